"""examples/train_gemm_impls.py --smoke (CPU, gloo world 1, TRITON_INTERPRET=1, tiny sizes, 3 steps)
trains the same model with mxep.MoE(gemm_impl="dequant") and gemm_impl="torchao" (emulated), writes
the PNG and the JSON, and both runs start from the same loss: same weights, same batch, and the two
forwards are the same MX GEMMs. Plumbing otherwise (the times mean nothing). About 20 s of CPU.
Also: the clear exits when TRITON_INTERPRET is missing and when torchao does not import."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "examples", "train_gemm_impls.py")


def _env(**extra):
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), CUDA_VISIBLE_DEVICES="", **extra)
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)   # a one-process world of its own, whatever launched pytest
    return env


@pytest.mark.skipif(importlib.util.find_spec("torchao") is None, reason="torchao is not installed")
def test_train_gemm_impls_smoke(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out-dir", str(tmp_path)],
                          env=_env(TRITON_INTERPRET="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(tmp_path / "train_gemm_impls_smoke.json") as f:
        data = json.load(f)
    assert data["smoke"] and data["world"] == 1 and data["steps_done"] == 3
    assert set(data["versions"]) >= {"torch", "triton", "torchao"} and data["commit"]
    runs = data["runs"]
    assert set(runs) == {"dequant", "torchao"}
    for impl, r in runs.items():
        assert r["error"] is None, (impl, r["error"])
        assert len(r["losses"]) == 3 and all(math.isfinite(v) for v in r["losses"]), (impl, r["losses"])
        assert len(r["step_ms"]) == 3 and r["median_step_ms"] > 0
        assert math.isfinite(r["final_loss"])
    assert runs["torchao"]["kernel_preference"] == "EMULATED"
    d, t = runs["dequant"]["losses"][0], runs["torchao"]["losses"][0]
    assert abs(t - d) <= 1e-3 * abs(d), (d, t)
    assert 3.0 < d < 4.0   # about ln(vocab 36) = 3.58 from small initial weights
    assert data["final_loss_gap"] is not None and math.isfinite(data["final_loss_gap"]["abs"])
    assert data["png"] and (tmp_path / "train_gemm_impls_smoke.png").stat().st_size > 10_000
    assert "| dequant |" in proc.stdout and "| torchao (EMULATED) |" in proc.stdout


def test_train_gemm_impls_needs_interpreter(tmp_path):
    env = _env()
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr, proc.stderr[-2000:]


def test_train_gemm_impls_without_torchao(tmp_path):
    # a torchao that does not import stands for a missing one (find_spec sees it; the import fails)
    fake = tmp_path / "fake"
    (fake / "torchao").mkdir(parents=True)
    (fake / "torchao" / "__init__.py").write_text("raise ImportError('no torchao here')\n")
    env = _env(TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join([str(fake), env["PYTHONPATH"]])
    proc = subprocess.run([sys.executable, SCRIPT, "--smoke", "--out-dir", str(tmp_path / "out")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pip install 'mxep[torchao]'" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()
