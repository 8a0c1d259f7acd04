"""fedcomp: fused compression kernels for gradients and model updates.

Ops (see :mod:`fedcomp.ops` for shapes, dtypes and the exact math):
top-k with error feedback (exact and threshold-based), 1-bit sign
quantization with block scales and majority vote, QSGD, and sparse
accumulation; and low-rank PowerSGD compression (:mod:`fedcomp.lowrank`).
Each op has a pure-PyTorch reference (:mod:`fedcomp.reference`) and fused
C++ CPU kernels built just in time (:mod:`fedcomp.build`); ``python -m
fedcomp.env`` reports what was found.

Over the ops: compressors (:mod:`fedcomp.compressors`) that turn a flat
tensor into a :class:`Payload` with an exact, versioned wire format
(:mod:`fedcomp.wire`), error feedback (EF14 and EF21) with checkpointable
state, :func:`aggregate` for many clients' payloads, :func:`flatten` for a
whole model, and a DDP communication hook (:mod:`fedcomp.ddp`).
"""

from ._backend import BackendUnavailable
from .aggregation import aggregate
from .compressors import EF21, QSGD, Compressor, ErrorFeedback, Identity, RandK, Sign, TopK
from .flat import FlatSpec, flatten, unflatten
from .lowrank import PowerSGD
from .ops import (
    qsgd,
    qsgd_accumulate,
    qsgd_decode,
    randk_ef,
    sign_accumulate,
    sign_decode,
    sign_ef,
    sign_majority,
    sparse_accumulate,
    topk_ef,
    topk_threshold_ef,
)
from .wire import Payload

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "Compressor",
    "EF21",
    "ErrorFeedback",
    "FlatSpec",
    "Identity",
    "Payload",
    "PowerSGD",
    "QSGD",
    "RandK",
    "Sign",
    "TopK",
    "aggregate",
    "flatten",
    "unflatten",
    "qsgd",
    "qsgd_accumulate",
    "qsgd_decode",
    "randk_ef",
    "sign_accumulate",
    "sign_decode",
    "sign_ef",
    "sign_majority",
    "sparse_accumulate",
    "topk_ef",
    "topk_threshold_ef",
]
