"""Timing with CUDA events for the benchmarks and scripts (``benchmarks/``, ``scripts/``), plus
the environment record of a result file.

Self-contained on purpose (torch and the standard library only, nothing from ``mxep``):
``scripts/ab_simulated.py`` loads this file by its path to time two source trees with the same
clock, whichever ``mxep`` each tree's ``PYTHONPATH`` brings.

Method (docs/benchmarks.md):

* **Aligned median** (``time_aligned``, the headline number). Each iteration: a short device
  sleep (so the host can queue the whole operation before the GPU reaches it: launch gaps of a
  sync-free op stay out of the number, a host sync inside the op stays in), then a tiny NCCL
  all-reduce that every rank leaves at nearly the same moment (the device-side barrier), then
  ``start`` event, one call, ``end`` event. After warm-up, ``iters`` such samples; each rank takes
  its median; the reported time is the **max over ranks of the per-rank medians**.
* **Pipelined** (``time_pipelined``): events around ``iters`` back-to-back calls, divided by
  ``iters`` (max over ranks). Only meaningful for operations without a host sync.
* On CPU (``--cpu-smoke``: gloo, Triton interpreter) the same functions use ``dist.barrier`` and
  ``time.perf_counter``; those numbers only prove the plumbing.

Everything that touches other ranks is collective: every rank must call these functions in the
same order.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist

__all__ = [
    "Measurement",
    "guarded",
    "gather",
    "time_aligned",
    "time_pipelined",
    "time_queued_us",
    "kernel_profile",
    "kernel_time_us",
    "busy_back_to_back",
    "capture_graph",
    "environment",
    "short_error",
]

_SLEEP_CYCLES_PER_US: dict[int, float] = {}
_ALIGN_BUF: dict[str, torch.Tensor] = {}


def _cuda(device: torch.device) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device: torch.device) -> None:
    if _cuda(device):
        torch.cuda.synchronize(device)   # debug-only: benchmark timing (mxep.testing), never the library's hot path


def gather(obj: Any, group=None) -> list:
    """``all_gather_object``: every rank gets the list of every rank's ``obj``."""
    out: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def short_error(exc: BaseException, limit: int = 600) -> str:
    """``Type: message`` on one line (the first ``limit`` characters)."""
    msg = f"{type(exc).__name__}: {exc}".replace("\n", " | ")
    return msg if len(msg) <= limit else msg[:limit] + " ..."


def guarded(name: str, fn: Callable[[], Any], group=None, device: torch.device | None = None,
            log: Callable[[str], None] = print) -> tuple[Any, str | None]:
    """Run ``fn()`` on every rank; return ``(result, None)`` or ``(None, error)``.

    The error string is the same on every rank (gathered: rank r's failure is seen by all), so
    callers can skip dependent work consistently and collectives stay in step. A failure that
    leaves ranks out of step (one rank raising inside a collective) cannot be repaired here: the
    launcher's timeout and the NCCL watchdog end that run; results written so far survive.
    """
    err = None
    result = None
    try:
        result = fn()
        if device is not None:
            _sync(device)
    except Exception as exc:  # noqa: BLE001 - every failure is recorded, the suite goes on
        err = short_error(exc)
        log(f"[{name}] rank {dist.get_rank()} failed: {err}\n{traceback.format_exc()}")
        if device is not None:
            try:
                _sync(device)
            except Exception:  # noqa: BLE001
                pass
    errors = gather(err, group)
    bad = [(r, e) for r, e in enumerate(errors) if e is not None]
    if not bad:
        return result, None
    r, e = bad[0]
    return None, f"rank {r}: {e}"


# --------------------------------------------------------------------------------- device helpers
def _cycles_per_us(device: torch.device) -> float:
    """Calibrate ``torch.cuda._sleep`` (cycles -> microseconds) once per device."""
    idx = torch.device(device).index or 0
    if idx not in _SLEEP_CYCLES_PER_US:
        torch.cuda._sleep(1000)  # load the kernel
        cycles = 2_000_000
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        best = float("inf")
        for _ in range(3):
            s.record()
            torch.cuda._sleep(cycles)
            e.record()
            e.synchronize()
            best = min(best, s.elapsed_time(e) * 1000.0)
        _SLEEP_CYCLES_PER_US[idx] = cycles / max(best, 1.0)
    return _SLEEP_CYCLES_PER_US[idx]


