"""Compressors over the fedcomp ops: tensor in, :class:`~fedcomp.wire.Payload` out.

Three lines compress a model update and send it::

    flat, spec = fedcomp.flatten(update)                  # one contiguous buffer
    payload = ErrorFeedback(TopK(0.01)).compress(flat, key="client-3")
    wire = payload.to_bytes()                             # exactly payload.nbytes bytes

and the receiver runs ``fedcomp.Payload.from_bytes(wire).decode()`` or
``fedcomp.aggregate(payloads)``.

Every compressor accepts a 1-D (or any contiguous, then flattened) float32,
float16 or bfloat16 tensor. Decoding is stateless: the payload carries all it
needs. :class:`ErrorFeedback` and :class:`EF21` keep per-key state (residuals or
estimates) that ``state_dict()`` / ``load_state_dict()`` save and restore exactly.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch
from torch import Tensor

from . import _backend, ops
from ._host import index_dtype_for, splitmix64
from .wire import Payload, _remember_positions, wire_nbytes

__all__ = ["Compressor", "Identity", "TopK", "RandK", "Sign", "QSGD", "ErrorFeedback", "EF21"]


def _flat_input(x) -> Tensor:
    return _checked(x).reshape(-1)


def _stack_input(x) -> Tensor:
    """``x`` of ``compress_many``: a ``[clients >= 1, n]`` float tensor, checked as :func:`_checked`."""
    if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"x must be a [clients >= 1, n] tensor; got {shape}")
    return _checked(x.contiguous())


def _checked(x) -> Tensor:
    """``x`` checked once for the ops (a contiguous float tensor on a device a backend serves),
    detached: the compressors then call the registered ops directly (``ops._ops``), with
    arguments they have validated themselves, and build payloads with ``Payload._trusted``."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor; got {type(x).__name__}")
    if x.dtype not in ops.FLOAT_DTYPES:
        raise TypeError(f"x must have dtype float32, float16 or bfloat16; got {x.dtype}")
    if not x.is_contiguous():
        raise ValueError("x must be contiguous; call .contiguous() first")
    _backend.backend_of(x)
    return x.detach()


def _row_payloads(kind: str, x: Tensor, params: list[dict], *stacks: Tensor) -> list[Payload]:
    """One payload per row of ``x`` ``[m, n]``, with ``params[i]`` and row ``i`` of each of a
    batched op's ``[m, ...]`` outputs as its sections (``unbind``: iterating a tensor goes
    through a Python-level ``Tensor.__iter__`` per output)."""
    rows = zip(*(s.unbind() for s in stacks))
    return [Payload._trusted(kind, x.dtype, x.shape[1], p, sections) for p, sections in zip(params, rows)]


def _ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
        raise TypeError(f"ratio must be a float; got {type(ratio).__name__}")
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1]; got {ratio!r}")
    return float(ratio)


def _count(ratio: float, n: int) -> int:
    """Entries kept of ``n``: ``ceil(ratio * n)``, at least 1 when ``n > 0``."""
    return min(n, max(1, math.ceil(ratio * n))) if n else 0


