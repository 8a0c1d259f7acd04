"""Route ``fedcomp::<op>`` on CUDA tensors to the CUDA C++ kernels (``csrc/cuda``).

The CUDA extension implements ``topk_ef``, ``sign_ef``, ``sign_decode``,
``sign_accumulate`` and ``sparse_accumulate`` for fp32. Everything else on CUDA tensors (other ops, fp16/bf16
inputs) goes to the Triton kernels when Triton imports, else to the reference.
"""

from __future__ import annotations

import torch

from . import reference

__all__ = ["register", "IMPLEMENTED"]

IMPLEMENTED = ("topk_ef", "sign_ef", "sign_decode", "sign_accumulate", "sparse_accumulate")

_registered: list[torch.library.Library] = []


def _fallback():
    try:
        from . import triton as triton_kernels
    except Exception:  # no triton: the reference runs on any device
        return {name: getattr(reference, name) for name in IMPLEMENTED}
    return {name: getattr(triton_kernels, f"{name}_triton") for name in IMPLEMENTED}


def register() -> None:
    """Serve the CUDA-implemented ops on the CUDA dispatch key (call once the extension is loaded)."""
    if _registered:
        return
    other = _fallback()
    ext = torch.ops.fedcomp_cuda

    def topk_ef(x, residual, k, index_dtype):
        if x.dtype != torch.float32:
            return other["topk_ef"](x, residual, k, index_dtype)
        values, indices = ext.topk_ef(x, residual, k)
        return values, indices.to(index_dtype)

    def sign_ef(x, residual, block, l2):
        if x.dtype != torch.float32:
            return other["sign_ef"](x, residual, block, l2)
        return ext.sign_ef(x, residual, block, l2)

    def sparse_accumulate(out, indices, values, alpha):
        reference.check_indices(indices, out.numel())
        ext.sparse_accumulate(out, indices.long(), values.float(), alpha)

    lib = torch.library.Library("fedcomp", "IMPL")
    lib.impl("topk_ef", topk_ef, "CUDA")
    lib.impl("sign_ef", sign_ef, "CUDA")
    lib.impl("sign_decode", lambda packed, scales, numel, block: ext.sign_decode(packed, scales, numel, block), "CUDA")
    lib.impl("sparse_accumulate", sparse_accumulate, "CUDA")
    lib.impl(
        "sign_accumulate",
        lambda out, packed, scales, block, alpha: ext.sign_accumulate(out, packed, scales, block, alpha),
        "CUDA",
    )
    _registered.append(lib)
