"""Subprocess tests that start when the session does: a test that only waits on a separate
process (``scripts/compile_sm90.py``: some 40 s of compiling on a cold Triton cache) runs beside
the in-process tests, on the core they leave idle, instead of after them.

``tests/conftest.py`` calls :func:`start_selected` once the items are collected (only for the
tests that were selected); the test calls :func:`result`, which waits for the process, or runs
it there and then when it was not started (e.g. ``pytest tests/test_sm90_compile.py``)."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time

__all__ = ["JOBS", "start_selected", "result", "stop_all"]

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")

# test node id suffix -> the command (run from the repository root, TRITON_INTERPRET unset)
JOBS = {
    "test_sm90_compile.py::test_every_kernel_compiles_for_sm90":
        [sys.executable, os.path.join(ROOT, "scripts", "compile_sm90.py")],
}

_running: dict[str, tuple[subprocess.Popen, object, object, float]] = {}


def _env() -> dict:
    return {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def _key(nodeid: str) -> str | None:
    return next((k for k in JOBS if nodeid.replace(os.sep, "/").endswith(k)), None)


def start_selected(nodeids) -> None:
    for key in {_key(n) for n in nodeids} - {None}:
        if key not in _running:
            out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
            proc = subprocess.Popen(JOBS[key], env=_env(), cwd=ROOT, stdout=out, stderr=err, text=True)
            _running[key] = (proc, out, err, time.monotonic())


def result(nodeid: str, timeout: float) -> subprocess.CompletedProcess:
    """The finished process of the job of ``nodeid``: ``returncode``, ``stdout``, ``stderr``."""
    key = _key(nodeid)
    if key not in _running:
        return subprocess.run(JOBS[key], env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    proc, out, err, started = _running.pop(key)
    try:
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - started)))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    out.seek(0)
    err.seek(0)
    return subprocess.CompletedProcess(JOBS[key], proc.returncode, out.read(), err.read())


def stop_all() -> None:
    """End the jobs nobody waited for (an interrupted or failing session)."""
    for proc, out, err, _ in _running.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()
    _running.clear()
