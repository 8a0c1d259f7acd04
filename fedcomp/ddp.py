"""A DistributedDataParallel communication hook that sends compressed gradients.

In the style of PyTorch's PowerSGD hook: a small state object plus a pure hook::

    from fedcomp.ddp import CompressionState, compression_hook
    state = CompressionState(fedcomp.TopK(0.01), error_feedback=True, start_iter=10)
    ddp_model.register_comm_hook(state, compression_hook)

Per gradient bucket, each rank compresses its bucket (with an error-feedback
residual keyed by the bucket index), all ranks all-gather the payload sections
(every rank's payload has the same size, so no size exchange is needed), and
each rank accumulates all payloads into the bucket and divides by the world
size. Sparse payloads are scattered, never decoded to dense tensors.

The first ``start_iter`` iterations use plain allreduce (DDP rebuilds its
buckets after the first iteration, and error-feedback residuals are keyed by
bucket). Buckets that compression would not shrink by ``min_compression_rate``
are allreduced too. Only the payload sections travel (every rank knows the
layout, so no header). ``state.bytes_sent`` / ``state.bytes_dense`` count what
this rank contributed against the dense bucket size.
"""

import torch
import torch.distributed as dist
from torch import Tensor

from .compressors import Compressor, ErrorFeedback, _check_compressor
from .wire import Payload

__all__ = ["CompressionState", "compression_hook"]


class CompressionState:
    """State of :func:`compression_hook`: the compressor, residuals and statistics.

    Args:
        compressor: a base compressor (``TopK``, ``Sign``, ``QSGD``, ``RandK`` with the same
            seed on every rank, or ``Identity``).
        error_feedback: keep a residual per bucket (:class:`fedcomp.ErrorFeedback`).
        start_iter: iterations of plain allreduce before compression starts (``>= 1``).
        min_compression_rate: compress a bucket only if its dense size is at least this
            many times its compressed size (``>= 0``; PowerSGD's hook uses 2 by default).
        process_group: the group to communicate in (``None``: the default group).

    The state pickles (e.g. inside a checkpoint) without its process group.
    """

    __slots__ = (
        "compressor",
        "error_feedback",
        "start_iter",
        "min_compression_rate",
        "process_group",
        "iter",
        "bytes_sent",
        "bytes_dense",
        "compressed_buckets",
        "allreduced_buckets",
    )

    def __init__(
        self,
        compressor: Compressor,
        error_feedback: bool = True,
        start_iter: int = 10,
        min_compression_rate: float = 2.0,
        process_group=None,
    ):
        compressor = _check_compressor(compressor)
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 1:
            raise ValueError(
                f"start_iter must be an int >= 1 (DDP rebuilds its buckets after iteration 0); got {start_iter!r}"
            )
        if not isinstance(min_compression_rate, (int, float)) or not 0 <= min_compression_rate < float("inf"):
            raise ValueError(f"min_compression_rate must be a finite number >= 0; got {min_compression_rate!r}")
        self.min_compression_rate = float(min_compression_rate)
        self.compressor = ErrorFeedback(compressor) if error_feedback else compressor
        self.error_feedback = bool(error_feedback)
        self.start_iter = start_iter
        self.process_group = process_group
        self.iter = 0
        self.bytes_sent = 0
        self.bytes_dense = 0
        self.compressed_buckets = 0
        self.allreduced_buckets = 0

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes sent, counted since construction (1.0 before any traffic)."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    def __getstate__(self):
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot != "process_group"}

    def __setstate__(self, state):
        for slot, value in state.items():
            setattr(self, slot, value)
        self.process_group = None

    def _advance(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1


def _group_size(group) -> int:
    return dist.get_world_size(group)


def _allreduce(state: CompressionState, buf: Tensor, group) -> torch.futures.Future[torch.Tensor]:
    state.allreduced_buckets += 1
    nbytes = buf.numel() * buf.element_size()
    state.bytes_sent += nbytes
    state.bytes_dense += nbytes
    buf.div_(_group_size(group))
    return dist.all_reduce(buf, group=group, async_op=True).get_future().then(lambda fut: fut.value()[0])


def _raw(payload: Payload) -> Tensor:
    return torch.cat([t.reshape(-1).view(torch.uint8) for t in payload.sections])


def _split(raw: Tensor, like: Payload) -> Payload:
    sections, pos = [], 0
    for t in like.sections:
        nb = t.numel() * t.element_size()
        piece = raw[pos : pos + nb]
        if pos % t.element_size():  # e.g. fp32 scales after an odd number of packed bytes
            piece = piece.clone()
        sections.append(piece.view(t.dtype))
        pos += nb
    return Payload(like.kind, like.dtype, like.numel, like.params, tuple(sections))


def compression_hook(state: CompressionState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: compress, all-gather, accumulate, average.

    Returns a future holding the averaged bucket (the bucket's own buffer).
    (This module does not use ``from __future__ import annotations``: DDP checks the
    return annotation object.)
    """
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    buf = bucket.buffer()
    n, dense = buf.numel(), buf.numel() * buf.element_size()
    compress_now = state.iter >= state.start_iter and dense >= state.min_compression_rate * state.compressor.wire_bytes(
        n, buf.dtype, header=False
    )
    if not compress_now:
        fut = _allreduce(state, buf, group)
        state._advance(bucket)
        return fut
    flat = buf.reshape(-1)
    if isinstance(state.compressor, ErrorFeedback):
        payload = state.compressor.compress(flat, key=f"bucket{bucket.index()}")
    else:
        payload = state.compressor.compress(flat)
    raw = _raw(payload)
    state.compressed_buckets += 1
    state.bytes_sent += raw.numel()
    state.bytes_dense += dense
    world = _group_size(group)
    gathered = [torch.empty_like(raw) for _ in range(world)]
    work = dist.all_gather(gathered, raw, group=group, async_op=True)

    def decode(fut) -> Tensor:
        fut.wait()
        acc = torch.zeros(n, dtype=torch.float32, device=buf.device)
        for rank_raw in gathered:
            _split(rank_raw, payload).accumulate_into(acc)
        buf.copy_(acc.div_(world).view_as(buf))
        return buf

    state._advance(bucket)
    return work.get_future().then(decode)
