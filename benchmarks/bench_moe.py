"""MoE layer benchmark: forward + backward of one expert-parallel MoE layer, every system run from
the same weights, routing and inputs, in one launch.

    python benchmarks/bench_moe.py                                     # one GPU: world 1 (NCCL)
    torchrun --standalone --nproc_per_node=N benchmarks/bench_moe.py   # N GPUs: world N (NCCL)
    python benchmarks/bench_moe.py --smoke --out-dir /tmp/x            # CPU, gloo world 1, tiny shapes,
                                                                       # TRITON_INTERPRET=1 (plumbing only)
    python benchmarks/bench_moe.py --configs dsv3 --tokens 512,2048,4096   # issue 23's sweep, one GPU

Systems (names in the JSON):
  mxep           mxep.MoE (fused MXFP8 dispatch, MXFP8 expert GEMMs, mx_weights=True), the MX
                 weight cache rebuilt before every step: the cost of one optimizer step per step
  mxep_accum     the same layer with the cache warm: a micro-batch of gradient accumulation after
                 the first one (weights unchanged since the last step)
  mxep_graph     the mxep step captured once in a CUDA graph and replayed with new inputs
                 (mxep.moe.capture.CapturedStep: the copy-in and one graph launch per step; the MX
                 weights are quantized inside the graph, i.e. rebuilt every step); its output and
                 input gradient must equal mxep's bit for bit (checked). --smoke: mode="eager"
                 (no CUDA graphs on a CPU: the same static-buffer step, run eagerly)
  mxep_nocache   mxep.MoE(mx_weight_cache=False): the MX weights quantized at every forward and
                 dequantized in every GEMM pass (forward and backward), as before the cache; its
                 output and input gradient must equal mxep's bit for bit (checked)
  mxep_bf16w     mxep.MoE(mx_weights=False): MXFP8 tokens and activations, bf16 weights
  mxep_rows      mxep.MoE(dispatch="rows"): the row-level dispatch (sorted expansion) in the layer
  mxep_cf        mxep.MoE(capacity_factor=1.25): every expert keeps at most 1.25x its balanced
                 share of rows (drops counted; the layer's saved activations bounded)
  bf16           mxep.moe.naive.BF16EPMoE: torchtitan's bf16 path (host-synced splits,
                 all_to_all_single of bf16 rows, permute, torch._grouped_mm, unpermute, all_to_all)
  bf16_local     mxep.moe.naive.BF16LocalMoE, world 1 only (skipped at world > 1): the plain bf16
                 MoE of the same math (router, stable sort by expert, torch._grouped_mm SwiGLU
                 experts, fp32 index_add of the gated rows): the bf16 EP layer without its
                 all-to-all and host sync, the strongest bf16 flow on one GPU (a per-expert loop
                 where torch._grouped_mm does not run)
  unfused_mxfp8  mxep.moe.naive.UnfusedMXFP8EPMoE: torchao-style (quantize, host-synced splits,
                 all_to_all of data and scales, permute + pad, MX grouped GEMMs emulated as
                 dequantize + bf16 torch._grouped_mm, weights quantized at every forward)

Configs (``--configs``), per rank: ``dsv3`` (H 7168, F 2048, 256 experts, top-8, 4096 tokens) and
``llama4`` (H 5120, F 8192, 16 experts, top-1, 8192 tokens); ``--tokens 512,2048,4096`` runs each
config at each of those token counts per rank instead (named ``dsv3_t512``, ...). ``--world1`` (the default on a
single rank) scales them to fit one GPU while keeping the experts per rank of an EP group of
``--ref-ep`` (8) ranks: ``experts = E / ref_ep * world`` (DSv3-like at world 1: 32 experts, top-8,
4096 tokens; Llama4-like: 2 experts, top-1, 8192 tokens). ``--no-world1``: the full expert counts
split over the launch's ranks. The scaled configs are printed and recorded.

METHOD. Timing with torch.cuda.Event, baseline in the same run: per system, ``--warmup`` steps,
then ``--iters`` timed steps, each one: gradients set to None, device sync + barrier (all ranks
start together, the GPU idle), start event, ``y = layer(x); y.backward(dy)``, end event; the
step time is the median over the steps (max over ranks of the per-rank medians). Host launch
time the GPU cannot hide and host syncs inside a step (the baselines' split sizes) are in the
number, as in an eager training step. ``--weight-cache rebuilt|warm`` (default rebuilt): whether
the other layers with an MX weight cache (mxep_rows, mxep_cf) rebuild it before every step, as
mxep does, or keep it warm, as mxep_accum does (recorded per result as ``weight_cache``).
Host issue time (``host_issue_ms``): ``time.perf_counter`` around ``y = layer(x);
y.backward(dy)`` after a device sync (the GPU idle), not synced inside: how long the host takes
to issue the step (a host sync inside the step, the baselines' split sizes, waits for the GPU
and is in it); the median of ``--iters`` steps. Back to back (``pipelined_step_ms``): ``--iters / 2``
steps issued without a sync between them, CUDA events around all of them, divided by their
number; no profiler. GPU busy fraction back to back (``gpu_busy_fraction``): the same
back-to-back steps run again under torch.profiler, the union of their kernels' intervals over
the span from the first kernel's start to the last one's end (1.0: the GPU never waits for the
host; only gaps between kernels count as idle; CPU: None). ``kernel_slowdown_back_to_back``:
the kernel time per step in that run over the kernel time of a synced step (the mean of 3, the
profiler changes no kernel's duration; ``kernel_us_per_step``): above 1 where the GPU runs its
kernels slower when fed without pauses (clocks lowered under a power cap), which is not idle
time. Peak memory: ``torch.cuda.max_memory_allocated`` over one
more step (stats reset before it; ``peak_step_bytes`` = the peak above what was allocated
before the step: activations, gradients, workspaces; mxep's symmetric-memory Buffer is not
allocated by the caching allocator and counts in neither). Saved activations: the bytes of the
unique storages packed by ``torch.autograd.graph.saved_tensors_hooks`` during one forward,
parameters and the MX weight cache left out (``saved_total_bytes`` keeps them). Tokens/s per
GPU: tokens per rank / step time. Correctness: every system's output ``y`` and input gradient
``dx`` against the bf16 layer's, as SQNR (dB, min over ranks); systems with MXFP8 weights must
reach ``--min-sqnr-db-mx-weights`` (default 20: four MXFP8 quantization points, tokens, weights,
activation, second weights, measure about 23.5 dB against bf16 on Gaussian data), the others
``--min-sqnr-db`` (25: tokens and activation); mxep must match the unfused MXFP8 layer (the
same numerics) to ``--min-sqnr-db-same`` (40). A failed check is printed and recorded; the
run goes on.

Output (rank 0) in ``--out-dir`` (default benchmarks/results/moe): ``bench_moe_w<W>[_smoke].json``
(every number), ``.md`` (the table) and ``.png`` (if matplotlib imports).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback

if "--smoke" in sys.argv:   # before anything imports triton: the CPU smoke run uses its interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)   # never NVLink multicast (docs/benchmarks.md)

HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import mxep  # noqa: E402
from mxep.format.mxfp8 import MXFP8Tensor  # noqa: E402
from mxep.gemm import MXWeightCache  # noqa: E402
from mxep.moe.capture import CapturedStep  # noqa: E402
from mxep.moe.naive import BF16EPMoE, BF16LocalMoE, UnfusedMXFP8EPMoE  # noqa: E402
from mxep.testing import sqnr_db  # noqa: E402
from mxep.testing.launch import free_port  # noqa: E402
from mxep.testing.timing import busy_back_to_back, environment, kernel_profile, kernel_time_us  # noqa: E402

SYSTEMS = ("bf16", "bf16_local", "unfused_mxfp8", "mxep", "mxep_accum", "mxep_graph", "mxep_nocache", "mxep_bf16w",
           "mxep_rows", "mxep_cf")
MX_WEIGHT_SYSTEMS = ("unfused_mxfp8", "mxep", "mxep_accum", "mxep_graph", "mxep_nocache", "mxep_rows", "mxep_cf")
MXEP_SYSTEMS = ("mxep", "mxep_accum", "mxep_graph", "mxep_nocache", "mxep_bf16w", "mxep_rows", "mxep_cf")
# systems with a layer (a Buffer) of their own; the others share one mxep.MoE
OWN_LAYER = {"mxep_rows": dict(dispatch="rows"), "mxep_cf": dict(capacity_factor=1.25), "mxep_graph": {}}
# systems whose MX weight cache follows --weight-cache (mxep: always rebuilt; mxep_accum: always warm;
# mxep_graph quantizes inside its graph)
CACHE_FLAG_SYSTEMS = ("mxep_rows", "mxep_cf")
WORLD1_ONLY = ("bf16_local",)
# the baselines every mxep system's speedup is given against
BASELINES = ("bf16", "bf16_local", "unfused_mxfp8", "mxep_nocache")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    name: str
    label: str
    hidden: int
    ffn: int
    experts: int      # global
    top_k: int
    tokens: int       # per rank


CONFIGS = {
    "dsv3": MoEConfig("dsv3", "DSv3-like", 7168, 2048, 256, 8, 4096),
    "llama4": MoEConfig("llama4", "Llama4-like", 5120, 8192, 16, 1, 8192),
}
# --smoke: the same code paths on tiny shapes (CPU, Triton interpreter); same expert scaling.
SMOKE_CONFIGS = {
    "dsv3": MoEConfig("dsv3", "DSv3-like (smoke)", 32, 32, 16, 2, 4),
    "llama4": MoEConfig("llama4", "Llama4-like (smoke)", 32, 32, 16, 1, 8),
}


def scale_config(cfg: MoEConfig, world: int, world1: bool, ref_ep: int) -> MoEConfig:
    """``world1``: keep the experts per rank of an EP group of ``ref_ep`` ranks (``E / ref_ep``
    per rank, ``E / ref_ep * world`` in all); else the full ``E`` over ``world`` ranks."""
    if world1:
        if cfg.experts % ref_ep:
            raise SystemExit(f"{cfg.name}: {cfg.experts} experts do not split over --ref-ep {ref_ep}")
        experts = cfg.experts // ref_ep * world
        label = f"{cfg.label}, scaled: {cfg.experts // ref_ep} experts/rank as at EP {ref_ep}"
    else:
        if cfg.experts % world:
            raise SystemExit(f"{cfg.name}: {cfg.experts} experts do not split over {world} ranks")
        experts, label = cfg.experts, cfg.label
    return dataclasses.replace(cfg, experts=experts, top_k=min(cfg.top_k, experts), label=label)


# --------------------------------------------------------------------------------- set-up
def init(cpu: bool, timeout_s: float) -> tuple[int, int, torch.device]:
    """torchrun's environment if there is one, else a one-process world."""
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
        kw = {"init_method": "env://"}
    else:
        rank, world, local = 0, 1, 0
        kw = {"init_method": f"tcp://127.0.0.1:{free_port()}", "rank": 0, "world_size": 1}
    if cpu:
        dist.init_process_group("gloo", timeout=timeout, **kw)
        return rank, world, torch.device("cpu")
    device = torch.device("cuda", local)
    torch.cuda.set_device(device)
    torch.empty(1, device=device)
    dist.init_process_group("nccl", device_id=device, timeout=timeout, **kw)
    return rank, world, device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reduce(value: float, op, device: torch.device) -> float:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=op)
    return float(t.item())


