"""Token-level against row-level dispatch and combine on the simulated world (every rank's
buffers on one GPU), with the bytes each API puts on the wire and the local copy ceiling of the
same bytes, in one run.

The world's ranks run one after another on the one GPU, so a time is the sum of every rank's
kernels (W ranks' work): the ratio between the APIs is the number to read, and against the copy
ceiling of the same bytes. Each time comes twice (``mxep.testing.timing.time_queued_us``):
``device`` (the call queued behind a device sleep: its kernels' time, the host's launch gaps
hidden, as in a CUDA graph or a host that runs ahead) and ``host_inclusive`` (issued as the GPU runs: the eager
caller's view, where the host's launches of W ranks' phases one after another dominate).
``--profile``: the kernels of one call of each, by share. ``nvshmem``: the NVSHMEM transport's
kernels around its exchange (routing, plan of the exchanged counts, pack, unpack; reduce and sum
of partials), the exchanges themselves left out (they are NVSHMEM's ``all_to_all_vdev``, which
one GPU cannot run): the buffers hold the rows an earlier full call exchanged. Wire bytes per rank are computed from the routing: a row-level
dispatch sends every off-rank (token, expert) pair, a token-level one every off-rank (token,
rank) pair once (MXFP8 data + scales + its k slot rows and weights, 8 bytes each); the combines
send bf16 rows back the same way.

    python benchmarks/bench_tokens_simulated.py [--worlds 4 8] [--tokens 512] [--out results.json]

Config (a)-like: H 7168, 256 experts, top-8, uniform routing, ``--tokens`` per rank (scaled to
fit one GPU).
"""
from __future__ import annotations

import argparse
import json

import torch

from mxep.testing.timing import kernel_profile, time_queued_us


