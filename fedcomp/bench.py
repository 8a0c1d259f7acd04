"""Torch-composite baselines and a small timing harness.

The composites are each op written the way existing compressor libraries
write it: a sequence of ATen calls (``a = x + r; a.abs().topk(k); ...``). The
benchmarks (``benchmarks/``) and the demo (``python -m fedcomp.demo``) import
them from here, so the baseline never drifts between the two. They are not
bit-exact with the spec (``torch.topk`` breaks ties arbitrarily); they do the
same work.
"""

from __future__ import annotations

import io
import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bits: Tensor) -> Tensor:
    """Composite little-endian bit packing of a bool tensor."""
    pad = (-bits.numel()) % 8
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, pad))
    return (padded.view(-1, 8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


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
            d = torch.zeros(n)
            d[second] = first
        else:
            bits = torch.from_numpy(__import__("numpy").unpackbits(first.numpy(), count=n, bitorder="little"))
            d = second * (bits.to(torch.float32) * 2 - 1)
        decoded.append(d)
    return torch.stack(decoded).mean(0)


def time_call(fn: Callable[[], object], repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (what docs/performance.md shows)."""
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)
