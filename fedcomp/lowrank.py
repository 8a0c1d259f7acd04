"""PowerSGD: rank-``r`` compression of each matrix of a flat buffer (Vogels et al., 2019).

Each tensor of two or more dimensions is viewed as a matrix ``M [rows, cols]`` (``rows`` =
its first dimension, as PyTorch's PowerSGD hook does) and sent as two thin factors::

    P = orthonormalise(M Q)      # [rows, r]
    Q' = M^T P                   # [cols, r];   M ~ P Q'^T  (the projection of M on span(P))

one step of subspace iteration started from the previous call's ``Q'`` (*warm start*), so
that over calls the factors follow ``M``'s leading singular subspace. The products are
computed transposed (``P^T = Q^T M^T``, ``Q'^T = P^T M``): with the thin factor on the left,
BLAS runs them 5-20 times faster on a CPU at rank 2-4 than ``M Q`` and ``M^T P``. A tensor is sent as it
is when it is a vector, or when ``r (rows + cols)`` would not be ``min_compression_rate``
times smaller than ``rows * cols``; consecutive such tensors travel as one dense segment.

For federated uploads each client sends its own ``P_i, Q_i`` (a ``"lowrank"`` payload, see
:mod:`fedcomp.wire`) and the server adds ``P_i Q_i^T`` into its accumulator
(:func:`fedcomp.aggregate`: one ``addmm_`` per matrix, no dense tensor per client). For DDP,
:func:`fedcomp.ddp.compression_hook` with a ``PowerSGD`` compressor all-reduces ``P`` and then
``Q`` as PowerSGD does (two small all-reduces per bucket).
"""

from __future__ import annotations

import math
import numbers
import zlib

import torch
from torch import Tensor

from . import ops
from ._host import splitmix64
from .compressors import Compressor, _check_key, _flat_input, _stack_input
from .wire import Payload, lowrank_accumulate, wire_nbytes

__all__ = ["PowerSGD", "orthonormalize"]


def orthonormalize_rows(pt: Tensor) -> Tensor:
    """:func:`orthonormalize` of ``pt^T``, transposed back: orthonormal rows spanning ``pt``'s
    (``[r, rows]`` float32, the layout the factors are computed and sent in)."""
    if pt.shape[0] == 1:
        return pt / torch.linalg.vector_norm(pt).clamp_min(1e-30)
    return torch.linalg.qr(pt.T, mode="reduced").Q.T


def orthonormalize(p: Tensor) -> Tensor:
    """Orthonormal columns spanning ``p`` (``[rows, r]`` float32, ``r <= rows``): the ``Q`` factor of
    a Householder QR (``torch.linalg.qr``; stable, no per-column loop). A column that ``p`` does not
    span (``p`` of lower rank) is still unit length, and a zero single column stays zero, so
    ``P P^T M`` stays finite."""
    return orthonormalize_rows(p.T).T


def _shape(shape, i: int) -> tuple[int, ...]:
    if isinstance(shape, numbers.Integral) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(ops._check_int(f"shapes[{i}] entry", d, 0) for d in shape)
    except TypeError as e:
        if isinstance(e.args[0], str) and e.args[0].startswith("shapes["):
            raise
        raise TypeError(f"shapes[{i}] must be a tuple of ints (a tensor's shape); got {shape!r}") from None
    return dims


