"""Install what is missing, reuse what is importable (the set-up step of every Makefile target).

    python scripts/ensure_deps.py [--demo] [--test] [--bench]

Always: torch, Triton and numpy (Triton's CPU interpreter, which the demo and the CPU tests run
on, imports numpy). ``--demo`` adds matplotlib (the demo writes a PNG), ``--test`` pytest and
matplotlib (a test checks the PNG of examples/train_gemm_impls.py), ``--bench`` matplotlib (the
benchmark plot). ``--test`` also installs torchtitan==0.3.0 (Python
>= 3.11; the torchtitan integration tests) and torchao==0.18.0 (``pip install --no-deps``: the
torchao extra, tests/integrations/test_torchao.py), keeping the installed torch.

GPU machines (no network) already have torch and triton: we must not try to install our own.
A clean CPU machine gets torch 2.13.0 (CPU wheel, available offline) and Triton 3.6 from the
registry. Only modules that cannot be imported are installed; nothing is upgraded.

Last, mxep itself: when ``import mxep`` (without the Makefile's ``PYTHONPATH=src``) does not
resolve to this checkout, ``pip install -e . --no-deps`` installs it in editable mode into this
interpreter's environment, so that the user's own scripts and ``examples/`` import it. Should that
fail (an offline machine cannot fetch setuptools for the isolated build) it retries with
``--no-build-isolation`` (the environment's setuptools), else says so in a line and goes on: the
Makefile's ``PYTHONPATH=src`` still serves its own targets.
"""
import argparse
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# module -> pip requirement, for the optional groups (pyproject.toml's extras say the same)
EXTRAS = {
    "--demo": {"matplotlib": "matplotlib"},
    "--test": {"pytest": "pytest>=8", "matplotlib": "matplotlib"},
    "--bench": {"matplotlib": "matplotlib"},
}


def _missing(mod: str) -> bool:
    return importlib.util.find_spec(mod) is None


def _pip(*args: str, quiet: bool = False) -> None:
    """pip install; ``quiet``: pip's output only when it fails (subprocess.CalledProcessError)."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    if not quiet:
        subprocess.check_call(cmd)
        return
    run = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if run.returncode:
        raise subprocess.CalledProcessError(run.returncode, cmd, run.stdout)


def _mxep_is_this_checkout() -> bool:
    """``import mxep`` in a fresh interpreter, without this checkout's src on PYTHONPATH and
    wherever it runs, finds this checkout's src/mxep."""
    src = os.path.realpath(os.path.join(ROOT, "src"))
    env = dict(os.environ)
    kept = [p for p in env.pop("PYTHONPATH", "").split(os.pathsep) if p and os.path.realpath(p) != src]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    probe = ("import sys, importlib.util as u; sys.path[:] = [p for p in sys.path if p not in ('', '.')]; "
             "s = u.find_spec('mxep'); print(s.origin if s else '')")   # not the working directory's
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True).stdout.strip()
    return bool(out) and os.path.realpath(out) == os.path.join(src, "mxep", "__init__.py")


def _install_self() -> None:
    """This checkout, editable, into this interpreter's environment (its dependencies are the
    ones above: --no-deps)."""
    if _mxep_is_this_checkout():
        return
    try:   # the isolated build fetches setuptools: offline machines fail fast, then use their own
        _pip("--retries", "1", "--timeout", "30", "--no-deps", "-e", ROOT, quiet=True)
        return
    except subprocess.CalledProcessError:
        pass
    try:
        _pip("--no-deps", "--no-build-isolation", "-e", ROOT, quiet=True)
    except subprocess.CalledProcessError as e:
        why = ([ln.strip() for ln in (e.output or "").splitlines() if ln.strip()] or [f"exit {e.returncode}"])[-1]
        print(f"ensure_deps: mxep not installed in editable mode ({why}): `import mxep` needs "
              f"PYTHONPATH={ROOT}/src, which the Makefile's targets set", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for flag in EXTRAS:
        p.add_argument(flag, action="store_true")
    args = p.parse_args()
    if _missing("torch"):
        _pip("torch==2.13.0")
    if _missing("triton"):
        # 3.6 is what the GPU machines run; the interpreter semantics we test on CPU match it.
        _pip("triton==3.6.0")
    want = {"numpy": "numpy"}
    for flag, mods in EXTRAS.items():
        if getattr(args, flag.lstrip("-")):
            want.update(mods)
    missing = sorted({req for mod, req in want.items() if _missing(mod)})
    if missing:
        _pip(*missing)
    if args.test and sys.version_info >= (3, 11) and _missing("torchtitan"):
        # tests/integrations/test_torchtitan.py (pyproject's [test] extra); it keeps the torch
        # installed above. Offline machines (the GPU ones) give up quickly and go on without it:
        # that file skips there.
        try:
            _pip("--retries", "1", "--timeout", "30", "torchtitan==0.3.0")
        except subprocess.CalledProcessError:
            print("ensure_deps: torchtitan==0.3.0 could not be installed; its integration tests will skip",
                  flush=True)
    if args.test and _missing("torchao"):
        # the torchao extra (mxep.integrations.torchao); --no-deps: torchao must not replace the
        # installed torch. Offline machines give up quickly and go on: the torchao tests skip.
        try:
            _pip("--retries", "1", "--timeout", "30", "--no-deps", "torchao==0.18.0")
        except subprocess.CalledProcessError:
            print("ensure_deps: torchao==0.18.0 could not be installed; its tests will skip", flush=True)
    _install_self()


if __name__ == "__main__":
    main()
