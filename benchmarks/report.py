"""Markdown table and PNG plot from the merged benchmark JSON (written by run_all.py).

    python benchmarks/report.py benchmarks/results/results.json     # rewrites results.md / results.png

Derived numbers (computed here from raw records, nothing measured):
  GB/s per rank   = average over ranks of bytes sent to other ranks / median time (1 GB = 1e9 B)
  % of a ceiling  = GB/s / that ceiling's GB/s on the same traffic pattern (same world, config,
                    routing): copy engine (CE), Triton peer stores (Triton), NCCL all_to_all of
                    raw bytes (NCCL), and the NVLink nominal 450 GB/s per direction per GPU
  mxep speedup    = this system's median time / mxep's median time for the same op and case
"""
from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

SYSTEM_ORDER = ["mxep", "mxep_tokens", "unfused_mxfp8", "nccl_bf16", "nvshmem_a2a_2d", "ceil_ce", "ceil_triton", "ceil_nccl",
                "ceil_nccl_pairs"]
SYSTEM_LABEL = {
    "mxep": "mxep fused (MXFP8)",
    "mxep_tokens": "mxep token-level (MXFP8, once per destination rank)",
    "unfused_mxfp8": "unfused MXFP8 (NCCL a2a + permute)",
    "nccl_bf16": "NCCL bf16 (a2a + permute)",
    "nvshmem_a2a_2d": "symm_mem all_to_all_vdev_2d (NVSHMEM)",
    "ceil_ce": "ceiling: copy engine",
    "ceil_triton": "ceiling: Triton peer stores",
    "ceil_nccl": "ceiling: NCCL a2a raw bytes",
    "ceil_nccl_pairs": "ceiling: NCCL a2a raw bytes, real splits",
}
CEILINGS = ("ceil_ce", "ceil_triton", "ceil_nccl", "ceil_nccl_pairs")
ZERO_COPY = "mxep_zero_copy"   # plot-only label: system mxep, op dispatch_zero_copy / combine_zero_copy
SYSTEM_LABEL[ZERO_COPY] = "mxep, zero-copy (tokens / expert outputs in the Buffer)"
COLORS = {"mxep": "#1f77b4", "mxep_tokens": "#d62728", ZERO_COPY: "#aec7e8", "unfused_mxfp8": "#ff7f0e", "nccl_bf16": "#2ca02c", "nvshmem_a2a_2d": "#9467bd",
          "ceil_ce": "#7f7f7f", "ceil_triton": "#bcbd22", "ceil_nccl": "#17becf",
          "ceil_nccl_pairs": "#9edae5"}


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v, nd=1) -> str:
    return "" if v is None else f"{v:.{nd}f}"


def _case_key(r) -> tuple:
    return (r.get("world"), r.get("config"), r.get("routing"))


_ROUTING_ORDER = {"uniform": 0, "skewed": 1}


def _case_sort(key: tuple) -> tuple:
    return (-(key[0] or 0), key[1] or "", _ROUTING_ORDER.get(key[2], 9))


