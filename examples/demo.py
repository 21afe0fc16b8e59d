"""`python examples/demo.py` (`make demo`): train a small MoE transformer on mxep, beside a bf16 twin.

One process per visible CUDA GPU (NCCL), else 4 CPU processes (gloo, Triton interpreter; about
2 minutes on 2 idle cores). Every rank builds the same model: token + position embeddings, a few
blocks of [RMSNorm, causal self-attention (plain torch, fp32), RMSNorm, MoE], RMSNorm and an LM
head, trained as a causal LM on a synthetic English-like grammar generated here (deterministic,
no download; its entropy per token, the lowest loss reachable, is printed).

Two copies of it train side by side, in lock step, from the same initial weights on the same
tokens (each rank draws its own batch: data parallel over the EP group):

* ``mxep``: the MoE of every block is :class:`mxep.MoE`, expert parallel over all ranks (rank
  r holds experts ``[r L, (r + 1) L)`` of the ``E``; MXFP8 dispatch, MXFP8 expert GEMMs, bf16
  combine and backward). The router, attention, norms and embeddings are replicated: their
  gradients are all-reduced (summed; every rank backpropagates its mean loss / world). The
  experts' gradients need no reduction: the combine's backward already brings every rank's
  contribution to the expert's owner.
* ``bf16``: the same router and SwiGLU expert math in plain bf16 torch, every expert on every
  rank and no quantization, no dispatch; every gradient all-reduced. ``--twin dense`` (default)
  runs every expert on every token and masks the sum with the gates (simple, slow);
  ``--twin local`` is :class:`mxep.moe.naive.BF16LocalMoE` (stable sort by expert,
  ``torch._grouped_mm`` SwiGLU experts, fp32 ``index_add``): the strongest bf16 flow on one rank,
  the one to compare step times against.

``--capture`` (GPU): each model's forward, loss and backward are captured once in one CUDA graph
and replayed every step (``GraphedStep``); the gradient all-reduce and the optimizer step stay
eager. Without it every op is issued from Python (eager).

Rank 0 builds all the weights and broadcasts them; each rank keeps its slice of the experts for
mxep and all of them for the bf16 twin. Rank 0 prints a progress line (loss and tokens/s of
both), then a summary paragraph and its checks: the first-step losses agree within MXFP8
tolerance, mxep.MoE's first-step output equals its MXFP8 reference (``mxep.moe.naive``) on the
same activations, both losses fell, they end close to each other, and the replicated weights are
still identical on every rank. On CPU a time budget (``--max-seconds``, 150 s from launch) ends
training early on a busy machine; the summary says so. It writes both loss curves to
``demo-loss.png`` (``--out``). The exit status is 1 when a check fails. ``--help`` for the knobs.

It imports mxep as an installed package (``make deps`` installs this checkout in editable mode).
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import random
import socket
import statistics
import sys
import time
import warnings
from dataclasses import dataclass

import torch

if not torch.cuda.is_available():
    # Must precede any triton import (here and in spawned children, which re-import this module).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import mxep  # noqa: E402
from mxep.moe.naive import BF16LocalMoE, moe_reference  # noqa: E402
from mxep.testing import rel_err  # noqa: E402

# ----------------------------------------------------------------------------------------------
# The corpus: a small synthetic grammar (subject-verb agreement across optional adjectives,
# optional prepositional tails), as an endless stream of sentences.
# ----------------------------------------------------------------------------------------------

_NOUNS = {"cat": "cats", "dog": "dogs", "bird": "birds", "fox": "foxes", "frog": "frogs", "robot": "robots"}
_ADJECTIVES = ("red", "big", "small", "old", "happy", "blue")
_VERBS = {"sees": "see", "likes": "like", "chases": "chase", "finds": "find", "helps": "help"}
_PREPOSITIONS = ("near", "under", "behind")
_DETERMINERS = {False: ("the", "a"), True: ("the", "some")}   # plural -> determiners
VOCAB = sorted({".", "and", *_NOUNS, *_NOUNS.values(), *_ADJECTIVES, *_VERBS, *_VERBS.values(),
                *_PREPOSITIONS, *_DETERMINERS[False], *_DETERMINERS[True]})


def _sentence(rng: random.Random) -> tuple[list[str], float]:
    """One sentence and its log-probability under the generator (every choice is uniform and
    the words determine the choices, so the product of the choices' probabilities is exact)."""
    logp = 0.0

    def pick(options):
        nonlocal logp
        logp -= math.log(len(options))
        return options[rng.randrange(len(options))]

    def coin(p: float) -> bool:
        nonlocal logp
        hit = rng.random() < p
        logp += math.log(p if hit else 1 - p)
        return hit

    def noun_phrase() -> tuple[list[str], bool]:
        plural = pick((False, True))
        words = [pick(_DETERMINERS[plural])]
        if coin(0.5):
            words.append(pick(_ADJECTIVES))
        noun = pick(tuple(_NOUNS))
        return words + [_NOUNS[noun] if plural else noun], plural

    subject, plural = noun_phrase()
    if coin(0.2):                                  # "the cat and a dog": a plural subject
        other, _ = noun_phrase()
        subject, plural = subject + ["and"] + other, True
    verb = pick(tuple(_VERBS))
    words = subject + [_VERBS[verb] if plural else verb] + noun_phrase()[0]
    if coin(1 / 3):
        words += [pick(_PREPOSITIONS)] + noun_phrase()[0]
    return words + ["."], logp


def make_corpus(num_tokens: int, seed: int = 0) -> tuple[torch.Tensor, float]:
    """``num_tokens`` or a few more token ids (int64), and the grammar's entropy in nats per
    token measured on them (the loss of a model that knows the grammar)."""
    rng = random.Random(seed)
    index = {w: i for i, w in enumerate(VOCAB)}
    ids: list[int] = []
    nats = 0.0
    while len(ids) < num_tokens:
        words, logp = _sentence(rng)
        ids += [index[w] for w in words]
        nats -= logp
    return torch.tensor(ids, dtype=torch.int64), nats / len(ids)


def get_batch(corpus: torch.Tensor, batch: int, seq: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``seq + 1`` tokens: inputs and next-token targets ``[B, T]``."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, corpus.numel() - seq - 1, (batch,), generator=g)
    win = torch.stack([corpus[s:s + seq + 1] for s in starts.tolist()])
    return win[:, :-1], win[:, 1:]


# ----------------------------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------------------------

class DenseMoE(nn.Module):
    """bf16 reference of :class:`mxep.MoE`'s math on one rank, all ``E`` experts local: the same
    router (fp32 logits, softmax, top-k, gates renormalized over the chosen experts) and SwiGLU
    experts (bf16 GEMMs), no quantization and no dispatch: every expert runs on every token and
    the gates (zero outside the top-k) mask the sum. Parameters as mxep.MoE's, with ``L = E``."""

    def __init__(self, hidden: int, ffn_hidden: int, num_experts: int, top_k: int, device=None):
        super().__init__()
        self.top_k = top_k
        self.router = nn.Parameter(torch.empty(num_experts, hidden, device=device))
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * ffn_hidden, hidden, dtype=torch.bfloat16, device=device))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, ffn_hidden, dtype=torch.bfloat16, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # bf16 [n, H] -> bf16 [n, H]
        probs = (x.float() @ self.router.t()).softmax(dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        gates = gates / gates.sum(dim=-1, keepdim=True)
        mask = torch.zeros_like(probs).scatter(1, experts, gates)                     # [n, E] fp32
        h = torch.einsum("nh,efh->enf", x, self.w13)                                  # [E, n, 2F] bf16
        f = self.w2.shape[2]
        a = F.silu(h[..., :f]) * h[..., f:]
        out = torch.bmm(a, self.w2.transpose(1, 2))                                   # [E, n, H] bf16
        return torch.einsum("ne,enh->nh", mask, out.float()).to(x.dtype)


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, moe: nn.Module, device=None):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.RMSNorm(hidden, device=device)
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False, device=device)
        self.proj = nn.Linear(hidden, hidden, bias=False, device=device)
        self.norm2 = nn.RMSNorm(hidden, device=device)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # fp32 [B, T, H]
        B, T, H = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(B, T, 3, self.heads, H // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)                 # [B, heads, T, H/heads]
        x = x + self.proj(att.transpose(1, 2).reshape(B, T, H))
        return x + self.moe(self.norm2(x).reshape(B * T, H).bfloat16()).float().view(B, T, H)


class MoETransformer(nn.Module):
    """Causal LM: embeddings, ``len(moes)`` blocks (attention + the given MoE layers), head."""

    def __init__(self, vocab: int, seq: int, hidden: int, heads: int, moes: list[nn.Module], device=None):
        super().__init__()
        self.tok = nn.Embedding(vocab, hidden, device=device)
        self.pos = nn.Embedding(seq, hidden, device=device)
        self.blocks = nn.ModuleList(Block(hidden, heads, m, device) for m in moes)
        self.norm = nn.RMSNorm(hidden, device=device)
        self.head = nn.Linear(hidden, vocab, bias=False, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:   # int64 [B, T] -> fp32 logits [B, T, V]
        x = self.tok(ids) + self.pos(torch.arange(ids.shape[1], device=ids.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Deterministic initial weights (on the CPU generator: the same on any device; rank 0's are
    broadcast anyway); experts and router as mxep.MoE initializes its own. Also used by
    examples/train_gemm_impls.py."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("moe.router"):
            v = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
        elif name.endswith("moe.w13") or name.endswith("moe.w2"):
            v = torch.randn(p.shape, generator=g) / p.shape[2] ** 0.5
        elif name.endswith(("norm.weight", "norm1.weight", "norm2.weight")):
            v = torch.ones(p.shape)
        elif name.endswith("proj.weight"):   # residual branch: small
            v = torch.randn(p.shape, generator=g) * (0.02 / (2 * len(model.blocks)) ** 0.5)
        else:
            v = torch.randn(p.shape, generator=g) * 0.02
        p.copy_(v.to(p.dtype))


# ----------------------------------------------------------------------------------------------
# Training (one process per rank).
# ----------------------------------------------------------------------------------------------

@dataclass
class TrainConfig:
    steps: int
    layers: int
    hidden: int
    heads: int
    ffn_hidden: int
    experts_per_rank: int
    top_k: int
    seq: int
    batch: int            # sequences per rank per step
    lr: float
    seed: int
    out: str
    deadline: float       # time.time() after which training stops early (inf: none)
    twin: str = "dense"   # the bf16 twin's MoE: "dense" (DenseMoE) or "local" (BF16LocalMoE)
    capture: bool = False  # GPU: each model's forward + loss + backward replayed as one CUDA graph
    corpus_tokens: int = 200_000


@dataclass
class Twin:
    """One of the two models and what trains it."""

    model: MoETransformer
    replicated: list[nn.Parameter]   # the parameters every rank holds: gradients all-reduced
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    graphed: "GraphedStep | None" = None   # --capture: built at the first step


@dataclass
class History:
    """What the training loop records."""

    losses: dict[str, list[float]]                # per step, mean over the ranks
    times: dict[str, list[float]]                 # this rank's step times (s)
    first_logits: dict[str, torch.Tensor]         # step 1's logits on this rank
    stopped_early: bool = False
    wall: float = 0.0                             # seconds of training


def _twin(model: MoETransformer, replicated: list[nn.Parameter], cfg: TrainConfig) -> Twin:
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)
    warmup = max(1, min(10, cfg.steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup))
    return Twin(model, replicated, opt, sched)


def build_twins(rank: int, world: int, device: torch.device, cfg: TrainConfig) -> dict[str, Twin]:
    """Both models with the same weights: the bf16 twin holds every weight (rank 0's, broadcast),
    mxep's experts on this rank take their slice of them."""
    E, L, V = cfg.experts_per_rank * world, cfg.experts_per_rank, len(VOCAB)
    torch.manual_seed(cfg.seed)
    twin_moe = {"dense": DenseMoE, "local": BF16LocalMoE}[cfg.twin]
    bf16 = MoETransformer(V, cfg.seq, cfg.hidden, cfg.heads,
                          [twin_moe(cfg.hidden, cfg.ffn_hidden, E, cfg.top_k, device=device) for _ in range(cfg.layers)],
                          device)
    init_weights(bf16, cfg.seed)
    with torch.no_grad():
        for p in bf16.parameters():
            dist.broadcast(p.data, 0)
    moes = [mxep.MoE(cfg.hidden, cfg.ffn_hidden, E, cfg.top_k, max_tokens_per_rank=cfg.batch * cfg.seq, device=device)
            for _ in range(cfg.layers)]
    mx = MoETransformer(V, cfg.seq, cfg.hidden, cfg.heads, moes, device)
    with torch.no_grad():
        src = dict(bf16.named_parameters())
        for name, p in mx.named_parameters():
            w = src[name]
            if name.endswith("moe.w13") or name.endswith("moe.w2"):
                w = w[rank * L:(rank + 1) * L]
            p.copy_(w)
    experts = {id(m.w13) for m in moes} | {id(m.w2) for m in moes}
    return {"mxep": _twin(mx, [p for p in mx.parameters() if id(p) not in experts], cfg),
            "bf16": _twin(bf16, list(bf16.parameters()), cfg)}


def _all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Sum the gradients of replicated parameters over the ranks, in one fp32 all-reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    off = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[off:off + n].view(g.shape).to(g.dtype)
        off += n


def _same_on_every_rank(params: list[nn.Parameter]) -> bool:
    """Rank 0's values of these parameters equal every rank's, bit for bit."""
    mine = torch.cat([p.detach().reshape(-1).float() for p in params])
    ref = mine.clone()
    dist.broadcast(ref, 0)
    ok = torch.tensor([1.0 if torch.equal(mine, ref) else 0.0], device=mine.device)
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    return bool(ok.item())


def _capture_first_call(module: nn.Module) -> dict[str, torch.Tensor]:
    """Filled with the module's first input ``x`` and output ``y`` when it first runs."""
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, inputs, output):
        if not captured:
            captured["x"], captured["y"] = inputs[0].detach().clone(), output.detach().clone()
            handle.remove()

    handle = module.register_forward_hook(hook)
    return captured


def forward_backward(model: nn.Module, ids: torch.Tensor, targets: torch.Tensor,
                     world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's loss on this rank's batch and its backward: (loss, logits)."""
    logits = model(ids)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    (loss / world).backward()            # summed over the ranks below: the mean loss's gradient
    return loss, logits


class GraphedStep:
    """``forward_backward`` of one model on fixed-shape batches, captured once in one CUDA graph
    (``--capture``) and replayed with each step's tokens: the host issues one launch per step
    instead of every op of the forward and backward. Both twins' layers are capturable: mxep.MoE
    never waits on the GPU from the host (see mxep.moe.CapturedStep, the same for one layer), and
    BF16LocalMoE keeps its group ends on the device.

    The gradients are the graph's own tensors, written (not accumulated) by every replay, and
    put back on the parameters after ``optimizer.zero_grad(set_to_none=True)``; the optimizer
    updates the weights in place, which the next replay reads (mxep.MoE's MX weights are
    quantized inside the graph: its weight cache is dropped around the capture, as
    CapturedStep does). Built with the first step's batch: two warm-up steps on a side stream
    (their gradients discarded), then the capture (which runs nothing)."""

    def __init__(self, model: nn.Module, ids: torch.Tensor, targets: torch.Tensor, world: int, warmup: int = 2):
        self.model, self.world = model, world
        self.ids, self.targets = ids.clone(), targets.clone()
        self.params = [p for p in model.parameters() if p.requires_grad]
        moes = [m for m in model.modules() if isinstance(m, mxep.MoE)]
        side = torch.cuda.Stream(ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(warmup):
                self._zero()
                forward_backward(model, self.ids, self.targets, world)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self._zero()
        for m in moes:
            m.clear_mx_weight_cache()
        self.graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(self.graph):
                self.loss, self.logits = forward_backward(model, self.ids, self.targets, world)
        finally:
            for m in moes:
                m.clear_mx_weight_cache()
        self.grads = [p.grad for p in self.params]

    def _zero(self) -> None:
        for p in self.params:
            p.grad = None

    def __call__(self, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ids.copy_(ids)
        self.targets.copy_(targets)
        self.graph.replay()
        for p, g in zip(self.params, self.grads):
            p.grad = g
        return self.loss, self.logits


def train_step(twin: Twin, ids: torch.Tensor, targets: torch.Tensor, world: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor, float]:
    """One optimizer step of one model on this rank's batch: its loss, logits and time (s)."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    sync()
    t0 = time.perf_counter()
    if twin.graphed is not None:
        loss, logits = twin.graphed(ids, targets)
    else:
        loss, logits = forward_backward(twin.model, ids, targets, world)
    _all_reduce_grads(twin.replicated)   # mxep's experts: the combine's backward already did it
    twin.opt.step()
    twin.opt.zero_grad(set_to_none=True)
    twin.sched.step()
    sync()
    return loss.detach(), logits.detach(), time.perf_counter() - t0


def _mean_losses_and_stop(local: dict[str, torch.Tensor], stop: bool, world: int,
                          device: torch.device) -> tuple[dict[str, float], bool]:
    """The step's losses averaged over the ranks, and whether any rank votes to stop."""
    stats = torch.stack([*local.values(), torch.tensor(float(stop), device=device)]).float()
    dist.all_reduce(stats)
    return {name: float(v) / world for name, v in zip(local, stats)}, bool(stats[-1] > 0)


def train_loop(rank: int, world: int, device: torch.device, cfg: TrainConfig, twins: dict[str, Twin],
               corpus: torch.Tensor) -> History:
    """Both models, step by step on the same batches, until cfg.steps or the deadline."""
    hist = History({k: [] for k in twins}, {k: [] for k in twins}, {})
    progress = _Progress(cfg.steps, world * cfg.batch * cfg.seq) if rank == 0 else None
    t_start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        batch_seed = cfg.seed * 1_000_003 + (step - 1) * world + rank     # different tokens on every rank
        ids, targets = (t.to(device) for t in get_batch(corpus, cfg.batch, cfg.seq, batch_seed))
        local = {}
        for name, twin in twins.items():
            if cfg.capture and twin.graphed is None:
                twin.graphed = GraphedStep(twin.model, ids, targets, world)
            local[name], logits, seconds = train_step(twin, ids, targets, world, device)
            hist.times[name].append(seconds)
            if step == 1:
                hist.first_logits[name] = logits.clone()   # (a graph's logits are overwritten)
        # Stop early if the next step would end past the deadline (every rank votes: any stops all).
        next_end = time.time() + sum(t[-1] for t in hist.times.values())
        mean, stop = _mean_losses_and_stop(local, next_end > cfg.deadline, world, device)
        for name, loss in mean.items():
            hist.losses[name].append(loss)
        hist.stopped_early = stop and step < cfg.steps
        if progress is not None:
            progress.update(step, hist, time.perf_counter() - t_start, last=step == cfg.steps or hist.stopped_early)
        if hist.stopped_early:
            break
    hist.wall = time.perf_counter() - t_start
    return hist


class _Progress:
    """Rank 0's progress line: rewritten in place on a terminal, else a line every few steps."""

    def __init__(self, total: int, tokens_per_step: int):
        self.total, self.tokens, self.tty = total, tokens_per_step, sys.stdout.isatty()
        self.every = max(1, total // 10)
        self._len = 0

    def update(self, step: int, hist: History, elapsed: float, last: bool = False) -> None:
        mt, dt = (statistics.median(hist.times[k][1:] or hist.times[k]) for k in ("mxep", "bf16"))
        text = (f"loss mxep {hist.losses['mxep'][-1]:.3f} bf16 {hist.losses['bf16'][-1]:.3f} | "
                f"tok/s mxep {_rate(self.tokens, mt)} bf16 {_rate(self.tokens, dt)} | {elapsed:.0f} s")
        width = 24
        done = round(width * step / self.total)
        line = f"step {step:>{len(str(self.total))}}/{self.total} [{'#' * done}{'.' * (width - done)}] {text}"
        if self.tty:
            print("\r" + line.ljust(self._len), end="\n" if last else "", flush=True)
            self._len = len(line)
        elif last or step == 1 or step % self.every == 0:
            print(line, flush=True)


def _rate(tokens: int, seconds: float) -> str:
    r = tokens / seconds
    return f"{r / 1e6:.2f}M" if r >= 1e6 else f"{r / 1e3:.1f}k" if r >= 1e4 else f"{r:.0f}"


def _duration(seconds: float) -> str:
    return f"{seconds:.2f} s" if seconds >= 1 else f"{seconds * 1e3:.1f} ms"


# ----------------------------------------------------------------------------------------------
# Checks and report (rank 0).
# ----------------------------------------------------------------------------------------------

@dataclass
class LossStats:
    start: dict[str, float]    # step 1
    final: dict[str, float]    # mean of the last `tail` steps (batches are noisy)
    fell: dict[str, float]     # 1 - final / start
    tail: int
    steps: int

    @classmethod
    def of(cls, losses: dict[str, list[float]]) -> "LossStats":
        steps = len(losses["mxep"])
        tail = max(1, min(5, steps // 5))
        start = {k: v[0] for k, v in losses.items()}
        final = {k: statistics.fmean(v[-tail:]) for k, v in losses.items()}
        return cls(start, final, {k: 1 - final[k] / start[k] for k in losses}, tail, steps)


def _checks(ls: LossStats, stopped_early: bool, layer_err: float, logits_err: float,
            same: dict[str, bool]) -> list[tuple[str, bool | str]]:
    """(what, True / False / "skip" / "note"): only False is a failure."""
    start, final, fell, want_fall = ls.start, ls.final, ls.fell, 0.25
    d0 = abs(start["mxep"] - start["bf16"]) / start["bf16"]
    checks: list[tuple[str, bool | str]] = [
        (f"first-step losses agree within MXFP8 tolerance ({start['mxep']:.4f} vs {start['bf16']:.4f}: "
         f"{d0:.2%} <= 1%; the logits differ by {logits_err:.0%}, relative: MXFP8 rounding and the "
         f"top-k flips it causes)", d0 <= 0.01),
        (f"mxep.MoE's first-step output (layer 0, every rank) matches its MXFP8 reference "
         f"mxep.moe.naive.moe_reference: rel err {layer_err:.1e} <= 1e-2", layer_err <= 1e-2)]
    if ls.steps >= 10:
        gap = abs(final["mxep"] - final["bf16"]) / final["bf16"]
        fall = (f"both losses fell by >= {want_fall:.0%} (mxep {fell['mxep']:.0%}, bf16 {fell['bf16']:.0%})",
                min(fell.values()) >= want_fall)
        if stopped_early and not fall[1]:   # a slow (busy) machine, not a wrong result: reported only
            fall = (fall[0] + f": not reached in the {ls.steps} steps the time budget allowed", "note")
        checks += [fall, (f"final losses within 10% of each other ({gap:.1%})", gap <= 0.10)]
    else:
        checks.append((f"loss fell / final losses agree: skipped ({ls.steps} steps, needs >= 10)", "skip"))
    checks.append(("replicated weights identical on every rank after training (all-reduced gradients)",
                   all(same.values())))
    return checks


def _summary(hist: History, ls: LossStats, cfg: TrainConfig, world: int, backend: str, device: torch.device,
             entropy: float, n_params: int, plot_note: str) -> str:
    E, tokens = cfg.experts_per_rank * world, world * cfg.batch * cfg.seq
    step_s = {k: statistics.median(v[1:] or v) for k, v in hist.times.items()}
    where = f"{world} {'GPU' if device.type == 'cuda' else 'CPU'} rank{'s' if world > 1 else ''} ({backend})"
    return (
        f"Summary: trained a {cfg.layers}-layer MoE transformer (hidden {cfg.hidden}, {cfg.heads} heads, "
        f"{E} experts top-{cfg.top_k} with ffn {cfg.ffn_hidden}, {n_params / 1e3:.0f}k parameters) as a "
        f"causal LM on a synthetic grammar (vocab {len(VOCAB)}, entropy {entropy:.2f} nats/token: the lowest "
        f"reachable loss) on {where}, {ls.steps} steps"
        + (f" (stopped early: time budget; {cfg.steps} asked)" if hist.stopped_early else "")
        + f" of {tokens} tokens ({cfg.batch} x {cfg.seq} per rank), AdamW lr {cfg.lr:g}, "
        f"in {hist.wall:.0f} s. mxep ({cfg.experts_per_rank} experts per rank, MXFP8 dispatch and expert GEMMs, "
        f"expert parallel): loss {ls.start['mxep']:.3f} -> {ls.final['mxep']:.3f} ({ls.fell['mxep']:.0%} lower; "
        f"mean of the last {ls.tail}), {_duration(step_s['mxep'])}/step, {_rate(tokens, step_s['mxep'])} tokens/s. "
        f"bf16 twin ({TWIN_TEXT[cfg.twin]}, every expert on every rank, no quantization): loss {ls.start['bf16']:.3f} -> "
        f"{ls.final['bf16']:.3f} ({ls.fell['bf16']:.0%} lower), {_duration(step_s['bf16'])}/step, "
        f"{_rate(tokens, step_s['bf16'])} tokens/s (median step, first excluded). Step time mxep / bf16: "
        f"{step_s['mxep'] / step_s['bf16']:.2f}x{' (each step one CUDA graph)' if cfg.capture else ' (eager)'}; "
        f"final loss gap (mxep - bf16) / bf16: {(ls.final['mxep'] - ls.final['bf16']) / ls.final['bf16']:+.2%}. "
        + ("Timings on CPU run the Triton interpreter and gloo: not performance numbers. " if device.type == "cpu" else "")
        + plot_note)


def _train(rank: int, world: int, device: torch.device, cfg: TrainConfig, backend: str) -> bool:
    """Train both models, check, and (rank 0) report; True when every check passed."""
    corpus, entropy = make_corpus(cfg.corpus_tokens, cfg.seed)
    twins = build_twins(rank, world, device, cfg)
    # The first step's layer-0 MoE input and output of the mxep model, against mxep's own dense
    # reference of the same MXFP8 math (mxep.moe.naive) on the same (initial) weights.
    bf16_moe = twins["bf16"].model.blocks[0].moe
    ref_weights = [t.detach().clone() for t in (bf16_moe.router, bf16_moe.w13, bf16_moe.w2)]
    captured = _capture_first_call(twins["mxep"].model.blocks[0].moe)

    hist = train_loop(rank, world, device, cfg, twins, corpus)

    ref_y = moe_reference(captured["x"], *ref_weights, cfg.top_k)
    errs = torch.tensor([rel_err(captured["y"], ref_y), rel_err(hist.first_logits["mxep"], hist.first_logits["bf16"])],
                        device=device)
    dist.all_reduce(errs, op=dist.ReduceOp.MAX)
    same = {k: _same_on_every_rank(t.replicated) for k, t in twins.items()}
    if rank != 0:
        return True
    ls = LossStats.of(hist.losses)
    checks = _checks(ls, hist.stopped_early, float(errs[0]), float(errs[1]), same)
    plot_note = _plot(hist.losses, entropy, cfg, world, backend, device)
    n_params = sum(p.numel() for p in twins["bf16"].model.parameters())
    print()
    print(_summary(hist, ls, cfg, world, backend, device, entropy, n_params, plot_note))
    for text, passed in checks:
        print(f"  [{'OK' if passed is True else 'FAIL' if passed is False else passed}] {text}")
    ok = all(v is not False for _, v in checks)
    print(f"all checks: {'OK' if ok else 'FAIL'}", flush=True)
    return ok


def _plot(losses: dict[str, list[float]], entropy: float, cfg: TrainConfig, world: int, backend: str,
          device: torch.device) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return f"(matplotlib is not installed: no plot; pip install matplotlib for {cfg.out}.)"
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=120)
    steps = range(1, len(losses["mxep"]) + 1)
    ax.plot(steps, losses["bf16"], label=f"bf16 MoE ({TWIN_TEXT[cfg.twin]}, no quantization)", color="tab:gray", lw=2.2)
    ax.plot(steps, losses["mxep"], label="mxep.MoE (MXFP8 dispatch + GEMMs, expert parallel)", color="tab:blue", lw=1.4)
    ax.axhline(entropy, ls="--", color="tab:green", lw=1, label=f"grammar entropy {entropy:.2f}")
    ax.set_xlabel(f"step ({world * cfg.batch * cfg.seq} tokens each)")
    ax.set_ylabel("training loss (nats/token)")
    ax.set_title(f"{cfg.layers}-layer MoE LM, {world} rank{'s' if world > 1 else ''} ({backend}, {device.type}), "
                 f"{cfg.experts_per_rank * world} experts top-{cfg.top_k}", fontsize=10)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_ylim(bottom=entropy - 0.1)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)   # the curves fall from the top left and flatten low
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
    fig.savefig(cfg.out)
    plt.close(fig)
    return f"Loss curves: {cfg.out}."


def _init_rank(rank: int, world: int, backend: str, port: int) -> torch.device:
    """One spawned rank's set-up: its device, one thread on CPU, the process group."""
    warnings.filterwarnings("ignore", message=r".*is deprecated.*", category=FutureWarning)
    if backend == "nccl":
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    else:
        torch.set_num_threads(1)
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    return device


def _release_then_destroy() -> None:
    """Free what still holds the process group (the layers' Buffers, kept alive by reference
    cycles until a collection) before destroying it: a group whose last reference goes only at
    interpreter exit is torn down there, which can abort the process ("terminate called
    without an active exception"; seen once each in the demo and in a one-rank test,
    torch 2.13 CPU)."""
    gc.collect()
    dist.destroy_process_group()


def _train_rank(rank: int, world: int, backend: str, port: int, cfg: TrainConfig, result) -> None:
    device = _init_rank(rank, world, backend, port)
    try:
        ok = _train(rank, world, device, cfg, backend)
        if rank == 0:
            result.put(ok)
        # nobody tears down its gloo connections while rank 0 still prints and plots: a rank that
        # destroyed its group and exited early aborted once in a fresh venv ("terminate called
        # without an active exception", torch 2.13 CPU, 2026-12-01)
        dist.barrier()
    finally:
        _release_then_destroy()


# ----------------------------------------------------------------------------------------------
# Launcher.
# ----------------------------------------------------------------------------------------------

# Per machine kind (experts: in all, rounded up to a multiple of the ranks; batch: sequences per
# rank). CPU: a step of the mxep model takes ~11 s of CPU (4 ranks, Triton interpreter; ~5 s of
# wall time on 2 idle cores), the dense bf16 twin's ~0.1 s; 16 steps bring the loss from ln(V) = 3.58
# to about 2.25 (the grammar's entropy is 1.71), in about 100 s in all. GPU (4096 tokens per rank):
# about a minute on one H200 (60 steps took 24 s in all, 34 ms per mxep step, 15 ms per dense step).
CPU_DEFAULTS = dict(steps=16, layers=2, hidden=64, heads=4, ffn_hidden=64, experts=8, top_k=2, seq=32, batch=2,
                    lr=1e-2)
GPU_DEFAULTS = dict(steps=300, layers=4, hidden=256, heads=8, ffn_hidden=512, experts=8, top_k=2, seq=256,
                    batch=16, lr=3e-3)
CPU_RANKS = 4
TWIN_TEXT = {"dense": "dense: all experts on every token, gate-masked sum",
             "local": "BF16LocalMoE: sorted by expert, grouped GEMMs"}
CPU_TIME_BUDGET_S = 150.0   # from launch: stop training early past it (make demo must end in < 3 min)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _parse(argv):
    p = argparse.ArgumentParser(prog="python examples/demo.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int,
                   help=f"training steps (CPU {CPU_DEFAULTS['steps']}, GPU {GPU_DEFAULTS['steps']})")
    p.add_argument("--out", default="demo-loss.png", help="PNG of the loss curves (default %(default)s)")
    p.add_argument("--ranks", type=int, default=CPU_RANKS, help="CPU only: gloo processes (default %(default)s)")
    p.add_argument("--max-seconds", type=float,
                   help=f"stop training once this many seconds have passed since launch "
                        f"(CPU default {CPU_TIME_BUDGET_S:.0f}, GPU none; 0: none)")
    p.add_argument("--seed", type=int, default=0)
    for k in ("layers", "hidden", "heads", "ffn_hidden", "experts", "top_k", "seq", "batch"):
        p.add_argument(f"--{k.replace('_', '-')}", type=int, dest=k,
                       help=f"(CPU {CPU_DEFAULTS[k]}, GPU {GPU_DEFAULTS[k]})"
                            + (": experts in all, rounded up to a multiple of the ranks" if k == "experts" else ""))
    p.add_argument("--twin", choices=tuple(TWIN_TEXT), default="dense",
                   help="the bf16 twin's MoE: " + "; ".join(f"{k}: {v}" for k, v in TWIN_TEXT.items())
                        + " (default %(default)s)")
    p.add_argument("--capture", action="store_true",
                   help="GPU only: each model's forward + loss + backward captured once in a CUDA graph and "
                        "replayed every step (GraphedStep)")
    p.add_argument("--lr", type=float, help=f"(CPU {CPU_DEFAULTS['lr']:g}, GPU {GPU_DEFAULTS['lr']:g})")
    return p.parse_args(argv)


def _config(args, world: int, gpus: int, t_launch: float) -> TrainConfig:
    """The machine kind's defaults, overridden by the command line."""
    d = dict(GPU_DEFAULTS if gpus else CPU_DEFAULTS)
    d.update({k: v for k, v in vars(args).items() if k in d and v is not None})
    budget = args.max_seconds if args.max_seconds is not None else (0.0 if gpus else CPU_TIME_BUDGET_S)
    cfg = TrainConfig(steps=d["steps"], layers=d["layers"], hidden=d["hidden"], heads=d["heads"],
                      ffn_hidden=d["ffn_hidden"], experts_per_rank=-(-d["experts"] // world), top_k=d["top_k"],
                      seq=d["seq"], batch=d["batch"], lr=d["lr"], seed=args.seed, out=args.out,
                      deadline=t_launch + budget if budget > 0 else math.inf, twin=args.twin,
                      capture=args.capture)
    if cfg.capture and not gpus:
        raise SystemExit("--capture needs a CUDA GPU (CUDA graphs)")
    if cfg.hidden % cfg.heads:
        raise SystemExit(f"--hidden {cfg.hidden} must be a multiple of --heads {cfg.heads}")
    return cfg


def main(argv=None) -> None:
    t_launch = time.time()
    args = _parse(argv)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        # Never NVLink multicast on the shared machines (set before any child starts).
        os.environ["NCCL_NVLS_ENABLE"] = "0"
        os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
        os.environ["NVSHMEM_DISABLE_NVLS"] = "1"
        world, backend = gpus, "nccl"
    else:
        os.environ["TRITON_INTERPRET"] = "1"
        world, backend = args.ranks, "gloo"
    cfg = _config(args, world, gpus, t_launch)
    print(f"mxep demo: training a {cfg.layers}-layer MoE transformer on {world} {'GPU' if gpus else 'CPU'} "
          f"rank{'s' if world > 1 else ''} ({backend}{'' if gpus else ', Triton interpreter'}): "
          f"mxep.MoE (MXFP8, expert parallel) beside a bf16 MoE ({TWIN_TEXT[cfg.twin]}), same initial weights, "
          f"same tokens{', each step one CUDA graph' if cfg.capture else ''}",
          flush=True)
    result = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_train_rank, args=(world, backend, _free_port(), cfg, result), nprocs=world)
    ok = result.get() if not result.empty() else False
    print(f"({time.time() - t_launch:.0f} s in all)")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
