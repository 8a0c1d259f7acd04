"""Rand-k with error feedback on CUDA tensors."""

from __future__ import annotations

from torch import Tensor

from ..reference import randk_ef_rows


def randk_ef_rows_triton(x: Tensor, residual: Tensor | None, seeds, k: int, rows=None):
    # Rand-k has no kernel of its own on the GPU: the positions come from the host op (as the
    # receiver's do) and the add, gather and zeroing are device-side torch ops, queued with no
    # host synchronisation.
    return randk_ef_rows(x, residual, seeds, k, rows)
