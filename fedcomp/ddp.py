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

With :class:`fedcomp.PowerSGD` as the compressor the hook works as PowerSGD does instead
(low-rank factors add up, so no all-gather): per bucket, ``P = M Q`` of every matrix and the
bucket's vectors go in one all-reduce, each rank orthonormalises the summed ``P``, and
``Q = M^T P`` goes in a second all-reduce; the bucket becomes ``P (sum Q / world)^T``. Both
all-reduces are waited for inside the hook (on a GPU that only orders the streams), so every
rank issues its collectives in the same order whatever the number of buckets (PyTorch's own
PowerSGD hook issues the second from a callback, and gloo failed when DDP made more than one
bucket), and the product is computed in the thread that runs the hooks, so every rank gets the
same bits (a callback's thread may run BLAS with another thread count). The bucket's matrix shapes come
from ``bucket.gradients()``; the first compressed step broadcasts rank 0's ``seed``, so every
rank draws the same initial ``Q``.

The first ``start_iter`` iterations use plain allreduce (DDP rebuilds its
buckets after the first iteration, and error-feedback residuals are keyed by
bucket). Buckets that compression would not shrink by ``min_compression_rate``
are allreduced too (PowerSGD applies its own rate per matrix). Only the payload
sections travel (every rank knows the layout, so no header). ``state.bytes_sent`` /
``state.bytes_dense`` count what this rank contributed against the dense bucket size.
"""

import warnings

import torch
import torch.distributed as dist
from torch import Tensor

from .compressors import Compressor, ErrorFeedback, Sign, _check_compressor
from .lowrank import PowerSGD, orthonormalize_rows
from .wire import Payload, lowrank_accumulate

__all__ = ["CompressionState", "compression_hook"]


class CompressionState:
    """State of :func:`compression_hook`: the compressor, residuals and statistics.

    Args:
        compressor: a base compressor (``TopK``, ``Sign`` with a ``block`` (one scale per
            bucket trains badly and warns), ``QSGD``, ``RandK`` with the same seed on every
            rank, ``Identity``, or ``PowerSGD(rank)``: two all-reduces of low-rank factors).
        error_feedback: keep a residual per bucket (:class:`fedcomp.ErrorFeedback`).
        start_iter: iterations of plain allreduce before compression starts (``>= 1``).
        min_compression_rate: compress a bucket only if its dense size is at least this
            many times its compressed size (``>= 0``; PyTorch's PowerSGD hook uses 2 by
            default). ``PowerSGD`` applies its own ``min_compression_rate`` per matrix instead.
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
        "seed_synced",
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
        if isinstance(compressor, Sign) and compressor.block is None:
            warnings.warn(
                "CompressionState(Sign()): one sign scale per DDP bucket (up to millions of entries) "
                "trains badly: in benchmarks/test_bench_ddp_compare.py it ends at a higher loss than "
                "block scales at about the same bytes. Use Sign(block=256) (see docs/ddp.md).",
                UserWarning,
                stacklevel=2,
            )
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
        self.seed_synced = False  # PowerSGD: rank 0's seed adopted (at the first compressed step)

    @property
    def compression_ratio(self) -> float:
        """Dense bytes over bytes sent, counted since construction (1.0 before any traffic)."""
        return self.bytes_dense / self.bytes_sent if self.bytes_sent else 1.0

    def __getstate__(self):
        return {slot: getattr(self, slot) for slot in self.__slots__ if slot != "process_group"}

    def __setstate__(self, state):
        self.seed_synced = False  # absent from states pickled before PowerSGD
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
    base = state.compressor.compressor if isinstance(state.compressor, ErrorFeedback) else state.compressor
    if isinstance(base, PowerSGD):
        if state.iter < state.start_iter:
            fut = _allreduce(state, buf, group)
        else:
            fut = _lowrank(state, base, bucket, group)
        state._advance(bucket)
        return fut
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


def _lowrank(state: CompressionState, base: PowerSGD, bucket, group) -> torch.futures.Future[torch.Tensor]:
    """PowerSGD's two all-reduces for one bucket (see the module docstring)."""
    buf = bucket.buffer()
    flat, n, world = buf.reshape(-1), buf.numel(), _group_size(group)
    layout = base.layout_for([g.shape for g in bucket.gradients()], n)
    key = f"bucket{bucket.index()}"
    if not state.seed_synced:  # every rank must draw the same initial Q: rank 0's seed
        seed = torch.tensor([base.seed], dtype=torch.int64, device=buf.device)
        dist.broadcast(seed, group=group, group_src=0)
        base.seed, state.seed_synced = int(seed.item()), True
    residual = state.compressor._residual(key, flat) if isinstance(state.compressor, ErrorFeedback) else None
    if residual is not None and residual.dtype == torch.float32:
        a = residual.add_(flat)  # M + e, kept in the residual
    else:
        a = flat.float() if residual is None else flat.float() + residual.float()
    mats = base._matrices(a, layout)
    dense = base._dense(a, layout)
    ps = [qt @ m.T for m, qt in zip(mats, base._start(key, layout, a.device))]  # P^T = Q^T M^T [r, rows]
    first = torch.cat([p.reshape(-1) for p in ps] + dense) if ps or dense else a.new_zeros(0)
    state.compressed_buckets += 1
    state.bytes_dense += n * buf.element_size()
    state.bytes_sent += first.numel() * first.element_size()

    def finish(ps: list[Tensor], summed_q: Tensor | None) -> Tensor:
        """The bucket from the orthonormal ``P^T`` factors and the all-reduced ``Q^T`` (and dense) ones."""
        p_flat = torch.cat([p.reshape(-1) for p in ps]) if ps else a.new_zeros(0)
        q_mean = summed_q.div_(world) if summed_q is not None else a.new_zeros(0)
        dense_mean = first[p_flat.numel() :].div_(world)
        base._finish(key, _split_like(q_mean, [(p.shape[0], m.shape[1]) for m, p in zip(mats, ps)]))
        out = lowrank_accumulate(
            torch.zeros(n, dtype=torch.float32, device=a.device), layout, p_flat, q_mean, dense_mean
        )
        if residual is not None:  # e = (M + e) - P Q_mean^T, PowerSGD's error feedback
            residual.copy_(a.sub_(out) if a is residual else a - out)
        buf.copy_(out.view_as(buf))
        return buf

    if not ps:  # vectors only: one all-reduce (its callback only copies: the same bits on every rank)
        work = dist.all_reduce(first, group=group, async_op=True)
        return work.get_future().then(lambda fut: finish([], None))
    # Both all-reduces are waited for here, and the factors multiplied in this thread: a callback runs
    # on gloo's thread or inline, where BLAS may use another number of threads and round differently,
    # and the ranks' models would drift apart in the last bits. Waiting for P also makes this rank
    # issue its collectives in bucket order (the next one, Q, from here).
    dist.all_reduce(first, group=group)
    ps = [orthonormalize_rows(p) for p in _split_like(first, [tuple(p.shape) for p in ps])]
    second = torch.cat([(p @ m).reshape(-1) for m, p in zip(mats, ps)])  # Q^T = P^T M [r, cols]
    state.bytes_sent += second.numel() * second.element_size()
    dist.all_reduce(second, group=group)
    done = torch.futures.Future()
    done.set_result(finish(ps, second))
    return done


def _split_like(flat: Tensor, shapes: list[tuple[int, int]]) -> list[Tensor]:
    """``flat``'s leading entries as consecutive tensors of ``shapes`` (views)."""
    out, off = [], 0
    for rows, cols in shapes:
        out.append(flat[off : off + rows * cols].view(rows, cols))
        off += rows * cols
    return out
