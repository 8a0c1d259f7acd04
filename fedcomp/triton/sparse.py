"""Sparse accumulation: out[idx] += alpha * v (what a top-k or rand-k payload adds)."""

from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

from ..reference import check_indices
from ._common import _OPTS, F32, I64, TILE, _alpha32, _grid


# --------------------------------------------------------------------------
# sparse accumulation
# --------------------------------------------------------------------------
@triton.jit
def _sparse_accumulate_kernel(out_ptr, idx_ptr, val_ptr, m, alpha, T: tl.constexpr):
    """out[idx] += alpha * v with fp32 atomics. Traffic: reads idx + v, one atomic RMW of 4 B per entry.

    Exact (equal to the reference) when the indices are distinct, as in one top-k payload; with
    duplicates, fp32 addition order follows the atomics' order on a GPU.
    """
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < m
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    v = tl.load(val_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + idx, v * alpha, mask=mask)


def sparse_accumulate_triton(out: Tensor, indices: Tensor, values: Tensor, alpha: float) -> None:
    m = indices.numel()
    if m == 0:
        return
    check_indices(indices, out.numel())  # one host sync, as in the reference
    _sparse_accumulate_kernel[_grid(m)](out, indices, values, m, _alpha32(alpha), T=TILE, **_OPTS)


def launch_configs() -> list[tuple]:
    """(name, kernel, signature, constexprs) of the sparse accumulation."""
    return [
        (
            "sparse_accumulate",
            _sparse_accumulate_kernel,
            {"out_ptr": F32, "idx_ptr": "*i64", "val_ptr": F32, "m": I64, "alpha": "fp32"},
            {"T": TILE},
        )
    ]
