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

.PHONY: deps demo test test-gpu bench

deps:
	@$(PYTHON) scripts/ensure_deps.py

demo: deps
	@$(PYTHON) -m mxep.demo

# CPU suite: Triton kernels run under the interpreter, distributed logic on gloo processes.
test:
	@$(PYTHON) scripts/ensure_deps.py --test
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not gpu and not multigpu" tests

# GPU suite: single-GPU tests plus multi-GPU tests on every visible GPU (2 and 4 ranks where possible).
test-gpu:
	@$(PYTHON) scripts/ensure_deps.py --test
	$(PYTHON) -m pytest -q -x -m "gpu or multigpu" tests

bench:
	@$(PYTHON) scripts/ensure_deps.py --bench
	$(PYTHON) benchmarks/run_all.py
