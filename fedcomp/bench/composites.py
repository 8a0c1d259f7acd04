"""Torch-composite baselines: each op written the way existing compressor libraries write it,
a sequence of ATen calls (``a = x + r; a.abs().topk(k); ...``).

``fedcomp-bench``, the benchmarks (``benchmarks/``) and the demo (``python -m fedcomp.demo``)
all time them from here, so the baseline never drifts between them. They are not bit-exact
with the spec (``torch.topk`` breaks ties arbitrarily); they do the same work.
"""

from __future__ import annotations

import io

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """Composite little-endian bit packing of a bool tensor."""
    pad = (-bits.numel()) % 8
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))
    return (padded.view(-1, 8) * _BIT_WEIGHTS.to(bits.device)).sum(1, dtype=torch.uint8)


def unpack_bits(packed: Tensor, n: int) -> Tensor:
    """Composite inverse of :func:`pack_bits`: ``[n]`` bool."""
    return ((packed[:, None] & _BIT_WEIGHTS.to(packed.device)) != 0).view(-1)[:n]


def composite_sign_decode(packed: Tensor, scales: Tensor, n: int, block: int) -> Tensor:
    """Dense decode of a sign payload: unpack the bits, expand the block scales, multiply."""
    signs = torch.where(unpack_bits(packed, n), 1.0, -1.0)
    return signs * scales.repeat_interleave(block)[:n]


def composite_sign_accumulate(out: Tensor, packed: Tensor, scales: Tensor, block: int, alpha: float) -> Tensor:
    """Decode to a dense temporary, then add: what a library without a fused accumulate does."""
    return out.add_(composite_sign_decode(packed, scales, out.numel(), block), alpha=alpha)


def composite_sparse_accumulate(out: Tensor, indices: Tensor, values: Tensor, alpha: float) -> Tensor:
    return out.index_add_(0, indices.long(), values.to(out.dtype), alpha=alpha)


def composite_add(x: Tensor, residual: Tensor, k: int | None = None) -> None:
    """The yardstick: one in-place add of two n-vectors."""
    residual.add_(x)


def composite_topk_ef(x: Tensor, residual: Tensor, k: int):
    a = x + residual
    indices = a.abs().topk(k, sorted=False).indices
    values = a[indices]
    residual.copy_(a)
    residual[indices] = 0
    return values, indices


def composite_randk_ef(x: Tensor, residual: Tensor, k: int):
    """Rand-k with error feedback as GRACE-style libraries write it (``torch.randperm`` positions)."""
    a = x + residual
    indices = torch.randperm(a.numel(), device=a.device)[:k]
    values = a[indices]
    residual.copy_(a)
    residual[indices] = 0
    return values, indices


def composite_sign_ef(x: Tensor, residual: Tensor, k: int | None = None):
    a = x + residual
    scale = a.abs().mean()
    bits = a >= 0
    residual.copy_(a - scale * (bits.to(a.dtype) * 2 - 1))
    return pack_bits(bits), scale


def composite_qsgd(x: Tensor, residual: Tensor, levels: int = 4, bucket: int = 512):
    a = x + residual
    n = a.numel()
    pad = (-n) % bucket
    buckets = torch.nn.functional.pad(a, (0, pad)).view(-1, bucket)
    norms = buckets.norm(dim=1, keepdim=True)
    q = torch.floor(levels * buckets.abs() / norms + torch.rand_like(buckets)).clamp_(max=levels)
    q = torch.where(buckets < 0, -q, q)
    residual.copy_((buckets - q * norms / levels).view(-1)[:n])
    return (q + levels).to(torch.uint8).view(-1)[:n], norms  # one byte per code: no sub-byte packing


def composite_pipeline(xs: list[Tensor], residuals: list[Tensor], kind: str, ratio: float = 0.01) -> Tensor:
    """Compress, serialise, deserialise and average many clients' updates, the way existing libraries do.

    Per client: compensate (``a = x + r``), compress (``torch.topk`` of ``|a|``, or the sign
    and mean magnitude), decompress to a dense tensor, subtract it to get the new residual,
    serialise with ``torch.save`` (int64 indices; signs as packed bits) and load it back;
    then decode every client to a dense tensor and average the dense tensors.
    """
    n = xs[0].numel()
    k = max(1, int(ratio * n))
    received = []
    for x, r in zip(xs, residuals):
        a = x + r
        if kind == "topk":
            idx = a.abs().topk(k, sorted=False).indices
            msg = (a[idx], idx)
            dense = torch.zeros_like(a)
            dense[idx] = msg[0]
        else:
            scale = a.abs().mean()
            bits = a >= 0
            msg = (pack_bits(bits), scale)
            dense = scale * (bits.to(a.dtype) * 2 - 1)
        r.copy_(a - dense)
        buf = io.BytesIO()
        torch.save(msg, buf)
        received.append(torch.load(io.BytesIO(buf.getvalue())))
    return composite_decode_mean(received, n, kind)


def composite_decode_mean(received: list[tuple[Tensor, Tensor]], n: int, kind: str) -> Tensor:
    """The server half of :func:`composite_pipeline`: every client's message (``(values, indices)``
    or ``(packed signs, scale)``) decoded to a dense ``[n]`` tensor, then the mean of the stack."""
    decoded = []
    for first, second in received:
        if kind == "topk":
            d = torch.zeros(n, device=first.device)
            d[second] = first
        else:
            d = second * (unpack_bits(first, n).to(torch.float32) * 2 - 1)
        decoded.append(d)
    return torch.stack(decoded).mean(0)
