"""Top-k with error feedback: a radix select over the 31-bit magnitude key, then an
index-ordered compaction; the exact op and the sampled-threshold variant."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _OPTS,
    F32,
    HIST_BITS,
    I64,
    I64P,
    RESIDUAL_VARIANTS,
    SCAN_CHUNK,
    TILE,
    _abs_key,
    _grid,
    _in_slices,
    _row,
    _rows_arg,
    _shape,
    _to_storage,
    variant_tag,
)


# --------------------------------------------------------------------------
# top-k: radix select over the 31-bit magnitude key, then an index-ordered compaction
# --------------------------------------------------------------------------
@triton.jit
def _topk_keys_kernel(
    x_ptr, r_ptr, keys_ptr, n, rows_ptr, HAS_R: tl.constexpr, T: tl.constexpr, HAS_ROWS: tl.constexpr
):
    """a = round_dtype(x + r); residual <- a; keys <- abs_key(a).

    Traffic: reads x, r (8 B), writes r (4 B) and the key (4 B): 16 B/elem.
    """
    i, j = _row(rows_ptr, HAS_ROWS)
    x_ptr += i * n
    r_ptr += j * n
    keys_ptr += i * n
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    a = tl.load(x_ptr + offs, mask=mask, other=0.0)
    if HAS_R:
        a = _to_storage(
            a.to(tl.float32) + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32), x_ptr.dtype.element_ty
        )
        tl.store(r_ptr + offs, a, mask=mask)
    tl.store(keys_ptr + offs, _abs_key(a.to(tl.float32)), mask=mask)


@triton.jit
def _gather_keys_kernel(keys_ptr, sample_ptr, n, s, seed, T: tl.constexpr):
    """sample[j] = keys[(word1 << 32 | word0) mod n], words of Philox(seed, j). Traffic: 8 B per sample."""
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < s
    ctr = offs.to(tl.uint64)
    zero = tl.zeros([T], dtype=tl.uint32)
    c0, c1, _, _ = tl.philox(seed, (ctr & 0xFFFFFFFF).to(tl.uint32), (ctr >> 32).to(tl.uint32), zero, zero)
    pos = ((c1.to(tl.uint64) << 32) | c0.to(tl.uint64)) % n.to(tl.uint64)
    tl.store(sample_ptr + offs, tl.load(keys_ptr + pos.to(tl.int64), mask=mask, other=0), mask=mask)


@triton.jit
def _histogram_kernel(
    keys_ptr, n, state_ptr, hist_ptr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, BINS: tl.constexpr, T: tl.constexpr
):
    """hist[(key >> SHIFT) % BINS] += 1 over the keys whose bits above SHIFT+log2(BINS) equal the
    prefix found so far (state[1]). Traffic: reads 4 B/elem; BINS atomics per program. A stack's
    row i has its own keys, state and histogram."""
    i = tl.program_id(1).to(tl.int64)
    keys_ptr += i * n
    state_ptr += i * 2
    hist_ptr += i * BINS
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    key = tl.load(keys_ptr + offs, mask=offs < n, other=0)
    prefix = tl.load(state_ptr + 1)
    if SHIFT + DIGIT_BITS >= 31:
        live = offs < n
    else:
        live = (offs < n) & ((key >> (SHIFT + DIGIT_BITS)) == prefix)
    digit = (key >> SHIFT) & (BINS - 1)
    counts = tl.histogram(tl.where(live, digit, 0), BINS)
    # subtract the masked-out lanes counted in bin 0
    dead = tl.sum((~live).to(tl.int32), axis=0)
    counts = counts - tl.where(tl.arange(0, BINS) == 0, dead, 0)
    tl.atomic_add(hist_ptr + tl.arange(0, BINS), counts, mask=counts != 0)


@triton.jit
def _select_kernel(state_ptr, hist_ptr, DIGIT_BITS: tl.constexpr, BINS: tl.constexpr):
    """One program: with r = state[0] entries still to take from the top, find the digit b whose bin
    holds the r-th largest: state[1] <- prefix * BINS + b, state[0] <- r - (count above b).
    One program per row of a stack."""
    i = tl.program_id(1).to(tl.int64)
    state_ptr += i * 2
    hist_ptr += i * BINS
    rem = tl.load(state_ptr + 0)
    prefix = tl.load(state_ptr + 1)
    hist = tl.load(hist_ptr + tl.arange(0, BINS))
    total = tl.sum(hist, axis=0)
    suffix_ge = total - tl.cumsum(hist, axis=0) + hist  # entries in bins >= b
    b = tl.sum((suffix_ge >= rem).to(tl.int32), axis=0) - 1
    above = tl.sum(tl.where(tl.arange(0, BINS) > b, hist, 0), axis=0)
    tl.store(state_ptr + 1, (prefix << DIGIT_BITS) | b)
    tl.store(state_ptr + 0, rem - above)


@triton.jit
def _threshold(state_ptr, AT_LEAST: tl.constexpr):
    """(thresh, take_eq) from the select state: top-k takes key > t and the first state[0] ties at t;
    the sampled threshold takes key >= t, i.e. key > t - 1 with no ties."""
    if AT_LEAST:
        return tl.load(state_ptr + 1) - 1, 0
    return tl.load(state_ptr + 1), tl.load(state_ptr + 0)


@triton.jit
def _count_kernel(keys_ptr, n, state_ptr, counts_ptr, ntiles, AT_LEAST: tl.constexpr, T: tl.constexpr):
    """Per tile: entries with key > thresh, and with key == thresh. Traffic: reads 4 B/elem."""
    i = tl.program_id(1).to(tl.int64)
    keys_ptr += i * n
    state_ptr += i * 2
    counts_ptr += i * 2 * ntiles
    pid = tl.program_id(0)
    thresh, _ = _threshold(state_ptr, AT_LEAST)
    offs = pid.to(tl.int64) * T + tl.arange(0, T)
    key = tl.load(keys_ptr + offs, mask=offs < n, other=-1)
    tl.store(counts_ptr + pid, tl.sum((key > thresh).to(tl.int32), axis=0))
    tl.store(counts_ptr + ntiles + pid, tl.sum((key == thresh).to(tl.int32), axis=0))


@triton.jit
def _scan_kernel(
    counts_ptr, offsets_ptr, ntiles, state_ptr, cap, total_ptr, AT_LEAST: tl.constexpr, CHUNK: tl.constexpr
):
    """One program: exclusive scans over tiles of 'greater' and 'equal' counts; a tile's output
    offset is greater_before + min(equal_before, take_eq). Writes the picked total (<= cap).
    One program per row of a stack."""
    i = tl.program_id(1).to(tl.int64)
    counts_ptr += i * 2 * ntiles
    offsets_ptr += i * 2 * ntiles
    state_ptr += i * 2
    total_ptr += i
    _, take_eq = _threshold(state_ptr, AT_LEAST)
    carry_g = 0
    carry_e = 0
    for start in range(0, ntiles, CHUNK):
        idx = start + tl.arange(0, CHUNK)
        mask = idx < ntiles
        g = tl.load(counts_ptr + idx, mask=mask, other=0)
        e = tl.load(counts_ptr + ntiles + idx, mask=mask, other=0)
        eg = tl.cumsum(g, axis=0) - g + carry_g
        ee = tl.cumsum(e, axis=0) - e + carry_e
        tl.store(offsets_ptr + idx, eg + tl.minimum(ee, take_eq), mask=mask)
        tl.store(offsets_ptr + ntiles + idx, ee, mask=mask)
        carry_g += tl.sum(g, axis=0)
        carry_e += tl.sum(e, axis=0)
    tl.store(total_ptr, tl.minimum(carry_g + tl.minimum(carry_e, take_eq), cap).to(tl.int64))


@triton.jit
def _compact_kernel(
    keys_ptr,
    a_ptr,
    r_ptr,
    n,
    state_ptr,
    cap,
    offsets_ptr,
    ntiles,
    val_ptr,
    idx_ptr,
    rows_ptr,
    HAS_R: tl.constexpr,
    AT_LEAST: tl.constexpr,
    T: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """Write the picked entries in index order: key > thresh, or key == thresh among the first
    take_eq such entries, while fewer than cap are written; zero them in the residual.

    Traffic: reads the key (4 B), writes the residual's picked entries; reads a and writes
    value + index only for picked entries (negligible at k << n). ``a`` is the residual's row when
    there is a residual (it holds a after the keys kernel), else x's.
    """
    i, j = _row(rows_ptr, HAS_ROWS)
    keys_ptr += i * n
    a_ptr += (j if HAS_R else i) * n
    r_ptr += j * n
    state_ptr += i * 2
    offsets_ptr += i * 2 * ntiles
    val_ptr += i * cap
    idx_ptr += i * cap
    pid = tl.program_id(0)
    thresh, take_eq = _threshold(state_ptr, AT_LEAST)
    offs = pid.to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    key = tl.load(keys_ptr + offs, mask=mask, other=-1)
    eq = key == thresh
    eq_rank = tl.load(offsets_ptr + ntiles + pid) + tl.cumsum(eq.to(tl.int32), axis=0) - 1
    cand = mask & ((key > thresh) | (eq & (eq_rank < take_eq)))
    pos = tl.load(offsets_ptr + pid) + tl.cumsum(cand.to(tl.int32), axis=0) - 1
    pick = cand & (pos < cap)
    a = tl.load(a_ptr + offs, mask=pick, other=0.0)
    tl.store(val_ptr + pos, a, mask=pick)
    tl.store(idx_ptr + pos, offs.to(idx_ptr.dtype.element_ty), mask=pick)
    if HAS_R:
        tl.store(r_ptr + offs, tl.zeros_like(a), mask=pick)


def _radix_select(keys: Tensor, n: int, k: int, m: int = 1) -> Tensor:
    """state[i, 1] <- the k-th largest of row i's n keys (1 <= k <= n), state[i, 0] <- how many
    entries equal to it are among row i's top k; ``[m, 2]`` int32.
    All on the device: no host synchronisation."""
    state = torch.zeros(m, 2, dtype=torch.int32, device=keys.device)
    state[:, 0] = k  # a fill on the device (a tensor built from [k, 0] would copy from the host)
    shift = 31
    for bits in HIST_BITS:
        shift -= bits
        hist = torch.zeros(m, 1 << bits, dtype=torch.int32, device=keys.device)
        _histogram_kernel[(_grid(n)[0], m)](
            keys, n, state, hist, SHIFT=shift, DIGIT_BITS=bits, BINS=1 << bits, T=TILE, **_OPTS
        )
        _select_kernel[(1, m)](state, hist, DIGIT_BITS=bits, BINS=1 << bits, **_OPTS)
    return state


def _compact(keys, a, residual, state, at_least: bool, cap, values, indices, n, m, rows) -> Tensor:
    """count -> scan -> compact, reading the threshold from ``state`` on the device (no host
    sync), for each of m rows in the same launches (``rows``: :func:`_rows_arg`). Returns each
    row's picked total, ``[m]``."""
    ntiles = _grid(n)[0]
    counts = torch.empty(m, 2 * ntiles, dtype=torch.int32, device=keys.device)
    offsets = torch.empty(m, 2 * ntiles, dtype=torch.int32, device=keys.device)
    total = torch.empty(m, dtype=torch.int64, device=keys.device)
    _count_kernel[(ntiles, m)](keys, n, state, counts, ntiles, AT_LEAST=at_least, T=TILE, **_OPTS)
    _scan_kernel[(1, m)](counts, offsets, ntiles, state, cap, total, AT_LEAST=at_least, CHUNK=SCAN_CHUNK, **_OPTS)
    r = residual if residual is not None else a
    rows_t, has_rows = rows
    _compact_kernel[(ntiles, m)](
        keys, a, r, n, state, cap, offsets, ntiles, values, indices, rows_t,
        HAS_R=residual is not None, AT_LEAST=at_least, T=TILE, HAS_ROWS=has_rows, **_OPTS,
    )  # fmt: skip
    return total


