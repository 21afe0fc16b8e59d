"""torch.ops.symm_mem.all_to_all_vdev_2d (NVSHMEM backend) as an MXFP8 EP dispatch, and
all_to_all_vdev_2d_offset as its combine. Its own torchrun launch: ``symm_mem.set_backend("NVSHMEM")``
must precede every symmetric allocation of the process, so it cannot share a process with the
CUDA-backend systems of bench_dispatch.py.

    python -m torch.distributed.run --standalone --nproc_per_node=4 benchmarks/bench_nvshmem.py \
        --out benchmarks/results/raw/nvshmem_w4.json

Dispatch (timed): ``mxep.to_mxfp8(x)`` -> pack data+scales into the symmetric input rows
``[n, H + H/32]`` uint8 -> copy the counts into the symmetric split vector ->
``all_to_all_vdev_2d(inp, out, in_splits, out_splits_offsets, group_name, major_align=32)``. Its
output is the expert-major layout padded to 32 rows per expert (the same layout as mxep), left
in symmetric memory; pad rows are not zeroed (mxep zeroes them).
Combine (timed): copy the dispatch's ``out_splits_offsets`` into the combine's input
split/offset tensor -> ``all_to_all_vdev_2d_offset(expert_out, out, in_splits_offsets,
out_splits_offsets, group_name)`` (bf16 rows back to their sources, original order).
Both are checked once per case against the unfused reference (data rows bit for bit).
Any exception is recorded as its error string. The process ends with os._exit(0) after the
JSON is written (NVSHMEM finalization at exit has been seen to crash).
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.distributed as dist

from _common import (ResultFile, add_common_args, attach_measurement, init_distributed, parse_list, result_header,
                     result_line, traffic)

import mxep
from mxep.ep.naive_pipeline import unfused_combine, unfused_dispatch_mxfp8
from mxep.testing.cases import CONFIGS, ROUTINGS, SMOKE_CONFIGS, count_matrix, make_case, row_bytes
from mxep.testing.timing import gather, guarded, short_error, time_aligned, time_pipelined

SYSTEM = "nvshmem_a2a_2d"
ALIGN = 32


def symm_bytes_needed(cfg, world: int) -> int:
    """Symmetric bytes per rank this script allocates for one config."""
    n, H, E = cfg.rows, cfg.hidden, cfg.experts
    cap = world * n + (E // world) * ALIGN
    rb = row_bytes("mxfp8", H)
    return n * rb + cap * rb + cap * H * 2 + n * H * 2 + 4 * (2 * E * 8) + E * 8


def valid_rows(goe: torch.Tensor, tpe: torch.Tensor, R: int) -> torch.Tensor:
    """bool ``[R]``: rows of the padded expert-major layout that hold data (not padding)."""
    goe, tpe = goe.long(), tpe.long()
    r = torch.arange(R, device=goe.device)
    g = torch.searchsorted(goe, r, right=True)
    start = torch.cat([goe.new_zeros(1), goe[:-1]])[g]
    return (r - start) < tpe[g]


class EmulatedOps:
    """``--cpu-smoke`` stand-in for torch.ops.symm_mem (gloo, regular tensors): the documented
    semantics of all_to_all_vdev_2d / _offset written with all_gather, so the packing, split
    bookkeeping and checks of this script run end to end on CPU. Not a benchmark."""

    def __init__(self, group=None):
        self.group = group

    def _all(self, t: torch.Tensor) -> list[torch.Tensor]:
        w = t.view(torch.uint8) if t.dtype == torch.bfloat16 else t  # gloo: no bf16/int16
        out = [torch.empty_like(w) for _ in range(dist.get_world_size(self.group))]
        dist.all_gather(out, w.contiguous(), group=self.group)
        return [o.view(t.dtype) for o in out]

    def all_to_all_vdev_2d(self, inp, out, in_splits, out_so, group_name, major_align=None):
        W, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        E = in_splits.numel()
        ne, align = E // W, major_align or 1
        inps, splits = self._all(inp), [s.tolist() for s in self._all(in_splits)]
        pos = 0
        for e in range(ne):
            g = me * ne + e
            start = pos
            for s in range(W):
                off, ln = sum(splits[s][:g]), splits[s][g]
                out[pos:pos + ln] = inps[s][off:off + ln]
                out_so[0, e * W + s], out_so[1, e * W + s] = ln, pos
                pos += ln
            tot = pos - start
            pos = start + max((tot + align - 1) // align * align, align)

    def all_to_all_vdev_2d_offset(self, inp, out, in_so, out_so, group_name):
        W, me = dist.get_world_size(self.group), dist.get_rank(self.group)
        ne = in_so.shape[1] // W
        inps, sos = self._all(inp), [t.tolist() for t in self._all(in_so)]
        pos = 0
        for r in range(W):
            for e in range(ne):
                ln, off = sos[r][0][e * W + me], sos[r][1][e * W + me]
                out[pos:pos + ln] = inps[r][off:off + ln]
                out_so[0, r * ne + e], out_so[1, r * ne + e] = ln, pos
                pos += ln


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    args = p.parse_args()
    cpu = args.cpu_smoke
    table = SMOKE_CONFIGS if cpu else CONFIGS
    configs = [table[c] for c in parse_list(args.configs, table)]
    routings = parse_list(args.routings, ROUTINGS)

    rank, world, device = init_distributed(cpu, args.pg_timeout)
    group = None

    def log(msg):
        if rank == 0:
            print(msg, flush=True)

    def log_all(msg):
        print(msg, file=sys.stderr, flush=True)

    def run(name, fn):
        return guarded(name, fn, group, device, log_all)

    header = result_header("bench_nvshmem", rank, world, cpu, args, configs)
    rf = ResultFile(args.out, rank, header)

    def finish(code: int = 0):
        rf.flush(finished=True)
        log(f"wrote {args.out}")
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001
            pass
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # skip NVSHMEM finalization (see module docstring)

    def record_all(err: str) -> None:
        for cfg in configs:
            for routing in routings:
                for op, pat in (("dispatch", "dispatch_mxfp8"), ("combine", "combine_bf16")):
                    rec = {"world": world, "config": cfg.name, "routing": routing, "system": SYSTEM, "op": op,
                           "pattern": pat, "error": err}
                    rec.update(traffic(count_matrix(cfg, routing, world, args.seed), world, cfg.hidden, pat))
                    rf.add(rec)

    if world < 2:
        record_all("skipped: needs >= 2 ranks")
        finish()

    info = {}
    rf.data["nvshmem"] = info
    group_name = dist.group.WORLD.group_name
    if cpu:
        info["emulated"] = True  # plumbing check only: see EmulatedOps

        class _Host:
            @staticmethod
            def empty(shape, dtype, device):
                return torch.empty(shape, dtype=dtype, device=device)

            @staticmethod
            def rendezvous(t, name):
                return None

        symm_mem, ops = _Host, EmulatedOps(group)
    else:
        import torch.distributed._symmetric_memory as symm_mem

        try:
            info["nvshmem_available"] = bool(symm_mem.is_nvshmem_available())
        except Exception as exc:  # noqa: BLE001
            info["nvshmem_available"] = short_error(exc)
        _, err = run("set_backend", lambda: symm_mem.set_backend("NVSHMEM"))
        if err is not None:
            record_all(f"set_backend('NVSHMEM'): {err}")
            finish()
        try:
            symm_mem.enable_symm_mem_for_group(group_name)  # older torch needs it; newer ones ignore it
        except Exception as exc:  # noqa: BLE001
            info["enable_symm_mem_for_group"] = short_error(exc)
        ops = torch.ops.symm_mem

    # Configs with few local experts first: the kernel limits experts per rank (a failing
    # config must not be the first to touch NVSHMEM).
    configs.sort(key=lambda c: c.experts // world)
    with torch.no_grad():
        for cfg in configs:
            H, E, n = cfg.hidden, cfg.experts, cfg.rows
            cap = world * n + (E // world) * ALIGN
            log(f"== world {world} config {cfg.name}: {cfg.label} (NVSHMEM all_to_all_vdev_2d)")

            def alloc():
                t = {
                    "inp": symm_mem.empty((n, H + H // 32), dtype=torch.uint8, device=device),
                    "out": symm_mem.empty((cap, H + H // 32), dtype=torch.uint8, device=device),
                    "in_splits": symm_mem.empty((E,), dtype=torch.int64, device=device),
                    "out_so": symm_mem.empty((2, E), dtype=torch.int64, device=device),
                    "c_inp": symm_mem.empty((cap, H), dtype=torch.bfloat16, device=device),
                    "c_out": symm_mem.empty((n, H), dtype=torch.bfloat16, device=device),
                    "c_in_so": symm_mem.empty((2, E), dtype=torch.int64, device=device),
                    "c_out_so": symm_mem.empty((2, E), dtype=torch.int64, device=device),
                }
                for v in t.values():
                    symm_mem.rendezvous(v, group_name)
                t["c_inp"].copy_(torch.randn(cap, H, dtype=torch.bfloat16, device=device))
                t["out"].fill_(0xA5)
                return t

            T, alloc_err = run("alloc", alloc)
            sbytes = sum(v.numel() * v.element_size() for v in T.values()) if T else None
            for routing in routings:
                base = {"world": world, "config": cfg.name, "routing": routing, "system": SYSTEM,
                        "symm_bytes": sbytes, "emulated": cpu}
                tr = {pt: traffic(count_matrix(cfg, routing, world, args.seed), world, H, pt)
                      for pt in ("dispatch_mxfp8", "combine_bf16")}

                def record(op, pattern, meas=None, err=None, **extra):
                    rec = dict(base, op=op, pattern=pattern, error=err, **extra)
                    rec.update(tr[pattern])
                    rf.add(attach_measurement(rec, meas))
                    if rank == 0:
                        print(f"   w{world} {cfg.name} {routing:8s} {SYSTEM} {op:8s} {result_line(rec, meas, err)}",
                              flush=True)

                if T is None:
                    record("dispatch", "dispatch_mxfp8", err=f"alloc: {alloc_err}")
                    record("combine", "combine_bf16", err=f"alloc: {alloc_err}")
                    continue
                case, err = run("inputs", lambda: make_case(cfg, routing, world, rank, device, args.seed))
                if case is None:
                    record("dispatch", "dispatch_mxfp8", err=f"inputs: {err}")
                    record("combine", "combine_bf16", err=f"inputs: {err}")
                    continue
                x, counts = case.x, case.counts

                def dispatch():
                    q = mxep.to_mxfp8(x, "rceil")
                    T["inp"][:, :H].copy_(q.qdata.view(torch.uint8))
                    T["inp"][:, H:].copy_(q.scale.view(torch.uint8))
                    T["in_splits"].copy_(counts)
                    ops.all_to_all_vdev_2d(T["inp"], T["out"], T["in_splits"], T["out_so"], group_name,
                                           major_align=ALIGN)

                def combine():
                    T["c_in_so"].copy_(T["out_so"])
                    ops.all_to_all_vdev_2d_offset(T["c_inp"], T["c_out"], T["c_in_so"], T["c_out_so"], group_name)

                def timed(fn):
                    m, e = run("time", lambda: time_aligned(fn, device=device, group=group, warmup=args.warmup,
                                                            iters=args.iters))
                    if m is not None and args.pipelined_iters > 0:
                        pm, pe = run("pipelined", lambda: time_pipelined(fn, device=device, group=group,
                                                                          iters=args.pipelined_iters))
                        m["pipelined"] = pm if pm is not None else {"error": pe}
                    return m, e

                _, d_err = run("dispatch once", dispatch)
                m, err = (None, d_err) if d_err else timed(dispatch)
                # check (collectives on every rank first, comparisons after)
                check = None
                if d_err is None:
                    def do_check():
                        dispatch()
                        ures = unfused_dispatch_mxfp8(x, counts, group, align=ALIGN)
                        R = ures.handle.num_padded_rows
                        ref = torch.cat([ures.tokens.qdata.view(torch.uint8), ures.tokens.scale.view(torch.uint8)], 1)
                        ok = valid_rows(ures.group_end_offsets, ures.tokens_per_expert, R)
                        bad = []
                        if R > cap:
                            bad.append(f"layout rows {R} > capacity {cap}")
                        elif not torch.equal(T["out"][:R][ok], ref[ok]):
                            bad.append("dispatch rows")
                        combine()
                        y_ref = unfused_combine(T["c_inp"][:R], ures.handle)
                        if not torch.equal(T["c_out"][:n], y_ref):
                            bad.append("combine rows")
                        return "ok" if not bad else "mismatch: " + ",".join(bad)
                    verdict, cerr = run("check", do_check)
                    verdicts = gather(verdict)
                    check = (f"error: {cerr}" if cerr else "ok" if all(v == "ok" for v in verdicts)
                             else "; ".join(f"rank {r}: {v}" for r, v in enumerate(verdicts) if v != "ok"))
                    log(f"   check vs unfused reference: {check}")
                record("dispatch", "dispatch_mxfp8", m, err, check=check)
                if d_err is not None:
                    record("combine", "combine_bf16", err=f"needs a dispatch: {d_err}")
                else:
                    _, c_err = run("combine once", combine)
                    m, err = (None, c_err) if c_err else timed(combine)
                    record("combine", "combine_bf16", m, err, check=check)
                case = x = counts = None
                gc.collect()
            T = None
            gc.collect()
            if not cpu:
                torch.cuda.empty_cache()
    finish()


if __name__ == "__main__":
    main()
