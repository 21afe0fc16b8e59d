"""`python examples/train_gemm_impls.py`: train the same small MoE model twice on ONE GPU (world
1), once with ``mxep.MoE(gemm_impl="dequant")`` and once with ``gemm_impl="torchao"``, and
compare the loss curves and step times.

* ``dequant`` (mxep's default expert GEMMs off sm_100): the MXFP8 tokens and weights dequantized
  to bf16, ``torch._grouped_mm``; bf16 backward.
* ``torchao``: torchao's ``_to_mxfp8_then_scaled_grouped_mm`` (torchao 0.18.0, the ``torchao``
  extra). On sm_100+ ``KernelPreference.AUTO`` (MX tensor cores), below sm_100 ``EMULATED``
  (quantize + dequantize + bf16 grouped GEMM in plain torch ops: its step times are NOT those of
  an MX GEMM). Backward: torchao's recipe, an MXFP8 input gradient and a bf16 weight gradient.

Both forwards are the same MX GEMMs (bit for bit: tests/integrations/test_torchao.py), so the
first-step losses agree; the runs then drift apart by the backward's numerics only.

The model: token embeddings of the current and the two previous tokens (summed; no attention),
``--layers`` blocks of ``x + MoE(RMSNorm(x))`` (fp32 residual stream, bf16 into the MoE), a final
RMSNorm and an LM head, trained as a next-token predictor on the synthetic grammar of
examples/demo.py (deterministic, no download). Both runs start from the same weights (one model
built, its state copied into the other) and see the same batches (seeded); AdamW with a short
linear warm-up. The two runs advance in lock step (step s of ``dequant``, then step s of
``torchao``), so both see the same machine conditions.

METHOD (step time): forward + backward + optimizer step of one model, bracketed by CUDA events
(host clock on CPU), synchronized after every step; the first ``--warmup`` steps (Triton JIT
compiles, allocator warm-up) are excluded; the median of the rest is reported per run.

Outputs in ``--out-dir`` (default examples/out): ``train_gemm_impls[_smoke].png`` (the two loss
curves overlaid, and the median step times side by side) and ``train_gemm_impls[_smoke].json``
(config, device, versions, commit, per-step losses and times, median step times, the final-loss
gap = mean of the last 10 steps); a markdown summary on stdout.

GPU (one process, NCCL world 1)::

    PYTHONPATH=src python examples/train_gemm_impls.py     # 150 steps; not run on a GPU yet (estimate below)

CPU plumbing check (gloo world 1, Triton interpreter, tiny sizes, 3 steps; times mean nothing)::

    TRITON_INTERPRET=1 PYTHONPATH=src python examples/train_gemm_impls.py --smoke --out-dir /tmp/x

Exit status: 0 when both runs finished with finite losses, 1 otherwise (and when torchao is
missing: ``pip install 'mxep[torchao]'``).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings

# Before anything imports triton: the CPU smoke run runs mxep's kernels in Triton's interpreter,
# which is chosen when triton is first imported.
if "--smoke" in sys.argv[1:] and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("train_gemm_impls.py --smoke runs mxep's Triton kernels on the CPU and needs TRITON_INTERPRET=1 set "
             "before Python starts, e.g.\n  TRITON_INTERPRET=1 PYTHONPATH=src python examples/train_gemm_impls.py "
             "--smoke")
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_k, _v)   # never NVLink multicast on the shared machines

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mxep  # noqa: E402
from mxep.testing.launch import free_port  # noqa: E402

from demo import VOCAB, get_batch, init_weights, make_corpus  # noqa: E402  (examples/demo.py, beside this script)

IMPLS = ("dequant", "torchao")
COLORS = {"dequant": "tab:blue", "torchao": "tab:orange"}
LABELS = {"dequant": 'gemm_impl="dequant" (dequantize + bf16 grouped GEMM, bf16 backward)',
          "torchao": 'gemm_impl="torchao" (torchao MXFP8 grouped GEMM, MXFP8 dgrad, bf16 wgrad)'}
CONTEXT = 3   # the model sees the current token and the CONTEXT - 1 before it
TAIL = 10     # the final loss: mean of the last TAIL steps

# GPU: 4 layers x (16 experts of ffn 1024, hidden 512), 4096 tokens per step (~100M expert
# parameters). Estimate on an H100: tens of ms per dequant step, a few times that for the emulated
# torchao step; the Triton JIT compiles in the first steps. --max-seconds (120 s of training) caps
# the total either way: both runs stop at the same step and the JSON says so (stopped_early).
GPU_DEFAULTS = dict(steps=150, warmup=10, layers=4, hidden=512, ffn_hidden=1024, experts=16, top_k=2, seq=256,
                    batch=16, lr=1e-3, max_seconds=120.0)
# --smoke: the same code paths on the CPU (Triton interpreter): about 20-40 s on 2 cores.
SMOKE_DEFAULTS = dict(steps=3, warmup=1, layers=2, hidden=32, ffn_hidden=32, experts=4, top_k=2, seq=16,
                      batch=2, lr=1e-2, max_seconds=0.0)


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, hidden: int, moe: nn.Module, device=None):
        super().__init__()
        self.norm = nn.RMSNorm(hidden, device=device)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # fp32 [n, H]
        return x + self.moe(self.norm(x).bfloat16()).float()


class MoEModel(nn.Module):
    """Next-token predictor: the sum of ``CONTEXT`` embeddings (current token, previous ones),
    ``len(moes)`` residual MoE blocks, RMSNorm, LM head."""

    def __init__(self, vocab: int, hidden: int, moes: list[nn.Module], device=None):
        super().__init__()
        self.emb = nn.ModuleList(nn.Embedding(vocab, hidden, device=device) for _ in range(CONTEXT))
        self.blocks = nn.ModuleList(Block(hidden, m, device) for m in moes)
        self.norm = nn.RMSNorm(hidden, device=device)
        self.head = nn.Linear(hidden, vocab, bias=False, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """int64 ``[B, T + CONTEXT - 1]`` -> fp32 logits ``[B * T, V]`` for the last ``T`` positions."""
        T = ids.shape[1] - (CONTEXT - 1)
        x = sum(emb(ids[:, CONTEXT - 1 - j:CONTEXT - 1 - j + T]) for j, emb in enumerate(self.emb))
        x = x.reshape(-1, x.shape[-1])
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def build(impl: str, cfg: dict, device: torch.device) -> MoEModel:
    moes = [mxep.MoE(cfg["hidden"], cfg["ffn_hidden"], cfg["experts"], cfg["top_k"],
                     max_tokens_per_rank=cfg["batch"] * cfg["seq"], device=device, gemm_impl=impl)
            for _ in range(cfg["layers"])]
    return MoEModel(len(VOCAB), cfg["hidden"], moes, device)


def batch(corpus: torch.Tensor, cfg: dict, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s batch (the same for both runs): ids ``[B, T + CONTEXT - 1]``, targets ``[B * T]``."""
    ids, targets = get_batch(corpus, cfg["batch"], cfg["seq"] + CONTEXT - 1, cfg["seed"] * 1_000_003 + step)
    return ids.to(device), targets[:, CONTEXT - 1:].reshape(-1).to(device)