def _keys(x: Tensor, residual: Tensor | None, rows) -> tuple[Tensor, Tensor]:
    """(keys [m, n], a): the top-k keys of x (+ residual, stored there), ``rows`` from :func:`_rows_arg`."""
    m, n = _shape(x)
    keys = torch.empty(m, n, dtype=torch.int32, device=x.device)
    r = residual if residual is not None else x
    rows_t, has_rows = rows
    _topk_keys_kernel[(_grid(n)[0], m)](
        x, r, keys, n, rows_t, HAS_R=residual is not None, T=TILE, HAS_ROWS=has_rows, **_OPTS
    )
    return keys, (residual if residual is not None else x)


def topk_ef_triton(x: Tensor, residual: Tensor | None, k: int, index_dtype: torch.dtype, rows=None):
    """Exact top-k of one tensor ``[n]``, or of every row of a stack ``[m, n]`` in the same
    launches (``rows``: the residual's row for each row of x): keys (16 B/elem), three radix
    histograms (4 B/elem each), count (4 B/elem) and compaction (4 B/elem + the k picks): about
    36 B/elem for fp32. The minimum for the math is 12 B/elem (read x and r, write r); the extra
    passes re-read the 4-byte keys, trading traffic for a host-synchronisation-free,
    deterministic selection."""
    m, n = _shape(x)
    values = torch.empty(*x.shape[:-1], k, dtype=x.dtype, device=x.device)
    indices = torch.empty(*x.shape[:-1], k, dtype=index_dtype, device=x.device)
    if n == 0 or m == 0:
        return values, indices
    rows = _rows_arg(x, rows)
    keys, a = _keys(x, residual, rows)
    if k == 0:
        return values, indices
    state = _radix_select(keys, n, k, m)
    _compact(keys, a, residual, state, False, k, values, indices, n, m, rows)
    return values, indices


