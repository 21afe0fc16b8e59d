"""benchmarks/bench_moe.py --smoke (CPU, gloo world 1, TRITON_INTERPRET=1, tiny shapes) runs every
system on every config and writes the JSON, the markdown table and (when matplotlib imports) the
PNG, with every system's host issue time and GPU busy fraction (None on a CPU); and the token
sweep (``--tokens``). Plumbing only: the times mean nothing; the SQNR checks are recorded, not
asserted here (at these sizes they are a handful of samples). About 30 s of CPU."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SYSTEMS = ("bf16", "bf16_local", "unfused_mxfp8", "mxep", "mxep_accum", "mxep_graph", "mxep_nocache", "mxep_bf16w",
           "mxep_rows", "mxep_cf")
CONFIGS = ("dsv3", "llama4")


def _smoke(tmp_path, *extra):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "src"))
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)   # a one-process world of its own, whatever launched pytest
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_moe.py"), "--smoke",
                           "--out-dir", str(tmp_path), *extra], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_bench_moe_smoke(tmp_path):
    _smoke(tmp_path)
    with open(tmp_path / "bench_moe_w1_smoke.json") as f:
        data = json.load(f)
    assert data["finished"] and data["world"] == 1 and data["smoke"]
    assert set(data["configs"]) == set(CONFIGS)
    got = {(r["config"], r["system"]): r for r in data["results"]}
    assert set(got) == {(c, s) for c in CONFIGS for s in SYSTEMS}
    for (c, s), r in got.items():
        assert r["error"] is None, (c, s, r["error"])
        assert r["step_ms"] > 0 and r["tokens_per_s_per_gpu"] > 0
        assert r["saved_activation_bytes"] > 0 and r["saved_total_bytes"] >= r["saved_activation_bytes"]
        assert "sqnr_y_db" in r and "check" in r
        assert r["host_issue_ms"] > 0 and r["gpu_busy_fraction"] is None     # (no GPU to keep busy)
    for c in CONFIGS:
        assert got[(c, "mxep")]["weight_cache_bytes"] > 0 and got[(c, "mxep_bf16w")]["weight_cache_bytes"] == 0
        # mxep and the unfused MXFP8 layer compute the same numerics (world 1: the same bits)
        assert float(got[(c, "mxep")]["sqnr_y_vs_unfused_db"]) >= 40
        assert set(data["speedups"][c]["mxep"]) == {"vs_bf16", "vs_bf16_local", "vs_unfused_mxfp8", "vs_mxep_nocache"}
        assert got[(c, "mxep_nocache")]["bit_identical_to_mxep"] is True     # the weight cache changes no bit
        assert got[(c, "mxep_graph")]["bit_identical_to_mxep"] is True       # the captured step: the same bits
        assert got[(c, "mxep")]["weight_cache"] == "rebuilt" and got[(c, "mxep_accum")]["weight_cache"] == "warm"
        assert got[(c, "bf16_local")]["check"] == "ok"                       # the same bf16 math as bf16
        # a capacity factor bounds what the layer saves for the backward
        assert got[(c, "mxep_cf")]["saved_activation_bytes"] <= got[(c, "mxep")]["saved_activation_bytes"]
    md = (tmp_path / "bench_moe_w1_smoke.md").read_text()
    assert all(s in md for s in SYSTEMS) and "host issue ms" in md and "GPU busy" in md


def test_bench_moe_smoke_token_sweep(tmp_path):
    """--tokens runs every config at every token count (issue 23's 512, 2048, 4096 on a GPU)."""
    _smoke(tmp_path, "--configs", "dsv3", "--systems", "bf16_local,mxep", "--tokens", "3,4")
    with open(tmp_path / "bench_moe_w1_smoke.json") as f:
        data = json.load(f)
    assert set(data["configs"]) == {"dsv3_t3", "dsv3_t4"}
    got = {(r["config"], r["system"]): r for r in data["results"]}
    assert set(got) == {(c, s) for c in ("dsv3_t3", "dsv3_t4") for s in ("bf16_local", "mxep")}
    assert all(r["error"] is None and r["host_issue_ms"] > 0 for r in got.values())
    assert got[("dsv3_t3", "mxep")]["tokens"] == 3 and data["speedups"]["dsv3_t4"]["mxep"]["vs_bf16_local"] > 0
