"""Aggregate many clients' payloads into one dense update.

``aggregate(payloads, weights)`` returns ``sum_i w_i * decode(p_i)`` (default
``w_i = 1/m``) as one float32 tensor, without holding a dense tensor per client:

* top-k / rand-k payloads are scattered straight into the accumulator with
  :func:`fedcomp.sparse_accumulate` (no dense decode at all);
* identity payloads are added in place;
* sign and QSGD payloads are decoded straight into the accumulator with
  :func:`fedcomp.sign_accumulate` / :func:`fedcomp.qsgd_accumulate` (one pass over
  the codes, no dense tensor per client); consecutive payloads of one kind and block
  size go in one call (``fedcomp::sign_accumulate_many`` / ``qsgd_accumulate_many``),
  which on the CPU adds them all to each cached tile of the accumulator in turn.

``sign="majority"`` instead takes the bitwise majority of the packed bits (signSGD with
majority vote, :func:`fedcomp.sign_majority`) and the weighted sum of the block scales.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

from . import _backend, ops
from .wire import Payload

__all__ = ["aggregate"]


def _weights(weights, m: int) -> list[float]:
    if weights is None:
        return [1.0 / m] * m
    weights = [w.item() if isinstance(w, Tensor) else w for w in weights]
    if len(weights) != m:
        raise ValueError(f"weights must have one entry per payload ({m}); got {len(weights)}")
    for i, w in enumerate(weights):
        if isinstance(w, bool) or not isinstance(w, numbers.Real) or w != w or abs(w) == float("inf"):
            raise ValueError(f"weights[{i}] must be a finite number; got {w!r}")
    return [float(w) for w in weights]


def aggregate(payloads, weights=None, *, out: Tensor | None = None, sign: str = "mean") -> Tensor:
    """Weighted sum of decoded payloads.

    Args:
        payloads: non-empty sequence of :class:`~fedcomp.Payload`, all with the same
            ``numel`` and on the same device; kinds may be mixed.
        weights: one finite number per payload (default ``1/m``: the mean).
        out: optional ``[numel]`` float32 accumulator; it is zeroed first.
        sign: ``"mean"`` (exact weighted sum) or ``"majority"`` (majority vote of sign
            payloads, which must then all be sign payloads with the same block size;
            each block's scale is ``sum_i w_i * scale_i``).

    Returns:
        ``[numel]`` float32.
    """
    payloads = list(payloads)
    if not payloads:
        raise ValueError("payloads must not be empty")
    for i, p in enumerate(payloads):
        if not isinstance(p, Payload):
            raise TypeError(f"payloads[{i}] must be a fedcomp Payload; got {type(p).__name__}")
    numel, device = payloads[0].numel, payloads[0].device
    for i, p in enumerate(payloads):
        if p.numel != numel:
            raise ValueError(f"payloads[{i}] has numel {p.numel}; payloads[0] has {numel}")
        if p.device != device:
            raise ValueError(f"payloads[{i}] is on {p.device}; payloads[0] is on {device}")
    w = _weights(weights, len(payloads))
    if sign not in ("mean", "majority"):
        raise ValueError(f"sign must be 'mean' or 'majority'; got {sign!r}")
    if out is None:
        out = torch.zeros(numel, dtype=torch.float32, device=device)
    else:
        if (
            not isinstance(out, Tensor)
            or out.dtype != torch.float32
            or out.shape != (numel,)
            or out.device != device
            or not out.is_contiguous()
        ):
            raise ValueError(f"out must be a contiguous [{numel}] float32 tensor on {device}")
        out.zero_()
    if sign == "majority":
        return _majority(payloads, w, out)
    _backend.backend_of(payloads[0].sections[0])
    # out, the weights and (when made) each payload are checked: the kernels are called directly.
    # A run of consecutive sign (or QSGD) payloads with the same block size is one fused call;
    # each entry still receives the payloads' terms in list order, so the bits are those of one
    # accumulate per payload.
    i = 0
    while i < len(payloads):
        j = i + 1
        while j < len(payloads) and _fusable(payloads[i], payloads[j]):
            j += 1
        if j - i == 1:
            payloads[i]._accumulate(out, w[i])
        else:
            run = payloads[i:j]
            packed, scales = [p.sections[0] for p in run], [p.sections[1] for p in run]
            params = run[0].params
            if run[0].kind == "sign":
                torch.ops.fedcomp.sign_accumulate_many(out, packed, scales, params["block"], w[i:j])
            else:
                torch.ops.fedcomp.qsgd_accumulate_many(out, packed, scales, params["levels"], params["bucket"], w[i:j])
        i = j
    return out


def _fusable(first: Payload, p: Payload) -> bool:
    return first.kind in ("sign", "qsgd") and p.kind == first.kind and p.params == first.params


def _majority(payloads: list[Payload], w: list[float], out: Tensor) -> Tensor:
    blocks = {p.params.get("block") for p in payloads}
    if any(p.kind != "sign" for p in payloads) or len(blocks) != 1:
        raise ValueError("sign='majority' needs sign payloads that all use the same block size")
    (block,) = blocks
    bits = ops.sign_majority(torch.stack([p.sections[0] for p in payloads]))
    scales = torch.zeros_like(payloads[0].sections[1])
    for p, wi in zip(payloads, w):
        scales.add_(p.sections[1], alpha=wi)
    return out.copy_(ops.sign_decode(bits, scales, payloads[0].numel, block))
