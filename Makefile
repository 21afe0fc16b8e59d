# mxep: two set-up-complete commands (`make demo`, `make test`) plus GPU entry points.
# Every target first installs what it needs and is missing (scripts/ensure_deps.py: torch,
# Triton and numpy always, since Triton's CPU interpreter imports numpy; then the target's
# extras), and reuses an importable torch/triton (GPU machines are offline and bring their own
# builds). Then it installs this checkout itself in editable mode (pip install -e . --no-deps)
# into $(PYTHON)'s environment, so `import mxep` works in your own scripts too. `make demo` and
# `make test` work from a fresh virtualenv: the demo adds matplotlib; the tests add pytest and
# torchtitan 0.3.0 (Python >= 3.11, for tests/integrations/test_torchtitan.py), which pulls about
# 500 MB (pandas, pyarrow, wandb, datasets, tensorboard). Kernel settings are not environment
# variables: they are an mxep.EPConfig passed to the Buffer (README).
PYTHON ?= python3
# Fallback for where the editable install could not be made (ensure_deps says so).
export PYTHONPATH := $(CURDIR)/src:$(PYTHONPATH)
# Multi-GPU safety on the shared NVLink machines: never use NVLink multicast.
export NCCL_NVLS_ENABLE := 0
export TORCH_SYMM_MEM_DISABLE_MULTICAST := 1
export NVSHMEM_DISABLE_NVLS := 1
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c GPU)

.PHONY: deps demo test test-gpu bench gpu-session

# torch, Triton, numpy and mxep itself (editable), nothing else.
deps:
	@$(PYTHON) scripts/ensure_deps.py

# examples/demo.py: trains a small MoE transformer with mxep.MoE beside a dense bf16 twin on every
# rank (GPUs over NCCL, else 4 CPU ranks on gloo under the Triton interpreter), checks them and
# plots both loss curves (demo-loss.png, matplotlib). `python examples/demo.py --help` for knobs.
demo:
	@$(PYTHON) scripts/ensure_deps.py --demo
	@$(PYTHON) examples/demo.py

# CPU suite (what CI runs, .ci/run): Triton kernels run under the interpreter, distributed logic on
# gloo processes, plus the offline sm_90 compile of every kernel (scripts/compile_sm90.py). Installs
# pytest and torchtitan 0.3.0 first (see the top of this file).
test:
	@$(PYTHON) scripts/ensure_deps.py --test
	TRITON_INTERPRET=1 $(PYTHON) -m pytest -q -m "not gpu and not multigpu" tests

# GPU suite on whatever GPUs are visible (scripts/run_gpu_tests.py): the single-GPU tests (-m gpu)
# on one GPU and, with two or more, the multi-GPU tests (-m multigpu, 2 and 4 ranks where
# possible) on all of them, as two concurrent pytest processes: most of a first run is Triton
# compiling every kernel variant the tests launch. Logs: $(OUT)/tests/*.log. (The suite before
# the one-protocol tree, five processes, took 412 s on a cold 4 x H200 machine; docs/history.md.)
test-gpu:
	@$(PYTHON) scripts/ensure_deps.py --test
	$(PYTHON) scripts/run_gpu_tests.py --out $(OUT)/tests

# The dispatch / combine suite on every visible GPU (docs/benchmarks.md), then on the first
# visible GPU the grouped GEMM on the layout, to_mxfp8 against the copy ceiling and the
# token-level path on the simulated world, then the MoE layer on every visible GPU; outputs in
# benchmarks/results/. Needs a CUDA GPU: without one it stops at once (make test is the CPU suite).
bench:
	@[ "$(NGPU)" -gt 0 ] 2>/dev/null || { echo "make bench needs a CUDA GPU; nvidia-smi -L lists none here" \
		"(CPU plumbing check: $(PYTHON) benchmarks/run_all.py --cpu-smoke; CPU suite: make test)" >&2; exit 1; }
	@$(PYTHON) scripts/ensure_deps.py --bench
	$(PYTHON) benchmarks/run_all.py
	$(PYTHON) benchmarks/bench_grouped_gemm.py --out benchmarks/results/grouped_gemm.json
	$(PYTHON) benchmarks/bench_quantize.py --out benchmarks/results/quantize.json
	$(PYTHON) benchmarks/bench_route.py --out benchmarks/results/route.json
	$(PYTHON) benchmarks/bench_tokens_simulated.py --out benchmarks/results/tokens_simulated.json
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) benchmarks/bench_moe.py --out-dir benchmarks/results/moe

# One device-machine call that does everything in order (few, full calls): GPU tests, per-kernel
# device times, then the quick benchmark suite. OUT (default ./gpu-session) collects the logs.
# Every step runs whatever the ones before it did; the session then exits non-zero if any step
# failed, naming those steps (with their exit status) and their logs.
OUT ?= gpu-session
# $(call step_log,NAME): a step's output into $(OUT)/NAME.log; a failure noted in $(OUT)/failed-steps
step_log = > $(OUT)/$(1).log 2>&1 || echo "$(1) (rc $$?): $(OUT)/$(1).log" >> $(OUT)/failed-steps
gpu-session:
	@mkdir -p $(OUT); rm -f $(OUT)/failed-steps
	$(MAKE) test-gpu $(call step_log,test-gpu); tail -12 $(OUT)/test-gpu.log
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) scripts/profile_stages.py --config a,c --zero-copy $(call step_log,profile); grep -A12 "^## config" $(OUT)/profile.log || true
	$(PYTHON) benchmarks/run_all.py --quick --out-dir $(OUT)/bench $(call step_log,bench); sed -n '/## Summary/,/## All/p' $(OUT)/bench/results.md 2>/dev/null || tail -5 $(OUT)/bench.log
	$(PYTHON) benchmarks/bench_grouped_gemm.py --out $(OUT)/grouped_gemm.json $(call step_log,grouped_gemm); cat $(OUT)/grouped_gemm.log
	$(PYTHON) benchmarks/bench_quantize.py --shapes 32768x7168 16384x7168 --out $(OUT)/quantize.json $(call step_log,quantize); tail -8 $(OUT)/quantize.log
	$(PYTHON) benchmarks/bench_tokens_simulated.py --out $(OUT)/tokens_simulated.json $(call step_log,tokens_simulated); tail -5 $(OUT)/tokens_simulated.log
	$(PYTHON) -m torch.distributed.run --standalone --nproc_per_node=$(NGPU) benchmarks/bench_moe.py --profile mxep --out-dir $(OUT)/moe $(call step_log,moe); grep -E "^   |^==" $(OUT)/moe.log || true
	@if [ -s $(OUT)/failed-steps ]; then echo "gpu-session: these steps failed:" >&2; cat $(OUT)/failed-steps >&2; exit 1; fi; \
		echo "gpu-session: every step passed (logs in $(OUT)/)"
