"""Build the C++ CPU extension just in time, against the torch that is running.

Why JIT: a wheel or an isolated pip build environment may compile against a
different torch than the one that runs it (ABI mismatch), and a bare ``torch``
build requirement can pull a multi-GB CUDA wheel. Compiling on first use with
:func:`torch.utils.cpp_extension.load` (ninja) always matches the running
torch. Builds are cached in ``$FEDCOMP_CACHE`` (default
``~/.cache/fedcomp``), in a folder keyed by the torch version, the Python
version and a hash of the sources and flags, so an upgrade of torch or of
fedcomp never loads a stale library.

``python -m fedcomp.build`` prebuilds (e.g. in a Docker image or before a
cluster job); ``--force`` rebuilds.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

# one file per op family, and the registration (csrc/cpu/); the headers are hashed with them
CPU_SOURCES = (
    "cpu/register.cpp",
    "cpu/topk.cpp",
    "cpu/sign.cpp",
    "cpu/qsgd.cpp",
    "cpu/randk.cpp",
    "cpu/sparse.cpp",
)
HEADERS = ("common/fedcomp_math.h", "cpu/common.h", "cpu/block_quant.h", "cpu/ops.h")
CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-fno-math-errno")
LDFLAGS = ("-fopenmp",)


def csrc_dir() -> Path:
    """The kernel sources: inside the installed package, or at the repository root."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "_csrc", here.parent / "csrc"):
        if (candidate / CPU_SOURCES[0]).is_file():
            return candidate
    raise FileNotFoundError(
        f"fedcomp: kernel sources not found in {here / '_csrc'} or {here.parent / 'csrc'}; reinstall fedcomp"
    )


def cache_root() -> Path:
    return Path(os.environ.get("FEDCOMP_CACHE", Path.home() / ".cache" / "fedcomp"))


def build_tag() -> str:
    """Hash of the sources and flags: part of the build folder and library name."""
    digest = hashlib.sha256()
    root = csrc_dir()
    for rel in CPU_SOURCES + HEADERS:
        digest.update(rel.encode())
        digest.update((root / rel).read_bytes())
    digest.update(" ".join(CFLAGS + LDFLAGS).encode())
    return digest.hexdigest()[:12]


def build_dir() -> Path:
    torch_tag = torch.__version__.replace("+", "_")
    py_tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return cache_root() / f"torch-{torch_tag}-{py_tag}-{build_tag()}"


def library_name() -> str:
    return f"fedcomp_cpu_{build_tag()}"


def library_path() -> Path:
    return build_dir() / f"{library_name()}.so"


_BUILT = "built.ok"  # written after a complete build: the library is whole and may be loaded as is


def is_built() -> bool:
    return library_path().is_file() and (build_dir() / _BUILT).is_file()


def compiler() -> str | None:
    """The C++ compiler torch's extension builder will call, if one exists."""
    return shutil.which(os.environ.get("CXX", "c++"))


def load_cpu_extension(verbose: bool = False) -> Path:
    """Compile (if needed) and load the CPU kernels; returns the library path.

    Loading registers the ``fedcomp::*`` CPU kernels with the dispatcher.
    Raises whatever the build raises (no compiler, no ninja, compile error).
    """
    from torch.utils import cpp_extension

    target = build_dir()
    if is_built():
        # The folder's name hashes the sources' contents and the flags, so its library is
        # current. Loading it directly skips cpp_extension's ninja check, which rebuilds
        # (about 30 s) whenever the sources come from another path than the last build's
        # (a second checkout, an installed copy next to a development one).
        torch.ops.load_library(str(library_path()))
        return library_path()
    target.mkdir(parents=True, exist_ok=True)
    print(
        f"fedcomp: building the C++ CPU kernels for torch {torch.__version__} (one time, about a minute) into {target}",
        file=sys.stderr,
        flush=True,
    )
    start = time.perf_counter()
    root = csrc_dir()
    cpp_extension.load(
        name=library_name(),
        sources=[str(root / rel) for rel in CPU_SOURCES],
        extra_cflags=list(CFLAGS),
        extra_ldflags=list(LDFLAGS),
        build_directory=str(target),
        is_python_module=False,
        verbose=verbose,
    )
    (target / _BUILT).write_text(f"{library_name()}\n")
    print(f"fedcomp: built in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return library_path()


CUDA_SOURCES = ("cuda/fedcomp_cuda.cu", "cuda/fedcomp_cuda_torch.cu")
CUDA_HEADERS = ("cuda/fedcomp_cuda.cuh",)
NVCC_FLAGS = ("-O3", "-std=c++17", "-fmad=false")  # no FMA contraction: the reference's fp32 ops, one at a time


def load_cuda_extension(verbose: bool = False) -> None:
    """Compile (if needed) and load the CUDA kernels (``fedcomp_cuda::*`` ops).

    Raises RuntimeError when torch has no CUDA (the CPU wheel): the torch binding needs
    torch's CUDA headers, so only the framework-free ``.cu`` file can be compiled then
    (``python -m fedcomp.env --compile-gpu`` does that).
    """
    if torch.version.cuda is None:
        raise RuntimeError(f"torch {torch.__version__} has no CUDA: the CUDA kernels are not built")
    if not torch.cuda.is_available():
        raise RuntimeError("no CUDA device is visible: the CUDA kernels are not loaded")
    from torch.utils import cpp_extension

    root = csrc_dir()
    digest = hashlib.sha256()
    for rel in CUDA_SOURCES + CUDA_HEADERS + HEADERS:
        digest.update((root / rel).read_bytes())
    target = cache_root() / f"{build_dir().name}-cuda{torch.version.cuda}-{digest.hexdigest()[:12]}"
    target.mkdir(parents=True, exist_ok=True)
    cpp_extension.load(
        name=f"fedcomp_cuda_{digest.hexdigest()[:12]}",
        sources=[str(root / rel) for rel in CUDA_SOURCES],
        extra_cuda_cflags=list(NVCC_FLAGS),
        build_directory=str(target),
        is_python_module=False,
        verbose=verbose,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcomp.build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="delete the cached build and rebuild")
    parser.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)
    if args.force and build_dir().exists():
        shutil.rmtree(build_dir())
    try:
        path = load_cpu_extension(verbose=args.verbose)
    except Exception as exc:  # report any build failure as one readable line
        print(f"fedcomp: build failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"fedcomp: CPU kernels ready: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