def _align(device: torch.device, group) -> None:
    """Device-side rank alignment: a one-element all-reduce on the current stream."""
    key = str(device)
    if key not in _ALIGN_BUF:
        _ALIGN_BUF[key] = torch.zeros(1, dtype=torch.float32, device=device)
    dist.all_reduce(_ALIGN_BUF[key], group=group)


def _host_enqueue_us(fn: Callable[[], Any], device: torch.device, group) -> float:
    """Host time to issue one call (includes any host sync inside ``fn``); max over ranks."""
    _sync(device)
    dist.barrier(group=group)
    t0 = time.perf_counter()
    fn()
    t1 = time.perf_counter()
    _sync(device)
    return max(gather((t1 - t0) * 1e6, group))


class Measurement(dict):
    """A plain dict (JSON-ready) with the summary of one timed operation.

    Keys: ``median_us`` (max over ranks of each rank's median), ``per_rank_median_us``,
    ``per_rank_min_us``, ``per_rank_max_us``, ``samples_us`` (every rank's raw samples),
    ``iters``, ``warmup``, ``method``, plus method-specific keys.
    """


def _summarize(per_rank: list[list[float]], method: str, iters: int, warmup: int, **extra) -> Measurement:
    med = [statistics.median(v) for v in per_rank]
    return Measurement(
        median_us=max(med),
        per_rank_median_us=med,
        per_rank_min_us=[min(v) for v in per_rank],
        per_rank_max_us=[max(v) for v in per_rank],
        samples_us=[[round(t, 3) for t in v] for v in per_rank],
        iters=iters,
        warmup=warmup,
        method=method,
        **extra,
    )


def time_aligned(fn: Callable[[], Any], *, device: torch.device, group=None, warmup: int = 5,
                 iters: int = 50, sleep_us: float | None = None,
                 setup: Callable[[], Any] | None = None) -> Measurement:
    """Median over ``iters`` barrier-aligned single calls of ``fn`` (see module docstring).
    ``setup`` (untimed) runs before every call, ahead of the alignment: e.g. the dispatch
    before a timed combine, so that the combine runs as it does in a training step."""
    device = torch.device(device)
    setup = setup or (lambda: None)
    for _ in range(warmup):
        setup()
        fn()
    if not _cuda(device):
        times = []
        for _ in range(iters):
            setup()
            dist.barrier(group=group)
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e6)
        return _summarize(gather(times, group), "host-clock-barrier", iters, warmup)

    setup()
    host_us = _host_enqueue_us(fn, device, group)
    if sleep_us is None:
        # Long enough for the host to queue one whole call before the GPU gets there.
        sleep_us = min(max(1.5 * host_us + 30.0, 50.0), 50_000.0)
    cycles = int(sleep_us * _cycles_per_us(device))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    _sync(device)
    dist.barrier(group=group)
    for i in range(iters):
        setup()
        torch.cuda._sleep(cycles)
        _align(device, group)
        starts[i].record()
        fn()
        ends[i].record()
    _sync(device)
    times = [s.elapsed_time(e) * 1000.0 for s, e in zip(starts, ends)]
    return _summarize(gather(times, group), "cuda-events-aligned", iters, warmup,
                      host_enqueue_us=host_us, sleep_us=sleep_us)