# ----------------------------------------------------------------------------------------------
# Training.
# ----------------------------------------------------------------------------------------------

class Run:
    """One of the two models and its optimizer; records losses and step times."""

    def __init__(self, impl: str, model: MoEModel, cfg: dict, device: torch.device):
        self.impl, self.model, self.device = impl, model, device
        self.opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=(0.9, 0.95), weight_decay=0.0)
        warm = max(1, min(10, cfg["steps"] // 10))
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: min(1.0, (s + 1) / warm))
        self.losses: list[float] = []
        self.step_ms: list[float] = []
        self.error: str | None = None

    def step(self, ids: torch.Tensor, targets: torch.Tensor) -> None:
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        loss = F.cross_entropy(self.model(ids), targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.sched.step()
        if cuda:
            end.record()
            torch.cuda.synchronize(self.device)
            ms = start.elapsed_time(end)
        else:
            ms = (time.perf_counter() - t0) * 1e3
        self.step_ms.append(ms)
        self.losses.append(float(loss.detach()))


def train(cfg: dict, device: torch.device) -> tuple[dict[str, Run], bool, float]:
    """Both runs in lock step; (runs, stopped early by --max-seconds, seconds of training)."""
    corpus, _ = make_corpus(200_000, cfg["seed"])
    torch.manual_seed(cfg["seed"])
    models = {impl: build(impl, cfg, device) for impl in IMPLS}
    init_weights(models["dequant"], cfg["seed"])
    models["torchao"].load_state_dict(models["dequant"].state_dict())
    runs = {impl: Run(impl, m, cfg, device) for impl, m in models.items()}
    deadline = time.time() + cfg["max_seconds"] if cfg["max_seconds"] > 0 else math.inf
    t0 = time.perf_counter()
    every = max(1, cfg["steps"] // 10)
    stopped = False
    for step in range(cfg["steps"]):
        ids, targets = batch(corpus, cfg, step, device)
        live = [r for r in runs.values() if r.error is None]
        if not live:
            break
        for run in live:
            try:
                run.step(ids, targets)
            except Exception as exc:  # noqa: BLE001  (reported in the JSON; the other run goes on)
                run.error = f"step {step + 1}: {type(exc).__name__}: {exc}"
                traceback.print_exc()
                print(f"[{run.impl}] failed at step {step + 1}: {type(exc).__name__}: {exc}", flush=True)
        done = step + 1
        if done == 1 or done % every == 0 or done == cfg["steps"]:
            print(f"step {done:>4}/{cfg['steps']}  " + "  ".join(
                f"{r.impl} loss {r.losses[-1]:.4f} ({r.step_ms[-1]:.1f} ms)" if r.error is None and r.losses
                else f"{r.impl} FAILED" for r in runs.values()) + f"  | {time.perf_counter() - t0:.0f} s", flush=True)
        next_end = time.time() + sum(r.step_ms[-1] for r in runs.values() if r.step_ms) / 1e3
        if next_end > deadline and done < cfg["steps"]:
            stopped = True
            print(f"stopping after step {done}: --max-seconds {cfg['max_seconds']:g} reached", flush=True)
            break
    return runs, stopped, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Report.
# ----------------------------------------------------------------------------------------------

def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _median_ms(run: Run, warmup: int) -> float | None:
    timed = run.step_ms[warmup:] or run.step_ms[-1:]
    return statistics.median(timed) if timed else None


def _tail_mean(losses: list[float]) -> float | None:
    return statistics.fmean(losses[-TAIL:]) if losses else None


def _plot(path: str, runs: dict[str, Run], med: dict[str, float | None], cfg: dict, device_name: str, pref: str,
          smoke: bool) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.4), dpi=120, gridspec_kw=dict(width_ratios=[3.2, 1]))
    for impl, run in runs.items():
        if run.losses:
            ax.plot(range(1, len(run.losses) + 1), run.losses, color=COLORS[impl], lw=1.6 if impl == "dequant" else 1.1,
                    label=LABELS[impl] + (" [FAILED]" if run.error else ""))
    tokens = cfg["batch"] * cfg["seq"]
    ax.set_xlabel(f"step ({tokens} tokens each)")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{cfg['layers']} x MoE (hidden {cfg['hidden']}, {cfg['experts']} experts top-{cfg['top_k']}, "
                 f"ffn {cfg['ffn_hidden']}), world 1" + (" [CPU smoke]" if smoke else ""), fontsize=9)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper right")
    names = [i for i in IMPLS if med[i] is not None]
    bars = bx.bar(names, [med[i] for i in names], color=[COLORS[i] for i in names])
    for b, i in zip(bars, names):
        bx.annotate(f"{med[i]:.1f} ms", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    bx.set_ylabel("median step time (ms)")
    bx.set_title("fwd + bwd + AdamW step\n" + ("CPU interpreter: meaningless" if smoke else
                                                 f"{device_name}\n(torchao {pref})"), fontsize=7)
    bx.margins(y=0.15)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _markdown(data: dict) -> str:
    tok, tail = data["config"]["tokens_per_step"], data["final_loss_tail"]
    lines = [f"| run | first loss | final loss (mean last {tail}) | median step (ms) | tokens/s | status |",
             "|---|---|---|---|---|---|"]
    for impl in IMPLS:
        r = data["runs"][impl]
        ms = r["median_step_ms"]
        name = impl + (f" ({r['kernel_preference']})" if r["kernel_preference"] else "")
        first = f"{r['losses'][0]:.4f}" if r["losses"] else "-"
        final = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        step = f"{ms:.2f}" if ms else "-"
        rate = f"{tok / ms * 1e3:,.0f}" if ms else "-"
        status = "FAILED: " + r["error"] if r["error"] else "ok"
        lines.append(f"| {name} | {first} | {final} | {step} | {rate} | {status} |")
    g, ratio = data["final_loss_gap"], data["step_time_ratio_torchao_over_dequant"]
    if g is not None:
        lines += ["", f"final-loss gap (torchao - dequant, mean of the last {tail} steps): {g['abs']:+.4f} "
                      f"({g['rel']:+.2%}); first-step losses differ by {data['first_loss_rel_diff']:.1e} (relative); "
                      f"step time torchao / dequant: {f'{ratio:.2f}x' if ratio else '-'}"]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main.
# ----------------------------------------------------------------------------------------------

def _parse(argv):
    p = argparse.ArgumentParser(prog="python examples/train_gemm_impls.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, gloo world 1, tiny sizes, 3 steps (TRITON_INTERPRET=1)")
    p.add_argument("--out-dir", default=os.path.join(HERE, "out"),
                   help="where the PNG and JSON go (default %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    for k in ("steps", "warmup", "layers", "hidden", "ffn_hidden", "experts", "top_k", "seq", "batch"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k,
                       help=f"(GPU {GPU_DEFAULTS[k]}, smoke {SMOKE_DEFAULTS[k]})"
                            + (": first steps left out of the median step time" if k == "warmup" else "")
                            + (": sequences per step" if k == "batch" else ""))
    p.add_argument("--lr", type=float, help=f"AdamW (GPU {GPU_DEFAULTS['lr']:g}, smoke {SMOKE_DEFAULTS['lr']:g})")
    p.add_argument("--max-seconds", type=float, dest="max_seconds",
                   help=f"stop both runs (at the same step) once training passed this many seconds; 0: never "
                        f"(GPU {GPU_DEFAULTS['max_seconds']:g}, smoke {SMOKE_DEFAULTS['max_seconds']:g})")
    return p.parse_args(argv)


def _check_torchao() -> None:
    msg = ("train_gemm_impls.py compares gemm_impl='dequant' with gemm_impl='torchao', which needs torchao: "
           "pip install 'mxep[torchao]' (torchao==0.18.0)")
    if importlib.util.find_spec("torchao") is None:
        sys.exit(msg)
    from mxep.integrations.torchao import require_torchao
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            require_torchao("gemm_impl='torchao'")
        except ImportError as e:
            sys.exit(f"{msg}\n({e})")


def _train_and_report(args, cfg: dict, device: torch.device, device_name: str) -> int:
    """Train both runs, write the JSON and PNG, print the summary; the exit status."""
    import triton
    import torchao
    from mxep.integrations.torchao import kernel_preference_for

    pref = kernel_preference_for(device).name
    print(f"train_gemm_impls: {cfg['layers']} x mxep.MoE (hidden {cfg['hidden']}, ffn {cfg['ffn_hidden']}, "
          f"{cfg['experts']} experts top-{cfg['top_k']}), {cfg['batch'] * cfg['seq']} tokens/step, {cfg['steps']} "
          f"steps on {device_name}: gemm_impl='dequant' vs 'torchao' (torchao {pref})", flush=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=UserWarning)
        runs, stopped, wall = train(cfg, device)

    med = {impl: _median_ms(r, cfg["warmup"]) for impl, r in runs.items()}
    final = {impl: _tail_mean(r.losses) for impl, r in runs.items()}
    both = all(r.losses and r.error is None for r in runs.values())
    first_d = (abs(runs["torchao"].losses[0] - runs["dequant"].losses[0]) / abs(runs["dequant"].losses[0])
               if all(r.losses for r in runs.values()) else None)
    gap = ({"abs": final["torchao"] - final["dequant"], "rel": (final["torchao"] - final["dequant"]) / final["dequant"]}
           if both else None)
    data = {
        "script": "examples/train_gemm_impls.py",
        "smoke": args.smoke,
        "commit": _commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name,
        "device_capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "world": 1,
        "versions": {"python": sys.version.split()[0], "torch": torch.__version__, "triton": triton.__version__,
                     "torchao": getattr(torchao, "__version__", "unknown"), "cuda": torch.version.cuda},
        "config": {**cfg, "vocab": len(VOCAB), "context_tokens": CONTEXT, "tokens_per_step": cfg["batch"] * cfg["seq"],
                   "optimizer": "AdamW(betas=(0.9, 0.95), weight_decay=0), linear warm-up over min(10, steps // 10)",
                   "moe": "mxep.MoE defaults (dispatch='tokens', scale_mode='rceil', mx_weights=True)"},
        "method": ("step time: forward + backward + optimizer step of one model, torch.cuda.Event around it (host "
                   "clock on CPU), synchronized every step; the two runs alternate step by step on the same batch; "
                   f"the first {cfg['warmup']} steps excluded; median of the rest"),
        "steps_done": max(len(r.losses) for r in runs.values()),
        "stopped_early": stopped,
        "train_seconds": wall,
        "runs": {impl: {"gemm_impl": impl, "kernel_preference": pref if impl == "torchao" else None,
                        "losses": r.losses, "step_ms": r.step_ms, "median_step_ms": med[impl],
                        "final_loss": final[impl], "error": r.error,
                        "finite": bool(r.losses) and all(math.isfinite(v) for v in r.losses)}
                 for impl, r in runs.items()},
        "final_loss_tail": min(TAIL, max(len(r.losses) for r in runs.values())),
        "final_loss_gap": gap,
        "first_loss_rel_diff": first_d,
        "step_time_ratio_torchao_over_dequant": (med["torchao"] / med["dequant"]
                                                 if med["torchao"] and med["dequant"] else None),
    }
    os.makedirs(args.out_dir, exist_ok=True)
    stem = os.path.join(args.out_dir, "train_gemm_impls" + ("_smoke" if args.smoke else ""))
    png = _plot(stem + ".png", runs, med, cfg, device_name, pref, args.smoke)
    data["png"] = png
    with open(stem + ".json", "w") as f:
        json.dump(data, f, indent=1)
    print()
    print(_markdown(data))
    print()
    print(f"{data['steps_done']} steps in {wall:.0f} s" + (" (stopped early: --max-seconds)" if stopped else "")
          + f"; wrote {stem}.json" + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"))
    ok = both and all(data["runs"][i]["finite"] for i in IMPLS)
    return 0 if ok else 1


def main(argv=None) -> int:
    args = _parse(argv)
    cfg = dict(SMOKE_DEFAULTS if args.smoke else GPU_DEFAULTS)
    cfg.update({k: v for k, v in vars(args).items() if k in cfg and v is not None})
    cfg["seed"] = args.seed
    for k in ("hidden", "ffn_hidden"):
        if cfg[k] % 32:
            sys.exit(f"--{k.replace('_', '-')} must be a multiple of 32 (MXFP8 blocks), got {cfg[k]}")
    if not args.smoke and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --smoke (and TRITON_INTERPRET=1) for the CPU plumbing check")
    _check_torchao()

    port = free_port()
    timeout = datetime.timedelta(seconds=600)
    if args.smoke:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1, timeout=timeout)
        device_name = "CPU (Triton interpreter, gloo)"
    else:
        device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.empty(1, device=device)   # the CUDA context before NCCL (as benchmarks/bench_moe.py)
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                device_id=device, timeout=timeout)
        device_name = torch.cuda.get_device_name(device)
    try:
        return _train_and_report(args, cfg, device, device_name)
    finally:
        gc.collect()   # the layers' Buffers hold the group: free them before destroying it (see demo.py)
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
