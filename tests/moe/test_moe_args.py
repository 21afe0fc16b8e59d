"""MoE's argument errors name the argument and the value the caller gave (they are raised
before the Buffer, and before any collective: no process group is needed here), and on a CPU
without TRITON_INTERPRET=1 every public op that needs Triton says how to run it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import mxep

GOOD = dict(hidden=64, ffn_hidden=32, num_experts=4, top_k=2, max_tokens_per_rank=16)


@pytest.mark.parametrize("changes,exc,msg", [
    (dict(max_tokens_per_rank=-1), ValueError, r"^max_tokens_per_rank must be >= 0, got -1$"),   # not -2 (x top_k)
    (dict(max_tokens_per_rank=16.0), TypeError, r"^max_tokens_per_rank must be an int, got 16\.0 \(float\)$"),
    (dict(max_tokens_per_rank=True), TypeError, r"^max_tokens_per_rank must be an int, got True \(bool\)$"),
    (dict(ffn_hidden=0), ValueError, r"^ffn_hidden must be >= 1, got 0$"),
    (dict(ffn_hidden=-32), ValueError, r"^ffn_hidden must be >= 1, got -32$"),
    (dict(ffn_hidden=48), ValueError, r"^ffn_hidden must be a positive multiple of 32 \(MXFP8 blocks\), got 48$"),
    (dict(ffn_hidden=32.0), TypeError, r"^ffn_hidden must be an int, got 32\.0 \(float\)$"),
    (dict(hidden=64.0), TypeError, r"^hidden must be an int, got 64\.0 \(float\)$"),
    (dict(hidden=False), TypeError, r"^hidden must be an int, got False \(bool\)$"),
    (dict(hidden=0), ValueError, r"^hidden must be >= 1, got 0$"),
    (dict(num_experts=4.0), TypeError, r"^num_experts must be an int, got 4\.0 \(float\)$"),
    (dict(num_experts=0), ValueError, r"^num_experts must be >= 1, got 0$"),
    (dict(top_k=0), ValueError, r"^top_k must be in \[1, num_experts=4\], got 0$"),
    (dict(top_k=5), ValueError, r"^top_k must be in \[1, num_experts=4\], got 5$"),
    (dict(top_k=-1), ValueError, r"^top_k must be >= 0, got -1$"),
    (dict(top_k=2.0), TypeError, r"^top_k must be an int, got 2\.0 \(float\)$"),
    (dict(top_k=True), TypeError, r"^top_k must be an int, got True \(bool\)$"),
    (dict(top_k="2"), TypeError, r"^top_k must be an int, got '2' \(str\)$"),
])
def test_moe_argument_errors(changes, exc, msg):
    kwargs = dict(GOOD, **changes)
    with pytest.raises(exc, match=msg):
        mxep.MoE(**kwargs)


_NO_INTERPRETER = r"""
import socket, torch, torch.distributed as dist, mxep
from mxep.swiglu import swiglu_mxfp8

def expect(what, fn):
    try:
        fn()
    except RuntimeError as e:
        assert "set" in str(e) and "TRITON_INTERPRET=1" in str(e), (what, str(e))
        print("raised:", what, flush=True)
    else:
        raise AssertionError(what + " ran without Triton")

x = torch.randn(64, 64, dtype=torch.bfloat16)
offs = torch.tensor([32, 64], dtype=torch.int32)
expect("to_mxfp8", lambda: mxep.to_mxfp8(x))
expect("swiglu_mxfp8", lambda: swiglu_mxfp8(x, offs))
t = mxep.MXFP8Tensor(torch.zeros(64, 64, dtype=torch.float8_e4m3fn), torch.full((64, 2), 127, dtype=torch.uint8)
                     .view(torch.float8_e8m0fnu))
expect("grouped_mm_mxfp8(impl='fused')", lambda: mxep.grouped_mm_mxfp8(t, torch.zeros(2, 32, 64, dtype=torch.bfloat16),
                                                                       offs, impl="fused"))
with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
moe = mxep.MoE(hidden=64, ffn_hidden=32, num_experts=4, top_k=2, max_tokens_per_rank=16)
expect("MoE forward", lambda: moe(torch.randn(8, 64, dtype=torch.bfloat16)))
del moe        # its Buffer holds the group: freed before the group is destroyed, not at exit
import gc; gc.collect()
dist.destroy_process_group()
print("done", flush=True)
"""


def test_public_ops_say_to_set_triton_interpret():
    """A CPU without the interpreter: a RuntimeError saying to set TRITON_INTERPRET=1 (one
    subprocess: the variable must be unset before triton is imported)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "src")
    env["PYTHONPATH"] = os.path.abspath(src) + os.pathsep + env.get("PYTHONPATH", "")
    env["CUDA_VISIBLE_DEVICES"] = ""   # the CPU case even on a GPU machine
    proc = subprocess.run([sys.executable, "-c", _NO_INTERPRETER], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for what in ("to_mxfp8", "swiglu_mxfp8", "grouped_mm_mxfp8(impl='fused')", "MoE forward"):
        assert f"raised: {what}" in proc.stdout, proc.stdout
    assert proc.stdout.rstrip().endswith("done")