class Compressor:
    """Base class. Subclasses implement :meth:`_encode`; decoding lives in the payload.

    ``_encode(x, residual)`` compresses ``a = x + residual`` (``residual=None``: ``a = x``)
    and, when a residual is given, sets it in place to ``a - decode(payload)``
    (rounded to ``x.dtype``), using the fused ``*_ef`` ops.
    """

    kind: str = ""

    def compress(self, x: Tensor) -> Payload:
        """Compress ``x`` (no error feedback). Returns a :class:`Payload`."""
        return self._encode(_flat_input(x), None)

    def _encode(self, x: Tensor, residual: Tensor | None) -> Payload:
        raise NotImplementedError

    def _encode_keyed(self, x: Tensor, residual: Tensor | None, key: str) -> Payload:
        """:meth:`_encode` for the state of ``key``: the wrappers call this, so that a compressor
        with per-key state of its own (:class:`fedcomp.PowerSGD`'s warm start) sees the key."""
        return self._encode(x, residual)

    def compress_many(self, x: Tensor) -> list[Payload]:
        """Compress each row of ``x`` ``[m, n]`` (no error feedback): the same payloads, to the
        bit, as ``[compress(x[i]) for i in range(m)]``, in one batched call where the
        compressor has one (sign and QSGD; for QSGD the rows' seeds are drawn in row order)."""
        return self._encode_rows(_stack_input(x), None, None)

    def _encode_rows(self, x: Tensor, residual: Tensor | None, rows: list[int] | None) -> list[Payload]:
        """``_encode`` of each row ``i`` of ``x [m, n]`` with row ``rows[i]`` of ``residual [K, n]``
        (updated in place; ``None``: no error feedback); compressors with a batched op override
        it with one call."""
        if residual is None:
            return [self._encode(x[i], None) for i in range(x.shape[0])]
        return [self._encode(x[i], residual[j]) for i, j in enumerate(rows)]

    def _params(self, numel: int) -> dict:
        raise NotImplementedError

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32, *, header: bool = True) -> int:
        """Exact ``nbytes`` of the payload this compressor makes from ``numel`` entries of ``dtype``.

        ``header=False``: the section bytes alone (what a channel that already knows the
        layout, such as the DDP hook's all-gather, transmits).
        """
        return wire_nbytes(self.kind, dtype, numel, self._params(numel), header=header)

    def state_dict(self) -> dict:
        """State needed to continue bit for bit (e.g. call counters of seeded compressors)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Identity(Compressor):
    """Sends the tensor as is (``n * itemsize`` bytes plus the header)."""

    kind = "identity"

    def _params(self, numel: int) -> dict:
        return {}

    def _encode(self, x, residual):
        if residual is None:
            values = x.clone()
        else:
            values = x + residual
            residual.zero_()
        return Payload._trusted("identity", x.dtype, x.numel(), {}, (values,))


class TopK(Compressor):
    """Exact top-k by magnitude (ties to the lower index), values plus ascending indices.

    Args:
        ratio: fraction of entries kept, in ``(0, 1]``; ``k = max(1, ceil(ratio * n))``.
        segments: optional sizes of consecutive segments (e.g. ``FlatSpec.sizes``) for a
            per-tensor top-k: each segment keeps ``max(1, ceil(ratio * size))`` entries.
            Default: one global top-k over the whole buffer.
    """

    kind = "topk"

    def __init__(self, ratio: float, *, segments=None):
        self.ratio = _ratio(ratio)
        if segments is not None:
            segments = tuple(segments)
            for s in segments:
                ops._check_int("segments entry", s, 0)
        self.segments = segments

    def k_for(self, numel: int) -> int:
        if self.segments is None:
            return _count(self.ratio, numel)
        return sum(_count(self.ratio, s) for s in self._segments(numel))

    def _segments(self, numel: int) -> tuple[int, ...]:
        if sum(self.segments) != numel:
            raise ValueError(f"segments sum to {sum(self.segments)} but x has {numel} entries")
        return self.segments

    def _params(self, numel: int) -> dict:
        return {"k": self.k_for(numel)}

    def _encode_rows(self, x, residual, rows):
        if self.segments is not None:
            return super()._encode_rows(x, residual, rows)
        n = x.shape[1]
        k = _count(self.ratio, n)
        values, indices = ops._ops.topk_ef_rows(x, residual, k, index_dtype_for(n), rows)
        return _row_payloads("topk", x, [{"k": k}] * x.shape[0], values, indices)

    def _encode(self, x, residual):
        n, idx_dtype = x.numel(), index_dtype_for(x.numel())
        if self.segments is None:
            values, indices = ops._ops.topk_ef(x, residual, _count(self.ratio, n), idx_dtype)
        else:
            vals, idxs, off = [], [], 0
            for size in self._segments(n):
                r = None if residual is None else residual[off : off + size]
                v, i = ops.topk_ef(x[off : off + size], r, _count(self.ratio, size), index_dtype=idx_dtype)
                vals.append(v)
                idxs.append(i + off)
                off += size
            values, indices = torch.cat(vals), torch.cat(idxs).to(idx_dtype)
        return Payload._trusted("topk", x.dtype, n, {"k": values.numel()}, (values, indices))

    def __repr__(self) -> str:
        per = ", per-tensor" if self.segments is not None else ""
        return f"TopK(ratio={self.ratio}{per})"


class _Seeded(Compressor):
    """A compressor that draws a fresh 63-bit seed per call from ``(seed, call count)``."""

    def __init__(self, seed: int):
        self.seed = ops._check_int("seed", seed, 0, (1 << 63) - 1)
        self.calls = 0

    def _next_seed(self) -> int:
        s = splitmix64(self.seed, self.calls)
        self.calls += 1
        return s

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = ops._check_int("state['calls']", state["calls"], 0)


class RandK(_Seeded):
    """``k`` random distinct positions per call; only the values and a 63-bit seed are sent.

    The positions of call ``t`` come from a keyed permutation seeded by
    ``splitmix64(seed, t)`` (:func:`fedcomp.wire.randk_indices`), so the receiver
    regenerates them. Compressors built with the same ``seed`` pick the same positions
    at the same call, which keeps an aggregate of many clients as sparse as one.
    Values are sent unscaled (biased, meant for error feedback).

    Args:
        ratio: fraction kept, ``k = max(1, ceil(ratio * n))``.
        seed: ``0 <= seed < 2**63``.
    """

    kind = "randk"

    def __init__(self, ratio: float, seed: int = 0):
        self.ratio = _ratio(ratio)
        super().__init__(seed)

    def _params(self, numel: int) -> dict:
        return {"k": _count(self.ratio, numel), "seed": 0}

    def _encode(self, x, residual):
        return self._encode_rows(x[None], None if residual is None else residual[None], None)[0]

    def _encode_rows(self, x, residual, rows):
        n = x.shape[1]
        k = _count(self.ratio, n)
        seeds = [self._next_seed() for _ in range(x.shape[0])]
        values, positions = ops._ops.randk_ef_rows(x, residual, seeds, k, rows)
        if positions.is_cpu:  # a receiver in this process (a simulation) reuses them
            _remember_positions(k, n, zip(seeds, positions.unbind()))
        return _row_payloads("randk", x, [{"k": k, "seed": s} for s in seeds], values)

    def __repr__(self) -> str:
        return f"RandK(ratio={self.ratio}, seed={self.seed})"


class Sign(Compressor):
    """1 bit per entry plus one fp32 scale per block (``mean|a|``, or ``||a||/sqrt(n_b)``).

    Args:
        block: entries per scale (``None``: one scale for the whole tensor).
        scale: ``"mean"`` or ``"l2"``.
    """

    kind = "sign"

    def __init__(self, block: int | None = None, scale: str = "mean"):
        self.block = None if block is None else ops._check_int("block", block, 1)
        if scale not in ("mean", "l2"):
            raise ValueError(f"scale must be 'mean' or 'l2'; got {scale!r}")
        self.scale = scale

    def _params(self, numel: int) -> dict:
        return {"block": max(numel, 1) if self.block is None else self.block, "l2": int(self.scale == "l2")}

    def _encode(self, x, residual):
        params = self._params(x.numel())
        packed, scales = ops._ops.sign_ef(x, residual, params["block"], self.scale == "l2")
        return Payload._trusted("sign", x.dtype, x.numel(), params, (packed, scales))

    def _encode_rows(self, x, residual, rows):
        params = self._params(x.shape[1])
        packed, scales = ops._ops.sign_ef_rows(x, residual, params["block"], self.scale == "l2", rows)
        return _row_payloads("sign", x, [params] * x.shape[0], packed, scales)

    def __repr__(self) -> str:
        return f"Sign(block={self.block}, scale={self.scale!r})"


class QSGD(_Seeded):
    """Unbiased stochastic quantization to ``2L+1`` levels per bucket, bit-packed.

    Args:
        levels: ``L`` in ``[1, 32768]``; each entry takes ``ceil(log2(2L+1))`` bits.
        bucket: entries per fp32 norm (``None``: one bucket).
        seed: base of the per-call Philox seeds, ``0 <= seed < 2**63``.
    """

    kind = "qsgd"

    def __init__(self, levels: int = 4, bucket: int | None = 512, seed: int = 0):
        self.levels = ops._check_int("levels", levels, 1, ops.MAX_LEVELS)
        self.bucket = None if bucket is None else ops._check_int("bucket", bucket, 1)
        super().__init__(seed)

    def _params(self, numel: int) -> dict:
        return {"levels": self.levels, "bucket": max(numel, 1) if self.bucket is None else self.bucket}

    def variance_bound(self, numel: int | None = None) -> float:
        """QSGD's variance bound ``ω`` (Alistarh et al. 2017, Lemma 3.1):
        ``E||decode - a||^2 <= ω ||a||^2`` with ``ω = min(d / L^2, sqrt(d) / L)`` for buckets of
        ``d`` entries (``bucket``, or ``numel`` when ``bucket`` is None; ``numel=None`` there
        means any size: ``inf``). Error feedback is only guaranteed to stay bounded for
        ``ω < 1``; at the default ``levels=4, bucket=512`` it is 5.66."""
        if self.bucket is None:
            d = math.inf if numel is None else numel
        else:
            d = self.bucket if numel is None else min(self.bucket, numel)
        return min(d / self.levels**2, math.sqrt(d) / self.levels)

    def _encode(self, x, residual):
        params = self._params(x.numel())
        packed, norms = ops._ops.qsgd(x, residual, self.levels, params["bucket"], self._next_seed())
        return Payload._trusted("qsgd", x.dtype, x.numel(), params, (packed, norms))

    def _encode_rows(self, x, residual, rows):
        params = self._params(x.shape[1])
        seeds = [self._next_seed() for _ in range(x.shape[0])]
        packed, norms = ops._ops.qsgd_rows(x, residual, self.levels, params["bucket"], seeds, rows)
        return _row_payloads("qsgd", x, [params] * x.shape[0], packed, norms)

    def __repr__(self) -> str:
        return f"QSGD(levels={self.levels}, bucket={self.bucket}, seed={self.seed})"


# --------------------------------------------------------------------------
# stateful wrappers
# --------------------------------------------------------------------------
def _check_key(key) -> str:
    if not isinstance(key, str):
        raise TypeError(
            f"key must be a str (a stable name such as a client id or parameter name); got {type(key).__name__}"
        )
    return key


def _check_compressor(compressor) -> Compressor:
    if isinstance(compressor, _Stateful):
        raise TypeError("compressor must be a base compressor, not another ErrorFeedback/EF21 wrapper")
    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a fedcomp Compressor; got {type(compressor).__name__}")
    return compressor


class _Stateful:
    """Per-key tensors that ``state_dict`` saves (cloned) and ``load_state_dict`` restores."""

    _slots: tuple[str, ...] = ()

    def __init__(self, compressor: Compressor):
        self.compressor = _check_compressor(compressor)
        for slot in self._slots:
            setattr(self, slot, {})

    @property
    def kind(self) -> str:
        return self.compressor.kind

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32, *, header: bool = True) -> int:
        return self.compressor.wire_bytes(numel, dtype, header=header)

    def _slot(self, table: dict, key, numel: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        key = _check_key(key)
        t = table.get(key)
        if t is None:
            t = table[key] = torch.zeros(numel, dtype=dtype, device=device)
        elif t.numel() != numel or t.device != device:
            raise ValueError(
                f"state for key {key!r} holds {t.numel()} entries on {t.device}; "
                f"got {numel} on {device} (use a distinct key per tensor, or reset({key!r}))"
            )
        elif t.dtype != dtype:
            raise TypeError(f"state for key {key!r} has dtype {t.dtype}; got x of dtype {dtype}")
        return t

    def reset(self, key: str | None = None) -> None:
        """Forget the state of ``key`` (all keys if ``None``)."""
        for slot in self._slots:
            table = getattr(self, slot)
            if key is None:
                table.clear()
            else:
                table.pop(key, None)

    def state_dict(self) -> dict:
        state = {slot: {k: v.clone() for k, v in getattr(self, slot).items()} for slot in self._slots}
        state["compressor"] = self.compressor.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for slot in self._slots:
            if slot not in state:
                raise ValueError(f"state is missing {slot!r}; keys: {sorted(state)}")
            setattr(self, slot, {str(k): v.clone() for k, v in state[slot].items()})
        self.compressor.load_state_dict(state.get("compressor", {}))


# Residuals of rows shorter than this live as rows of shared [capacity, n] buffers, so that
# compress_many runs one batched op over many keys' residuals in place (no gather, no write-back).
# Longer residuals get a tensor each and compress_many goes row by row: there one call's fixed cost
# (Python, dispatch, thread wake-up) is nothing next to the row's own work.
_ROWS_BATCH_BELOW = 1 << 18


class ErrorFeedback(_Stateful):
    """Error feedback (EF14): send ``C(x + e)``, keep ``e <- x + e - decode(C(x + e))``.

    The residual ``e`` of each ``key`` lives in ``x``'s dtype and is updated in place by
    the fused op (one pass; no dense temporary). Over any number of calls,
    ``sum(decoded) + e_final == sum(x)`` (exactly for top-k in fp32).

    Residuals of fewer than 2^18 entries are rows of shared buffers (one set per size, dtype
    and device, doubled when full and never moved; see :meth:`reserve`), so that
    :meth:`compress_many` updates many keys' residuals with one batched op.
    """

    _slots = ("residuals",)

    def __init__(self, compressor: Compressor):
        super().__init__(compressor)
        if isinstance(self.compressor, QSGD) and self.compressor.variance_bound() >= 1:
            warnings.warn(
                f"ErrorFeedback({self.compressor!r}): QSGD's variance bound is "
                f"{self.compressor.variance_bound():.3g} >= 1, so the residual can grow without bound "
                "(error feedback needs a contractive compressor; in fedsynsam's trainer it reached NaN "
                "within 100 rounds). Send QSGD without error feedback (it is unbiased), or use "
                "levels > sqrt(bucket).",
                UserWarning,
                stacklevel=2,
            )
        self._pools: dict[tuple, list[Tensor]] = {}  # (n, dtype, device) -> its [capacity, n] buffers
        self._free: dict[tuple, list[tuple[Tensor, int]]] = {}  # (n, dtype, device) -> unused rows
        self._home: dict[str, tuple[Tensor, int]] = {}  # key -> (buffer, row) of its residual

    def _residual(self, key, x: Tensor) -> Tensor:
        """The residual of ``key`` for updates like ``x`` (``[n]``, or a row of ``[m, n]``):
        zeros at a key's first call, from a shared buffer's free row when ``n < 2^18``."""
        n = x.shape[-1]
        key = _check_key(key)
        if key in self.residuals or n >= _ROWS_BATCH_BELOW:
            return self._slot(self.residuals, key, n, x.device, x.dtype)
        pool = (n, x.dtype, x.device)
        if not self._free.get(pool):
            self._grow(pool, max(8, sum(b.shape[0] for b in self._pools.get(pool, []))))
        buffer, row = self._home[key] = self._free[pool].pop()
        self.residuals[key] = buffer[row].zero_()
        return self.residuals[key]

    def _grow(self, pool: tuple, rows: int) -> None:
        n, dtype, device = pool
        buffer = torch.zeros(rows, n, dtype=dtype, device=device)
        self._pools.setdefault(pool, []).append(buffer)
        self._free.setdefault(pool, []).extend((buffer, j) for j in reversed(range(rows)))

    def reserve(self, count: int, like: Tensor) -> None:
        """Make room for ``count`` keys' residuals for updates like ``like`` (``[n]`` or
        ``[m, n]``) in one shared buffer, so that :meth:`compress_many` over any of them is one
        batched call (e.g. a trainer's number of clients, before the first round). Residuals
        are still created at a key's first call, as zeros; nothing else changes."""
        count = ops._check_int("count", count, 0)
        if not isinstance(like, Tensor) or like.dim() not in (1, 2):
            raise TypeError("like must be a [n] or [m, n] tensor")
        pool = (like.shape[-1], like.dtype, like.device)
        missing = count - len(self._free.get(pool, []))
        if like.shape[-1] < _ROWS_BATCH_BELOW and missing > 0:
            self._grow(pool, missing)

    def reset(self, key: str | None = None) -> None:
        """Forget the state of ``key`` (all keys if ``None``); their rows of the shared buffers
        are reused, zeroed, by later keys."""
        for k in list(self._home) if key is None else [key] if key in self._home else []:
            buffer, row = self._home.pop(k)
            self._free[(buffer.shape[1], buffer.dtype, buffer.device)].append((buffer, row))
        super().reset(key)

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        loaded = dict(self.residuals)
        self.reset()
        for key, value in loaded.items():
            self._residual(key, value).copy_(value)

    def compress(self, x: Tensor, key: str = "default") -> Payload:
        x = _flat_input(x)
        return self.compressor._encode_keyed(x, self._residual(key, x), key)

    def compress_many(self, x: Tensor, keys) -> list[Payload]:
        """Compress ``m`` clients' updates at once: ``x`` is ``[m, n]``, ``keys`` ``m`` distinct keys.

        For rows shorter than 2^18 entries, top-k (global), rand-k, sign and QSGD run as one
        batched op on the keys' residuals in place (one parallel region on the CPU; see :func:`fedcomp.topk_ef`);
        otherwise, and for other compressors, row by row. Either way the payloads and residuals
        equal ``[compress(x[i], keys[i]) for i in range(m)]`` to the bit.
        """
        x = _stack_input(x)
        keys = [_check_key(k) for k in keys]
        if len(keys) != x.shape[0] or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be {x.shape[0]} distinct keys, one per row of x; got {keys!r}")
        if type(self.compressor)._encode_rows is Compressor._encode_rows or x.shape[1] >= _ROWS_BATCH_BELOW:
            residuals = [self._residual(k, x) for k in keys]
            return [self.compressor._encode_keyed(x[i], r, k) for i, (r, k) in enumerate(zip(residuals, keys))]
        home = self._home
        for k in keys:  # a new key gets its row; a known one is checked with its buffer below
            if k not in home:
                self._residual(k, x)
        groups: dict[int, tuple[Tensor, list[int], list[int]]] = {}  # one batched call per buffer
        for i, k in enumerate(keys):
            buffer, row = home[k]
            group = groups.setdefault(id(buffer), (buffer, [], []))
            group[1].append(i)
            group[2].append(row)
        for buffer, idx, _ in groups.values():  # every key of a buffer holds residuals like x, or none
            if buffer.shape[1] != x.shape[1] or buffer.dtype != x.dtype or buffer.device != x.device:
                for i in idx:
                    self._residual(keys[i], x)  # raises, naming the key
        payloads: list = [None] * len(keys)
        for buffer, idx, rows in groups.values():
            part = x if len(idx) == len(keys) else x[idx]
            for i, p in zip(idx, self.compressor._encode_rows(part, buffer, rows)):
                payloads[i] = p
        return payloads

    def residual(self, key: str = "default") -> Tensor | None:
        """The current residual of ``key`` (``None`` before its first call)."""
        return self.residuals.get(key)

    def __repr__(self) -> str:
        return f"ErrorFeedback({self.compressor!r})"


class EF21(_Stateful):
    """EF21: send ``c = C(x - g)``, then ``g <- g + decode(c)``; the receiver keeps the same ``g``.

    ``g`` (fp32, per key) is the receiver's current estimate of ``x``. The sender calls
    :meth:`compress`; the receiver calls :meth:`receive` with the payload and the same
    key, which returns its copy of ``g`` (identical to the sender's). Payloads encode
    float32 differences whatever ``x``'s dtype.
    """

    _slots = ("estimates", "received")

    def compress(self, x: Tensor, key: str = "default") -> Payload:
        x = _flat_input(x)
        g = self._slot(self.estimates, key, x.numel(), x.device, torch.float32)
        payload = self.compressor._encode_keyed(x.float() - g, None, key)
        payload.accumulate_into(g)
        return payload

    def receive(self, payload: Payload, key: str = "default") -> Tensor:
        """Receiver side: ``g_key += decode(payload)``; returns ``g_key`` ([numel] float32)."""
        if not isinstance(payload, Payload):
            raise TypeError(f"payload must be a fedcomp Payload; got {type(payload).__name__}")
        g = self._slot(self.received, key, payload.numel, payload.device, torch.float32)
        return payload.accumulate_into(g)

    def estimate(self, key: str = "default") -> Tensor | None:
        """The sender's estimate ``g`` of ``key`` (``None`` before its first call)."""
        return self.estimates.get(key)

    def __repr__(self) -> str:
        return f"EF21({self.compressor!r})"