def derive(records: list[dict], nvlink_gbps: float = 450.0) -> list[dict]:
    """Rows for the table: one per (case, system, op), with ceilings and speedups attached."""
    ceil = defaultdict(dict)  # (world, config, routing, pattern) -> {ceiling system: gbps}
    times = {}  # (world, config, routing, system, op) -> median_us
    for r in records:
        if r.get("system") in CEILINGS and r.get("gbps"):
            ceil[_case_key(r) + (r["pattern"],)][r["system"]] = r["gbps"]
        if r.get("median_us"):
            times[_case_key(r) + (r["system"], r["op"])] = r["median_us"]
    rows = []
    for r in records:
        if r.get("system") not in SYSTEM_ORDER:
            continue
        row = dict(r)
        c = ceil.get(_case_key(r) + (r.get("pattern"),), {})
        for name in CEILINGS:
            row[f"pct_{name}"] = 100.0 * r["gbps"] / c[name] if r.get("gbps") and c.get(name) else None
        row["pct_nvlink"] = 100.0 * r["gbps"] / nvlink_gbps if r.get("gbps") else None
        t_mx = times.get(_case_key(r) + ("mxep", r.get("op")))
        if r.get("op") == "combine" and r["system"] != "mxep":   # vs mxep's faster combine path
            t_mx = min([t for t in (t_mx, times.get(_case_key(r) + ("mxep", "combine_zero_copy"))) if t] or [None])
        row["mxep_speedup"] = r["median_us"] / t_mx if r.get("median_us") and t_mx and r["system"] != "mxep" else None
        rows.append(row)
    order = {s: i for i, s in enumerate(SYSTEM_ORDER)}
    op_order = {"dispatch": 0, "combine": 1, "combine_zero_copy": 1.5, "combine_after_dispatch": 1.4, "step_graph": 1.9,
                "dispatch_graph": 1.7, "dispatch_zero_copy": 0.5, "dispatch_zero_copy_graph": 1.72, "combine_graph": 1.8,
                "dispatch_mxfp8": 2, "dispatch_bf16": 3, "combine_bf16": 4,
                # ops of result files written before the one-protocol tree (docs/history.md; such
                # files are in the git history): the staged pull combine of a regular expert_out
                "combine_pull_mode": 1.6, "combine_push_mode": 1.6}
    sync_order = {("dispatch", ""): 0.3, ("dispatch", "_graph"): 1.75, ("combine", ""): 1.3, ("combine", "_graph"): 1.85}

    def op_rank(op):   # old files: "<dispatch|combine>[_graph]_<sync mode>_sync", after its default-sync twin
        m = re.fullmatch(r"(dispatch|combine)(_graph)?_\w+_sync", op or "")
        return sync_order[(m.group(1), m.group(2) or "")] if m else op_order.get(op, 9)
    rows.sort(key=lambda r: _case_sort(_case_key(r)) + (op_rank(r.get("op")), order.get(r["system"], 99)))
    return rows


def _env_lines(env: dict | None) -> list[str]:
    if not env:
        return ["(no environment recorded)"]
    out = [
        f"- GPU: {env.get('gpu_name')} x {env.get('gpu_count')} ({env.get('gpu_memory_gib')} GiB, "
        f"{env.get('sm_count')} SMs); driver {env.get('driver')}",
        f"- torch {env.get('torch')} (CUDA {env.get('torch_cuda')}), Triton {env.get('triton')}, NCCL {env.get('nccl')}, "
        f"Python {env.get('python')}",
        f"- mxep commit {env.get('git_commit')}{' (dirty tree)' if env.get('git_dirty') else ''}",
        f"- env: {env.get('env_vars')}",
    ]
    return out


def _config_lines(merged: dict) -> list[str]:
    """The EPConfig of mxep's Buffers (older files: the module-level tuning dict of their time)."""
    if merged.get("ep_config"):
        over = (merged.get("args") or {}).get("ep_config_overrides")
        return [f"- mxep EPConfig: {json.dumps(merged['ep_config'])}"
                + (f" (overrides {json.dumps(over)})" if over else " (mxep.default_config)")]
    if merged.get("tuning"):
        return [f"- mxep tuning (pre-EPConfig file): {json.dumps(merged['tuning'])}"]
    return []


