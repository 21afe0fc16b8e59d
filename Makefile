# mxep: two set-up-complete commands (`make demo`, `make test`) plus GPU entry points.
# Every target installs what is missing and reuses an importable torch/triton (GPU machines
# are offline and bring their own builds).
PYTHON ?= python3
export PYTHONPATH := $(CURDIR)/src:$(PYTHONPATH)
# Multi-GPU safety on the shared NVLink machines: never use NVLink multicast.
export NCCL_NVLS_ENABLE := 0
export TORCH_SYMM_MEM_DISABLE_MULTICAST := 1
export NVSHMEM_DISABLE_NVLS := 1
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)

.PHONY: deps demo test test-gpu bench gpu-session

deps:
	@$(PYTHON) scripts/ensure_deps.py

demo: deps
	@$(PYTHON) -m mxep.demo

# CPU suite: Triton kernels run under the interpreter, distributed logic on gloo processes.
test:
	@$(PYTHON) scripts/ensure_deps.py --test
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not gpu and not multigpu" tests

# GPU suite: single-GPU tests plus multi-GPU tests on every visible GPU (2 and 4 ranks where
# possible), in every sync mode. Most of a first run is Triton compiling every kernel variant the
# tests launch, so the groups run as concurrent pytest processes (scripts/run_gpu_tests.py):
# a cold 4 x H200 machine took 412 s (2026-11-27, commit 1abf67d, 141 tests). Logs: $(OUT)/tests/*.log.
test-gpu:
	@$(PYTHON) scripts/ensure_deps.py --test
	$(PYTHON) scripts/run_gpu_tests.py --out $(OUT)/tests

# The dispatch / combine suite on every visible GPU (docs/benchmarks.md), then the grouped GEMM
# on the layout on the first visible GPU; outputs in benchmarks/results/.
bench:
	@$(PYTHON) scripts/ensure_deps.py --bench
	$(PYTHON) benchmarks/run_all.py
	$(PYTHON) benchmarks/bench_grouped_gemm.py --out benchmarks/results/grouped_gemm.json

# One device-machine call that does everything in order (few, full calls): GPU tests, per-kernel
# device times, then the quick benchmark suite. OUT (default ./gpu-session) collects the logs.
OUT ?= gpu-session
gpu-session:
	@mkdir -p $(OUT)
	-$(MAKE) test-gpu > $(OUT)/test-gpu.log 2>&1; tail -12 $(OUT)/test-gpu.log
	-$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) scripts/profile_stages.py --config a,c --zero-copy > $(OUT)/profile.log 2>&1; grep -A12 "^## config" $(OUT)/profile.log
	-$(PYTHON) benchmarks/run_all.py --quick --out-dir $(OUT)/bench > $(OUT)/bench.log 2>&1; sed -n '/## Summary/,/## All/p' $(OUT)/bench/results.md
	-$(PYTHON) benchmarks/bench_grouped_gemm.py --out $(OUT)/grouped_gemm.json > $(OUT)/grouped_gemm.log 2>&1; cat $(OUT)/grouped_gemm.log
