"""``python -m fedcomp.env``: what fedcomp found on this machine and what it uses.

Prints the torch version and build, the C++ compiler, ninja, nvcc and triton,
the requested and selected backends, and whether the CPU kernels are built
for *this* torch (a build for another torch version lives in another cache
folder and is never loaded).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import shutil
import subprocess
import sys

import torch

from . import _backend, build


def _version(cmd: list[str]) -> str:
    exe = shutil.which(cmd[0])
    if exe is None:
        return "not found"
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exe} (version query failed: {exc})"
    return f"{exe} ({out[-1] if out else 'unknown version'})"


def report(load: bool = True) -> list[tuple[str, str]]:
    """Rows of (item, finding). With ``load``, choose the CPU backend (building if needed)."""
    rows = [
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("torch", f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
                  f"GPU visible: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})"),
        ("c++ compiler", _version([build.compiler() or "c++", "--version"]).split(" (")[0]),
        ("ninja", _version(["ninja", "--version"])),
        ("nvcc", _version(["nvcc", "--version"])),
        ("triton", _triton()),
        ("FEDCOMP_BACKEND", os.environ.get(_backend.ENV_VAR, "auto (unset)")),
        ("kernel sources", str(build.csrc_dir())),
        ("CPU build folder", str(build.build_dir())),
        ("CPU kernels built for this torch", "yes" if build.is_built() else "no"),
    ]
    if load:
        try:
            chosen = _backend.cpu_backend()
        except _backend.BackendUnavailable as exc:
            chosen = f"unavailable: {exc}"
        rows.append(("CPU tensors use", chosen))
        if _backend.cpu_error():
            rows.append(("C++ kernels not in use because", _backend.cpu_error()))
    rows.append(("CUDA tensors use", "reference (GPU kernels are not part of this release)"))
    return rows


def _triton() -> str:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "not installed"
    try:
        import triton

        return f"{triton.__version__} (present; Triton kernels are not part of this release)"
    except Exception as exc:  # a broken triton install must not break the report
        return f"installed but fails to import: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcomp.env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="report only; do not build or load the kernels")
    args = parser.parse_args(argv)
    rows = report(load=not args.no_build)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
