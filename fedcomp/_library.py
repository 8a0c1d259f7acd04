"""Operator schemas (namespace ``fedcomp``), fake kernels, and the reference fallback.

The schemas live here, in Python, so the ops exist whether or not a compiled
backend was built. Every op gets:

* a fake (meta) kernel, so it traces under ``torch.compile`` / FakeTensor;
* the pure-PyTorch reference as its ``CompositeExplicitAutograd`` kernel: the
  implementation every device falls through to.

Compiled backends override a device: the C++ extension registers
``TORCH_LIBRARY_IMPL(fedcomp, CPU, m)`` when it is loaded (see
:mod:`fedcomp._backend`). Arguments reaching these schemas are already
validated by :mod:`fedcomp.ops`.
"""

from __future__ import annotations

import torch

from . import reference
from ._schemas import HOST_SCHEMAS, SCHEMAS

_lib = torch.library.Library("fedcomp", "DEF")

for _name, _schema in {**SCHEMAS, **HOST_SCHEMAS}.items():
    _lib.define(_schema)
    _lib.impl(_name, getattr(reference, _name), "CompositeExplicitAutograd")


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


@torch.library.register_fake("fedcomp::topk_ef")
def _(x, residual, k, index_dtype):
    return x.new_empty(k), x.new_empty(k, dtype=index_dtype)


@torch.library.register_fake("fedcomp::topk_threshold_ef")
def _(x, residual, k, capacity, sample_size, seed):
    return x.new_empty(capacity), x.new_empty(capacity, dtype=torch.int64), x.new_empty((), dtype=torch.int64)


@torch.library.register_fake("fedcomp::sign_ef")
def _(x, residual, block, l2):
    n = x.numel()
    return x.new_empty((n + 7) // 8, dtype=torch.uint8), x.new_empty(_nblocks(n, block), dtype=torch.float32)


@torch.library.register_fake("fedcomp::sign_decode")
def _(packed, scales, numel, block):
    return scales.new_empty(numel, dtype=torch.float32)


@torch.library.register_fake("fedcomp::sign_majority")
def _(packed_stack):
    return packed_stack.new_empty(packed_stack.shape[1])


@torch.library.register_fake("fedcomp::qsgd")
def _(x, residual, levels, bucket, seed):
    n = x.numel()
    nbytes = (n * reference.qsgd_bits(levels) + 7) // 8
    return x.new_empty(nbytes, dtype=torch.uint8), x.new_empty(_nblocks(n, bucket), dtype=torch.float32)


@torch.library.register_fake("fedcomp::qsgd_rows")
def _(x, residual, levels, bucket, seeds, rows=None):
    m, n = x.shape
    nbytes = (n * reference.qsgd_bits(levels) + 7) // 8
    return x.new_empty((m, nbytes), dtype=torch.uint8), x.new_empty((m, _nblocks(n, bucket)), dtype=torch.float32)


@torch.library.register_fake("fedcomp::qsgd_decode")
def _(packed, norms, numel, levels, bucket):
    return norms.new_empty(numel, dtype=torch.float32)


@torch.library.register_fake("fedcomp::sparse_accumulate")
def _(out, indices, values, alpha):
    return None


@torch.library.register_fake("fedcomp::sign_accumulate")
def _(out, packed, scales, block, alpha):
    return None


@torch.library.register_fake("fedcomp::qsgd_accumulate")
def _(out, packed, norms, levels, bucket, alpha):
    return None


@torch.library.register_fake("fedcomp::sign_accumulate_many")
def _(out, packed, scales, block, alphas):
    return None


@torch.library.register_fake("fedcomp::qsgd_accumulate_many")
def _(out, packed, norms, levels, bucket, alphas):
    return None


@torch.library.register_fake("fedcomp::topk_ef_rows")
def _(x, residual, k, index_dtype, rows=None):
    m = x.shape[0]
    return x.new_empty((m, k)), x.new_empty((m, k), dtype=index_dtype)


@torch.library.register_fake("fedcomp::sign_ef_rows")
def _(x, residual, block, l2, rows=None):
    m, n = x.shape
    return x.new_empty((m, (n + 7) // 8), dtype=torch.uint8), x.new_empty((m, _nblocks(n, block)), dtype=torch.float32)


@torch.library.register_fake("fedcomp::randk_ef_rows")
def _(x, residual, seeds, k, rows=None):
    m = x.shape[0]
    return x.new_empty((m, k)), x.new_empty((m, k), dtype=torch.int64)


@torch.library.register_fake("fedcomp::randk_positions")
def _(round_keys, k, n):
    return round_keys.new_empty(k, dtype=torch.int64)