class PowerSGD(Compressor):
    """Rank-``rank`` PowerSGD compression of the matrices of a flat buffer, with warm start.

    Args:
        rank: the approximation rank ``r >= 1`` (a matrix gets ``min(r, rows, cols)``).
        shapes: the shapes of the consecutive tensors that make up the flat buffer, e.g.
            ``fedcomp.flatten(model)[1].shapes``; they must hold exactly its ``numel`` entries.
            ``None`` is only for :func:`fedcomp.ddp.compression_hook`, which reads each
            bucket's shapes itself.
        warm_start: start each call's power iteration from the previous call's ``Q`` of the
            same key (PowerSGD's default and what makes rank 1-4 usable); ``False`` draws a
            fresh Gaussian ``Q`` per call.
        min_compression_rate: compress a matrix only if ``rows * cols >= rate * r (rows + cols)``
            (``>= 0``; PyTorch's hook uses 2).
        seed: seeds the initial (and, without warm start, every) ``Q``: a pure function of
            ``(seed, key, matrix, call)``, so every rank or client that uses the same key draws
            the same one.

    Stateful per key (a client id, a bucket): ``state_dict()`` holds each key's warm ``Q``
    factors and call count (``draws``: it numbers the fresh draws of ``Q``). The factors are
    products computed by BLAS, whose rounding depends on its thread count: processes that must
    agree to the bit (DDP ranks decoding the same payloads, a Flower node and a simulation) must
    run with the same ``torch.get_num_threads()``. Use it through :class:`fedcomp.ErrorFeedback`
    (PowerSGD is biased; without error feedback it loses what the rank cannot hold). Payloads are float32 factors
    for float32 input (the input's dtype otherwise); see :mod:`fedcomp.wire` for the layout.
    """

    kind = "lowrank"

    def __init__(self, rank: int, *, shapes=None, warm_start: bool = True, min_compression_rate: float = 2.0, seed=0):
        self.rank = ops._check_int("rank", rank, 1, (1 << 31) - 1)
        if shapes is not None:
            if isinstance(shapes, (str, bytes)) or not hasattr(shapes, "__iter__"):
                raise TypeError(f"shapes must be a sequence of tensor shapes; got {type(shapes).__name__}")
            shapes = tuple(_shape(s, i) for i, s in enumerate(shapes))
        self.shapes = shapes
        if not isinstance(warm_start, bool):
            raise TypeError(f"warm_start must be a bool; got {type(warm_start).__name__}")
        self.warm_start = warm_start
        if (
            isinstance(min_compression_rate, bool)
            or not isinstance(min_compression_rate, numbers.Real)
            or not 0 <= min_compression_rate < math.inf
        ):
            raise ValueError(f"min_compression_rate must be a finite number >= 0; got {min_compression_rate!r}")
        self.min_compression_rate = float(min_compression_rate)
        self.seed = ops._check_int("seed", seed, 0, (1 << 63) - 1)
        self.q: dict[str, list[Tensor]] = {}  # key -> the warm Q^T [r, cols] float32 of each compressed matrix
        self.draws: dict[str, int] = {}  # key -> calls so far (numbers the fresh draws of Q)
        self._layouts: dict[tuple, list[tuple[int, int, int]]] = {}
        self._layout_tensors: dict[tuple, Tensor] = {}

    # -- layout ---------------------------------------------------------------
    def layout_for(self, shapes, numel: int | None = None) -> list[tuple[int, int, int]]:
        """The payload layout for tensors of ``shapes``: ``(rows, cols, r)`` per segment, ``r = 0``
        for a dense run of consecutive tensors sent as they are. ``numel``, if given, must equal
        the entries the shapes hold."""
        shapes = tuple(shapes)
        layout = self._layouts.get(shapes)
        if layout is None:
            layout, raw = [], 0
            for shape in shapes:
                size = math.prod(shape)
                rows = shape[0] if len(shape) >= 2 else 0
                cols = size // rows if rows else 0
                r = min(self.rank, rows, cols)
                if r and rows * cols >= self.min_compression_rate * r * (rows + cols):
                    if raw:
                        layout.append((raw, 1, 0))
                        raw = 0
                    layout.append((rows, cols, r))
                else:
                    raw += size
            if raw:
                layout.append((raw, 1, 0))
            self._layouts[shapes] = layout
        total = sum(rows * cols for rows, cols, _ in layout)
        if numel is not None and total != numel:
            raise ValueError(f"shapes hold {total} entries but x has {numel}")
        return layout

    def _layout(self, numel: int) -> list[tuple[int, int, int]]:
        if self.shapes is None:
            raise ValueError(
                "PowerSGD needs the shapes of the tensors in the flat buffer: "
                "PowerSGD(rank, shapes=fedcomp.flatten(model)[1].shapes) (shapes=None is for the DDP hook)"
            )
        return self.layout_for(self.shapes, numel)

    def _layout_tensor(self, layout: list, device: torch.device) -> Tensor:
        key = (tuple(layout), device)
        t = self._layout_tensors.get(key)
        if t is None:
            t = self._layout_tensors[key] = torch.tensor(layout, dtype=torch.int64).reshape(-1).to(device)
        return t

    def _params(self, numel: int) -> dict:
        return {"rank": self.rank, "segments": len(self._layout(numel))}

    def wire_bytes(self, numel: int, dtype: torch.dtype = torch.float32, *, header: bool = True) -> int:
        layout = self._layout(numel)
        params = {"rank": self.rank, "segments": len(layout)}
        return wire_nbytes(self.kind, dtype, numel, params, header=header, layout=layout)

    # -- the power iteration, in steps (the DDP hook all-reduces between them) -----------
    def _start(self, key: str, layout: list, device: torch.device) -> list[Tensor]:
        """The ``Q^T [r, cols]`` (float32 on ``device``) each compressed segment of ``layout`` starts
        from: the key's warm one, or a fresh Gaussian draw of ``(seed, key, matrix, call)``."""
        key = _check_key(key)
        want = [(r, cols) for _, cols, r in layout if r]
        warm = self.q.get(key) if self.warm_start else None
        if warm is not None:
            if [tuple(q.shape) for q in warm] != want:
                raise ValueError(
                    f"PowerSGD state for key {key!r} holds factors of shapes {[tuple(q.shape) for q in warm]}; "
                    f"this tensor needs {want} (use a distinct key per tensor layout, or reset({key!r}))"
                )
            return [q.to(device) for q in warm]
        call = self.draws.get(key, 0)
        stream = splitmix64(self.seed, zlib.crc32(key.encode()))
        out = []
        for i, (r, cols) in enumerate(want):
            g = torch.Generator().manual_seed(splitmix64(stream, (call << 24) + i))
            out.append(torch.randn(r, cols, generator=g).to(device))
        return out

    def _finish(self, key: str, qs: list[Tensor]) -> None:
        """Count the call of ``key`` and keep its new ``Q^T`` factors for the next (warm start)."""
        self.draws[key] = self.draws.get(key, 0) + 1
        if self.warm_start:
            self.q[key] = [q.clone() for q in qs]

    @staticmethod
    def _matrices(a: Tensor, layout: list) -> list[Tensor]:
        """The ``[rows, cols]`` views of ``a`` (flat) of the compressed segments of ``layout``."""
        out, off = [], 0
        for rows, cols, r in layout:
            if r:
                out.append(a[off : off + rows * cols].view(rows, cols))
            off += rows * cols
        return out

    @staticmethod
    def _dense(a: Tensor, layout: list) -> list[Tensor]:
        """The flat views of ``a`` of the dense (``r = 0``) segments of ``layout``."""
        out, off = [], 0
        for rows, cols, r in layout:
            if not r:
                out.append(a[off : off + rows * cols])
            off += rows * cols
        return out

    # -- compression ----------------------------------------------------------------
    def compress(self, x: Tensor, key: str = "default") -> Payload:
        """Compress flat ``x`` (``numel`` = the entries ``shapes`` hold; no error feedback),
        warm-starting from ``key``'s previous call."""
        return self._encode_keyed(_flat_input(x), None, key)

    def compress_many(self, x: Tensor, keys=None) -> list[Payload]:
        """Compress each row of ``x [m, n]``, row ``i`` with the warm start of ``keys[i]`` (``m``
        distinct keys, required: PowerSGD keeps state per key)."""
        x = _stack_input(x)
        if keys is None:
            raise ValueError("PowerSGD keeps a warm start per key: pass keys, one per row of x")
        keys = [_check_key(k) for k in keys]
        if len(keys) != x.shape[0] or len(set(keys)) != len(keys):
            raise ValueError(f"keys must be {x.shape[0]} distinct keys, one per row of x; got {keys!r}")
        return [self._encode_keyed(x[i], None, k) for i, k in enumerate(keys)]

    def _encode(self, x: Tensor, residual: Tensor | None) -> Payload:
        return self._encode_keyed(x, residual, "default")

    def _encode_keyed(self, x: Tensor, residual: Tensor | None, key: str) -> Payload:
        """Compress ``a = x + residual`` (``[n]``) with the warm start of ``key``; when ``residual``
        is given, set it in place to ``a - decode(payload)`` (in ``x``'s dtype)."""
        layout = self._layout(x.numel())
        a = x.float() if residual is None else x.float() + residual.float()
        if a.data_ptr() % 64:  # BLAS rounds by alignment: a row of a stack is copied, so that the
            a = a.clone()  # same update gives the same payload wherever it lives (simulation, Flower)
        qts = self._start(key, layout, a.device)
        mats = self._matrices(a, layout)
        pts = [orthonormalize_rows(qt @ m.T) for m, qt in zip(mats, qts)]  # P^T [r, rows]
        new_qts = [pt @ m for m, pt in zip(mats, pts)]  # Q^T = P^T M [r, cols]
        self._finish(key, new_qts)
        p_flat = _cat(pts, x.dtype, a.device)
        q_flat = _cat(new_qts, x.dtype, a.device)
        dense = _cat(self._dense(a, layout), x.dtype, a.device)
        params = {"rank": self.rank, "segments": len(layout)}
        sections = (self._layout_tensor(layout, a.device), p_flat, q_flat, dense)
        payload = Payload._trusted(self.kind, x.dtype, x.numel(), params, sections)
        if residual is not None:  # a is a temporary of its own here
            residual.copy_(lowrank_accumulate(a, layout, p_flat, q_flat, dense, -1.0))
        return payload

    # -- state ----------------------------------------------------------------------
    def reset(self, key: str | None = None) -> None:
        """Forget the warm start and call count of ``key`` (all keys if ``None``)."""
        for table in (self.q, self.draws):
            if key is None:
                table.clear()
            else:
                table.pop(key, None)

    def state_dict(self) -> dict:
        return {
            "q": {k: [q.clone() for q in qs] for k, qs in self.q.items()},
            "draws": dict(self.draws),
        }

    def load_state_dict(self, state: dict) -> None:
        if not isinstance(state, dict) or set(state) != {"q", "draws"}:
            raise ValueError(
                f"PowerSGD state must hold 'q' and 'draws'; got {sorted(state) if isinstance(state, dict) else state!r}"
            )
        q = {}
        for k, qs in state["q"].items():
            if not isinstance(qs, (list, tuple)) or not all(isinstance(t, Tensor) and t.dim() == 2 for t in qs):
                raise ValueError(f"state['q'][{k!r}] must be a list of [r, cols] tensors")
            q[str(k)] = [t.float().clone() for t in qs]
        draws = {str(k): ops._check_int(f"state['draws'][{k!r}]", v, 0) for k, v in state["draws"].items()}
        self.q, self.draws = q, draws

    def __repr__(self) -> str:
        shapes = "" if self.shapes is None else f", {len(self.shapes)} tensors"
        warm = "" if self.warm_start else ", warm_start=False"
        return f"PowerSGD(rank={self.rank}{shapes}{warm})"


def _cat(parts: list[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The flattened ``parts`` back to back in ``dtype`` (an empty tensor for none)."""
    if not parts:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([t.reshape(-1) for t in parts]).to(dtype)