def main() -> None:
    from mxep.ep.routing import route_tokens
    from mxep.ep.transport.nvshmem.simulated import SimulatedNvshmemWorld
    from mxep.ep.transport.symm_mem.simulated import SimulatedWorld

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int, nargs="+", default=[4, 8])
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--hidden", type=int, default=7168)
    p.add_argument("--experts", type=int, default=256)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--out", default=None)
    p.add_argument("--device", default="cuda", help="cuda, or cpu (TRITON_INTERPRET=1, tiny shapes: plumbing only)")
    p.add_argument("--profile", action="store_true", help="print the kernels of each call (GPU)")
    a = p.parse_args()
    dev = torch.device(a.device)
    H, E, k, T = a.hidden, a.experts, a.top_k, a.tokens
    results = []
    for W in a.worlds:
        g = torch.Generator().manual_seed(W)
        idx = [torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).to(dev) for _ in range(W)]
        ws = [torch.rand(T, k, generator=g).to(dev) for _ in range(W)]
        xs = [torch.randn(T, H, generator=g).to(dev, torch.bfloat16) for _ in range(W)]
        # row-level: the sorted expansion (what the MoE layer built before the token API)
        rows, counts, orders = [], [], []
        for i, x in zip(idx, xs):
            order = torch.argsort(i.flatten(), stable=True)
            rows.append(x[order // k].contiguous())
            counts.append(torch.bincount(i.flatten(), minlength=E))
            orders.append(order)
        rw = SimulatedWorld(W, E, H, T * k, device=dev)
        tw = SimulatedWorld(W, E, H, T, device=dev, top_k=k)
        eo_r = [torch.randn(rw.capacity, H, device=dev).bfloat16() for _ in range(W)]
        eo_t = [torch.randn(tw.capacity, H, device=dev).bfloat16() for _ in range(W)]

        def row_dispatch():
            return rw.dispatch(rows, counts)

        def tok_dispatch():
            return tw.dispatch_tokens(xs, idx, ws)

        r_out = row_dispatch()
        t_out = tok_dispatch()
        nw = SimulatedNvshmemWorld(W, E, H, T, k, device=dev)
        n_out = nw.dispatch_tokens(xs, idx, ws)   # one full call: the receive buffers hold its rows
        n_states = [o.handle.state for o in n_out]

        def nv_dispatch():   # everything but the two exchanges (counts, rows)
            for p, x, i, w in zip(nw.peers, xs, idx, ws):
                route = p.route(i)
                send_counts, recv_counts = p.counts_views(p.send_buffer())
                p.put_count_rows(route, send_counts)
                st, _ = p.plan_tokens(route, recv_counts.view(torch.int32), w, nw.align)
                p.pack_tokens(x, st, p.send_buffer(), nw.scale_mode)
            return [p.unpack_tokens(st, p.recv_buffer(), nw.align) for p, st in zip(nw.peers, n_states)]

        def nv_combine():    # the owners' reduce and the sources' sum, without the exchange
            for p, e, st in zip(nw.peers, eo_t, n_states):
                p.reduce_rows(e, st, p.send_buffer(), True)
            return [p.sum_partials(st, p.recv_buffer()) for p, st in zip(nw.peers, n_states)]

        def row_combine():
            back = rw.combine(eo_r, [o.handle for o in r_out])
            ys = []
            for r in range(W):   # the layer's weighted sum of the k rows of a token (fp32 index_add)
                wsorted = ws[r].flatten()[orders[r]]
                ys.append(torch.zeros(T, H, device=dev).index_add_(0, orders[r] // k, back[r].float() * wsorted[:, None])
                          .bfloat16())
            return ys

        def tok_combine():
            return tw.combine_tokens(eo_t, [o.handle for o in t_out])

        L = E // W
        wire_row = wire_tok = 0
        for r in range(W):
            own = idx[r] // L
            wire_row += int((own != r).sum())                          # off-rank pairs
            route = route_tokens(idx[r], E, W)
            sent = route.tokens_per_rank.clone()
            sent[r] = 0
            wire_tok += int(sent.sum())                                # off-rank (token, rank) pairs
        per_rank = lambda n: n / W   # noqa: E731
        row_bytes = (H + H // 32)
        tok_bytes = (H + H // 32 + 8 * k)
        res = dict(world=W, tokens=T, hidden=H, experts=E, top_k=k,
                   dispatch_wire_bytes_per_rank=dict(row=per_rank(wire_row) * row_bytes, token=per_rank(wire_tok) * tok_bytes),
                   combine_wire_bytes_per_rank=dict(row=per_rank(wire_row) * 2 * H, token=per_rank(wire_tok) * 2 * H))
        apis = ("row", "token", "nvshmem")
        for op, fns in (("dispatch", (row_dispatch, tok_dispatch, nv_dispatch)),
                        ("combine", (row_combine, tok_combine, nv_combine))):
            t = [time_queued_us(f, dev) for f in fns]
            res[f"{op}_us"] = {api: m["device_us"] for api, m in zip(apis, t)}
            res[f"{op}_host_inclusive_us"] = {api: m["host_inclusive_us"] for api, m in zip(apis, t)}
            if a.profile and dev.type == "cuda":
                for api, f in zip(apis, fns):
                    res[f"{op}_{api}_kernels"] = kernel_profile(f, dev, steps=2, top=12)
                    for kern in res[f"{op}_{api}_kernels"]:
                        print(f"  W{W} {op} {api}: {kern['us_per_call']:9.1f} us {100 * kern['share']:5.1f}%  "
                              f"{kern['kernel']}")
        # local copy ceiling of the token-level bytes of the whole world (read + write, one pass)
        nbytes = int(per_rank(wire_tok) * W * tok_bytes)
        src = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=dev)
        dst = torch.empty_like(src)
        res["copy_ceiling_us_token_dispatch_bytes"] = time_queued_us(lambda: dst.copy_(src), dev)["device_us"]
        results.append(res)
        print(json.dumps(res))
        del rw, tw, nw, r_out, t_out, n_out, n_states, eo_r, eo_t
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    print("| W | dispatch row / token / nvshmem kernels (us, device) | combine row / token / nvshmem kernels (us, device) "
          "| dispatch / combine row / token (us, host-inclusive) | dispatch wire MB/rank row / token | copy ceiling (us) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        hi_d, hi_c = r["dispatch_host_inclusive_us"], r["combine_host_inclusive_us"]
        d, c = r["dispatch_us"], r["combine_us"]
        print(f"| {r['world']} | {d['row']:.1f} / {d['token']:.1f} / {d['nvshmem']:.1f} | "
              f"{c['row']:.1f} / {c['token']:.1f} / {c['nvshmem']:.1f} | "
              f"{hi_d['row']:.0f} / {hi_d['token']:.0f}, {hi_c['row']:.0f} / {hi_c['token']:.0f} | "
              f"{r['dispatch_wire_bytes_per_rank']['row'] / 1e6:.2f} / {r['dispatch_wire_bytes_per_rank']['token'] / 1e6:.2f} | "
              f"{r['copy_ceiling_us_token_dispatch_bytes']:.1f} |")
    if a.out:
        with open(a.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
