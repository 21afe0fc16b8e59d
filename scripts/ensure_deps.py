"""Install what is missing, reuse what is importable.

GPU machines (no network) already have torch and triton: we must not try to
install our own. A clean CPU machine gets torch 2.13.0 (CPU wheel, available
offline) and Triton 3.6 from the registry; `--test` / `--bench` add the extras.
"""
import importlib.util
import subprocess
import sys


def _missing(mod: str) -> bool:
    return importlib.util.find_spec(mod) is None


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.check_call(cmd)


def main() -> None:
    want = set(sys.argv[1:])
    if _missing("torch"):
        _pip("torch==2.13.0")
    if _missing("triton"):
        # 3.6 is what the GPU machines run; the interpreter semantics we test on CPU match it.
        _pip("triton==3.6.0")
    extra = []
    if "--test" in want:
        extra += [m for m in ("pytest", "numpy") if _missing(m)]
    if "--bench" in want:
        extra += [m for m in ("matplotlib", "numpy") if _missing(m)]
    if extra:
        _pip(*sorted(set(extra)))


if __name__ == "__main__":
    main()
