"""One contiguous buffer for a whole model: flatten parameters (or an update) and back.

Compressing a model update as one flat buffer means one kernel launch, one
payload, and a global top-k; ``FlatSpec.sizes`` gives the per-tensor segments
for a per-tensor top-k (``TopK(ratio, segments=spec.sizes)``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["FlatSpec", "flatten", "unflatten", "named_tensors"]


@dataclass(frozen=True)
class FlatSpec:
    """Where each named tensor lives in the flat buffer."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]
    offsets: tuple[int, ...]
    numel: int

    @property
    def sizes(self) -> tuple[int, ...]:
        """Number of entries of each tensor, in order (the segments of a per-tensor top-k)."""
        return tuple(b - a for a, b in zip(self.offsets, self.offsets[1:] + (self.numel,)))


def named_tensors(source) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs of an ``nn.Module`` (its parameters), a mapping, or a sequence."""
    if isinstance(source, nn.Module):
        return [(n, p.detach()) for n, p in source.named_parameters()]
    if isinstance(source, Mapping):
        items = list(source.items())
    elif isinstance(source, Iterable) and not isinstance(source, Tensor):
        items = [(str(i), t) for i, t in enumerate(source)]
    else:
        raise TypeError(f"source must be an nn.Module, a mapping or a sequence of tensors; got {type(source).__name__}")
    for name, t in items:
        if not isinstance(t, Tensor):
            raise TypeError(f"entry {name!r} must be a torch.Tensor; got {type(t).__name__}")
    return [(str(n), t.detach()) for n, t in items]


def flatten(source, *, dtype: torch.dtype | None = None, out: Tensor | None = None) -> tuple[Tensor, FlatSpec]:
    """Copy tensors into one contiguous 1-D buffer.

    Args:
        source: an ``nn.Module`` (its parameters, in ``named_parameters`` order), a
            ``{name: tensor}`` mapping, or a sequence of tensors (named ``"0"``, ``"1"``, ...).
        dtype: dtype of the buffer (default: that of the first tensor).
        out: optional ``[numel]`` buffer to reuse (must have the right size and dtype).

    Returns:
        ``(flat [numel] dtype, spec)``.
    """
    items = named_tensors(source)
    if not items:
        raise ValueError("source has no tensors to flatten")
    dtype = dtype or items[0][1].dtype
    offsets, total = [], 0
    for _, t in items:
        offsets.append(total)
        total += t.numel()
    if out is None:
        out = torch.empty(total, dtype=dtype, device=items[0][1].device)
    elif out.shape != (total,) or out.dtype != dtype:
        raise ValueError(f"out must be a [{total}] {dtype} tensor; got {tuple(out.shape)} {out.dtype}")
    for (_, t), off in zip(items, offsets):
        out[off : off + t.numel()].copy_(t.reshape(-1))
    spec = FlatSpec(tuple(n for n, _ in items), tuple(t.shape for _, t in items), tuple(offsets), total)
    return out, spec


def unflatten(flat: Tensor, spec: FlatSpec) -> dict[str, Tensor]:
    """Views of ``flat`` shaped like the tensors ``spec`` describes: ``{name: tensor}``."""
    if flat.dim() != 1 or flat.numel() != spec.numel:
        raise ValueError(f"flat must be a 1-D tensor of {spec.numel} entries; got shape {tuple(flat.shape)}")
    return {
        name: flat[off : off + size].view(shape)
        for name, shape, off, size in zip(spec.names, spec.shapes, spec.offsets, spec.sizes)
    }