def write_markdown(merged: dict, path: str) -> None:
    records = merged.get("records", [])
    rows = derive(records, merged.get("nvlink_gbps", 450.0))
    L = ["# mxep EP dispatch / combine benchmark results", ""]
    L.append(f"Generated by `benchmarks/run_all.py` on {merged.get('date', '?')}; raw numbers in `results.json`.")
    if merged.get("cpu_smoke"):
        L += ["", "**CPU SMOKE RUN (gloo, Triton interpreter, tiny shapes): the numbers below mean nothing.**"]
    L += ["", "## Environment", ""] + _env_lines(merged.get("env")) + _config_lines(merged)
    L += ["", "## Method", "",
          "- Time: " + (merged.get("timing") or "median of CUDA-event times, max over ranks of per-rank medians") + ".",
          f"- Iterations: {merged.get('args', {}).get('iters')} timed (+{merged.get('args', {}).get('warmup')} warm-up) "
          "per measurement; `pipelined` = back-to-back calls (no host sync systems only).",
          "- GB/s per rank = mean over ranks of bytes sent to other ranks / time; bytes per row: H + H/32 "
          "(MXFP8), 2H (bf16). Combine moves the dispatched rows back as bf16.",
          "- % CE / % Triton / % NCCL / % NCCL real splits: fraction of the ceiling measured on the same traffic "
          "pattern (dispatch MXFP8, dispatch bf16, or combine bf16) in the same run (NCCL: equal splits carrying "
          "the average bytes; real splits: the routing's pair matrix); % NVLink: of 450 GB/s nominal.",
          "- mxep speedup = this system's time / mxep's time (same op, same case; >1 means mxep is faster).",
          "- host µs/call = host time to issue one call from an idle GPU (includes any host sync inside the "
          "call); the device sleep before each timed call is sized from it.", ""]
    cfgs = merged.get("configs", {})
    if cfgs:
        L += ["Configs:", ""]
        for name, c in sorted(cfgs.items()):
            L.append(f"- ({name}) {c.get('label')}")
        L.append("")

    # summary
    summ = defaultdict(dict)
    for r in rows:
        if r.get("median_us") and r["system"] in ("mxep", "unfused_mxfp8", "nccl_bf16", "nvshmem_a2a_2d"):
            summ[_case_key(r)][(r["system"], r["op"])] = r["median_us"]
    if summ:
        L += ["## Summary (median µs; dispatch + combine)", "",
              "| world | config | routing | mxep | mxep, zero-copy combine | mxep, zero-copy dispatch | mxep, CUDA graph | "
              "unfused MXFP8 | NCCL bf16 | NVSHMEM 2d | mxep speedup vs unfused | vs bf16 |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for key in sorted(summ, key=_case_sort):
            d = summ[key]

            def tot(s, ops=("dispatch", "combine")):
                a, b = d.get((s, ops[0])), d.get((s, ops[1]))
                return None if a is None or b is None else a + b
            mx, un, bf, nv = tot("mxep"), tot("unfused_mxfp8"), tot("nccl_bf16"), tot("nvshmem_a2a_2d")
            mxg = tot("mxep", ("dispatch_graph", "combine_graph"))
            zc = d.get(("mxep", "combine_zero_copy"))
            mxz = d[("mxep", "dispatch")] + zc if zc and d.get(("mxep", "dispatch")) else None
            mxzd = tot("mxep", ("dispatch_zero_copy", "combine"))   # (not with the zero-copy combine: same memory)
            sp = lambda o: _fmt(o / mx, 2) if o and mx else ""  # noqa: E731
            L.append(f"| {key[0]} | {key[1]} | {key[2]} | {_fmt(mx)} | {_fmt(mxz)} | {_fmt(mxzd)} | {_fmt(mxg)} | {_fmt(un)} | {_fmt(bf)} | "
                     f"{_fmt(nv)} | {sp(un)} | {sp(bf)} |")
        L.append("")

    L += ["## All measurements", ""]
    hdr = ("| system | op | median µs | pipelined µs | host µs/call | GB/s/rank | % CE | % Triton | % NCCL | "
           "% NCCL real splits | % NVLink | mxep speedup | symm MB/rank | check | error |")
    sep = "|" + "---|" * 15
    cur = None
    for r in rows:
        key = _case_key(r)
        if key != cur:
            cur = key
            c = cfgs.get(r.get("config"), {})
            L += ["", f"### world {key[0]}, config ({key[1]}) {c.get('label', '')}, routing {key[2]}", "", hdr, sep]
        sb = r.get("symm_bytes")
        L.append("| " + " | ".join(_cell(v) for v in [
            SYSTEM_LABEL.get(r["system"], r["system"]), r.get("op"), _fmt(r.get("median_us")),
            _fmt(r.get("pipelined_us")), _fmt(r.get("host_enqueue_us")), _fmt(r.get("gbps")), _fmt(r.get("pct_ceil_ce")),
            _fmt(r.get("pct_ceil_triton")), _fmt(r.get("pct_ceil_nccl")), _fmt(r.get("pct_ceil_nccl_pairs")),
            _fmt(r.get("pct_nvlink")),
            _fmt(r.get("mxep_speedup"), 2), _fmt(sb / 2**20 if sb else None), r.get("check") or "",
            r.get("error") or ""]) + " |")
    checks = [r for r in records if r.get("system") in ("check", "selftest")]
    if checks:
        L += ["", "## Correctness checks", "", "| world | config | routing | check | result | error |", "|---|---|---|---|---|---|"]
        for r in checks:
            L.append("| " + " | ".join(_cell(v) for v in [r.get("world"), r.get("config", ""), r.get("routing", ""),
                                                          r.get("op"), r.get("check"), r.get("error") or ""]) + " |")
    launches = merged.get("launches", [])
    if launches:
        L += ["", "## Launches", "", "| launch | world | rc | seconds | note |", "|---|---|---|---|---|"]
        for la in launches:
            L.append("| " + " | ".join(_cell(v) for v in [la.get("name"), la.get("world"), la.get("rc"),
                                                          _fmt(la.get("seconds")), la.get("note") or ""]) + " |")
    with open(path, "w") as f:
        f.write("\n".join(L) + "\n")


def write_plot(merged: dict, path: str) -> str | None:
    """Grouped bars: rows dispatch / combine, columns time (log) / GB/s per rank. Returns an
    error string instead of raising (a missing matplotlib must not lose the table)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:  # noqa: BLE001
        return f"matplotlib unavailable: {exc}"
    nvlink = merged.get("nvlink_gbps", 450.0)
    rows = derive(merged.get("records", []), nvlink)
    cases = sorted({_case_key(r) for r in rows if r.get("config")}, key=_case_sort)
    if not cases:
        return "nothing to plot"
    fig, axes = plt.subplots(2, 2, figsize=(max(10, 1.6 * len(cases) + 4), 9), squeeze=False)
    labels = [f"w{w} {c} {r[:4]}" for w, c, r in cases]
    for i, op in enumerate(("dispatch", "combine")):
        ceil_pattern = "dispatch_mxfp8" if op == "dispatch" else "combine_bf16"
        for j, metric in enumerate(("median_us", "gbps")):
            ax = axes[i][j]
            systems = [s for s in SYSTEM_ORDER if s not in CEILINGS] + (list(CEILINGS) if metric == "gbps" else [])
            systems.insert(1, ZERO_COPY)
            width = 0.8 / len(systems)
            for k, s in enumerate(systems):
                vals = []
                for key in cases:
                    v = None
                    for r in rows:
                        if s == ZERO_COPY:
                            if _case_key(r) == key and r["system"] == "mxep" and r.get("op") == f"{op}_zero_copy":
                                v = r.get(metric)
                            continue
                        if _case_key(r) != key or r["system"] != s:
                            continue
                        if (s in CEILINGS and r.get("op") == ceil_pattern) or (s not in CEILINGS and r.get("op") == op):
                            v = r.get(metric)
                    vals.append(v if v else 0.0)
                xs = [x + (k - (len(systems) - 1) / 2) * width for x in range(len(cases))]
                ax.bar(xs, vals, width, label=SYSTEM_LABEL[s], color=COLORS[s],
                       hatch="//" if s in CEILINGS else None, edgecolor="white" if s in CEILINGS else None)
            if metric == "gbps":
                ax.axhline(nvlink, color="k", ls="--", lw=1, label=f"NVLink nominal {nvlink:.0f} GB/s")
                ax.set_ylabel("GB/s per rank (sent to other ranks)")
            else:
                ax.set_yscale("log")
                ax.set_ylabel("median time, µs (log)")
            ax.set_title(f"{op}: {'time' if metric == 'median_us' else 'bandwidth'}")
            ax.set_xticks(range(len(cases)))
            ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
            ax.grid(axis="y", alpha=0.3)
    handles, labs = axes[1][1].get_legend_handles_labels()
    title = "mxep dispatch/combine" + (" (CPU SMOKE: meaningless numbers)" if merged.get("cpu_smoke") else "")
    fig.suptitle(title, y=0.995)
    fig.legend(handles, labs, loc="upper center", bbox_to_anchor=(0.5, 0.975), ncol=4, fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.91))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


def write_report(merged: dict, out_dir: str) -> dict:
    """results.md and results.png in ``out_dir``; returns {"markdown": path, "plot": path or error}."""
    md = os.path.join(out_dir, "results.md")
    png = os.path.join(out_dir, "results.png")
    write_markdown(merged, md)
    err = write_plot(merged, png)
    return {"markdown": md, "plot": png if err is None else f"not written: {err}"}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                               "results.json"),
                   help="the merged JSON of run_all.py (default: benchmarks/results/results.json); "
                        "results.md and results.png are written next to it")
    src = p.parse_args(argv).results
    with open(src) as f:
        data = json.load(f)
    print(write_report(data, os.path.dirname(os.path.abspath(src))))


if __name__ == "__main__":
    main()
