"""Train torchtitan's smallest MoE model with mxep's dispatcher and with torchtitan's standard one.

    python examples/torchtitan_moe.py                       # no GPU: 2 CPU ranks (gloo, Triton interpreter)
    python examples/torchtitan_moe.py --ranks 4 --steps 10  # more CPU ranks, fewer steps
    python examples/torchtitan_moe.py                       # one GPU: EP = 1, 300 steps
    torchrun --nproc_per_node=4 examples/torchtitan_moe.py  # 4 GPUs of one node: EP = 4 (NCCL)

The model is torchtitan 0.3.0's ``deepseek_v3`` ``debugmodel`` (dim 256, 8 routed experts, top-3,
2 shared experts, vocab 2048; 1 dense + 5 MoE layers), built from its own config registry and
parallelized by torchtitan itself (``Module.parallelize`` with ``ParallelDims``: expert
parallelism over all ranks, the ``partial_dtensor`` backend). Each run trains it twice from the
same seed and data: with torchtitan's standard dispatcher (``AllToAllTokenDispatcher``: all-to-all
of bf16 rows + permute, host sync for the splits) and with ``MXEPTokenDispatcher`` (mxep's fused
MXFP8 dispatch, selected by ``mxep.integrations.torchtitan.use_mxep_dispatcher`` on the config,
the code form of ``--override.imports mxep.integrations.torchtitan.mxep_dispatcher``).

Training: bf16 compute, fp32 master weights and AdamW (what torchtitan's FSDP mixed precision
does; FSDP itself is left out: gradients are averaged over the ranks by hand), synthetic
next-token data (a fixed random bigram map, 90% of the time, else a random token: the loss can
fall from ln(2048) = 7.6 to about 1.1). Attention is torchtitan's SDPA module (causal), since
FlexAttention has no CPU backward. Outputs (``--out``, default ``torchtitan_moe``): a PNG with the
two loss curves overlaid and the step times side by side, and a JSON of both.

On CPU the step times measure the Triton interpreter that runs mxep's kernels there, not the
dispatch: they are for checking that it runs; compare speed on GPUs.

It imports mxep as an installed package: ``make deps`` installs this checkout in editable mode
(and ``pip install torchtitan==0.3.0``, or ``make test``, brings torchtitan).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
import types

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before anything imports triton: mxep's CPU path

import torch.distributed as dist  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=None, help="training steps per dispatcher (300 on GPU, 20 on CPU)")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks to spawn when there is no GPU (1, 2 or 4...)")
    p.add_argument("--batch", type=int, default=None, help="sequences per rank (8 on GPU, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None, help="sequence length (256 on GPU, 64 on CPU)")
    p.add_argument("--layers", type=int, default=None,
                   help="keep the first N layers of the model (default: all 6 on GPU, 3 on CPU)")
    p.add_argument("--lr", type=float, default=8e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dispatchers", default="standard,mxep", help="comma-separated: standard, mxep")
    p.add_argument("--out", default="torchtitan_moe", help="output prefix: <out>.png and <out>.json")
    p.add_argument("--replot", metavar="JSON", help="only redraw the PNG of a finished run from its JSON")
    args = p.parse_args(argv)
    gpu = HAS_CUDA
    args.steps = args.steps or (300 if gpu else 20)
    args.batch = args.batch or (8 if gpu else 2)
    args.seq = args.seq or (256 if gpu else 64)
    args.layers = args.layers or (6 if gpu else 3)
    return args


def build_model(args, world: int, dispatcher: str, device: torch.device):
    """torchtitan's deepseek_v3 debugmodel, parallelized by torchtitan (EP over all ranks)."""
    import torchtitan.distributed.parallel_dims as tt_parallel_dims
    from torchtitan.config import ParallelismConfig
    from torchtitan.distributed import ParallelDims
    from torchtitan.distributed.utils import set_spmd_backend
    from torchtitan.models.common.attention import ScaledDotProductAttention
    from torchtitan.models.deepseek_v3 import model_registry

    from mxep.integrations.torchtitan import use_mxep_dispatcher

    cfg = model_registry("debugmodel").model
    cfg.layers = cfg.layers[: args.layers]
    for layer in cfg.layers:
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    par = ParallelismConfig(data_parallel_shard_degree=world, expert_parallel_degree=world,
                            spmd_backend="partial_dtensor")
    cfg.update_from_config(config=types.SimpleNamespace(parallelism=par))   # sharding configs for EP
    if dispatcher == "mxep":
        use_mxep_dispatcher(cfg, num_max_tokens_per_rank=args.batch * args.seq)
    set_spmd_backend(par.spmd_backend)
    torch.manual_seed(args.seed)
    with torch.device(device):
        model = cfg.build()
        model.init_states()
    if world > 1:
        tt_parallel_dims.device_type = device.type   # torchtitan assumes "cuda" when it sees no GPU
        pd = ParallelDims.from_config(par, world)
        pd.build_mesh()
        model.parallelize(pd)
    return model, cfg


