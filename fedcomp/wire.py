"""The compressed payload and its binary wire format.

A :class:`Payload` is what one compressor call produces: a kind, the dtype and
length of the tensor it encodes, a few integer parameters, and one to four
typed sections (values, indices, packed bits, scales, low-rank factors). ``nbytes`` is the exact
size of ``to_bytes()``; ``from_bytes`` parses and validates a buffer.

Format (version 1, all integers little-endian)::

    offset  size  field
    0       4     magic b"FCMP"
    4       1     format version (1)
    5       1     kind      1 identity, 2 topk, 3 randk, 4 sign, 5 qsgd, 6 lowrank
    6       1     dtype     1 float32, 2 float16, 3 bfloat16 (of the encoded tensor)
    7       1     number of sections s (fixed per kind)
    8       8     numel n
    16      24    three u64 parameters (meaning per kind, unused ones 0)
    40      8*s   byte length of each section
    ...           the sections, back to back, no padding
    end-4   4     CRC-32 (zlib) of every byte before it

    nbytes = 44 + 8*s + sum(section lengths)

Sections per kind (``w`` = 2 for float16/bfloat16, 4 for float32; index width
``iw`` = 4 if ``n < 2**31`` else 8):

=========  ==================  ==========================================  =========================
kind       parameters          sections                                    section bytes
=========  ==================  ==========================================  =========================
identity   --                  values                                      ``n*w``
topk       k                   values, indices (ascending)                 ``k*w``, ``k*iw``
randk      k, seed             values (indices regenerated from the seed)  ``k*w``
sign       block, l2           packed bits (1 bit per entry), scales fp32  ``ceil(n/8)``, ``4*ceil(n/block)``
qsgd       levels L, bucket    packed codes (``ceil(log2(2L+1))`` bits),   ``ceil(n*bits/8)``,
                               norms fp32                                  ``4*ceil(n/bucket)``
lowrank    rank R, segments s  layout int64 ``[s, 3]``, P factors,         ``24*s``, ``w*sum(rows*r)``,
                               Q factors, dense values                     ``w*sum(cols*r)``,
                                                                           ``w*sum(rows*cols, r=0)``
=========  ==================  ==========================================  =========================

A low-rank payload (:class:`fedcomp.PowerSGD`) covers the flat tensor with ``s``
consecutive segments; layout row ``(rows, cols, r)`` says the segment holds
``rows*cols`` entries, sent as ``P [rows, r] @ Q[cols, r]^T`` when ``r >= 1`` (``P``
and ``Q`` are the next ``rows*r`` and ``cols*r`` values of their sections, column after
column: ``P^T`` and ``Q^T`` row-major)
or as the next ``rows*cols`` dense values when ``r = 0``. ``r <= min(rows, cols, R)``
and the segments' entries sum to ``n``.

``from_bytes`` raises ``ValueError`` (never another exception type, never a
wrong tensor) for a buffer that is truncated, has trailing bytes, has a bad
magic, version, kind, dtype or section count, parameters or section lengths
that disagree with ``n``, a checksum mismatch (every single flipped bit is
caught: CRC-32 detects all 1- and 2-bit errors), top-k indices that are out
of range or not strictly ascending, or a low-rank layout that does not add up.
"""

from __future__ import annotations

import collections
import math
import struct
import sys
import threading
import zlib
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _backend, ops
from ._host import host_to_device, index_dtype_for, round_keys, splitmix64  # noqa: F401  (re-exported)
from .reference import qsgd_bits

__all__ = ["Payload", "FORMAT_VERSION", "MAGIC", "HEADER_BYTES", "index_dtype_for", "randk_indices", "wire_nbytes"]

MAGIC = b"FCMP"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sBBBBQQQQ")
HEADER_BYTES = _HEADER.size  # 40
_CRC = struct.Struct("<I")
_U64 = struct.Struct("<Q")

_KIND_CODES = {"identity": 1, "topk": 2, "randk": 3, "sign": 4, "qsgd": 5, "lowrank": 6}
_KIND_NAMES = {v: k for k, v in _KIND_CODES.items()}
_PARAM_NAMES = {
    "identity": (),
    "topk": ("k",),
    "randk": ("k", "seed"),
    "sign": ("block", "l2"),
    "qsgd": ("levels", "bucket"),
    "lowrank": ("rank", "segments"),
}
_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3}
_DTYPE_NAMES = {v: k for k, v in _DTYPE_CODES.items()}

