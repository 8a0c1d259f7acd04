"""Triton kernels for every fedcomp op, one module per op family.

They serve CUDA tensors on a GPU, and, with ``TRITON_INTERPRET=1`` and
``FEDCOMP_BACKEND=triton``, CPU tensors through Triton's interpreter, so the same
exactness tests as the C++ kernels run on a machine without a GPU. Every kernel is
compiled with floating-point contraction off (``enable_fp_fusion=False``) so it
performs the reference's fp32 operations one at a time.

=================  ==============================================================
module             ops
=================  ==============================================================
``topk``           ``topk_ef``, ``topk_threshold_ef``, ``topk_ef_rows``
``sign``           ``sign_ef``, ``sign_ef_rows``, ``sign_decode``, ``sign_accumulate``,
                   ``sign_accumulate_many``, ``sign_majority``
``qsgd``           ``qsgd``, ``qsgd_rows``, ``qsgd_decode``, ``qsgd_accumulate``,
                   ``qsgd_accumulate_many``
``randk``          ``randk_ef_rows``
``sparse``         ``sparse_accumulate``
``_common``        launch constants, shared device helpers, the block statistic
=================  ==============================================================

Naming: ``_<name>_kernel`` is a ``@triton.jit`` kernel, ``<op>_triton`` its host
wrapper (arguments already validated by :mod:`fedcomp.ops`). Each module's
``launch_configs()`` lists its kernels with the constexpr values its wrappers launch
them with; :data:`LAUNCH_CONFIGS` joins them, and the AOT compile check
(:mod:`fedcomp.gpu_compile`) compiles exactly those.

Global-memory traffic per element (fp32 input, ``B/elem``) is stated next to each
kernel. ``n`` = entries, ``w`` = code bits.
"""

from __future__ import annotations

import torch

from .._schemas import SCHEMAS
from . import _common, qsgd, sign, sparse, topk
from .qsgd import (
    qsgd_accumulate_many_triton,
    qsgd_accumulate_triton,
    qsgd_decode_triton,
    qsgd_rows_triton,
    qsgd_triton,
)
from .randk import randk_ef_rows_triton
from .sign import (
    sign_accumulate_many_triton,
    sign_accumulate_triton,
    sign_decode_triton,
    sign_ef_rows_triton,
    sign_ef_triton,
    sign_majority_triton,
)
from .sparse import sparse_accumulate_triton
from .topk import topk_ef_rows_triton, topk_ef_triton, topk_threshold_ef_triton

__all__ = [
    "topk_ef_triton",
    "topk_threshold_ef_triton",
    "topk_ef_rows_triton",
    "sign_ef_triton",
    "sign_ef_rows_triton",
    "sign_decode_triton",
    "sign_accumulate_triton",
    "sign_accumulate_many_triton",
    "sign_majority_triton",
    "qsgd_triton",
    "qsgd_rows_triton",
    "qsgd_decode_triton",
    "qsgd_accumulate_triton",
    "qsgd_accumulate_many_triton",
    "randk_ef_rows_triton",
    "sparse_accumulate_triton",
    "register",
    "LAUNCH_CONFIGS",
    "HOT_KERNELS",
]

_registered: dict[str, torch.library.Library] = {}


def register(dispatch_key: str, skip: tuple[str, ...] = ()) -> None:
    """Serve the fedcomp ops (except ``skip``) on ``dispatch_key`` ("CUDA", or "CPU" under
    TRITON_INTERPRET=1) with these kernels."""
    if dispatch_key in _registered:
        return
    lib = torch.library.Library("fedcomp", "IMPL")
    for name in SCHEMAS:
        if name not in skip:
            lib.impl(name, globals()[f"{name}_triton"], dispatch_key)
    _registered[dispatch_key] = lib


#: (name, kernel, signature, constexprs, options) for every launch configuration of the wrappers.
LAUNCH_CONFIGS = [
    entry if len(entry) == 5 else (*entry, {})
    for family in (_common, sign, qsgd, topk, sparse)
    for entry in family.launch_configs()
]
#: name prefixes of the kernels on the ops' hot paths (their register and spill counts are checked)
HOT_KERNELS = (
    "sign_ef_fused",
    "sign_codes",
    "qsgd[",
    "topk_keys",
    "histogram",
    "compact",
    "sign_decode",
    "qsgd_decode",
    "sparse_accumulate",
    "sign_accumulate",
    "qsgd_accumulate",
)
