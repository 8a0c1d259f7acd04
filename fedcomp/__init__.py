"""fedcomp: fused compression kernels for gradients and model updates.

Ops (see :mod:`fedcomp.ops` for shapes, dtypes and the exact math):
top-k with error feedback (exact and threshold-based), 1-bit sign
quantization with block scales and majority vote, QSGD, and sparse
accumulation. Each op has a pure-PyTorch reference (:mod:`fedcomp.reference`)
and fused C++ CPU kernels built just in time (:mod:`fedcomp.build`);
``python -m fedcomp.env`` reports what was found.
"""

from ._backend import BackendUnavailable
from .ops import (
    qsgd,
    qsgd_decode,
    sign_decode,
    sign_ef,
    sign_majority,
    sparse_accumulate,
    topk_ef,
    topk_threshold_ef,
)

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "qsgd",
    "qsgd_decode",
    "sign_decode",
    "sign_ef",
    "sign_majority",
    "sparse_accumulate",
    "topk_ef",
    "topk_threshold_ef",
]