def time_pipelined(fn: Callable[[], Any], *, device: torch.device, group=None, warmup: int = 3,
                   iters: int = 20, reps: int = 3) -> Measurement:
    """Per-call time of ``iters`` back-to-back calls (``reps`` repetitions; median per rank, max
    over ranks). For operations with no host sync."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(reps):
        _sync(device)
        dist.barrier(group=group)
        if _cuda(device):
            torch.cuda._sleep(int(200.0 * _cycles_per_us(device)))
            _align(device, group)
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            for _ in range(iters):
                fn()
            e.record()
            e.synchronize()
            samples.append(s.elapsed_time(e) * 1000.0 / iters)
        else:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            samples.append((time.perf_counter() - t0) * 1e6 / iters)
    return _summarize(gather(samples, group), "cuda-events-back-to-back" if _cuda(device) else "host-clock",
                      iters, warmup, reps=reps)


def kernel_time_us(fn: Callable[[], Any], device: torch.device, steps: int = 3) -> float:
    """The GPU's kernel time of one ``fn()`` call, µs: the union of the intervals of its CUDA
    kernels (and memsets / copies) under torch.profiler, the mean over ``steps`` calls, each
    synced (the profiler changes no kernel's duration; gaps between kernels do not count). The
    numerator of a GPU busy fraction: this over the call's time back to back."""
    from torch.profiler import ProfilerActivity, profile
    spans = []
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            _sync(device)
            fn()
            _sync(device)
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            spans.append((ev.time_range.start, ev.time_range.end))
    return union_length(spans)[0] / steps


def union_length(spans) -> tuple[float, float]:
    """``(length of the union of the intervals (start, end), span from the first start to the
    last end)``: overlapping kernels (two streams) count once; ``(0.0, 0.0)`` for none."""
    busy, end, first = 0.0, float("-inf"), None
    for a, b in sorted(spans):
        first = a if first is None else first
        if b > end:
            busy += b - max(a, end)
            end = b
    return busy, (0.0 if first is None else end - first)


def busy_back_to_back(fn: Callable[[], Any], device: torch.device, steps: int = 6) -> dict:
    """How busy the GPU is while ``steps`` ``fn()`` calls run back to back (no sync between
    them), under torch.profiler: ``{"busy": union of the kernels' intervals / span from the first
    kernel's start to the last one's end, "kernel_us_per_step": that union / steps}``. Measured
    on the back-to-back run itself, so a GPU that runs slower when fed without pauses (clocks
    lowered under a power or thermal cap) is not counted as idle: only gaps between kernels are.
    (The profiler adds a few microseconds of host time per launch; a host-bound step shows
    slightly lower here than without it.)"""
    from torch.profiler import ProfilerActivity, profile
    fn()
    _sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        _sync(device)
    busy, span = union_length([(ev.time_range.start, ev.time_range.end) for ev in prof.events()
                               if ev.device_type == torch.autograd.DeviceType.CUDA])
    if span <= 0:
        return {"busy": None, "kernel_us_per_step": None}
    return {"busy": busy / span, "kernel_us_per_step": busy / steps}


def capture_graph(fn: Callable[[], Any]) -> "torch.cuda.CUDAGraph":
    """A CUDA graph of one ``fn()`` call (two warm-up calls first, on a side stream, as
    ``torch.cuda.graphs`` requires). Collective: every rank captures the same calls."""
    graph = torch.cuda.CUDAGraph()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    with torch.cuda.graph(graph):
        fn()
    return graph


# --------------------------------------------------------------------------------- environment
def _run(cmd: list[str]) -> str | None:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip() or None
    except Exception:  # noqa: BLE001 - not every machine has every tool
        return None


def environment() -> dict:
    """Card, driver, versions (called on one rank; reads no other rank)."""
    import triton

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
    }
    try:
        env["nccl"] = ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001
        env["nccl"] = short_error(exc)
    if torch.cuda.is_available():
        env["gpu_count"] = torch.cuda.device_count()
        env["gpu_name"] = torch.cuda.get_device_name(0)
        props = torch.cuda.get_device_properties(0)
        env["sm_count"] = props.multi_processor_count
        env["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
    else:
        env["gpu_count"] = 0
    smi = _run(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total,clocks.max.sm",
                "--format=csv,noheader"])
    env["nvidia_smi"] = smi.splitlines() if smi else None
    if smi:
        env["driver"] = smi.splitlines()[0].split(",")[2].strip()
    env["nvidia_smi_topo"] = _run(["nvidia-smi", "topo", "-m"])
    env["git_commit"] = _run(["git", "rev-parse", "HEAD"])
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    env["git_dirty"] = bool(status)
    env["env_vars"] = {k: os.environ.get(k) for k in (
        "CUDA_VISIBLE_DEVICES", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS",
        "NVSHMEM_SYMMETRIC_SIZE", "TRITON_INTERPRET", "OMP_NUM_THREADS")}
    return env


