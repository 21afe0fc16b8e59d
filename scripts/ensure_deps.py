"""Install what is missing, reuse what is importable (the set-up step of every Makefile target).

    python scripts/ensure_deps.py [--demo] [--test] [--bench]

Always: torch, Triton and numpy (Triton's CPU interpreter, which the demo and the CPU tests run
on, imports numpy). ``--demo`` adds matplotlib (the demo writes a PNG), ``--test`` pytest,
``--bench`` matplotlib (the benchmark plot). ``--test`` also installs torchtitan==0.3.0 (Python
>= 3.11; the torchtitan integration tests), keeping the installed torch.

GPU machines (no network) already have torch and triton: we must not try to install our own.
A clean CPU machine gets torch 2.13.0 (CPU wheel, available offline) and Triton 3.6 from the
registry. Only modules that cannot be imported are installed; nothing is upgraded.
"""
import argparse
import importlib.util
import subprocess
import sys

# module -> pip requirement, for the optional groups (pyproject.toml's extras say the same)
EXTRAS = {
    "--demo": {"matplotlib": "matplotlib"},
    "--test": {"pytest": "pytest>=8"},
    "--bench": {"matplotlib": "matplotlib"},
}


def _missing(mod: str) -> bool:
    return importlib.util.find_spec(mod) is None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


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


if __name__ == "__main__":
    main()
