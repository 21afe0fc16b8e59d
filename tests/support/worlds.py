"""Shared gloo worlds: every test module registers its multi-rank bodies here when it is
imported (collection), and the first test that asks for a world size spawns that world once
and runs every body registered for it, one after another (``run_many``). On 2 cores the
start-up of a rank (importing torch and triton) costs some seconds: one spawn per world size
for the whole session instead of one per test.

    worlds.register(2, "ep/buffer", _buffer_body, cases)     # module level, at import
    assert all(worlds.results(2, "ep/buffer"))               # in the test: per-rank results

Only the bodies of modules with a selected test run (``tests/conftest.py`` passes the selection
on; ``-k`` or one file does not pay for the others). A body that raises fails its world: every test of that world size then reports the failing
rank's traceback (which names the body). Bodies must be module-level functions (pickled by
name) taking ``(rank, world_size, *args)``.
"""
from __future__ import annotations

from typing import Any, Callable

from support.dist import run_many

__all__ = ["register", "results", "select_modules"]

_BODIES: dict[int, dict[str, tuple[Callable, tuple]]] = {}
_SELECTED: set[str] | None = None     # module names with a selected test (None: run every body)
_RESULTS: dict[int, dict[str, list] | Exception] = {}
TIMEOUT_S = 900.0


def register(world_size: int, name: str, fn: Callable, *args: Any) -> str:
    """Add ``fn(rank, world_size, *args)`` to the bodies of ``world_size`` (``name`` unique)."""
    bodies = _BODIES.setdefault(world_size, {})
    if name in bodies and bodies[name][0] is not fn:
        raise ValueError(f"worlds.register: {name!r} is registered twice for world size {world_size}")
    if world_size in _RESULTS:
        raise RuntimeError(f"worlds.register: world size {world_size} already ran; register at import time")
    bodies[name] = (fn, args)
    return name


def select_modules(modules) -> None:
    """Run only the bodies registered by these modules (and any body a test asks for)."""
    global _SELECTED
    _SELECTED = set(modules)


def results(world_size: int, name: str) -> list:
    """Per-rank return values of the body ``name`` (spawns the world on the first call)."""
    if world_size not in _RESULTS:
        bodies = _BODIES.get(world_size, {})
        if name not in bodies:
            raise KeyError(f"worlds.results: no body {name!r} registered for world size {world_size}")
        names = [n for n, (fn, _) in bodies.items() if n == name or _SELECTED is None or fn.__module__ in _SELECTED]
        try:
            out = run_many([_BODIES[world_size][n] for n in names], world_size, timeout=TIMEOUT_S)
            _RESULTS[world_size] = dict(zip(names, out))
        except Exception as exc:   # every later test of this world reports the same failure
            _RESULTS[world_size] = exc
    got = _RESULTS[world_size]
    if isinstance(got, Exception):
        raise got
    return got[name]
