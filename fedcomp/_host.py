"""Host-side helpers below every other layer: device copies without a host synchronisation,
the SplitMix64 stream and rand-k round keys, and the index dtype of a payload. Imported by the
reference, the kernels and the wire format alike (nothing here imports fedcomp)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["host_to_device", "index_dtype_for", "round_keys", "splitmix64"]

_M64 = (1 << 64) - 1


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices when every position fits (``numel < 2**31``), else int64."""
    return torch.int32 if numel < 2**31 else torch.int64


def splitmix64(seed: int, counter: int) -> int:
    """A 63-bit value for ``counter`` of a stream keyed by ``seed`` (SplitMix64 finaliser)."""
    z = (seed * 0x9E3779B97F4A7C15 + (counter + 1) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
    return (z ^ (z >> 31)) >> 1


def host_to_device(t: Tensor, like: Tensor) -> Tensor:
    """Host tensor ``t`` on ``like``'s device (a new tensor there): on a GPU copied from pinned
    memory without blocking the host, since a copy from pageable memory synchronises with the
    device; on the CPU, ``t`` itself."""
    return t.pin_memory().to(like.device, non_blocking=True) if like.is_cuda else t.to(like.device)


def round_keys(seeds) -> Tensor:
    """``[len(seeds), 4]`` int64: the Feistel round keys ``splitmix64(seed, r)`` of each seed."""
    return torch.tensor([[splitmix64(s, r) for r in range(4)] for s in seeds], dtype=torch.int64)
