"""Pure-PyTorch reference implementations: the specification of every op.

These functions are written to be read, not to be fast. Every other backend
(C++ CPU, Triton, CUDA) is tested against them. They take already-validated
arguments (see :mod:`fedcomp.ops` for the public, checked entry points) and
follow the same floating-point recipe as the kernels in
``csrc/common/fedcomp_math.h``: one IEEE fp32 operation at a time.

Conventions shared by all ops
-----------------------------
* ``a = x + residual`` is computed in fp32. ``topk_ef`` rounds ``a`` once to the
  storage dtype of ``x`` (values and residual live in that dtype, and the
  selection is made on what is stored); the quantizers keep ``a`` in fp32 and
  round ``residual = a - decode(code)`` once.
* Magnitudes are ordered by the key ``bits(|a|)`` (see ``abs_key``): NaN sorts
  above +Inf, which sorts above every finite value.
* Bit streams are little-endian: bit ``j`` of a stream is bit ``j % 8`` of
  byte ``j // 8``; a ``w``-bit code ``i`` occupies stream bits
  ``[i*w, (i+1)*w)``, least significant bit first (``numpy.packbits(...,
  bitorder="little")`` for ``w = 1``). Padding bits are zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._host import host_to_device, round_keys

__all__ = [
    "abs_key",
    "pack_codes",
    "unpack_codes",
    "philox_uniform24",
    "philox_sample_positions",
    "block_counts",
    "topk_ef",
    "topk_threshold_ef",
    "sign_ef",
    "sign_decode",
    "sign_majority",
    "sign_accumulate",
    "sign_accumulate_many",
    "qsgd_bits",
    "qsgd_norms",
    "qsgd_codes",
    "qsgd",
    "qsgd_decode",
    "qsgd_accumulate",
    "qsgd_accumulate_many",
    "sparse_accumulate",
    "randk_positions",
]

_M32 = 0xFFFFFFFF


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------
def abs_key(a: Tensor) -> Tensor:
    """int64 key that orders like ``|a|`` (``a`` fp32): the IEEE bits with the sign cleared."""
    return a.float().contiguous().view(torch.int32).long() & 0x7FFFFFFF


def pack_codes(codes: Tensor, width: int) -> Tensor:
    """Pack non-negative integer codes of ``width`` bits into a little-endian uint8 stream."""
    n = codes.numel()
    shifts = torch.arange(width, device=codes.device)
    bits = ((codes.long().unsqueeze(1) >> shifts) & 1).reshape(-1)
    nbytes = (n * width + 7) // 8
    bits = torch.nn.functional.pad(bits, (0, nbytes * 8 - bits.numel()))
    weights = torch.arange(8, device=codes.device)
    return (bits.view(nbytes, 8) << weights).sum(1).to(torch.uint8)


def unpack_codes(packed: Tensor, numel: int, width: int) -> Tensor:
    """Inverse of :func:`pack_codes`: int64 codes of shape ``[numel]``."""
    weights = torch.arange(8, device=packed.device)
    bits = ((packed.long().unsqueeze(1) >> weights) & 1).reshape(-1)[: numel * width]
    shifts = torch.arange(width, device=packed.device)
    return (bits.view(numel, width) << shifts).sum(1)


def _mulhilo(a: int, b: Tensor) -> tuple[Tensor, Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product ``a * b`` (``b`` holds uint32 in int64)."""
    p_lo = a * (b & 0xFFFF)  # < 2**48
    p_hi = a * (b >> 16)  # < 2**48
    t = p_lo + ((p_hi & 0xFFFF) << 16)
    return (p_hi >> 16) + (t >> 32), t & _M32