# --------------------------------------------------------------------------------- one process
def time_queued_us(fn: Callable[[], Any], device: torch.device, reps: int = 20, warmup: int = 3,
                   queue_ms: float = 30.0, host_inclusive: bool = True) -> dict:
    """One process, one GPU (the simulated world): per call, a ``queue_ms`` device sleep first, so
    the host has queued the whole call before the GPU reaches it, then events around the call.
    ``device_us`` (median): the GPU's time for the call's kernels with the host's launch gaps
    hidden; ``host_inclusive_us`` (median, no sleep): what an eager caller sees when the host
    issues the launches as the GPU runs them; left out with ``host_inclusive=False``. CPU
    (plumbing only): the host clock for both."""
    for _ in range(warmup):
        fn()
    if not _cuda(device):
        ts = []
        for _ in range(max(1, reps // 10)):
            t0 = time.perf_counter()
            fn()
            ts.append((time.perf_counter() - t0) * 1e6)
        return {"device_us": statistics.median(ts), "host_inclusive_us": statistics.median(ts)}
    cycles = int(_cycles_per_us(device) * queue_ms * 1e3)
    out = {}
    for key, sleep in (("device_us", True), ("host_inclusive_us", False))[:2 if host_inclusive else 1]:
        torch.cuda.synchronize(device)   # debug-only: benchmark timing
        ts = []
        for _ in range(reps):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            if sleep:
                torch.cuda._sleep(cycles)
            a.record()
            fn()
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) * 1e3)
        out[key] = statistics.median(ts)
    return out


def kernel_profile(fn: Callable[[], Any], device: torch.device, steps: int = 3, top: int = 20,
                   gaps: int = 0) -> list[dict]:
    """The GPU kernels of ``steps`` calls of ``fn`` under torch.profiler: per kernel name, device
    µs per call and share of the call's kernel time, largest first; the rest as ``(other)``.
    ``gaps``: also that many of the longest idle stretches between two kernels of the last call
    (``{"kernel": "(idle before NAME)", "us_per_call": gap, "after": PREVIOUS}``), the first
    one measured from the call's first kernel."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
            _sync(device)
    totals: dict = {}
    kernels = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            totals[ev.name] = totals.get(ev.name, 0.0) + ev.time_range.elapsed_us() / steps
            kernels.append((ev.time_range.start, ev.time_range.end, ev.name))
    whole = sum(totals.values()) or 1.0
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    out = [{"kernel": k[:120], "us_per_call": round(v, 1), "share": round(v / whole, 4)} for k, v in rows[:top]]
    rest = sum(v for _, v in rows[top:])
    if rest:
        out.append({"kernel": "(other)", "us_per_call": round(rest, 1), "share": round(rest / whole, 4)})
    if gaps and kernels:
        kernels.sort()
        per_call = len(kernels) // steps
        last = kernels[-per_call:]            # the last call's kernels (every call launches the same ones)
        found, end, prev = [], last[0][1], last[0][2]
        for start, stop, name in last[1:]:
            if start > end:
                found.append((start - end, name, prev))
            if stop > end:
                end, prev = stop, name
        span = last[-1][1] - last[0][0]
        busy = sum(b - a for a, b, _ in last)
        for gap, name, before in sorted(found, reverse=True)[:gaps]:
            out.append({"kernel": f"(idle before {name[:80]})", "us_per_call": round(gap, 1),
                        "after": before[:80], "share": None})
        out.append({"kernel": "(first kernel to last, one call)", "us_per_call": round(span, 1),
                    "busy_us": round(busy, 1), "share": None})
    return out
