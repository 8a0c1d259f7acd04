"""What ``fedcomp-bench`` times: every op and the many-client pipelines, each with its inputs,
a callable per backend, and its minimal memory traffic.

A :class:`Case` builds its inputs for one size, dtype and device (:meth:`Case.make`), then
hands out a zero-argument callable per backend (:meth:`Case.call`). The traffic model
(:func:`traffic_bytes`) is the one table of bytes moved per call that the kernels' docstrings
state and that the roofline fractions use: every input read once, every output written once,
and a read-modify-write where the op updates in place. Nothing else is counted (no
temporaries, no second pass), so a fraction of 1 means the kernel moves only the bytes it must.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .. import _host, cuda_ops, reference
from . import composites

#: every backend name the tool accepts
BACKENDS = ("auto", "reference", "cpu", "triton", "cuda", "composite")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Params:
    """The ops' settings, the same for every size (the CLI's flags)."""

    ratio: float = 0.01  # top-k / rand-k share of entries
    block: int = 4096  # sign block
    levels: int = 4  # QSGD levels
    bucket: int = 512  # QSGD bucket
    rows: int = 10  # clients of the batched ops, payloads of the many-payload ops, clients of a pipeline

    def k(self, n: int) -> int:
        return max(1, min(n, round(self.ratio * n)))


@dataclass
class Inputs:
    """One case's tensors. ``fresh`` names those the op writes (residual, accumulator), which
    ``--fresh-inputs`` restores from ``pristine`` before every timed call."""

    tensors: dict[str, object]
    fresh: tuple[str, ...] = ()
    pristine: dict[str, Tensor] = field(init=False)

    def __post_init__(self):
        self.pristine = {name: self.tensors[name].clone() for name in self.fresh}

    def refresh(self) -> None:
        for name in self.fresh:
            self.tensors[name].copy_(self.pristine[name])


def _nblocks(n: int, block: int) -> int:
    return -(-n // block)


def traffic_bytes(op: str, n: int, dtype: torch.dtype, p: Params) -> int | None:
    """Minimal bytes one call of ``op`` moves to and from memory for ``n`` entries (per row for
    the row ops and payloads of the many-payload ops: the total is over all rows), or ``None``
    where no roofline applies (the pipelines, whose bytes include serialisation)."""
    w = torch.empty((), dtype=dtype).element_size()
    iw = 4 if _host.index_dtype_for(n) == torch.int32 else 8
    k, m = p.k(n), p.rows
    sign_bytes = -(-n // 8) + 4 * _nblocks(n, p.block)  # packed bits + fp32 scales
    qsgd_bytes = -(-n * reference.qsgd_bits(p.levels) // 8) + 4 * _nblocks(n, p.bucket)
    ef = 3 * w * n  # read x, read residual, write residual
    table = {
        "topk_ef": ef + k * (w + iw),
        "topk_threshold_ef": ef + 2 * k * (w + 8),  # capacity 2k, int64 indices
        "randk_ef": ef + k * (w + 8),
        "sign_ef": ef + sign_bytes,
        "qsgd": ef + qsgd_bytes,
        "sign_decode": sign_bytes + 4 * n,
        "qsgd_decode": qsgd_bytes + 4 * n,
        "sign_accumulate": sign_bytes + 8 * n,  # read and write the fp32 accumulator
        "qsgd_accumulate": qsgd_bytes + 8 * n,
        "sign_accumulate_many": m * sign_bytes + 8 * n,
        "qsgd_accumulate_many": m * qsgd_bytes + 8 * n,
        "sign_majority": m * -(-n // 8) + -(-n // 8),
        "sparse_accumulate": m * k * (8 + w + 8),  # int64 index + value read, 4 B read + 4 B written
        "topk_ef_rows": m * (ef + k * (w + iw)),
        "sign_ef_rows": m * (ef + sign_bytes),
        "qsgd_rows": m * (ef + qsgd_bytes),
        "randk_ef_rows": m * (ef + k * (w + 8)),
    }
    return table.get(op)


@dataclass(frozen=True)
class Case:
    """One op (or pipeline): how to build its inputs and call it on each backend.

    ``schema``: the ``torch.ops.fedcomp`` op it times (None for a pipeline); ``dtyped``: whether
    the input dtype matters (decodes and accumulates read packed codes and write fp32, so they
    run once, as fp32); ``composite``: whether a torch composite exists.
    """

    name: str
    schema: str | None
    dtyped: bool
    composite: bool
    doc: str

    def make(self, n: int, dtype: torch.dtype, device: torch.device, p: Params, seed: int = 0) -> Inputs:
        return _MAKERS[self.name](n, dtype, device, p, torch.Generator().manual_seed(seed))

    def backends(self) -> tuple[str, ...]:
        """The backends that have an implementation of this case at all (device permitting)."""
        if self.schema is None:
            return ("auto", "composite")
        out = ["auto", "reference", "cpu", "triton"]
        if self.schema in cuda_ops.IMPLEMENTED:
            out.append("cuda")
        if self.composite:
            out.append("composite")
        return tuple(out)

    def call(self, backend: str, inputs: Inputs):
        """A zero-argument callable that runs this case once on ``backend`` (already checked to
        serve the inputs' device)."""
        t = inputs.tensors
        if self.schema is None:
            return _PIPELINES[self.name][backend](t)
        if backend == "composite":
            return _COMPOSITES[self.name](t)
        args = t["args"]
        if backend == "reference":
            fn = getattr(reference, self.schema)
        elif backend == "triton":
            from .. import triton as triton_kernels

            fn = getattr(triton_kernels, f"{self.schema}_triton")
        else:  # auto, cpu, cuda: the dispatcher, with the backend's kernels registered (see harness)
            fn = getattr(torch.ops.fedcomp, self.schema)
        return lambda: fn(*args)


def _xr(n, dtype, device, g, rows=None):
    shape = (n,) if rows is None else (rows, n)
    x = torch.randn(shape, generator=g).to(dtype).to(device)
    r = (torch.randn(shape, generator=g) * 0.1).to(dtype).to(device)
    return x, r


def _sign_payload(n, device, p, g):
    x = torch.randn(n, generator=g)
    packed, scales = reference.sign_ef(x, None, p.block, False)
    return packed.to(device), scales.to(device)


def _qsgd_payload(n, device, p, g, seed=1):
    x = torch.randn(n, generator=g)
    packed, norms = reference.qsgd(x, None, p.levels, p.bucket, seed)
    return packed.to(device), norms.to(device)


def _make_topk(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g)
    return Inputs({"x": x, "r": r, "args": (x, r, p.k(n), _host.index_dtype_for(n))}, fresh=("r",))


def _make_topk_threshold(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g)
    k = p.k(n)
    return Inputs({"x": x, "r": r, "args": (x, r, k, min(n, 2 * k), min(n, 65536), 0)}, fresh=("r",))


def _make_randk(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g, rows=1)
    return Inputs({"x": x[0], "r": r[0], "args": (x, r, [7], p.k(n), None)}, fresh=("r",))


def _make_sign(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g)
    return Inputs({"x": x, "r": r, "args": (x, r, p.block, False)}, fresh=("r",))


def _make_qsgd(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g)
    return Inputs({"x": x, "r": r, "args": (x, r, p.levels, p.bucket, 0)}, fresh=("r",))


def _make_sign_decode(n, dtype, device, p, g):
    packed, scales = _sign_payload(n, device, p, g)
    return Inputs({"packed": packed, "scales": scales, "args": (packed, scales, n, p.block)})


def _make_qsgd_decode(n, dtype, device, p, g):
    packed, norms = _qsgd_payload(n, device, p, g)
    return Inputs({"packed": packed, "norms": norms, "args": (packed, norms, n, p.levels, p.bucket)})


def _make_sign_accumulate(n, dtype, device, p, g):
    packed, scales = _sign_payload(n, device, p, g)
    out = torch.zeros(n, device=device)
    return Inputs({"out": out, "packed": packed, "scales": scales, "args": (out, packed, scales, p.block, 0.1)})


def _make_qsgd_accumulate(n, dtype, device, p, g):
    packed, norms = _qsgd_payload(n, device, p, g)
    out = torch.zeros(n, device=device)
    return Inputs({"out": out, "args": (out, packed, norms, p.levels, p.bucket, 0.1)})


def _rows_of(payload, rows):
    """``rows`` distinct payloads from one: its sections rolled by an even number of bytes, so
    that making inputs does not cost ``rows`` encodes at 10^8. Codes of 1, 2, 4, 8 or 16 bits stay
    whole and valid; other widths become other bit patterns, which cost the same to decode."""
    first, second = payload
    return [(first.roll(2 * i), second.roll(i)) for i in range(rows)]


def _make_sign_accumulate_many(n, dtype, device, p, g):
    payloads = _rows_of(_sign_payload(n, device, p, g), p.rows)
    out = torch.zeros(n, device=device)
    args = (out, [a for a, _ in payloads], [b for _, b in payloads], p.block, [1.0 / p.rows] * p.rows)
    return Inputs({"out": out, "payloads": payloads, "args": args})


def _make_qsgd_accumulate_many(n, dtype, device, p, g):
    payloads = _rows_of(_qsgd_payload(n, device, p, g), p.rows)
    out = torch.zeros(n, device=device)
    args = (out, [a for a, _ in payloads], [b for _, b in payloads], p.levels, p.bucket, [1.0 / p.rows] * p.rows)
    return Inputs({"out": out, "args": args})


def _make_sign_majority(n, dtype, device, p, g):
    stack = torch.randint(0, 256, (p.rows, -(-n // 8)), generator=g, dtype=torch.uint8).to(device)
    return Inputs({"stack": stack, "args": (stack,)})


def _make_sparse_accumulate(n, dtype, device, p, g):
    m = p.rows * p.k(n)  # rows payloads of k entries each, concatenated, unsorted
    idx = torch.randint(0, n, (m,), generator=g).to(device)
    vals = torch.randn(m, generator=g).to(dtype).to(device)
    out = torch.zeros(n, device=device)
    return Inputs({"out": out, "idx": idx, "vals": vals, "args": (out, idx, vals, 0.1)})


def _make_topk_rows(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g, rows=p.rows)
    return Inputs({"x": x, "r": r, "args": (x, r, p.k(n), _host.index_dtype_for(n), None)}, fresh=("r",))


def _make_sign_rows(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g, rows=p.rows)
    return Inputs({"x": x, "r": r, "args": (x, r, p.block, False, None)}, fresh=("r",))


def _make_qsgd_rows(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g, rows=p.rows)
    return Inputs({"x": x, "r": r, "args": (x, r, p.levels, p.bucket, list(range(1, p.rows + 1)), None)}, fresh=("r",))


def _make_randk_rows(n, dtype, device, p, g):
    x, r = _xr(n, dtype, device, g, rows=p.rows)
    return Inputs({"x": x, "r": r, "args": (x, r, list(range(7, 7 + p.rows)), p.k(n), None)}, fresh=("r",))


def _make_pipeline(kind):
    def make(n, dtype, device, p, g):
        x, r = _xr(n, dtype, device, g, rows=p.rows)
        # the residuals carry from round to round, as a trainer's do (also under --fresh-inputs)
        return Inputs({"x": x, "r": r, "kind": kind, "p": p})

    return make


def _fedcomp_pipeline(t):
    """Compress every client with error feedback (one batched call), serialise, parse and
    aggregate: one federated round's compression path."""
    from ..aggregation import aggregate
    from ..compressors import ErrorFeedback, Sign, TopK
    from ..wire import Payload

    p: Params = t["p"]
    base = TopK(p.ratio) if t["kind"] == "topk" else Sign()
    ef = ErrorFeedback(base)  # its residuals persist across calls, as a trainer's do
    keys = [f"client-{i}" for i in range(p.rows)]

    def run():
        payloads = ef.compress_many(t["x"], keys)
        received = [Payload.from_bytes(q.to_bytes(), device=t["x"].device) for q in payloads]
        return aggregate(received)

    return run


def _composite_pipeline(t):
    p: Params = t["p"]
    xs, rs = list(t["x"]), list(t["r"])
    return lambda: composites.composite_pipeline(xs, rs, t["kind"], p.ratio)


_PIPELINES = {
    "pipeline_topk": {"auto": _fedcomp_pipeline, "composite": _composite_pipeline},
    "pipeline_sign": {"auto": _fedcomp_pipeline, "composite": _composite_pipeline},
}


_COMPOSITES = {
    "topk_ef": lambda t: lambda: composites.composite_topk_ef(t["x"], t["r"], t["args"][2]),
    "randk_ef": lambda t: lambda: composites.composite_randk_ef(t["x"], t["r"], t["args"][3]),
    "sign_ef": lambda t: lambda: composites.composite_sign_ef(t["x"], t["r"]),
    "qsgd": lambda t: lambda: composites.composite_qsgd(t["x"], t["r"], t["args"][2], t["args"][3]),
    "sign_decode": lambda t: lambda: composites.composite_sign_decode(*t["args"]),
    "sign_accumulate": lambda t: lambda: composites.composite_sign_accumulate(*t["args"]),
    "sparse_accumulate": lambda t: lambda: composites.composite_sparse_accumulate(*t["args"]),
    "topk_ef_rows": lambda t: (
        lambda: [composites.composite_topk_ef(x, r, t["args"][2]) for x, r in zip(t["x"], t["r"])]
    ),
    "sign_ef_rows": lambda t: lambda: [composites.composite_sign_ef(x, r) for x, r in zip(t["x"], t["r"])],
}

_MAKERS = {
    "topk_ef": _make_topk,
    "topk_threshold_ef": _make_topk_threshold,
    "randk_ef": _make_randk,
    "sign_ef": _make_sign,
    "qsgd": _make_qsgd,
    "sign_decode": _make_sign_decode,
    "qsgd_decode": _make_qsgd_decode,
    "sign_majority": _make_sign_majority,
    "sparse_accumulate": _make_sparse_accumulate,
    "sign_accumulate": _make_sign_accumulate,
    "qsgd_accumulate": _make_qsgd_accumulate,
    "sign_accumulate_many": _make_sign_accumulate_many,
    "qsgd_accumulate_many": _make_qsgd_accumulate_many,
    "topk_ef_rows": _make_topk_rows,
    "sign_ef_rows": _make_sign_rows,
    "qsgd_rows": _make_qsgd_rows,
    "randk_ef_rows": _make_randk_rows,
    "pipeline_topk": _make_pipeline("topk"),
    "pipeline_sign": _make_pipeline("sign"),
}

CASES: dict[str, Case] = {
    c.name: c
    for c in (
        Case("topk_ef", "topk_ef", True, True, "exact top-k by magnitude of x + r, EF, k = ratio * n"),
        Case("topk_threshold_ef", "topk_threshold_ef", True, False, "top-k by a sampled threshold, capacity 2k"),
        Case("randk_ef", "randk_ef_rows", True, True, "rand-k with EF (one row)"),
        Case("sign_ef", "sign_ef", True, True, "1-bit sign + block scales, EF"),
        Case("qsgd", "qsgd", True, True, "QSGD codes + bucket norms, EF"),
        Case("sign_decode", "sign_decode", False, True, "dense decode of one sign payload"),
        Case("qsgd_decode", "qsgd_decode", False, False, "dense decode of one QSGD payload"),
        Case("sign_majority", "sign_majority", False, False, "bitwise majority of `rows` packed sign rows"),
        Case("sparse_accumulate", "sparse_accumulate", True, True, "out += alpha * v at `rows` x k unsorted indices"),
        Case("sign_accumulate", "sign_accumulate", False, True, "out += alpha * decode(sign payload)"),
        Case("qsgd_accumulate", "qsgd_accumulate", False, False, "out += alpha * decode(QSGD payload)"),
        Case("sign_accumulate_many", "sign_accumulate_many", False, False, "`rows` sign payloads into one out"),
        Case("qsgd_accumulate_many", "qsgd_accumulate_many", False, False, "`rows` QSGD payloads into one out"),
        Case("topk_ef_rows", "topk_ef_rows", True, True, "top-k EF of `rows` clients in one call"),
        Case("sign_ef_rows", "sign_ef_rows", True, True, "sign EF of `rows` clients in one call"),
        Case("qsgd_rows", "qsgd_rows", True, False, "QSGD EF of `rows` clients in one call"),
        Case("randk_ef_rows", "randk_ef_rows", True, False, "rand-k EF of `rows` clients in one call"),
        Case("pipeline_topk", None, True, True, "`rows` clients: top-k EF -> bytes -> parse -> aggregate"),
        Case("pipeline_sign", None, True, True, "`rows` clients: sign EF -> bytes -> parse -> aggregate"),
    )
}