def _philox4x32_10(seed: int, counter: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 as Triton's ``tl.philox``: key = (seed_lo, seed_hi), counter = (i_lo, i_hi, 0, 0)."""
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mulhilo(0xCD9E8D57, c2)
        hi_a, lo_a = _mulhilo(0xD2511F53, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + 0x9E3779B9) & _M32
        k1 = (k1 + 0xBB67AE85) & _M32
    return c0, c1, c2, c3


def philox_uniform24(seed: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """``u_i = (word_{i % 4}(philox(seed, i // 4)) >> 8) * 2**-24`` for ``i < n``: fp32 in [0, 1)."""
    counters = torch.arange(-(-n // 4), device=device, dtype=torch.int64)
    words = torch.stack(_philox4x32_10(seed, counters), dim=1).reshape(-1)[:n]
    return (words >> 8).float() * 2.0**-24


def philox_sample_positions(seed: int, s: int, n: int, device: torch.device | str = "cpu") -> Tensor:
    """Sample positions ``(word1 << 32 | word0) mod n`` for ``j < s`` (unsigned 64-bit arithmetic)."""
    c0, c1, _, _ = _philox4x32_10(seed, torch.arange(s, device=device, dtype=torch.int64))
    # (c1 * 2**32 + c0) mod n without leaving int64: reduce each part first.
    r32 = (1 << 32) % n
    return ((c1 % n) * r32 % n + c0 % n) % n if n < (1 << 31) else _mod_u64_python(c1, c0, n)


def _mod_u64_python(c1: Tensor, c0: Tensor, n: int) -> Tensor:
    vals = [((int(h) << 32) | int(lo)) % n for h, lo in zip(c1.tolist(), c0.tolist())]
    return torch.tensor(vals, dtype=torch.int64, device=c0.device)


def block_counts(n: int, block: int, device: torch.device | str = "cpu") -> Tensor:
    """Element count of each block of ``block`` contiguous entries (the last may be short)."""
    nblocks = -(-n // block)
    counts = torch.full((nblocks,), block, dtype=torch.int64, device=device)
    if nblocks:
        counts[-1] = n - (nblocks - 1) * block
    return counts


def _block_sums(values: Tensor, block: int) -> Tensor:
    """fp64 sum of each block of ``values`` (fp32 or fp64)."""
    n = values.numel()
    nblocks = -(-n // block)
    padded = torch.nn.functional.pad(values.double(), (0, nblocks * block - n))
    return padded.view(nblocks, block).sum(1)


# --------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------
def topk_ef(x: Tensor, residual: Tensor | None, k: int, index_dtype: torch.dtype = torch.int64):
    """Exact top-k by magnitude with error feedback.

    ``a = round_dtype(x + residual)``; pick the ``k`` entries of largest ``|a|``,
    ties broken by lower index; ``indices`` sorted ascending; ``values = a[indices]``;
    ``residual <- a`` with the picked entries zeroed.
    """
    a = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    order = torch.sort(abs_key(a), descending=True, stable=True).indices[:k]
    indices = order.sort().values
    values = a[indices]
    if residual is not None:
        residual.copy_(a)
        residual[indices] = 0
    return values, indices.to(index_dtype)


def topk_threshold_ef(x: Tensor, residual: Tensor | None, k: int, capacity: int, sample_size: int, seed: int):
    """Approximate top-k: a threshold from a sample, then a fixed-capacity compaction.

    ``s = sample_size`` positions ``p_j`` (:func:`philox_sample_positions`) are drawn;
    ``t`` is the ``m``-th largest key of ``|a[p_j]|`` with ``m = ceil(k*s/n)``; the
    entries with ``key(|a|) >= t`` are kept in index order up to ``capacity``; the
    rest (including any overflow beyond ``capacity``) stay in the residual.
    Unused slots hold value 0 at index 0, so the full buffers can be fed to
    ``sparse_accumulate`` with no host synchronisation. ``count`` is a 0-d int64 tensor.
    """
    n = x.numel()
    a = x if residual is None else (x.float() + residual.float()).to(x.dtype)
    key = abs_key(a)
    values = torch.zeros(capacity, dtype=x.dtype, device=x.device)
    indices = torch.zeros(capacity, dtype=torch.int64, device=x.device)
    kept = torch.zeros(0, dtype=torch.int64, device=x.device)
    if k > 0 and n > 0:
        sample = key[philox_sample_positions(seed, sample_size, n, x.device)]
        m = -(-k * sample_size // n)
        threshold = torch.sort(sample, descending=True).values[m - 1]
        kept = torch.nonzero(key >= threshold).flatten()[:capacity]
    values[: kept.numel()] = a[kept]
    indices[: kept.numel()] = kept
    if residual is not None:
        residual.copy_(a)
        residual[kept] = 0
    return values, indices, torch.tensor(kept.numel(), dtype=torch.int64, device=x.device)


# --------------------------------------------------------------------------
# sign
# --------------------------------------------------------------------------
def sign_ef(x: Tensor, residual: Tensor | None, block: int, l2: bool):
    """1-bit sign quantization with per-block scales and error feedback.

    ``a = x + residual`` (fp32); ``scale_b = mean(|a_b|)`` (``l2``: ``||a_b||_2 / sqrt(n_b)``),
    accumulated in fp64 and rounded to fp32; bit ``i = a_i >= 0`` packed little-endian;
    ``residual <- a - scale_b * (+1 | -1)``.
    """
    n = x.numel()
    a = x.float() if residual is None else x.float() + residual.float()
    counts = block_counts(n, block, x.device)
    if l2:
        scales = (_block_sums(a.double().square(), block) / counts).sqrt().float()
    else:
        scales = (_block_sums(a.abs(), block) / counts).float()
    bits = a >= 0
    if residual is not None:
        sgn = torch.where(bits, 1.0, -1.0)
        residual.copy_(a - scales.repeat_interleave(counts) * sgn)
    return pack_codes(bits, 1), scales


def apply_rows(op, x: Tensor, residual: Tensor | None, *args, rows=None, per_row=None):
    """Apply a 1-D op to each row of ``x`` ``[m, n]`` (with its residual row, a view updated in
    place: row ``i``, or row ``rows[i]`` of a ``[K, n]`` residual) and stack each output: the
    batched ops' semantics, row by row. ``per_row[i]``, when given, is row ``i``'s last argument."""
    rows = range(x.shape[0]) if rows is None else rows
    last = (lambda i: ()) if per_row is None else (lambda i: (per_row[i],))
    outs = [op(x[i], None if residual is None else residual[j], *args, *last(i)) for i, j in enumerate(rows)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def topk_ef_rows(x: Tensor, residual: Tensor | None, k: int, index_dtype: torch.dtype = torch.int64, rows=None):
    """:func:`topk_ef` on each row of ``x [m, n]``: ``(values [m, k], indices [m, k])``."""
    return apply_rows(topk_ef, x, residual, k, index_dtype, rows=rows)


def sign_ef_rows(x: Tensor, residual: Tensor | None, block: int, l2: bool, rows=None):
    """:func:`sign_ef` on each row of ``x [m, n]``: ``(packed [m, ceil(n/8)], scales [m, ceil(n/block)])``."""
    return apply_rows(sign_ef, x, residual, block, l2, rows=rows)


def sign_decode(packed: Tensor, scales: Tensor, numel: int, block: int) -> Tensor:
    """Dense fp32 ``[numel]``: ``scale_b * (+1 if bit else -1)``."""
    bits = unpack_codes(packed, numel, 1)
    counts = block_counts(numel, block, packed.device)
    return torch.where(bits == 1, 1.0, -1.0) * scales.repeat_interleave(counts)


def sign_accumulate(out: Tensor, packed: Tensor, scales: Tensor, block: int, alpha: float) -> None:
    """``out += alpha * sign_decode(packed, scales, out.numel(), block)``; the product is rounded to
    fp32 before the add (no fused multiply-add), as in :func:`sparse_accumulate`."""
    out.add_(sign_decode(packed, scales, out.numel(), block) * alpha)


def sign_accumulate_many(out: Tensor, packed, scales, block: int, alphas) -> None:
    """:func:`sign_accumulate` of payload ``j = 0, 1, ...`` (``packed[j]``, ``scales[j]``,
    ``alphas[j]``) in turn, through the dispatcher, so each runs on its device's kernel."""
    for pj, sj, aj in zip(packed, scales, alphas):
        torch.ops.fedcomp.sign_accumulate(out, pj, sj, block, aj)


def sign_majority(packed_stack: Tensor) -> Tensor:
    """Bitwise majority over the rows of a ``[m >= 1, nbytes]`` uint8 stack; ties give 1."""
    m, nbytes = packed_stack.shape
    ones = sum(unpack_codes(row, nbytes * 8, 1) for row in packed_stack)
    return pack_codes(2 * ones >= m, 1)


# --------------------------------------------------------------------------
# QSGD
# --------------------------------------------------------------------------
def qsgd_bits(levels: int) -> int:
    """Fewest whole bits that hold the 2*levels + 1 signed codes."""
    return max(1, math.ceil(math.log2(2 * levels + 1)))


def qsgd_norms(a: Tensor, bucket: int) -> Tensor:
    """fp32 L2 norm of each bucket, accumulated in fp64."""
    return _block_sums(a.double().square(), bucket).sqrt().float()


def qsgd_codes(a: Tensor, norms: Tensor, levels: int, bucket: int, seed: int) -> Tensor:
    """Codes ``L + sign(a) * min(L, floor(L*|a|/norm + u))`` (0 magnitude where non-finite)."""
    n = a.numel()
    norm = norms.repeat_interleave(block_counts(n, bucket, a.device))
    t = levels * a.abs()
    t = t / norm
    t = t + philox_uniform24(seed, n, a.device)
    q = torch.where(torch.isfinite(t), torch.floor(t), 0.0).clamp(max=levels).long()
    return torch.where(a < 0, levels - q, levels + q)


def qsgd(x: Tensor, residual: Tensor | None, levels: int, bucket: int, seed: int):
    """Unbiased stochastic quantization (QSGD) per bucket, optionally with error feedback.

    Returns ``(packed, norms)``: codes of :func:`qsgd_bits` bits, packed little-endian, and
    fp32 bucket norms. ``E[qsgd_decode(...)] = x + residual``; ``residual <- a - decode``.
    """
    n = x.numel()
    a = x.float() if residual is None else x.float() + residual.float()
    norms = qsgd_norms(a, bucket)
    codes = qsgd_codes(a, norms, levels, bucket, seed)
    if residual is not None:
        residual.copy_(a - _qsgd_values(codes, norms, n, levels, bucket))
    return pack_codes(codes, qsgd_bits(levels)), norms


def qsgd_rows(x: Tensor, residual: Tensor | None, levels: int, bucket: int, seeds, rows=None):
    """:func:`qsgd` on each row ``i`` of ``x [m, n]`` with seed ``seeds[i]`` (through the
    dispatcher, so each row runs on its device's kernel): ``(packed [m, nbytes], norms [m, nb])``."""
    return apply_rows(torch.ops.fedcomp.qsgd, x, residual, levels, bucket, rows=rows, per_row=seeds)


def _qsgd_values(codes: Tensor, norms: Tensor, numel: int, levels: int, bucket: int) -> Tensor:
    norm = norms.repeat_interleave(block_counts(numel, bucket, norms.device))
    return (codes - levels).float() * norm / levels


def qsgd_decode(packed: Tensor, norms: Tensor, numel: int, levels: int, bucket: int) -> Tensor:
    """Dense fp32 ``[numel]``: ``(code - L) * norm_b / L``."""
    codes = unpack_codes(packed, numel, qsgd_bits(levels))
    return _qsgd_values(codes, norms, numel, levels, bucket)


def qsgd_accumulate(out: Tensor, packed: Tensor, norms: Tensor, levels: int, bucket: int, alpha: float) -> None:
    """``out += alpha * qsgd_decode(packed, norms, out.numel(), levels, bucket)`` (product rounded first)."""
    out.add_(qsgd_decode(packed, norms, out.numel(), levels, bucket) * alpha)


def qsgd_accumulate_many(out: Tensor, packed, norms, levels: int, bucket: int, alphas) -> None:
    """:func:`qsgd_accumulate` of payload ``j = 0, 1, ...`` in turn, through the dispatcher."""
    for pj, nj, aj in zip(packed, norms, alphas):
        torch.ops.fedcomp.qsgd_accumulate(out, pj, nj, levels, bucket, aj)


# --------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------
def check_indices(indices: Tensor, n: int) -> None:
    """IndexError unless every index lies in ``[0, n)`` (one host synchronisation).

    On a GPU the check is a device-side assertion instead (``torch._assert_async``): no host
    synchronisation in the aggregation path; a bad index fails the next synchronising call.
    """
    if indices.numel() and indices.is_cuda:
        torch._assert_async(
            (indices.min() >= 0) & (indices.max() < n), f"sparse_accumulate: indices must lie in [0, {n})"
        )
        return
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"sparse_accumulate: indices must lie in [0, {n}), got min {lo}, max {hi}")


def sparse_accumulate(out: Tensor, indices: Tensor, values: Tensor, alpha: float) -> None:
    """``out[indices] += alpha * values`` (duplicates accumulate, in list order)."""
    check_indices(indices, out.numel())
    out.index_add_(0, indices.long(), (values.float() * alpha).to(out.dtype))


# --------------------------------------------------------------------------
# rand-k positions (the wire format's keyed permutation)
# --------------------------------------------------------------------------
_M31 = (1 << 31) - 1
_M62 = (1 << 62) - 1


def _feistel_round(r, key: int, mask: int):
    # A mixing function on half-words (< 2**31); products stay below 2**62 (no wrap-around).
    h = ((r ^ (key & _M31)) & _M31) * 0x5BD1E995 & _M62
    h = h ^ (h >> 29)
    h = (h & _M31) * 0x2C1B3C6D & _M62
    return (h ^ (h >> 31)) & mask


def randk_positions(round_keys: Tensor, k: int, n: int) -> Tensor:
    """The ``k`` positions of a rand-k payload: ``[k]`` int64, ascending.

    ``pi`` is a 4-round Feistel permutation of ``[0, 2**(2h))`` (``h`` = half the bits of
    ``n``; ``round_keys``: ``[4]`` int64, each ``< 2**63``). The positions are the first
    ``k`` values of ``pi(0), pi(1), ...`` that fall in ``[0, n)``, sorted.
    """
    keys = [int(v) for v in round_keys.tolist()]
    half = max(1, (max(n - 1, 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    domain = 1 << (2 * half)
    found, start, need = [], 0, k
    while need > 0:
        # enough counters that, on average, 1.25 * need of them land in [0, n)
        count = min(domain - start, int(need * domain / n * 1.25) + 64)
        v = torch.arange(start, start + count, dtype=torch.int64)
        left, right = v >> half, v & mask
        for key in keys:
            left, right = right, left ^ _feistel_round(right, key, mask)
        v = (left << half) | right
        v = v[v < n][:need]
        found.append(v)
        need -= v.numel()
        start += count
    return torch.cat(found).sort().values if found else torch.zeros(0, dtype=torch.int64)


def randk_ef_rows(x: Tensor, residual: Tensor | None, seeds, k: int, rows=None):
    """Rand-k with error feedback on each row of ``x [m, n]``: ``a = x[i] + residual row``
    (rounded to ``x.dtype``; the row is ``i``, or ``rows[i]`` of a ``[K, n]`` residual), then
    ``values[i] = a[p_i]`` with ``p_i = randk_positions(round_keys(seeds)[i], k, n)`` (round keys
    ``splitmix64(seed, 0..3)``, :func:`fedcomp._host.round_keys`) and the residual row set to
    ``a`` with ``p_i`` zeroed.

    Returns:
        ``(values [m, k] x.dtype, positions [m, k] int64 on x's device)``.
    """
    m, n = x.shape
    rows = range(m) if rows is None else rows
    keys = round_keys(seeds)
    values, positions = [], []
    for i, j in enumerate(rows):
        # the host op: the C++ kernel when it is built, else randk_positions above
        pos = host_to_device(torch.ops.fedcomp.randk_positions(keys[i], k, n), x)
        if residual is None:
            values.append(x[i][pos])
        else:
            r = residual[j]
            r.add_(x[i])
            values.append(r[pos])
            r.index_fill_(0, pos, 0)
        positions.append(pos)
    if not positions:
        return x.new_empty((0, k)), x.new_empty((0, k), dtype=torch.int64)
    return torch.stack(values), torch.stack(positions)
