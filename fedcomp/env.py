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
        (
            "torch",
            f"{torch.__version__} (CUDA build: {torch.version.cuda or 'no'}, "
            f"GPU visible: {torch.cuda.is_available()}, threads: {torch.get_num_threads()})",
        ),
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
    if torch.cuda.is_available() and load:
        try:
            rows.append(("CUDA tensors use", _backend.gpu_backend()))
        except _backend.BackendUnavailable as exc:
            rows.append(("CUDA tensors use", f"unavailable: {exc}"))
    else:
        rows.append(("CUDA tensors use", "no GPU visible (Triton and CUDA kernels are checked with --compile-gpu)"))
    return rows


def _triton() -> str:
    spec = importlib.util.find_spec("triton")
    if spec is None:
        return "not installed"
    try:
        import triton

        return f"{triton.__version__}"
    except Exception as exc:  # a broken triton install must not break the report
        return f"installed but fails to import: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcomp.env", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-build", action="store_true", help="report only; do not build or load the kernels")
    parser.add_argument(
        "--compile-gpu",
        action="store_true",
        help="compile every Triton kernel and CUDA file for sm_80 and sm_90 (no GPU needed) and tabulate "
        "registers and spills; exits 1 if any compile fails",
    )
    args = parser.parse_args(argv)
    if args.compile_gpu:
        return _compile_gpu()
    rows = report(load=not args.no_build)
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _compile_gpu() -> int:
    from . import gpu_compile
    from .bench import format_table

    rows, problems = [], []
    for kind, run in (("triton", gpu_compile.compile_triton), ("cuda", gpu_compile.compile_cuda)):
        try:
            rows += run()
        except Exception as exc:  # tool missing: say so in the table, keep going
            problems.append(f"{kind}: not compiled: {type(exc).__name__}: {exc}")
    table = [
        [
            r.kind,
            r.kernel,
            r.target,
            "-" if r.registers is None else r.registers,
            "-" if r.spills is None else r.spills,
            r.status,
        ]
        for r in rows
    ]
    print(format_table(["kind", "kernel", "target", "registers", "spill/local bytes", "status"], table))
    failed = [r for r in rows if r.status != "ok"]
    print(
        f"\n{len(rows) - len(failed)} of {len(rows)} compiled; "
        f"{sum(1 for r in rows if r.spills)} with spills or local memory"
    )
    for p in problems:
        print(p)
    return 1 if failed or problems else 0


if __name__ == "__main__":
    sys.exit(main())