if sys.byteorder != "little":  # pragma: no cover - every supported platform is little-endian
    raise ImportError("fedcomp's wire format assumes a little-endian host")


# --------------------------------------------------------------------------
# RandK positions: a keyed pseudorandom permutation of [0, n)
# --------------------------------------------------------------------------
def randk_indices(seed: int, k: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """``k`` distinct positions in ``[0, n)``, sorted ascending, determined by ``seed`` alone.

    ``pi`` is a 4-round Feistel permutation of ``[0, 2**(2h))`` (``h`` = half the bits
    of ``n``, round keys ``splitmix64(seed, r)``). The positions are the first ``k`` values of
    ``pi(0), pi(1), ...`` that fall in ``[0, n)`` (at least a quarter of them do). Being
    a permutation, it never repeats a position; sender and receiver compute the same
    positions whatever the payload's device.

    The result is a pure function of ``(seed, k, n)``, computed on the CPU by
    ``fedcomp::randk_positions`` (C++; a few microseconds for the trainer's sizes); for
    ``k <= 65536`` the last 64 results are memoised, so a receiver in the sender's process
    (a simulation, a test) reuses the sender's.

    Returns:
        ``[k]`` int64.
    """
    if not 0 <= k <= n:
        raise ValueError(f"k must be in [0, n={n}]; got {k}")
    if n >= 1 << 62:
        raise ValueError(f"n must be < 2**62; got {n}")
    positions = _positions(seed, k, n)  # the memo's tensor: callers get a copy, which they may write to
    if torch.device(device).type == "cuda":  # copied without blocking the host
        return positions.pin_memory().to(device, non_blocking=True)
    return positions.clone().to(device)


_MEMO_MAX_K, _MEMO_SIZE = 65536, 64
_memo: collections.OrderedDict = collections.OrderedDict()  # (seed, k, n) -> [k] int64 on the CPU
_memo_lock = threading.Lock()


def _positions(seed: int, k: int, n: int) -> Tensor:
    """The positions of :func:`randk_indices` on the CPU (arguments already checked), memoised
    for ``k <= 65536`` (the last 64; a sender's are remembered by :func:`_remember_positions`).
    Do not modify the result."""
    key = (seed, k, n)
    with _memo_lock:
        hit = _memo.get(key)
        if hit is not None:
            _memo.move_to_end(key)
            return hit
    _backend.backend_for("cpu")  # loads the C++ kernels when they can be built
    positions = torch.ops.fedcomp.randk_positions(round_keys([seed])[0], k, n)
    _remember_positions(k, n, [(seed, positions)])
    return positions


def _remember_positions(k: int, n: int, known) -> None:
    """Memoise positions just computed: ``known`` holds pairs ``(seed, [k] int64 on the CPU)``,
    stored under one acquisition of the lock."""
    if k > _MEMO_MAX_K:
        return
    with _memo_lock:
        for seed, positions in known:
            _memo[(seed, k, n)] = positions
            _memo.move_to_end((seed, k, n))
        while len(_memo) > _MEMO_SIZE:
            _memo.popitem(last=False)


def lowrank_accumulate(out: Tensor, layout, p: Tensor, q: Tensor, dense: Tensor, alpha: float = 1.0) -> Tensor:
    """``out += alpha * decode`` of a low-rank payload: each segment ``(rows, cols, r)`` of ``out``
    (``[numel]`` float32, contiguous) gets ``P Q^T`` added in place by one ``addmm_`` (``r >= 1``:
    no dense ``[rows, cols]`` temporary) or its dense values (``r = 0``). ``p``, ``q`` and ``dense``
    are the payload's flat factor and value sections (any float dtype; computed in float32).

    The factors are copied to fresh tensors first: BLAS rounds differently at another address
    alignment, and sections parsed from bytes sit wherever the buffer did, so without the copy two
    processes decoding the same payload (two DDP ranks, a Flower server and a simulation) could
    disagree in the last bits."""
    off = po = qo = do = 0
    for rows, cols, r in layout:
        size = rows * cols
        seg = out[off : off + size]
        if r:
            pt = p[po : po + rows * r].view(r, rows).to(torch.float32, copy=True)  # P^T
            qt = q[qo : qo + cols * r].view(r, cols).to(torch.float32, copy=True)  # Q^T
            seg.view(rows, cols).addmm_(pt.T, qt, alpha=alpha)
            po, qo = po + rows * r, qo + cols * r
        else:
            seg.add_(dense[do : do + size], alpha=alpha)
            do += size
        off += size
    return out


# --------------------------------------------------------------------------
# Payload
# --------------------------------------------------------------------------
_ITEMSIZE = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2, torch.int32: 4, torch.int64: 8}