def topk_threshold_ef_triton(x: Tensor, residual: Tensor | None, k: int, capacity: int, sample_size: int, seed: int):
    """Sampled threshold: gather ``sample_size`` keys at Philox positions, radix-select the
    ``ceil(k * s / n)``-th largest on the device, then one index-ordered compaction of
    ``key >= t`` capped at ``capacity``. The count stays on the device."""
    n = x.numel()
    values = torch.zeros(capacity, dtype=x.dtype, device=x.device)
    indices = torch.zeros(capacity, dtype=torch.int64, device=x.device)
    count = torch.zeros((), dtype=torch.int64, device=x.device)
    if n == 0:
        return values, indices, count
    one = _rows_arg(x, None)
    keys, a = _keys(x, residual, one)
    if k == 0:
        return values, indices, count
    sample = torch.empty(sample_size, dtype=torch.int32, device=x.device)
    _gather_keys_kernel[_grid(sample_size)](keys, sample, n, sample_size, seed, T=TILE, **_OPTS)
    state = _radix_select(sample, sample_size, -(-k * sample_size // n))
    count = _compact(keys, a, residual, state, True, capacity, values, indices, n, 1, one)[0]
    return values, indices, count


def topk_ef_rows_triton(x: Tensor, residual: Tensor | None, k: int, index_dtype: torch.dtype, rows=None):
    return _in_slices(lambda x, r, rows: topk_ef_triton(x, r, k, index_dtype, rows), x, residual, rows)


def launch_configs() -> list[tuple]:
    """(name, kernel, signature, constexprs) of every top-k launch above."""
    out = []
    for has_r, has_rows in RESIDUAL_VARIANTS:
        tag = variant_tag(has_r, has_rows)
        out.append(
            (
                f"topk_keys[{tag}]",
                _topk_keys_kernel,
                {"x_ptr": F32, "r_ptr": F32, "keys_ptr": "*i32", "n": I64, "rows_ptr": I64P},
                {"HAS_R": has_r, "T": TILE, "HAS_ROWS": has_rows},
            )
        )
        for at_least in (False,) if has_rows else (False, True):  # the sampled threshold: one tensor
            out.append(
                (
                    f"compact[{tag},at_least={int(at_least)}]",
                    _compact_kernel,
                    {
                        "keys_ptr": "*i32",
                        "a_ptr": F32,
                        "r_ptr": F32,
                        "n": I64,
                        "state_ptr": "*i32",
                        "cap": I64,
                        "offsets_ptr": "*i32",
                        "ntiles": I64,
                        "val_ptr": F32,
                        "idx_ptr": "*i64",
                        "rows_ptr": I64P,
                    },
                    {"HAS_R": has_r, "AT_LEAST": at_least, "T": TILE, "HAS_ROWS": has_rows},
                )
            )
    out.append(
        (
            "gather_keys",
            _gather_keys_kernel,
            {"keys_ptr": "*i32", "sample_ptr": "*i32", "n": I64, "s": I64, "seed": "u64"},
            {"T": TILE},
        )
    )
    shift = 31
    for bits in HIST_BITS:
        shift -= bits
        out.append(
            (
                f"histogram[shift={shift},bins={1 << bits}]",
                _histogram_kernel,
                {"keys_ptr": "*i32", "n": I64, "state_ptr": "*i32", "hist_ptr": "*i32"},
                {"SHIFT": shift, "DIGIT_BITS": bits, "BINS": 1 << bits, "T": TILE},
            )
        )
        out.append(
            (
                f"select[bins={1 << bits}]",
                _select_kernel,
                {"state_ptr": "*i32", "hist_ptr": "*i32"},
                {"DIGIT_BITS": bits, "BINS": 1 << bits},
            )
        )
    for at_least in (False, True):
        out.append(
            (
                f"count[at_least={int(at_least)}]",
                _count_kernel,
                {"keys_ptr": "*i32", "n": I64, "state_ptr": "*i32", "counts_ptr": "*i32", "ntiles": I64},
                {"AT_LEAST": at_least, "T": TILE},
            )
        )
        out.append(
            (
                f"scan[at_least={int(at_least)}]",
                _scan_kernel,
                {
                    "counts_ptr": "*i32",
                    "offsets_ptr": "*i32",
                    "ntiles": I64,
                    "state_ptr": "*i32",
                    "cap": I64,
                    "total_ptr": "*i64",
                },
                {"AT_LEAST": at_least, "CHUNK": SCAN_CHUNK},
            )
        )
    return out
