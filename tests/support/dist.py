"""Multi-process test harness: run ``fn(rank, world_size, *args)`` on N spawned ranks.

    from support.dist import run_distributed

    def _body(rank, world, cases):          # module-level (it is pickled by name)
        return [do_case(c) for c in cases]  # run many cases per spawn: startup is the cost

    results = run_distributed(_body, 4, cases)   # list of per-rank return values
    results = run_many([(_body, (cases,)), (_other, ())], 2)   # several bodies, one spawn

    with single_rank_group():                    # a world of one, in this process (no spawn)
        _body(0, 1, cases)

* Processes are started with ``torch.multiprocessing`` "spawn"; each calls
  ``init_process_group(backend, tcp://127.0.0.1:<free port>)`` and ``destroy_process_group``.
* Children inherit the parent's environment (TRITON_INTERPRET included: it is (re)exported into
  ``os.environ`` before the spawn, so it is set before any child imports triton); ``env`` adds
  variables for the children only.
* A child's exception is re-raised in the parent as ``ChildFailed`` carrying the child's
  traceback (pytest shows it); the other ranks are terminated. A global ``timeout`` also kills
  everything (a rank stuck in a collective cannot hang CI).
* Return values travel back through ``torch.save`` files (tensors welcome); a rank that wrote
  its result leaves with ``os._exit(0)`` (no interpreter finalization: see ``_child``).
* Each child sets ``torch.set_num_threads(threads_per_rank)`` (default 1: CI has 2 cores).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

__all__ = ["run_distributed", "run_many", "ChildFailed", "free_port", "single_rank_group"]

_INHERITED = ("TRITON_INTERPRET", "PYTHONPATH", "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
              "NVSHMEM_DISABLE_NVLS")


class ChildFailed(RuntimeError):
    """A spawned rank raised; the message holds its rank and formatted traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_rank_group(backend: str = "gloo"):
    """A one-rank process group in this process (no spawn: a world of one costs no start-up),
    destroyed on exit so that no test sees another's group."""
    if dist.is_initialized():
        raise RuntimeError("single_rank_group: a process group is already initialized in this process")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=120))
    try:
        yield dist.group.WORLD
    finally:
        gc.collect()
        dist.destroy_process_group()


def _child(rank: int, world_size: int, fn: Callable, args: tuple, backend: str, port: int, out_dir: str,
           pg_timeout_s: float, threads: int, env: dict) -> None:
    os.environ.update(env)
    torch.set_num_threads(threads)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank % torch.cuda.device_count())
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=pg_timeout_s))
        try:
            result = fn(rank, world_size, *args)
            dist.barrier()  # nobody tears down its connections while a peer still talks to it
        finally:
            gc.collect()    # what still holds the group (Buffers in reference cycles) goes first
            dist.destroy_process_group()
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        # The parent reads this file (the traceback of the rank that failed first).
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    # Leave without interpreter finalization. A rank that has finished everything (result on
    # disk, process group destroyed) otherwise runs the C++ static destructors of torch's
    # distributed runtime at exit, and on a loaded 2-core CI machine one of them once aborted
    # ("terminate called without an active exception", SIGABRT, rank 0 of 4: the rank that
    # hosts the TCPStore) after the test's work had passed. What a test checks is over by now.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_distributed(fn: Callable, world_size: int, *args: Any, backend: str = "gloo", timeout: float = 120.0,
                    env: Optional[dict] = None, threads_per_rank: int = 1) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return per-rank results.

    ``fn`` and ``args`` must be picklable (module-level function). Raises :class:`ChildFailed`
    with the failing rank's traceback, or ``TimeoutError`` after ``timeout`` seconds.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    child_env = {k: os.environ[k] for k in _INHERITED if k in os.environ}
    child_env.update(env or {})
    saved = {k: os.environ.get(k) for k in child_env}
    os.environ.update(child_env)  # spawn copies os.environ: children start with these set
    with tempfile.TemporaryDirectory(prefix="mxep_dist_") as out_dir:
        try:
            ctx = mp.start_processes(
                _child,
                args=(world_size, fn, args, backend, free_port(), out_dir, max(timeout, 1.0), threads_per_rank,
                      child_env),
                nprocs=world_size, join=False, start_method="spawn",
            )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}, {world_size}) "
                                       f"did not finish in {timeout:.0f} s")
        except ProcessException as e:
            rank = getattr(e, "error_index", None)
            err = os.path.join(out_dir, f"rank{rank}.err")
            if os.path.exists(err):
                with open(err) as f:
                    raise ChildFailed(f"rank {rank} of {world_size} failed:\n{f.read()}") from None
            done = os.path.exists(os.path.join(out_dir, f"rank{rank}.pt"))
            raise ChildFailed(f"rank {rank} of {world_size} failed: {e} "
                              f"({'after' if done else 'before'} writing its result)") from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.terminate()
            for p in ctx.processes:
                p.join(5)
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]


def _run_bodies(rank: int, world_size: int, bodies: list) -> list:
    out = []
    for fn, args in bodies:
        out.append(fn(rank, world_size, *args))
        dist.barrier()   # the next body starts on every rank together
    return out


def run_many(bodies: list, world_size: int, **kwargs) -> list:
    """Run several ``(fn, args)`` bodies one after another on the same spawned ranks (the
    start-up, some seconds per rank on 2 cores, is paid once); returns ``results[body][rank]``.
    A body that raises fails the whole group with that rank's traceback, like
    :func:`run_distributed` (which takes the same keyword arguments)."""
    per_rank = run_distributed(_run_bodies, world_size, list(bodies), **kwargs)
    return [[per_rank[r][i] for r in range(world_size)] for i in range(len(bodies))]