# --------------------------------------------------------------------------------- weights and inputs
def make_state(cfg: MoEConfig, world: int, rank: int, device: torch.device, seed: int) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """The weights every system loads (router replicated: one seed for all ranks; this rank's
    experts: a seed per rank), the tokens ``x`` and the output gradient ``dy`` of this rank."""
    H, Fh, L = cfg.hidden, cfg.ffn, cfg.experts // world

    def gen(s):
        return torch.Generator(device=device).manual_seed(seed * 1_000_003 + s)

    bf = torch.bfloat16
    state = {
        "router": torch.randn(cfg.experts, H, generator=gen(1), device=device) / H ** 0.5,
        "w13": torch.randn(L, 2 * Fh, H, generator=gen(100 + rank), device=device, dtype=bf) * (1 / H ** 0.5),
        "w2": torch.randn(L, H, Fh, generator=gen(200 + rank), device=device, dtype=bf) * (1 / Fh ** 0.5),
    }
    x = torch.randn(cfg.tokens, H, generator=gen(300 + rank), device=device, dtype=bf)
    dy = torch.randn(cfg.tokens, H, generator=gen(400 + rank), device=device, dtype=bf)
    return state, x, dy


def build(system: str, cfg: MoEConfig, device: torch.device, state: dict, mxep_layer=None, transport: str = "auto"):
    """The layer of ``system`` with ``state``'s weights; the mxep systems share one mxep.MoE
    (one Buffer), switched by its attributes; ``transport``: their Buffer's."""
    H, Fh, E, k = cfg.hidden, cfg.ffn, cfg.experts, cfg.top_k
    if system in OWN_LAYER:
        m = mxep.MoE(H, Fh, E, k, max_tokens_per_rank=cfg.tokens, device=device, transport=transport,
                     **OWN_LAYER[system])
    elif system in MXEP_SYSTEMS:
        m = mxep_layer or mxep.MoE(H, Fh, E, k, max_tokens_per_rank=cfg.tokens, device=device, transport=transport)
        m.mx_weights = system != "mxep_bf16w"
        m.mx_weight_cache = system != "mxep_nocache"
        m.clear_mx_weight_cache()
    elif system == "bf16":
        m = BF16EPMoE(H, Fh, E, k, device=device)
    elif system == "bf16_local":
        m = BF16LocalMoE(H, Fh, E, k, device=device)
    elif system == "unfused_mxfp8":
        m = UnfusedMXFP8EPMoE(H, Fh, E, k, device=device)
    else:
        raise ValueError(system)
    m.load_state_dict(state)
    return m