def batch(args, step: int, rank: int, vocab: int, device: torch.device):
    """Synthetic next-token data: token -> bigram[token] 90% of the time, else random; the same
    for both dispatchers (seeded by step and rank)."""
    g = torch.Generator().manual_seed(args.seed)
    bigram = torch.randperm(vocab, generator=g)
    g.manual_seed(1_000_003 * (step + 1) + rank)
    toks = torch.empty(args.batch, args.seq + 1, dtype=torch.long)
    toks[:, 0] = torch.randint(0, vocab, (args.batch,), generator=g)
    noise = torch.rand(args.batch, args.seq, generator=g) < 0.1
    rand = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    for i in range(args.seq):
        toks[:, i + 1] = torch.where(noise[:, i], rand[:, i], bigram[toks[:, i]])
    toks = toks.to(device)
    return toks[:, :-1], toks[:, 1:]


def _local(t):
    from torch.distributed.tensor import DTensor
    return t.to_local() if isinstance(t, DTensor) else t


def train(args, rank: int, world: int, dispatcher: str, device: torch.device) -> dict:
    from torch.distributed.tensor import DTensor, Shard

    model, cfg = build_model(args, world, dispatcher, device)
    # fp32 master weights (this rank's shard of the experts) for AdamW, bf16 weights for compute
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    master = {n: torch.nn.Parameter(_local(p).detach().float().clone()) for n, p in model.named_parameters()
              if p.requires_grad}
    for mod in model.modules():   # parameters only (buffers stay: RoPE's complex table, the MoE counters)
        for n, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point():
                setattr(mod, n, torch.nn.Parameter(p.detach().to(torch.bfloat16), requires_grad=p.requires_grad))
    by_name = dict(model.named_parameters())
    params = [by_name[n] for n in names]
    master = [master[n] for n in names]
    expert = [isinstance(p, DTensor) and any(isinstance(pl, Shard) for pl in p.placements) for p in params]
    opt = torch.optim.AdamW(master, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    losses, times = [], []
    for step in range(args.steps):
        inputs, labels = batch(args, step, rank, cfg.vocab_size, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        logits = model(inputs)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        loss.backward()
        for p, m, is_expert in zip(params, master, expert):
            g = _local(p.grad).float()
            if world > 1 and not is_expert:
                dist.all_reduce(g)    # data parallelism over the replicated weights
            m.grad = g / world        # experts: their owner already summed every rank's tokens
            p.grad = None
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for p, m in zip(params, master):
                _local(p).copy_(m)
        global_loss = loss.detach().clone()
        if world > 1:
            dist.all_reduce(global_loss)
        losses.append(global_loss.item() / world)   # (host sync: after the step, for the curve)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        if rank == 0 and (step % max(1, args.steps // 10) == 0 or step == args.steps - 1):
            print(f"[{dispatcher}] step {step:4d}  loss {losses[-1]:.4f}  {times[-1] * 1e3:8.1f} ms", flush=True)
    return {"loss": losses, "step_s": times}


def plot(results: dict, args, world: int, device: str, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: no PNG (pip install matplotlib)")
        return
    fig, (ax_loss, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    colors = {"standard": "tab:blue", "mxep": "tab:orange"}
    style = {"standard": dict(lw=3.0, alpha=0.5), "mxep": dict(lw=1.2, ls="--")}
    for name, r in results.items():
        ax_loss.plot(range(1, len(r["loss"]) + 1), r["loss"], label=name, color=colors.get(name),
                     **style.get(name, {}))
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training loss (mean over ranks)")
    ax_loss.set_title(f"torchtitan deepseek_v3 debugmodel ({args.layers} layers), EP={world} on {device}")
    if {"standard", "mxep"} <= set(results):
        diff = max(abs(a - b) for a, b in zip(results["standard"]["loss"], results["mxep"]["loss"]))
        ax_loss.text(0.02, 0.03, f"max |loss(mxep) - loss(standard)| = {diff:.4f}", transform=ax_loss.transAxes)
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    names = list(results)
    warm = lambda r: r["step_s"][min(2, len(r["step_s"]) - 1):]   # noqa: E731  (skip warm-up steps)
    med = [statistics.median(warm(results[n])) * 1e3 for n in names]
    lo = [sorted(warm(results[n]))[len(warm(results[n])) // 10] * 1e3 for n in names]
    hi = [sorted(warm(results[n]))[(9 * len(warm(results[n]))) // 10] * 1e3 for n in names]
    bars = ax_time.bar(names, med, yerr=[[m - a for m, a in zip(med, lo)], [b - m for m, b in zip(med, hi)]],
                       color=[colors.get(n) for n in names], capsize=6)
    for b, m in zip(bars, med):
        ax_time.annotate(f"{m:.1f} ms", (b.get_x() + b.get_width() / 2, m), ha="center", va="bottom",
                         xytext=(0, 3), textcoords="offset points")
    ax_time.set_ylabel("step time, median (p10-p90), ms")
    ax_time.set_title("step time" + (" (CPU: Triton interpreter)" if device == "cpu" else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def run(rank: int, world: int, args, device: torch.device) -> None:
    results = {}
    for name in args.dispatchers.split(","):
        results[name] = train(args, rank, world, name.strip(), device)
    if rank == 0:
        summary = {"world": world, "device": device.type, "args": vars(args), "results": results}
        with open(args.out + ".json", "w") as f:
            json.dump(summary, f, indent=1)
        print(f"wrote {args.out}.json")
        for name, r in results.items():
            warm = r["step_s"][min(2, len(r["step_s"]) - 1):]
            print(f"{name:>9}: final loss {r['loss'][-1]:.4f}, median step {statistics.median(warm) * 1e3:.1f} ms")
        plot(results, args, world, device.type, args.out + ".png")


def replot(json_path: str) -> None:
    """Redraw the PNG of a finished run from its JSON (``--replot run.json``)."""
    with open(json_path) as f:
        summary = json.load(f)
    args = argparse.Namespace(**summary["args"])
    plot(summary["results"], args, summary["world"], summary["device"], json_path.rsplit(".", 1)[0] + ".png")


def _cpu_rank(rank: int, world: int, port: int, args) -> None:
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    try:
        run(rank, world, args, torch.device("cpu"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.replot:
        replot(args.replot)
        return
    if "RANK" in os.environ:                          # torchrun: one process per GPU
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        dist.init_process_group("nccl")
        try:
            run(dist.get_rank(), dist.get_world_size(), args, torch.device("cuda", local))
        finally:
            dist.destroy_process_group()
    elif HAS_CUDA:                                    # one GPU: EP = 1
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            run(0, 1, args, torch.device("cuda", 0))
        finally:
            dist.destroy_process_group()
    else:                                             # CPU ranks on gloo
        import socket

        import torch.multiprocessing as mp
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_cpu_rank, args=(args.ranks, port, args), nprocs=args.ranks, start_method="spawn")


if __name__ == "__main__":
    main()
