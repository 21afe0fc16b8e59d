"""EP dispatch / combine benchmark: mxep fused vs the unfused MXFP8 pipeline vs NCCL bf16, plus
transfer ceilings, on every rank of one torchrun launch (one process group).

    python -m torch.distributed.run --standalone --nproc_per_node=4 benchmarks/bench_dispatch.py \
        --out benchmarks/results/raw/dispatch_w4.json

(``benchmarks/run_all.py`` launches this with the right environment; see docs/benchmarks.md.)

Systems (names used in the JSON):
  mxep           mxep.Buffer.dispatch / .combine (fused MXFP8, symmetric memory, no host sync),
                 with the EPConfig of ``--ep-config`` (default: mxep.default_config; the header's
                 "ep_config" records it); op dispatch_zero_copy (+ _graph): .dispatch(zero_copy=True),
                 tokens left in the receive region, no copy-out; op combine_zero_copy: .combine of
                 .combine_input() (expert outputs already in the Buffer's region, pulled by the
                 sources); op combine_after_dispatch: the combine timed right after an (untimed)
                 dispatch, as in a training step; ops dispatch_graph / combine_graph: CUDA-graph
                 replays back to back (GPU only); op step_graph: dispatch + combine in one graph (its
                 GB/s column counts the dispatch's bytes only)
  mxep_tokens    mxep.Buffer(top_k=k).dispatch_tokens / .combine_tokens: the token-level path (each
                 token once per destination rank, expanded on the owner; the gate-weighted
                 combine reduced on the owner), on the config's tokens with a top-k routing of
                 the same kind (uniform / skewed; mxep.testing.cases.make_token_case); ops as mxep's
                 (dispatch, combine, combine_after_dispatch, and on GPUs the graph replays);
                 bytes: the token-level wire bytes; checked bit for bit against the row-level
                 dispatch of the stably expert-sorted expansion (with "mxep")
  unfused_mxfp8  mxep.ep.naive_pipeline.unfused_dispatch_mxfp8 / unfused_combine
  nccl_bf16      unfused_dispatch_bf16 / unfused_combine (bf16 all_to_all_single + permute)
  ceilings       ceil_ce, ceil_triton, ceil_nccl, ceil_nccl_pairs (see _ceilings.py), for three traffic patterns
Every system runs under try/except: a failure is recorded as its error string and the rest run.
"""
from __future__ import annotations

import argparse
import gc
import sys

import torch
import torch.distributed as dist

import _ceilings
from _common import (ResultFile, add_common_args, attach_measurement, init_distributed, parse_list,
                     pattern_pair_bytes, result_header, result_line, traffic)

import mxep
from mxep.ep.naive_pipeline import unfused_combine, unfused_dispatch_bf16, unfused_dispatch_mxfp8
from mxep.testing.cases import CONFIGS, ROUTINGS, SMOKE_CONFIGS, count_matrix, make_case, make_token_case, row_bytes
from mxep.testing.overrides import EP_CONFIG_HELP, ep_config, ep_config_dict, parse_ep_config
from mxep.testing.timing import capture_graph, gather, guarded, time_aligned, time_pipelined