# --------------------------------------------------------------------------------- measurements
def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    if isinstance(t, MXFP8Tensor):
        return [t.qdata, t.scale]
    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return [u for n in names for u in _plain_tensors(getattr(t, n))]
    return [t]


def _storage_key(t: torch.Tensor):
    st = t.untyped_storage()
    return (str(t.device), st.data_ptr()), st.nbytes()


def state_tensors(m: torch.nn.Module) -> list[torch.Tensor]:
    """Parameters and MX weight cache entries: state that outlives a step, not activations."""
    out = list(m.parameters()) + list(m.buffers())
    for v in vars(m).values():
        if isinstance(v, MXWeightCache):
            out += v.tensors()
    return out


def measured_forward(m, x: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """One forward under saved_tensors_hooks: (y, {saved_total_bytes, saved_activation_bytes})."""
    seen: dict = {}

    def pack(t):
        for u in _plain_tensors(t):
            key, nbytes = _storage_key(u)
            seen[key] = nbytes
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = m(x)
    persistent = {_storage_key(t)[0] for t in state_tensors(m)}
    total = sum(seen.values())
    act = sum(b for k, b in seen.items() if k not in persistent)
    return y, {"saved_total_bytes": total, "saved_activation_bytes": act}


def run_system(system, m, x, dy, device, args) -> tuple[dict, dict]:
    """Warm-up (the first step also measures saved activations and keeps y, dx), memory,
    timing. Returns (record, {"y": y, "dx": dx})."""
    params = list(m.parameters())
    xin = x.detach().clone().requires_grad_(True)

    rebuild = system == "mxep" or (system in CACHE_FLAG_SYSTEMS and args.weight_cache == "rebuilt")

    def setup():
        for p in params:
            p.grad = None
        xin.grad = None
        if rebuild:   # an optimizer step before every step: the cache rebuilds
            m.clear_mx_weight_cache()

    def step():
        y = m(xin)
        y.backward(dy)
        return y

    rec: dict = {"weight_cache": "rebuilt" if rebuild else "warm" if system in MX_WEIGHT_SYSTEMS else None}
    setup()
    y, saved = measured_forward(m, xin)
    y.backward(dy)
    outputs = {"y": y.detach(), "dx": xin.grad.detach().clone()}
    # (y's autograd graph would keep the parameters' gradient accumulators, made on the default
    # stream, alive into mxep_graph's capture: a capture cannot wait on the default stream)
    del y
    rec.update(saved)
    if system == "mxep_graph":
        # the same layer, its step captured (after the eager step above: saved activations, y, dx)
        mode = "graph" if device.type == "cuda" else "eager"
        rec["weight_cache"] = "rebuilt (in the graph)" if mode == "graph" else "warm"
        captured = CapturedStep(m, x.shape[0], mode=mode)
        y_graph, dx_graph = captured(x, dy)
        outputs = {"y": y_graph.detach().clone(), "dx": dx_graph.detach().clone()}

        def setup():
            pass

        def step():
            return captured(x, dy)[0]
    for _ in range(max(args.warmup - 1, 0)):
        setup()
        step()
    if device.type == "cuda":
        setup()
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        peak = torch.cuda.max_memory_allocated(device)
        rec["peak_bytes"] = peak
        rec["peak_step_bytes"] = peak - before
        rec["allocated_before_bytes"] = before
    issue = []
    for _ in range(args.iters):   # host issue time: the GPU idle before, no sync inside
        setup()
        _sync(device)
        t0 = time.perf_counter()
        step()
        issue.append((time.perf_counter() - t0) * 1e3)
    _sync(device)
    rec["host_issue_ms"] = statistics.median(issue)
    times = []
    for _ in range(args.iters):
        setup()
        _sync(device)
        dist.barrier()
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            step()
            e.record()
            e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            step()
            times.append((time.perf_counter() - t0) * 1e3)
    if device.type == "cuda" and system in args.profile.split(","):
        rec["kernel_profile"] = kernel_profile(lambda: (setup(), step()), device, gaps=6)
    if device.type == "cuda":
        # back to back, no sync between steps (a model's layers keep the GPU fed): the host's
        # launch latency of one step is hidden behind the previous one
        n = max(args.iters // 2, 1)
        _sync(device)
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        for _ in range(n):
            setup()
            step()
        e.record()
        e.synchronize()
        rec["pipelined_step_ms"] = s.elapsed_time(e) / n
        rec["kernel_us_per_step"] = kernel_time_us(lambda: (setup(), step()), device)
        b2b = busy_back_to_back(lambda: (setup(), step()), device, steps=n)
        rec["gpu_busy_fraction"] = b2b["busy"]
        # kernel time per step back to back over synced: above 1 where the GPU runs slower fed
        # without pauses (clocks under a power cap), which a busy fraction cannot show
        rec["kernel_slowdown_back_to_back"] = (None if b2b["kernel_us_per_step"] is None else
                                               b2b["kernel_us_per_step"] / rec["kernel_us_per_step"])
    else:
        rec["gpu_busy_fraction"] = None   # no GPU: nothing to keep busy
    rec["times_ms"] = [round(t, 4) for t in times]
    rec["rank_median_ms"] = statistics.median(times)
    rec["weight_cache_bytes"] = sum(v.nbytes for v in vars(m).values() if isinstance(v, MXWeightCache))
    return rec, outputs


# --------------------------------------------------------------------------------- report
def _finite(obj):
    """Strict JSON: non-finite floats (an SQNR of identical outputs is +inf) become strings."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _fmt(v, scale=1.0, digits=2):
    return "-" if v is None else f"{v / scale:.{digits}f}"


def markdown(data: dict) -> str:
    lines = [f"# MoE layer forward + backward, world {data['world']}{' (smoke: CPU, meaningless times)' if data['smoke'] else ''}",
             "", data["method"], ""]
    for name, cfg in data["configs"].items():
        lines += [f"## {name}: {cfg['label']}",
                  f"H {cfg['hidden']}, F {cfg['ffn']}, {cfg['experts']} experts ({cfg['experts'] // data['world']}/rank), "
                  f"top-{cfg['top_k']}, {cfg['tokens']} tokens/rank", "",
                  "| system | step ms | host issue ms | back-to-back ms | GPU busy | tokens/s/GPU | peak GiB | "
                  "step peak GiB | saved act. MiB | weight cache MiB | SQNR y dB | SQNR dx dB | check | vs bf16 | "
                  "vs bf16_local | vs unfused | vs mxep_nocache |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in (r for r in data["results"] if r["config"] == name):
            if r.get("error"):
                lines.append(f"| {r['system']} | ERROR: {r['error'][:120]} |" + " |" * 15)
                continue
            sp = data["speedups"].get(name, {}).get(r["system"], {})
            lines.append("| " + " | ".join([
                r["system"], _fmt(r["step_ms"], 1, 3), _fmt(r.get("host_issue_ms"), 1, 3),
                _fmt(r.get("pipelined_step_ms"), 1, 3),
                "-" if r.get("gpu_busy_fraction") is None else f"{100 * r['gpu_busy_fraction']:.0f}%",
                _fmt(r["tokens_per_s_per_gpu"], 1, 0),
                _fmt(r.get("peak_bytes"), 2**30), _fmt(r.get("peak_step_bytes"), 2**30),
                _fmt(r["saved_activation_bytes"], 2**20, 1), _fmt(r["weight_cache_bytes"], 2**20, 1),
                _fmt(r.get("sqnr_y_db"), 1, 1), _fmt(r.get("sqnr_dx_db"), 1, 1), r.get("check", "-"),
                *(_fmt(sp.get(f"vs_{b}"), 1, 2) + ("x" if sp.get(f"vs_{b}") else "") for b in BASELINES)]) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(data: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # noqa: BLE001 - the PNG is optional
        return False
    names = list(data["configs"])
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in data["results"])]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(systems), 1)
    for j, s in enumerate(systems):
        ms = [next((r.get("step_ms") for r in data["results"] if r["config"] == c and r["system"] == s), None) or 0
              for c in names]
        act = [(next((r.get("saved_activation_bytes") for r in data["results"] if r["config"] == c and r["system"] == s),
                     None) or 0) / 2**20 for c in names]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(names))]
        axes[0].bar(xs, ms, width, label=s)
        axes[1].bar(xs, act, width, label=s)
    for ax, title in zip(axes, ("step time (fwd + bwd), ms", "saved activations per layer, MiB")):
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels([data["configs"][c]["label"].split(",")[0] for c in names])
        ax.set_title(title)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"MoE layer, world {data['world']}" + (" (CPU smoke)" if data["smoke"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------- main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma list of {','.join(CONFIGS)}")
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per system (default 3; smoke 1)")
    p.add_argument("--iters", type=int, default=None, help="timed steps per system (default 20; smoke 1)")
    p.add_argument("--world1", action=argparse.BooleanOptionalAction, default=None,
                   help="scale the configs to the experts per rank of an EP group of --ref-ep ranks "
                        "(default: on when the launch has one rank)")
    p.add_argument("--ref-ep", type=int, default=8, help="EP group size the --world1 scaling keeps the experts/rank of")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-sqnr-db", type=float, default=25.0, help="check for systems with bf16 weights")
    p.add_argument("--min-sqnr-db-mx-weights", type=float, default=20.0, help="check for systems with MXFP8 weights")
    p.add_argument("--min-sqnr-db-same", type=float, default=40.0, help="mxep against the unfused MXFP8 layer")
    p.add_argument("--out-dir", default=os.path.join(HERE, "results", "moe"))
    p.add_argument("--smoke", action="store_true", help="CPU, gloo world 1, tiny shapes, TRITON_INTERPRET=1")
    p.add_argument("--pg-timeout", type=float, default=600.0)
    p.add_argument("--transport", default="auto", choices=("auto", "symm_mem", "nvshmem", "collective"),
                   help="the mxep layers' Buffer transport ('nvshmem': token level only, so not mxep_rows; one "
                        "process cannot also hold symm_mem's CUDA symmetric memory)")
    p.add_argument("--profile", default="", help="comma list of systems whose step's kernels to profile (GPU)")
    p.add_argument("--tokens", default="", help="comma list of tokens per rank: every config at each (e.g. 512,2048,4096)")
    p.add_argument("--weight-cache", choices=("rebuilt", "warm"), default="rebuilt",
                   help="mxep_rows / mxep_cf: rebuild the MX weight cache before every step, or keep it warm")
    args = p.parse_args()
    args.warmup = (1 if args.smoke else 3) if args.warmup is None else args.warmup
    args.iters = (1 if args.smoke else 20) if args.iters is None else args.iters
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    bad = [s for s in systems if s not in SYSTEMS] + [c for c in names if c not in CONFIGS]
    if bad:
        raise SystemExit(f"unknown system(s)/config(s) {bad}; systems: {SYSTEMS}, configs: {tuple(CONFIGS)}")
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke for the CPU plumbing check")

    if args.smoke:
        torch.set_num_threads(1)   # tiny tensors: extra threads only contend (CI has 2 cores)
    rank, world, device = init(args.smoke, args.pg_timeout)
    world1 = (world == 1) if args.world1 is None else args.world1
    table = SMOKE_CONFIGS if args.smoke else CONFIGS
    configs = [scale_config(table[n], world, world1, args.ref_ep) for n in names]
    if args.tokens:
        try:
            sweep = [int(t) for t in args.tokens.split(",") if t.strip()]
        except ValueError:
            raise SystemExit(f"--tokens must be a comma list of positive ints, got {args.tokens!r}")
        if not sweep or min(sweep) <= 0:
            raise SystemExit(f"--tokens must be a comma list of positive ints, got {args.tokens!r}")
        configs = [dataclasses.replace(c, name=f"{c.name}_t{t}", tokens=t, label=f"{c.label}, {t} tokens")
                   for c in configs for t in sweep]
    torch.manual_seed(args.seed)

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    method = ("timing with torch.cuda.Event (host clock on CPU), baseline in the same run: "
              f"{args.warmup} warm-up steps, then the median of {args.iters} steps (fwd + bwd of one layer), "
              "each after a device sync and a barrier; max over ranks of the per-rank medians")
    data = {"script": "bench_moe.py", "world": world, "smoke": args.smoke, "world1_scaling": world1,
            "ref_ep": args.ref_ep, "device": str(device), "env": environment() if rank == 0 else None,
            "args": vars(args), "method": method,
            "configs": {c.name: dataclasses.asdict(c) for c in configs}, "results": [], "speedups": {},
            "checks": {}, "finished": False}
    log(f"bench_moe: world {world}, {device.type}, {'world-1 scaling' if world1 else 'full configs'}; {method}")

    for cfg in configs:
        log(f"== {cfg.name}: {cfg.label}: H {cfg.hidden}, F {cfg.ffn}, {cfg.experts} experts "
            f"({cfg.experts // world}/rank), top-{cfg.top_k}, {cfg.tokens} tokens/rank")
        state, x, dy = make_state(cfg, world, rank, device, args.seed)
        outs: dict = {}
        mxep_layer = None
        for system in [s for s in SYSTEMS if s in systems]:   # bf16 first: the reference
            if system in WORLD1_ONLY and world != 1:
                log(f"   {system:14s} skipped: a world-1 layer (every expert on one rank), this world has {world}")
                continue
            rec = {"config": cfg.name, "system": system, "tokens": cfg.tokens, "error": None}
            try:
                m = build(system, cfg, device, state, mxep_layer, args.transport)
                if getattr(m, "buffer", None) is not None:
                    rec["transport"] = m.buffer.transport_name
                if system in MXEP_SYSTEMS and system not in OWN_LAYER:
                    mxep_layer = m
                r, o = run_system(system, m, x, dy, device, args)
                rec.update(r)
                outs[system] = o
                del m
            except Exception as exc:  # noqa: BLE001 - recorded; the other systems still run
                traceback.print_exc()
                rec["error"] = f"{type(exc).__name__}: {exc}"[:600]
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if rec["error"] is None:
                rec["step_ms"] = _reduce(rec.pop("rank_median_ms"), dist.ReduceOp.MAX, device)
                rec["tokens_per_s_per_gpu"] = cfg.tokens / (rec["step_ms"] / 1e3)
                for key in ("peak_bytes", "peak_step_bytes", "saved_activation_bytes", "saved_total_bytes"):
                    if key in rec:
                        rec[key] = int(_reduce(rec[key], dist.ReduceOp.MAX, device))
                if "bf16" in outs:
                    ref = outs["bf16"]
                    rec["sqnr_y_db"] = _reduce(sqnr_db(outs[system]["y"], ref["y"]), dist.ReduceOp.MIN, device)
                    rec["sqnr_dx_db"] = _reduce(sqnr_db(outs[system]["dx"], ref["dx"]), dist.ReduceOp.MIN, device)
                    need = args.min_sqnr_db_mx_weights if system in MX_WEIGHT_SYSTEMS else args.min_sqnr_db
                    rec["sqnr_min_db"] = need
                    ok = system == "bf16" or (rec["sqnr_y_db"] >= need and rec["sqnr_dx_db"] >= need)
                    rec["check"] = "ok" if ok else "FAIL"
                if system in ("mxep", "mxep_accum") and "unfused_mxfp8" in outs:
                    rec["sqnr_y_vs_unfused_db"] = _reduce(sqnr_db(outs[system]["y"], outs["unfused_mxfp8"]["y"]),
                                                          dist.ReduceOp.MIN, device)
                    if rec["sqnr_y_vs_unfused_db"] < args.min_sqnr_db_same:
                        rec["check"] = "FAIL"
                if system in ("mxep_nocache", "mxep_graph") and "mxep" in outs:   # the cache / the graph changes no bit
                    same = all(torch.equal(outs[system][k], outs["mxep"][k]) for k in ("y", "dx"))
                    rec["bit_identical_to_mxep"] = _reduce(float(same), dist.ReduceOp.MIN, device) == 1.0
                    if not rec["bit_identical_to_mxep"]:
                        rec["check"] = "FAIL"
            data["results"].append(rec)
            if rec["error"]:
                log(f"   {system:14s} ERROR {rec['error']}")
            else:
                extra = "" if "sqnr_y_db" not in rec else (
                    f"  SQNR vs bf16 y {rec['sqnr_y_db']:6.1f} dB dx {rec['sqnr_dx_db']:6.1f} dB"
                    + (f" (vs unfused {rec['sqnr_y_vs_unfused_db']:.1f} dB)" if "sqnr_y_vs_unfused_db" in rec else "")
                    + (f" (bit-identical to mxep: {rec['bit_identical_to_mxep']})" if "bit_identical_to_mxep" in rec else "")
                    + f"  [{rec['check']}]")
                mem = "" if "peak_bytes" not in rec else (
                    f"  peak {rec['peak_bytes'] / 2**30:6.2f} GiB (step {rec['peak_step_bytes'] / 2**30:5.2f})")
                rec["host_issue_ms"] = _reduce(rec["host_issue_ms"], dist.ReduceOp.MAX, device)
                mem += f"  host issue {rec['host_issue_ms']:.3f} ms"
                if "pipelined_step_ms" in rec and rec["gpu_busy_fraction"] is not None:
                    rec["pipelined_step_ms"] = _reduce(rec["pipelined_step_ms"], dist.ReduceOp.MAX, device)
                    rec["gpu_busy_fraction"] = _reduce(rec["gpu_busy_fraction"], dist.ReduceOp.MIN, device)
                    rec["kernel_slowdown_back_to_back"] = _reduce(rec["kernel_slowdown_back_to_back"],
                                                                  dist.ReduceOp.MAX, device)
                    mem += (f"  back-to-back {rec['pipelined_step_ms']:.3f} ms, GPU busy "
                            f"{100 * rec['gpu_busy_fraction']:.0f}% (kernels x"
                            f"{rec['kernel_slowdown_back_to_back']:.2f} of synced)")
                log(f"   {system:14s} {rec['step_ms']:9.3f} ms  {rec['tokens_per_s_per_gpu']:12.0f} tok/s/GPU{mem}"
                    f"  saved act {rec['saved_activation_bytes'] / 2**20:8.1f} MiB{extra}")
                for k in rec.get("kernel_profile", []):
                    share = "      " if k["share"] is None else f"{100 * k['share']:5.1f}%"
                    extra = (f"  (after {k['after']})" if "after" in k else
                             f"  (kernels busy {k['busy_us']:.1f} us)" if "busy_us" in k else "")
                    log(f"      {k['us_per_call']:9.1f} us {share}  {k['kernel']}{extra}")
        del mxep_layer, outs, state, x, dy
        gc.collect()
        ms = {r["system"]: r["step_ms"] for r in data["results"] if r["config"] == cfg.name and not r["error"]}
        sp = {}
        for s in MXEP_SYSTEMS:
            if s in ms:
                sp[s] = {f"vs_{b}": ms[b] / ms[s] for b in BASELINES if b in ms and b != s}
        data["speedups"][cfg.name] = sp
        for s, v in sp.items():
            log(f"   speedup {s}: " + ", ".join(f"{k} {x:.2f}x" for k, x in v.items()))
    data["checks"] = {f"{r['config']}/{r['system']}": r.get("check") for r in data["results"]}
    data["finished"] = True

    if rank == 0:
        os.makedirs(args.out_dir, exist_ok=True)
        stem = os.path.join(args.out_dir, f"bench_moe_w{world}{'_smoke' if args.smoke else ''}")
        with open(stem + ".json", "w") as f:
            json.dump(_finite(data), f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write(markdown(data))
        png = plot(data, stem + ".png")
        print(f"wrote {stem}.json, {stem}.md" + (f", {stem}.png" if png else " (no matplotlib: no PNG)"), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
