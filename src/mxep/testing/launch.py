"""What the launchers under ``benchmarks/`` and ``scripts/`` ask of the machine before they start
any worker: the GPUs they may use and a free port for a one-process world of their own."""
from __future__ import annotations

import os
import socket
import subprocess

__all__ = ["visible_gpus", "free_port"]


def visible_gpus() -> list[str]:
    """The ids to put in ``CUDA_VISIBLE_DEVICES`` for each visible GPU: those of
    ``CUDA_VISIBLE_DEVICES`` where it is set, else one per GPU ``nvidia-smi -L`` lists (none
    where it is missing). Starts no CUDA context."""
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    if cvd is not None:
        return [d.strip() for d in cvd.split(",") if d.strip() and d.strip() != "-1"]
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [str(i) for i, line in enumerate(ln for ln in out.splitlines() if ln.startswith("GPU"))]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now (a ``tcp://`` init method)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
