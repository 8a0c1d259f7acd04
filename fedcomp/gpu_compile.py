"""Compile every GPU kernel for sm_80 and sm_90 without a GPU, and report registers and spills.

* Triton: each entry of :data:`fedcomp.triton.LAUNCH_CONFIGS` (the constexpr values the
  host wrappers launch with) goes through ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", arch, 32))``, which produces PTX and a cubin; ``cuobjdump
  -res-usage`` on the cubin gives registers and local memory (spills + stack).
* CUDA: ``csrc/cuda/fedcomp_cuda.cu`` (framework-free) through ``nvcc -Xptxas -v`` per
  architecture. The torch binding (``fedcomp_cuda_torch.cu``) needs torch's CUDA headers and
  is compiled only by :func:`fedcomp.build.load_cuda_extension` on a CUDA build of torch.

Run ``python -m fedcomp.env --compile-gpu``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Row", "ARCHS", "compile_triton", "compile_cuda", "find_nvcc", "find_cuobjdump"]

ARCHS = (80, 90)
_USED = re.compile(r"Used (\d+) registers")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_KERNEL = re.compile(r"(\w+_kernel(?:<(?:\d+|true|false)>)?)\(")
_RES_REG = re.compile(r"REG:(\d+)")
_RES_LOCAL = re.compile(r"LOCAL:(\d+)")
_RES_STACK = re.compile(r"STACK:(\d+)")


@dataclass
class Row:
    kind: str  # "triton" or "cuda"
    kernel: str
    target: str  # "sm_80" / "sm_90"
    registers: int | None
    spills: int | None  # spill stores + loads, bytes
    status: str  # "ok" or the error


def find_nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if os.path.exists(p)), None
    )


def find_cuobjdump() -> str | None:
    """cuobjdump bundled with Triton, else next to nvcc or on PATH."""
    candidates = []
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"))
    except Exception:  # triton missing: the CUDA side may still run
        pass
    nvcc = find_nvcc()
    if nvcc:
        candidates.append(str(Path(nvcc).parent / "cuobjdump"))
    candidates.append(shutil.which("cuobjdump") or "")
    return next((c for c in candidates if c and os.path.exists(c)), None)


def _cubin_usage(cubin: bytes, tool: str) -> tuple[int, int]:
    """(registers, local-memory bytes) of the one kernel in ``cubin`` (local memory = spills + stack)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        text = subprocess.run([tool, "-res-usage", str(path)], capture_output=True, text=True, check=True).stdout
    regs = _RES_REG.search(text)
    local = _RES_LOCAL.search(text)
    stack = _RES_STACK.search(text)
    return int(regs.group(1)) if regs else 0, (int(local.group(1)) if local else 0) + (
        int(stack.group(1)) if stack else 0
    )


def compile_triton(archs=ARCHS) -> list[Row]:
    """AOT-compile every Triton launch configuration for each arch. Needs triton (not its interpreter)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("unset TRITON_INTERPRET to compile Triton kernels ahead of time")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._backend import summarize
    from .triton import LAUNCH_CONFIGS

    tool = find_cuobjdump()
    rows = []
    for arch in archs:
        for name, fn, signature, constexprs, options in LAUNCH_CONFIGS:
            sig = dict(signature)
            sig.update({k: "constexpr" for k in constexprs})
            try:
                src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
                compiled = triton.compile(
                    src, target=GPUTarget("cuda", arch, 32), options={"enable_fp_fusion": False, **options}
                )
                if "cubin" not in compiled.asm or "ptx" not in compiled.asm:
                    raise RuntimeError("no PTX/cubin produced")
                regs, spills = _cubin_usage(compiled.asm["cubin"], tool) if tool else (None, None)
                rows.append(Row("triton", name, f"sm_{arch}", regs, spills, "ok"))
            except Exception as exc:
                rows.append(Row("triton", name, f"sm_{arch}", None, None, summarize(exc)))
    return rows


def _demangle(symbol: str) -> str:
    """``histogram_kernel<11>`` from the mangled name (c++filt if present)."""
    tool = shutil.which("c++filt")
    if tool:
        text = subprocess.run([tool, symbol], capture_output=True, text=True).stdout
        found = _KERNEL.search(text)
        if found:
            return found.group(1)
    return symbol


def compile_cuda(archs=ARCHS, source: Path | None = None) -> list[Row]:
    """Compile the framework-free CUDA file with ``nvcc -Xptxas -v`` for each arch."""
    from .build import NVCC_FLAGS, csrc_dir

    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found (looked on PATH, /usr/local/cuda/bin, /usr/local/bin)")
    source = source or csrc_dir() / "cuda" / "fedcomp_cuda.cu"
    rows = []
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            out = subprocess.run(
                [
                    nvcc,
                    "-c",
                    *NVCC_FLAGS,
                    f"-arch=sm_{arch}",
                    "-Xptxas",
                    "-v",
                    str(source),
                    "-o",
                    str(Path(tmp) / "k.o"),
                ],
                capture_output=True,
                text=True,
            )
        text = out.stdout + out.stderr
        if out.returncode != 0:
            errors = [line for line in text.splitlines() if "error" in line] or text.splitlines()[-1:]
            rows.append(Row("cuda", source.name, f"sm_{arch}", None, None, f"nvcc failed: {errors[0].strip()}"))
            continue
        current = None
        for line in text.splitlines():
            entry = _ENTRY.search(line)
            if entry:
                current = Row("cuda", _demangle(entry.group(1)), f"sm_{arch}", None, 0, "ok")
                rows.append(current)
            elif current is not None and _SPILL.search(line):
                spill = _SPILL.search(line)
                current.spills = int(spill.group(1)) + int(spill.group(2))
            elif current is not None and _USED.search(line):
                current.registers = int(_USED.search(line).group(1))
    return rows