def _section_lengths(kind: str, dtype: torch.dtype, numel: int, params: dict, layout=None) -> list[int]:
    """Byte length of each section, from the header fields alone (a low-rank payload's also
    from its ``layout``: ``(rows, cols, r)`` per segment, already checked)."""
    w = _ITEMSIZE[dtype]
    if kind == "identity":
        return [numel * w]
    if kind == "topk":
        return [params["k"] * w, params["k"] * _ITEMSIZE[index_dtype_for(numel)]]
    if kind == "randk":
        return [params["k"] * w]
    if kind == "sign":
        return [-(-numel // 8), 4 * -(-numel // params["block"])]
    if kind == "lowrank":
        p = sum(rows * r for rows, _, r in layout)
        q = sum(cols * r for _, cols, r in layout)
        dense = sum(rows * cols for rows, cols, r in layout if not r)
        return [24 * params["segments"], p * w, q * w, dense * w]
    return [-(-numel * qsgd_bits(params["levels"]) // 8), 4 * -(-numel // params["bucket"])]


def check_layout(layout, numel: int, rank: int) -> list[tuple[int, int, int]]:
    """A low-rank payload's layout as ``(rows, cols, r)`` triples, checked: each ``rows, cols >= 0``,
    ``0 <= r <= min(rows, cols, rank)``, and the segments' entries summing to ``numel``.

    Raises:
        ValueError: saying which segment is wrong.
    """
    out, total = [], 0
    for i, (rows, cols, r) in enumerate(layout):
        rows, cols, r = int(rows), int(cols), int(r)
        if rows < 0 or cols < 0 or not 0 <= r <= min(rows, cols, rank):
            raise ValueError(
                f"low-rank segment {i} is (rows={rows}, cols={cols}, r={r}); "
                f"need rows, cols >= 0 and 0 <= r <= min(rows, cols, rank={rank})"
            )
        total += rows * cols
        if total > numel:
            raise ValueError(f"low-rank segments hold more than numel={numel} entries (at segment {i})")
        out.append((rows, cols, r))
    if total != numel:
        raise ValueError(f"low-rank segments hold {total} entries; numel is {numel}")
    return out


def wire_nbytes(kind: str, dtype: torch.dtype, numel: int, params: dict, *, header: bool = True, layout=None) -> int:
    """Exact wire size of a payload: ``44 + 8*s + sum(section lengths)`` (``header=False``: the sum
    alone); a low-rank payload's needs its ``layout`` too."""
    lengths = _section_lengths(kind, dtype, numel, params, layout)
    return sum(lengths) + (HEADER_BYTES + 8 * len(lengths) + _CRC.size if header else 0)


def _check_params(kind: str, numel: int, params: dict) -> None:
    """Raise ValueError if header parameters cannot describe a tensor of ``numel`` entries."""
    if numel >= 1 << 62:
        raise ValueError(f"numel={numel} is not < 2**62")
    if kind in ("topk", "randk") and not 0 <= params["k"] <= numel:
        raise ValueError(f"k={params['k']} is not in [0, numel={numel}]")
    if kind == "randk" and params["seed"] >= 1 << 63:
        raise ValueError(f"seed={params['seed']} is not < 2**63")
    if kind == "sign":
        if not 1 <= params["block"] < 1 << 62:
            raise ValueError(f"block={params['block']} is not in [1, 2**62)")
        if params["l2"] not in (0, 1):
            raise ValueError(f"l2 flag must be 0 or 1; got {params['l2']}")
    if kind == "lowrank":
        if not 1 <= params["rank"] < 1 << 31:
            raise ValueError(f"rank={params['rank']} is not in [1, 2**31)")
        if params["segments"] > numel:
            raise ValueError(f"segments={params['segments']} is more than numel={numel} (every segment holds entries)")
    if kind == "qsgd":
        if not 1 <= params["levels"] <= ops.MAX_LEVELS:
            raise ValueError(f"levels={params['levels']} is not in [1, {ops.MAX_LEVELS}]")
        if not 1 <= params["bucket"] < 1 << 62:
            raise ValueError(f"bucket={params['bucket']} is not in [1, 2**62)")


def _section_dtypes(kind: str, dtype: torch.dtype, numel: int) -> list[torch.dtype]:
    if kind == "identity" or kind == "randk":
        return [dtype]
    if kind == "topk":
        return [dtype, index_dtype_for(numel)]
    if kind == "lowrank":
        return [torch.int64, dtype, dtype, dtype]
    return [torch.uint8, torch.float32]


@dataclass(frozen=True, eq=False)
class Payload:
    """One compressed tensor: what a compressor sends.

    Attributes:
        kind: ``"identity" | "topk" | "randk" | "sign" | "qsgd" | "lowrank"``.
        dtype: dtype of the tensor that was compressed (float32/float16/bfloat16).
        numel: its number of entries.
        params: kind-specific integers (see the module docstring), e.g. ``{"k": 100}``.
        sections: the typed tensors that go on the wire, e.g. ``(values, indices)``.
    """

    kind: str
    dtype: torch.dtype
    numel: int
    params: dict
    sections: tuple[Tensor, ...]

    def __post_init__(self):
        if self.kind not in _KIND_CODES:
            raise ValueError(f"kind must be one of {', '.join(_KIND_CODES)}; got {self.kind!r}")
        if self.dtype not in _DTYPE_CODES:
            raise ValueError(f"dtype must be float32, float16 or bfloat16; got {self.dtype}")
        if set(self.params) != set(_PARAM_NAMES[self.kind]):
            raise ValueError(
                f"params of a {self.kind} payload must be {_PARAM_NAMES[self.kind]}; got {tuple(self.params)}"
            )
        _check_params(self.kind, self.numel, self.params)
        dtypes = _section_dtypes(self.kind, self.dtype, self.numel)
        if len(self.sections) != len(dtypes):
            raise ValueError(f"a {self.kind} payload has {len(dtypes)} sections; got {len(self.sections)}")
        layout = None
        if self.kind == "lowrank":
            t = self.sections[0]
            if not isinstance(t, Tensor) or t.dtype != torch.int64 or t.shape != (3 * self.params["segments"],):
                raise ValueError(
                    f"section 0 of a lowrank payload must be the [{3 * self.params['segments']}] int64 layout"
                )
            layout = check_layout(t.view(-1, 3).tolist(), self.numel, self.params["rank"])
        want = _section_lengths(self.kind, self.dtype, self.numel, self.params, layout)
        for i, (t, nb, dt) in enumerate(zip(self.sections, want, dtypes)):
            if not isinstance(t, Tensor) or t.device != self.sections[0].device or not t.is_contiguous():
                raise ValueError(
                    f"section {i} of a {self.kind} payload must be a contiguous tensor on the device of section 0"
                )
            if t.dtype != dt or t.dim() != 1 or t.numel() * t.element_size() != nb:
                raise ValueError(
                    f"section {i} of a {self.kind} payload must be a 1-D {dt} tensor of {nb} bytes; "
                    f"got {t.dtype} of shape {tuple(t.shape)}"
                )

    @classmethod
    def _trusted(cls, kind: str, dtype: torch.dtype, numel: int, params: dict, sections: tuple) -> Payload:
        """A payload built by fedcomp's own compressors from its ops' outputs, whose sections
        have the right dtypes and lengths by construction: made without ``__post_init__``'s
        checks (about 20 us per payload in a trainer's round). Payloads from anywhere else (a
        user, :meth:`from_bytes`, a DDP peer) go through the constructor and are checked."""
        payload = object.__new__(cls)
        payload.__dict__.update(kind=kind, dtype=dtype, numel=numel, params=params, sections=sections)
        return payload

    # -- sizes ---------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Exact length of :meth:`to_bytes`: ``44 + 8*len(sections) + sum(section bytes)``."""
        return HEADER_BYTES + _CRC.size + sum(8 + t.numel() * t.element_size() for t in self.sections)

    @property
    def dense_nbytes(self) -> int:
        """Bytes the uncompressed tensor would take (``numel * itemsize``)."""
        return self.numel * _ITEMSIZE[self.dtype]

    # -- serialisation -------------------------------------------------------
    def _header(self) -> bytes:
        p = [int(self.params[name]) for name in _PARAM_NAMES[self.kind]] + [0, 0, 0]
        head = _HEADER.pack(
            MAGIC,
            FORMAT_VERSION,
            _KIND_CODES[self.kind],
            _DTYPE_CODES[self.dtype],
            len(self.sections),
            self.numel,
            *p[:3],
        )
        return head + b"".join(_U64.pack(t.numel() * t.element_size()) for t in self.sections)

    def to_bytes(self) -> bytes:
        """The payload in the wire format (see the module docstring)."""
        parts = [self._header()]
        parts += [t.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes() for t in self.sections]
        body = b"".join(parts)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def from_bytes(cls, buf, device: torch.device | str = "cpu") -> Payload:
        """Parse and validate a wire buffer (``bytes``, ``bytearray`` or ``memoryview``).

        Raises:
            ValueError: saying what is wrong, for any buffer :meth:`to_bytes` did not produce.
        """
        if not isinstance(buf, (bytes, bytearray, memoryview)):
            raise TypeError(f"buf must be bytes, bytearray or memoryview; got {type(buf).__name__}")
        buf = bytes(buf)
        if len(buf) < HEADER_BYTES + 4:
            raise ValueError(f"payload truncated: {len(buf)} bytes is shorter than the {HEADER_BYTES + 4}-byte minimum")
        magic, version, kind_code, dtype_code, nsec, numel, *raw = _HEADER.unpack_from(buf)
        if magic != MAGIC:
            raise ValueError(f"not a fedcomp payload: magic is {magic!r}, expected {MAGIC!r}")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported payload format version {version}; this fedcomp reads version {FORMAT_VERSION}"
            )
        if kind_code not in _KIND_NAMES:
            raise ValueError(f"unknown payload kind code {kind_code}; known: {sorted(_KIND_NAMES)}")
        if dtype_code not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype code {dtype_code}; known: {sorted(_DTYPE_NAMES)}")
        kind, dtype = _KIND_NAMES[kind_code], _DTYPE_NAMES[dtype_code]
        names = _PARAM_NAMES[kind]
        if any(raw[len(names) :]):
            raise ValueError(f"unused parameter fields of a {kind} payload must be 0; got {raw}")
        params = dict(zip(names, raw))
        try:
            _check_params(kind, numel, params)
        except ValueError as e:
            raise ValueError(f"inconsistent {kind} payload header: {e}") from None
        dtypes = _section_dtypes(kind, dtype, numel)
        if nsec != len(dtypes):
            raise ValueError(f"a {kind} payload has {len(dtypes)} sections; header says {nsec}")
        table_end = HEADER_BYTES + 8 * nsec
        if len(buf) < table_end + 4:
            raise ValueError(f"payload truncated: {len(buf)} bytes, the header alone needs {table_end + 4}")
        lengths = [_U64.unpack_from(buf, HEADER_BYTES + 8 * i)[0] for i in range(nsec)]
        if kind != "lowrank":
            want_lengths = _section_lengths(kind, dtype, numel, params)
            if lengths != want_lengths:
                raise ValueError(
                    f"section lengths {lengths} disagree with numel={numel} and {params}: expected {want_lengths}"
                )
        elif lengths[0] != 24 * params["segments"]:
            raise ValueError(
                f"section lengths {lengths} disagree with {params}: the layout takes {24 * params['segments']}"
            )
        total = table_end + sum(lengths) + 4
        if len(buf) < total:
            raise ValueError(f"payload truncated: {len(buf)} bytes, expected {total}")
        if len(buf) > total:
            raise ValueError(f"payload has {len(buf) - total} trailing bytes: {len(buf)} bytes, expected {total}")
        (crc,) = _CRC.unpack_from(buf, total - 4)
        if zlib.crc32(buf[: total - 4]) != crc:
            raise ValueError("payload checksum mismatch: the buffer was corrupted")
        if kind == "lowrank":  # the layout (section 0) sizes the other sections
            try:
                layout = check_layout(
                    struct.iter_unpack("<qqq", buf[table_end : table_end + lengths[0]]), numel, params["rank"]
                )
            except ValueError as e:
                raise ValueError(f"inconsistent lowrank payload layout: {e}") from None
            want_lengths = _section_lengths(kind, dtype, numel, params, layout)
            if lengths != want_lengths:
                raise ValueError(f"section lengths {lengths} disagree with the lowrank layout: expected {want_lengths}")
        sections, pos = [], table_end
        for nb, dt in zip(lengths, dtypes):
            raw_t = (
                torch.frombuffer(bytearray(buf[pos : pos + nb]), dtype=torch.uint8)
                if nb
                else torch.empty(0, dtype=torch.uint8)
            )
            sections.append(raw_t.view(dt))
            pos += nb
        # validated here, on the host bytes, before anything moves to the device
        if kind == "topk" and params["k"]:
            idx = sections[1]
            if (
                int(idx.min()) < 0
                or int(idx.max()) >= numel
                or (idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()))
            ):
                raise ValueError(f"top-k indices must be strictly ascending and in [0, {numel})")
        return cls(kind, dtype, numel, params, tuple(s.to(device) for s in sections))

    # -- decoding ------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.sections[0].device

    def indices(self) -> Tensor:
        """Positions of a sparse (topk/randk) payload's values: ``[k]``, ascending."""
        if self.kind == "topk":
            return self.sections[1]
        if self.kind == "randk":
            return randk_indices(self.params["seed"], self.params["k"], self.numel, self.device)
        raise ValueError(f"a {self.kind} payload is not sparse")

    def accumulate_into(self, out: Tensor, alpha: float = 1.0) -> Tensor:
        """``out += alpha * decode()`` with no dense temporary: sparse kinds scatter, sign and QSGD
        payloads are decoded straight into ``out`` (:func:`fedcomp.sign_accumulate`,
        :func:`fedcomp.qsgd_accumulate`).

        Args:
            out: ``[numel]`` float32 on the payload's device.
        """
        ops._check_accumulator(out, self.sections[0])  # a contiguous 1-D fp32 tensor on the payload's device
        if out.numel() != self.numel:
            raise ValueError(f"out must have {self.numel} entries; got {out.numel()}")
        _backend.backend_of(out)
        return self._accumulate(out, ops._check_alpha(alpha))

    def _accumulate(self, out: Tensor, alpha: float) -> Tensor:
        """:meth:`accumulate_into` once ``out`` (contiguous fp32 ``[numel]`` on the payload's
        device) and ``alpha`` (a finite float) are checked: the sections were checked when the
        payload was made, so the kernels are called directly."""
        kind, sections = self.kind, self.sections
        if kind == "topk":
            torch.ops.fedcomp.sparse_accumulate(out, sections[1], sections[0].detach(), alpha)
        elif kind == "randk":  # the memoised positions are only read here: no copy on the CPU
            positions = host_to_device(_positions(self.params["seed"], self.params["k"], self.numel), out)
            torch.ops.fedcomp.sparse_accumulate(out, positions, sections[0].detach(), alpha)
        elif kind == "sign":
            torch.ops.fedcomp.sign_accumulate(out, *sections, self.params["block"], alpha)
        elif kind == "qsgd":
            torch.ops.fedcomp.qsgd_accumulate(out, *sections, self.params["levels"], self.params["bucket"], alpha)
        elif kind == "lowrank":
            lowrank_accumulate(out, self.layout(), sections[1], sections[2], sections[3], alpha)
        else:
            out.add_(sections[0], alpha=alpha)
        return out

    def layout(self) -> list[tuple[int, int, int]]:
        """A low-rank payload's segments: ``(rows, cols, r)`` each (see the module docstring)."""
        if self.kind != "lowrank":
            raise ValueError(f"a {self.kind} payload has no low-rank layout")
        return [tuple(row) for row in self.sections[0].view(-1, 3).tolist()]

    def _decode_quantized(self) -> Tensor:
        packed, scales = self.sections
        if self.kind == "sign":
            return ops.sign_decode(packed, scales, self.numel, self.params["block"])
        return ops.qsgd_decode(packed, scales, self.numel, self.params["levels"], self.params["bucket"])

    def decode(self) -> Tensor:
        """The dense tensor this payload encodes: ``[numel]`` float32 on the payload's device."""
        if self.kind in ("sign", "qsgd"):
            return self._decode_quantized()
        if self.kind == "identity":
            return self.sections[0].float()
        return self.accumulate_into(torch.zeros(self.numel, dtype=torch.float32, device=self.device))

    @property
    def compression_ratio(self) -> float:
        """``dense_nbytes / nbytes`` (how many times smaller than sending the tensor raw)."""
        return self.dense_nbytes / self.nbytes if self.nbytes else math.inf

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v}" for k, v in self.params.items())
        return (
            f"Payload({self.kind}, {str(self.dtype).replace('torch.', '')}, numel={self.numel}"
            f"{', ' + params if params else ''}, nbytes={self.nbytes})"
        )