SYSTEMS = ("mxep", "mxep_tokens", "unfused_mxfp8", "nccl_bf16", "ceilings")
PATTERNS = ("dispatch_mxfp8", "dispatch_bf16", "combine_bf16")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {','.join(SYSTEMS)}")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="ceiling traffic patterns")
    p.add_argument("--ep-config", default="{}", help=EP_CONFIG_HELP)
    p.add_argument("--transport", default="auto", choices=("auto", "symm_mem", "nvshmem", "collective"),
                   help="the token-level system's Buffer transport. 'nvshmem' selects PyTorch's NVSHMEM backend "
                        "for the process, so it runs with the systems that hold no CUDA symmetric memory "
                        "(mxep_tokens, unfused_mxfp8, nccl_bf16); its check compares with the symmetric-memory "
                        "kernels' simulated world on this GPU")
    args = p.parse_args()
    overrides = parse_ep_config(args.ep_config)
    cpu = args.cpu_smoke
    table = SMOKE_CONFIGS if cpu else CONFIGS
    configs = [table[c] for c in parse_list(args.configs, table)]
    routings = parse_list(args.routings, ROUTINGS)
    systems = parse_list(args.systems, SYSTEMS)
    patterns = parse_list(args.patterns, PATTERNS)
    if args.transport == "nvshmem" and {"mxep", "ceilings"} & set(systems):
        raise SystemExit("--transport nvshmem: the 'mxep' and 'ceilings' systems hold CUDA-backend symmetric memory, "
                         "which one process cannot mix with NVSHMEM's; pass --systems mxep_tokens[,unfused_mxfp8,"
                         "nccl_bf16]")

    rank, world, device = init_distributed(cpu, args.pg_timeout)
    group = None

    def log(msg: str) -> None:
        if rank == 0:
            print(msg, flush=True)

    def log_all(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    # the EPConfig of the first config's Buffer (default_config gives one config for every shape
    # measured so far; each Buffer below is built with ep_config(overrides, device, H))
    header = result_header("bench_dispatch", rank, world, cpu, args, configs,
                           ep_config=ep_config_dict(ep_config(overrides, device, configs[0].hidden)),
                           timing=("median over iters of CUDA-event time around one call, each call preceded by a device "
                                  "sleep and a one-element NCCL all_reduce (device-side rank alignment); reported "
                                  "median_us = max over ranks of the per-rank medians"))
    rf = ResultFile(args.out, rank, header)
    if world < 2:
        rf.data["error"] = "needs at least 2 ranks"
        rf.flush(finished=True)
        dist.destroy_process_group()
        return

    def run(name, fn):
        return guarded(name, fn, group, device, log_all)

    def timed(fn, pipelined: bool = False, setup=None):
        m, err = run("time", lambda: time_aligned(fn, device=device, group=group, warmup=args.warmup,
                                                  iters=args.iters, setup=setup))
        if m is not None and pipelined and args.pipelined_iters > 0:
            pm, perr = run("pipelined", lambda: time_pipelined(fn, device=device, group=group,
                                                                iters=args.pipelined_iters))
            m["pipelined"] = pm if pm is not None else {"error": perr}
        return m, err

    # ---- ceilings: one symmetric buffer sized for every case of this launch
    ceil = None
    ceil_err = None
    if "ceilings" in systems:
        if cpu:
            res, err = run("peer_store selftest", lambda: _ceilings.simulated_peer_store_check(3, rank))
            rf.add({"world": world, "system": "selftest", "op": "peer_store_kernel_simulated", "check": res,
                    "error": err})

        def need():
            return max(_ceilings.recv_bytes_needed(pattern_pair_bytes(count_matrix(c, r, world, args.seed), world,
                                                                       c.hidden, pt))
                       for c in configs for r in routings for pt in patterns)
        ceil, ceil_err = run("ceilings init", lambda: _ceilings.PeerCeilings(group, device, need()))

    def token_level(cfg, routing, record, run, timed) -> None:
        """The token-level system on this config and routing (see the module docstring)."""
        H, E, T, k = cfg.hidden, cfg.experts, cfg.tokens, cfg.topk
        tbuf, err = run("mxep.Buffer(top_k)", lambda: mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T,
                                                                  top_k=k, align=32, transport=args.transport,
                                                                  config=ep_config(overrides, device, H)))
        if tbuf is not None:
            log(f"   {tbuf!r}")
        tc, terr = run("token inputs", lambda: make_token_case(cfg, routing, world, rank, device, args.seed))
        err = err or terr
        extra = {"symm_bytes": tbuf.symm_bytes if tbuf else None,
                 "transport": tbuf.transport_name if tbuf else None,
                 "capacity_rows": tbuf.capacity if tbuf else None}
        if tbuf is None or tc is None:
            for op, pat in (("dispatch", "dispatch_mxfp8"), ("combine", "combine_bf16")):
                record("mxep_tokens", op, pat, err=f"setup: {err}", **extra)
            return
        nb = tc.wire_bytes_avg
        x, idx, w = tc.x, tc.topk_idx, tc.topk_weights
        m, err = timed(lambda: tbuf.dispatch_tokens(x, idx, w), pipelined=True)
        record("mxep_tokens", "dispatch", "dispatch_mxfp8", m, err, nbytes=nb, **extra)
        res, err = run("mxep_tokens dispatch", lambda: tbuf.dispatch_tokens(x, idx, w))
        m = None
        if res is not None:
            eo = torch.randn(tbuf.capacity, H, device=device, dtype=torch.bfloat16)
            m, err = timed(lambda: tbuf.combine_tokens(eo, res.handle), pipelined=True)
        cb = nb / (row_bytes("mxfp8", H) + 8 * k) * 2 * H   # one bf16 partial per off-rank (token, rank)
        record("mxep_tokens", "combine", "combine_bf16", m, err, nbytes=cb, **extra)
        m = None
        if res is not None:
            step = {}
            m, err = timed(lambda: tbuf.combine_tokens(eo, step["res"].handle),
                           setup=lambda: step.update(res=tbuf.dispatch_tokens(x, idx, w)))
            step.clear()
        record("mxep_tokens", "combine_after_dispatch", "combine_bf16", m, err, nbytes=cb, **extra)
        if device.type == "cuda" and res is not None and args.pipelined_iters > 0:
            last = {}   # the latest dispatch before a capture: its handle is the combine's
            for op, pat, fn, b in (("dispatch_graph", "dispatch_mxfp8", lambda: tbuf.dispatch_tokens(x, idx, w), nb),
                                   ("combine_graph", "combine_bf16",
                                    lambda: tbuf.combine_tokens(eo, last["res"].handle), cb),
                                   ("step_graph", "dispatch_mxfp8",
                                    lambda: tbuf.combine_tokens(eo, tbuf.dispatch_tokens(x, idx, w).handle), nb)):
                last["res"] = tbuf.dispatch_tokens(x, idx, w)
                graph, err = run(f"tokens {op} capture", lambda: capture_graph(fn))
                m = None
                if graph is not None:
                    m, err = run(op, lambda: time_pipelined(graph.replay, device=device, group=group,
                                                            iters=args.pipelined_iters))
                record("mxep_tokens", op, pat, m, err, nbytes=b, **extra)
                graph = None

        def check():
            """The token dispatch's layout against the row-level dispatch of the stably
            expert-sorted expansion (bit for bit), on a row-level Buffer of the same shape."""
            rbuf = mxep.Buffer(None, num_experts=E, hidden=H, max_tokens_per_rank=T * k, align=32,
                               config=ep_config(overrides, device, H))
            got = tbuf.dispatch_tokens(x, idx, w)
            order = torch.argsort(idx.flatten().long(), stable=True)
            counts = torch.zeros(E, dtype=torch.int64, device=device).scatter_add_(
                0, idx.flatten().long(), torch.ones(T * k, dtype=torch.int64, device=device))
            want = rbuf.dispatch(x[order // k].contiguous(), counts)
            R = int(want.group_end_offsets[-1])   # debug-only (the benchmark's check)
            bad = [name for name, a, b in (
                ("group_end_offsets", got.group_end_offsets, want.group_end_offsets),
                ("tokens_per_expert", got.tokens_per_expert, want.tokens_per_expert),
                ("qdata", got.tokens.qdata[:R].view(torch.uint8), want.tokens.qdata[:R].view(torch.uint8)),
                ("scale", got.tokens.scale[:R].view(torch.uint8), want.tokens.scale[:R].view(torch.uint8)))
                if not torch.equal(a, b)]
            return "ok" if not bad else "mismatch: " + ",".join(bad)

        def check_simulated():
            """(no CUDA symmetric memory in this process) The layout, bit for bit, against the
            symmetric-memory kernels' simulated world of every rank's inputs on this GPU."""
            from mxep.ep.transport.symm_mem.simulated import SimulatedWorld

            cases = [make_token_case(cfg, routing, world, r, device, args.seed) for r in range(world)]
            sw = SimulatedWorld(world, E, H, T, 32, top_k=k, device=device)
            want = sw.dispatch_tokens([c.x for c in cases], [c.topk_idx for c in cases],
                                      [c.topk_weights for c in cases])[rank]
            got = tbuf.dispatch_tokens(x, idx, w)
            R = int(want.group_end_offsets[-1])   # debug-only (the benchmark's check)
            bad = [name for name, a, b in (
                ("group_end_offsets", got.group_end_offsets, want.group_end_offsets),
                ("qdata", got.tokens.qdata[:R].view(torch.uint8), want.tokens.qdata[:R].view(torch.uint8)),
                ("scale", got.tokens.scale[:R].view(torch.uint8), want.tokens.scale[:R].view(torch.uint8)))
                if not torch.equal(a, b)]
            return "ok" if not bad else "mismatch: " + ",".join(bad)
        out, err = run("tokens check", check_simulated if tbuf.transport_name == "nvshmem" else check)
        verdicts = gather(out)
        verdict = "ok" if all(v == "ok" for v in verdicts) else "; ".join(
            f"rank {r}: {v}" for r, v in enumerate(verdicts) if v != "ok")
        rf.add({"world": world, "config": cfg.name, "routing": routing, "system": "check",
                "op": "mxep_tokens_vs_row_level_bitwise", "check": verdict, "error": err})
        log(f"   check mxep_tokens vs the row-level dispatch of the sorted expansion: {verdict if err is None else err}")

    with torch.no_grad():
        for cfg in configs:
            H, E, n = cfg.hidden, cfg.experts, cfg.rows
            log(f"== world {world} config {cfg.name}: {cfg.label}")
            buf, buf_err = None, None
            if "mxep" in systems:
                buf, buf_err = run("mxep.Buffer", lambda: mxep.Buffer(None, num_experts=E, hidden=H,
                                                                     max_tokens_per_rank=n, align=32,
                                                                     config=ep_config(overrides, device, H)))
                if buf is not None:
                    log(f"   {buf!r}")
            for routing in routings:
                base = {"world": world, "config": cfg.name, "routing": routing}
                case, case_err = run("inputs", lambda: make_case(cfg, routing, world, rank, device, args.seed))
                tr = {pt: traffic(count_matrix(cfg, routing, world, args.seed), world, H, pt) for pt in PATTERNS}

                def record(system, op, pattern, meas=None, err=None, nbytes=None, **extra):
                    rec = dict(base, system=system, op=op, pattern=pattern, error=err, **extra)
                    rec.update(tr[pattern])
                    if nbytes is not None:
                        rec["bytes_sent_avg"] = nbytes
                        rec["bytes_sent_per_rank"] = [nbytes] * world
                    rf.add(attach_measurement(rec, meas))
                    if rank == 0:
                        print(f"   w{world} {cfg.name} {routing:8s} {system:14s} {op:24s} {result_line(rec, meas, err)}",
                              flush=True)

                if case is None:
                    for s in systems:
                        record(s, "setup", "dispatch_mxfp8", err=f"inputs: {case_err}")
                    continue
                x, counts = case.x, case.counts
                keep = {}

                # ---- 1. mxep fused
                if "mxep" in systems:
                    extra = {"symm_bytes": buf.symm_bytes if buf else None,
                             "transport": buf.transport_name if buf else None,
                             "capacity_rows": buf.capacity if buf else None}
                    if buf is None:
                        record("mxep", "dispatch", "dispatch_mxfp8", err=f"Buffer: {buf_err}", **extra)
                        record("mxep", "combine", "combine_bf16", err=f"Buffer: {buf_err}", **extra)
                    else:
                        m, err = timed(lambda: buf.dispatch(x, counts), pipelined=True)
                        record("mxep", "dispatch", "dispatch_mxfp8", m, err, **extra)
                        # Zero-copy dispatch: the tokens stay in the receive region until the next
                        # dispatch (no copy-out; DeepEP's low-latency contract). Checked below.
                        m, err = timed(lambda: buf.dispatch(x, counts, zero_copy=True), pipelined=True)
                        record("mxep", "dispatch_zero_copy", "dispatch_mxfp8", m, err, **extra)
                        res, err = run("mxep dispatch", lambda: buf.dispatch(x, counts))
                        if res is not None:
                            eo = torch.randn(buf.capacity, H, device=device, dtype=torch.bfloat16)
                            keep["mxep"] = (res, eo)
                            m, err = timed(lambda: buf.combine(eo, res.handle), pipelined=True)
                        record("mxep", "combine", "combine_bf16", m, err, **extra)
                        # The combine as a training step runs it: right after its dispatch (untimed,
                        # before the alignment), so the dispatch's last barrier serves as the
                        # combine's entry barrier. The "combine" row above is combine after combine.
                        m = None
                        if res is not None:
                            step = {}
                            m, err = timed(lambda: buf.combine(eo, step["res"].handle),
                                           setup=lambda: step.update(res=buf.dispatch(x, counts)))
                            step.clear()
                        record("mxep", "combine_after_dispatch", "combine_bf16", m, err, **extra)
                        # Zero-copy input: the expert outputs already sit in the Buffer's region
                        # (written there after the dispatch, as a grouped GEMM with out= would).
                        m = None
                        if res is not None:
                            zres = buf.dispatch(x, counts)   # a combine takes the last dispatch's handle
                            zin = buf.combine_input()
                            zin.copy_(eo)
                            m, err = timed(lambda: buf.combine(zin, zres.handle), pipelined=True)
                        record("mxep", "combine_zero_copy", "combine_bf16", m, err, **extra)
                        # CUDA-graph replay, back to back: the per-call time of a captured step,
                        # where no host work is left (eager calls above pay ~0.4-1 ms of host
                        # time each; see "pipelined").
                        if device.type == "cuda" and res is not None and args.pipelined_iters > 0:
                            last = {}   # the latest dispatch before a capture: its handle is the combine's
                            for op, pat, fn in (("dispatch_graph", "dispatch_mxfp8", lambda: buf.dispatch(x, counts)),
                                                ("dispatch_zero_copy_graph", "dispatch_mxfp8",
                                                 lambda: buf.dispatch(x, counts, zero_copy=True)),
                                                ("combine_graph", "combine_bf16",
                                                 lambda: buf.combine(eo, last["res"].handle)),
                                                # dispatch then combine, one graph: a step's EP traffic
                                                ("step_graph", "dispatch_mxfp8",
                                                 lambda: buf.combine(eo, buf.dispatch(x, counts).handle))):
                                last["res"] = buf.dispatch(x, counts)
                                graph, err = run(f"{op} capture", lambda: capture_graph(fn))
                                m = None
                                if graph is not None:
                                    m, err = run(op, lambda: time_pipelined(graph.replay, device=device, group=group,
                                                                            iters=args.pipelined_iters))
                                record("mxep", op, pat, m, err, **extra)
                                graph = None

                # ---- 1b. mxep token-level
                if "mxep_tokens" in systems:
                    token_level(cfg, routing, record, run, timed)

                # ---- 2. unfused MXFP8 and 3. NCCL bf16
                for name, disp in (("unfused_mxfp8", lambda: unfused_dispatch_mxfp8(x, counts, group, align=32)),
                                   ("nccl_bf16", lambda: unfused_dispatch_bf16(x, counts, group))):
                    if name not in systems:
                        continue
                    pat = "dispatch_mxfp8" if name == "unfused_mxfp8" else "dispatch_bf16"
                    m, err = timed(disp)
                    record(name, "dispatch", pat, m, err, align=32 if name == "unfused_mxfp8" else 8)
                    m = None
                    ures, err = run(f"{name} dispatch", disp)
                    if ures is not None:
                        ueo = torch.randn(ures.handle.num_padded_rows, H, device=device, dtype=torch.bfloat16)
                        keep[name] = (ures, ueo)
                        m, err = timed(lambda: unfused_combine(ueo, ures.handle))
                    record(name, "combine", "combine_bf16", m, err)

                # ---- correctness: mxep vs the unfused reference, same routing, same inputs
                if "mxep" in keep and "unfused_mxfp8" in keep:
                    def check():
                        (res, eo), (ures, _) = keep["mxep"], keep["unfused_mxfp8"]
                        R = ures.handle.num_padded_rows
                        rz = buf.dispatch(x, counts, zero_copy=True)   # compared before the region is reused
                        zero_copy_ok = (torch.equal(rz.tokens.qdata[:R].view(torch.uint8), ures.tokens.qdata.view(torch.uint8))
                                        and torch.equal(rz.tokens.scale[:R].view(torch.uint8), ures.tokens.scale.view(torch.uint8)))
                        # collectives first, on every rank whatever the comparisons say; a combine
                        # takes the handle of the Buffer's last dispatch
                        handle = buf.dispatch(x, counts).handle
                        y1 = buf.combine(eo, handle)
                        # the graph replays above dispatched again into the region: refill it
                        y0 = buf.combine(buf.combine_input().copy_(eo), handle)
                        y2 = unfused_combine(eo[:R], ures.handle)
                        bad = []
                        if not torch.equal(res.group_end_offsets.cpu(), ures.group_end_offsets.cpu()):
                            bad.append("group_end_offsets")
                        if not torch.equal(res.tokens_per_expert.cpu(), ures.tokens_per_expert.cpu()):
                            bad.append("tokens_per_expert")
                        if not bad:
                            if not torch.equal(res.tokens.qdata[:R].view(torch.uint8), ures.tokens.qdata.view(torch.uint8)):
                                bad.append("qdata")
                            if not torch.equal(res.tokens.scale[:R].view(torch.uint8), ures.tokens.scale.view(torch.uint8)):
                                bad.append("scale")
                        if not zero_copy_ok:
                            bad.append("dispatch_zero_copy")
                        if not torch.equal(y1, y2):
                            bad.append("combine")
                        if not torch.equal(y0, y2):
                            bad.append("combine_zero_copy")
                        try:   # the device-side status word: no timed-out wait, no clamped counts
                            buf.check("the benchmark's calls")
                        except RuntimeError as exc:
                            bad.append(f"status ({exc})")
                        return "ok" if not bad else "mismatch: " + ",".join(bad)
                    out, err = run("check", check)
                    verdicts = gather(out)
                    verdict = "ok" if all(v == "ok" for v in verdicts) else "; ".join(
                        f"rank {r}: {v}" for r, v in enumerate(verdicts) if v != "ok")
                    rf.add(dict(base, system="check", op="mxep_vs_unfused_bitwise", check=verdict, error=err))
                    log(f"   check mxep vs unfused (dispatch bytes + combine rows): {verdict if err is None else err}")
                keep.clear()
                gc.collect()

                # ---- 5. ceilings, same bytes peer to peer
                if "ceilings" in systems:
                    for pt in patterns:
                        B = pattern_pair_bytes(case.C, world, H, pt)
                        if ceil is None:
                            record("ceil_ce", pt, pt, err=f"init: {ceil_err}")
                            record("ceil_triton", pt, pt, err=f"init: {ceil_err}")
                        else:
                            fns, err = run("ceilings prepare", lambda: ceil.prepare(B))
                            for sname in ("ceil_ce", "ceil_triton"):
                                m, e2 = (None, err) if fns is None else timed(fns[sname])
                                record(sname, pt, pt, m, e2, symm_bytes=ceil.symm_bytes)
                            del fns
                        got, err = run("nccl ceiling", lambda: _ceilings.nccl_ceiling(B, group, device))
                        if got is None:
                            record("ceil_nccl", pt, pt, err=err)
                        else:
                            fn, nbytes = got
                            m, err = timed(fn)
                            record("ceil_nccl", pt, pt, m, err, nbytes=nbytes)
                        del got
                        fn, err = run("nccl pairs ceiling", lambda: _ceilings.nccl_pairs_ceiling(B, group, device))
                        m, err = (None, err) if fn is None else timed(fn)
                        record("ceil_nccl_pairs", pt, pt, m, err)
                        del fn
                case = x = counts = None
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            buf = None
            gc.collect()

    rf.flush(finished=True)
    log(f"wrote {args.out}")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
