"""`python examples/demo.py --steps 3` (the training demo of `make demo`, forced onto the CPU path: 4
gloo ranks, Triton interpreter) trains mxep's MoE transformer and its bf16 twin for three
steps, prints the progress lines, the summary and its checks, exits 0 and writes the loss PNG.
Plumbing plus the first-step checks (mxep.MoE's output equals its MXFP8 reference, both models'
first losses agree); the loss-fall checks need more steps and report themselves skipped. About
30 s on 2 cores."""
import importlib.util
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEMO = os.path.join(ROOT, "examples", "demo.py")


def test_demo_trains_three_steps(tmp_path):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "src"), CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)   # a world of its own, whatever launched pytest
    png = tmp_path / "loss.png"
    proc = subprocess.run([sys.executable, DEMO, "--steps", "3", "--max-seconds", "0", "--out", str(png)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert re.search(r"step 3/3 \[#+\] loss mxep \d+\.\d+ bf16 \d+\.\d+", out), out
    assert "Summary: trained a 2-layer MoE transformer" in out and "on 4 CPU ranks (gloo), 3 steps" in out, out
    assert "[OK] first-step losses agree" in out and "[OK] mxep.MoE's first-step output" in out, out
    assert "[OK] replicated weights identical on every rank" in out and "[skip] loss fell" in out, out
    assert "[FAIL]" not in out and out.rstrip().splitlines()[-2] == "all checks: OK", out
    losses = [float(v) for v in re.findall(r"loss (\d+\.\d+) -> (\d+\.\d+)", out)[0]]
    assert 3.0 < losses[0] < 4.0 and losses[1] < losses[0]    # from about ln(vocab 36) = 3.58, falling
    if importlib.util.find_spec("matplotlib") is not None:
        assert png.stat().st_size > 10_000 and f"Loss curves: {png}." in out
    else:
        assert "matplotlib is not installed" in out


def test_demo_twin_local_two_ranks(tmp_path):
    """``--twin local``: the bf16 twin is BF16LocalMoE (sorted by expert, grouped GEMMs), on 2 gloo
    ranks (every rank holds all experts of the twin); the same first-step checks pass and the
    summary gives the step-time ratio and the final-loss gap."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.path.join(ROOT, "src"), CUDA_VISIBLE_DEVICES="")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, DEMO, "--steps", "2", "--ranks", "2", "--twin", "local", "--max-seconds", "0",
                           "--out", str(tmp_path / "loss.png")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    assert "bf16 twin (BF16LocalMoE" in out and "on 2 CPU ranks (gloo), 2 steps" in out, out
    assert re.search(r"Step time mxep / bf16: \d+\.\d+x \(eager\); final loss gap \(mxep - bf16\) / bf16: [+-]\d", out), out
    assert "[OK] first-step losses agree" in out and "[OK] mxep.MoE's first-step output" in out, out
    assert "[FAIL]" not in out and out.rstrip().splitlines()[-2] == "all checks: OK", out


def test_demo_capture_needs_a_gpu():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, DEMO, "--capture"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--capture needs a CUDA GPU" in proc.stdout + proc.stderr, proc.stdout + proc.stderr
