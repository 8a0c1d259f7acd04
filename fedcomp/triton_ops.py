"""Triton kernels for every fedcomp op.

They serve CUDA tensors on a GPU, and, with ``TRITON_INTERPRET=1`` and
``FEDCOMP_BACKEND=triton``, CPU tensors through Triton's interpreter, so the same
exactness tests as the C++ kernels run on a machine without a GPU. Every kernel is
compiled with floating-point contraction off (``enable_fp_fusion=False``) so it
performs the reference's fp32 operations one at a time.

Naming: ``_<name>_kernel`` is a ``@triton.jit`` kernel, ``<op>_triton`` its host
wrapper (arguments already validated by :mod:`fedcomp.ops`). ``LAUNCH_CONFIGS`` lists
every kernel with the constexpr values the wrappers launch it with; the AOT compile
check (:mod:`fedcomp.gpu_compile`) compiles exactly those.

Global-memory traffic per element (fp32 input, ``B/elem``) is stated next to each
kernel. ``n`` = entries, ``w`` = code bits.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # every launch passes enable_fp_fusion=False anyway

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402

from .reference import check_indices, qsgd_bits, randk_ef_rows  # noqa: E402
from .wire import host_to_device  # noqa: E402

__all__ = [
    "topk_ef_triton",
    "topk_threshold_ef_triton",
    "sign_ef_triton",
    "sign_decode_triton",
    "sign_majority_triton",
    "qsgd_triton",
    "qsgd_decode_triton",
    "sparse_accumulate_triton",
    "sign_accumulate_triton",
    "qsgd_accumulate_triton",
    "topk_ef_rows_triton",
    "sign_ef_rows_triton",
    "qsgd_rows_triton",
    "LAUNCH_CONFIGS",
]

TILE = 1024  # entries per program of the elementwise kernels (a multiple of 32)
FUSED_MAX_BLOCK = 4096  # sign blocks up to this size (and a multiple of 8) take the one-pass kernel
FUSED_WARPS = 8  # 16 entries per thread at the largest block: no local memory on sm_80 / sm_90
HIST_BITS = (11, 10, 10)  # radix digits of the 31-bit magnitude key, most significant first
SCAN_CHUNK = 1024
_OPTS = {"enable_fp_fusion": False}


def _grid(n: int, tile: int = TILE) -> tuple[int]:
    return (max(1, triton.cdiv(n, tile)),)


def _shape(x: Tensor) -> tuple[int, int]:
    """(rows, entries per row) of one tensor ``[n]`` (one row) or a stack ``[m, n]``."""
    return (1, x.numel()) if x.dim() == 1 else (x.shape[0], x.shape[1])


def _host_ints(values, like: Tensor) -> Tensor:
    """Host ints as an int64 tensor on ``like``'s device, copied without a host synchronisation."""
    return host_to_device(torch.tensor([int(v) for v in values], dtype=torch.int64), like)


def _rows_arg(x: Tensor, rows) -> tuple[Tensor, bool]:
    """The kernels' (rows_ptr, HAS_ROWS): the residual row of each row of x as a device tensor,
    or x as an unread placeholder when every row i uses residual row i."""
    return (x, False) if rows is None else (_host_ints(rows, x), True)


# --------------------------------------------------------------------------
# shared device helpers
# --------------------------------------------------------------------------
@triton.jit
def _abs_key(a):
    """IEEE bits of |a| (fp32) as int32: orders like |a|, NaN above +Inf (fedcomp_math.h abs_key)."""
    return a.to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _to_storage(v, dtype: tl.constexpr):
    """fp32 -> storage dtype, rounding to nearest even. For bf16 the rounding is done on the bits
    first (Triton's interpreter truncates fp32 -> bf16), so the final cast is exact everywhere."""
    if dtype == tl.bfloat16:
        bits = v.to(tl.int32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        v = tl.where(v != v, v, rounded.to(tl.float32, bitcast=True))
    return v.to(dtype)


@triton.jit
def _row(rows_ptr, HAS_ROWS: tl.constexpr):
    """(i, j) of this program in a ``[tiles, m]`` grid of a batched op: row ``i = program_id(1)``
    of x and of every output, row ``j`` of the residual (``rows[i]`` when given, else ``i``).
    A 1-D launch is row 0 of itself: every kernel serves one tensor and a stack alike."""
    i = tl.program_id(1).to(tl.int64)
    if HAS_ROWS:
        j = tl.load(rows_ptr + i).to(tl.int64)
    else:
        j = i
    return i, j


@triton.jit
def _load_a(x_ptr, r_ptr, offs, mask, HAS_R: tl.constexpr):
    """a = x + residual in fp32 (x alone without a residual)."""
    a = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_R:
        a = a + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    return a


# --------------------------------------------------------------------------
# block statistics (sign scales, QSGD norms)
# --------------------------------------------------------------------------
@triton.jit
def _block_stat_kernel(
    x_ptr,
    r_ptr,
    out_ptr,
    n,
    block,
    rows_ptr,
    HAS_R: tl.constexpr,
    MODE: tl.constexpr,
    CHUNK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """One program per block (and row): MODE 0 mean|a|, 1 sqrt(mean a^2), 2 sqrt(sum a^2); fp64
    accumulation.

    Traffic: reads x and residual once (8 B/elem), writes 4 B per block.
    """
    i, j = _row(rows_ptr, HAS_ROWS)
    x_ptr += i * n
    r_ptr += j * n
    out_ptr += i * ((n + block - 1) // block)
    b = tl.program_id(0)
    start = b.to(tl.int64) * block
    count = tl.minimum(block, n - start)
    acc = tl.zeros([CHUNK], dtype=tl.float64)
    for off in range(0, count, CHUNK):
        offs = start + off + tl.arange(0, CHUNK)
        mask = (off + tl.arange(0, CHUNK)) < count
        a = _load_a(x_ptr, r_ptr, offs, mask, HAS_R)
        if MODE == 0:
            acc += tl.abs(a).to(tl.float64)
        else:
            ad = a.to(tl.float64)
            acc += ad * ad
    total = tl.sum(acc, axis=0)
    if MODE == 0:
        stat = total / count.to(tl.float64)
    elif MODE == 1:
        stat = tl.sqrt(total / count.to(tl.float64))
    else:
        stat = tl.sqrt(total)
    tl.store(out_ptr + b, stat.to(tl.float32))


# --------------------------------------------------------------------------
# sign
# --------------------------------------------------------------------------
@triton.jit
def _pack8(bits, NB: tl.constexpr):
    """[NB*8] 0/1 int32 -> [NB] uint8, bit j of byte i = bits[8i + j]."""
    weights = 1 << tl.arange(0, 8)
    return tl.sum(tl.reshape(bits, [NB, 8]) * weights[None, :], axis=1).to(tl.uint8)


@triton.jit
def _sign_row(x_ptr, r_ptr, scales_ptr, packed_ptr, n, block, rows_ptr, HAS_ROWS: tl.constexpr):
    """The sign kernels' pointers moved to this program's row of a stack (see :func:`_row`)."""
    i, j = _row(rows_ptr, HAS_ROWS)
    return x_ptr + i * n, r_ptr + j * n, scales_ptr + i * ((n + block - 1) // block), packed_ptr + i * ((n + 7) // 8)


@triton.jit
def _sign_codes_kernel(
    x_ptr,
    r_ptr,
    scales_ptr,
    packed_ptr,
    n,
    block,
    rows_ptr,
    HAS_R: tl.constexpr,
    T: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """Bits and residual once the block scales are known (second pass of the two-pass path).

    Traffic: reads x, residual (8 B/elem) and scales (cached), writes residual (4) and 1/8:
    12.125 B/elem; with :func:`_block_stat_kernel` first, 20.125 B/elem in all.
    """
    x_ptr, r_ptr, scales_ptr, packed_ptr = _sign_row(x_ptr, r_ptr, scales_ptr, packed_ptr, n, block, rows_ptr, HAS_ROWS)
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    a = _load_a(x_ptr, r_ptr, offs, mask, HAS_R)
    pos = a >= 0
    if HAS_R:
        scale = tl.load(scales_ptr + offs // block, mask=mask, other=0.0)
        sgn = tl.where(pos, 1.0, -1.0)
        tl.store(r_ptr + offs, _to_storage(a - scale * sgn, r_ptr.dtype.element_ty), mask=mask)
    bits = (pos & mask).to(tl.int32)
    byte_offs = pid.to(tl.int64) * (T // 8) + tl.arange(0, T // 8)
    tl.store(packed_ptr + byte_offs, _pack8(bits, T // 8), mask=byte_offs < (n + 7) // 8)


@triton.jit
def _sign_ef_fused_kernel(
    x_ptr,
    r_ptr,
    scales_ptr,
    packed_ptr,
    n,
    block,
    rows_ptr,
    HAS_R: tl.constexpr,
    L2: tl.constexpr,
    BLOCK: tl.constexpr,
    HAS_ROWS: tl.constexpr,
):
    """One program per block (``block % 8 == 0``, ``block <= BLOCK``): scale, bits, residual in one read.

    Traffic: reads x and residual (8 B/elem), writes residual (4 B) and the bits (1/8 B):
    12.125 B/elem, the minimum for the math (each input read once, each output written once).
    """
    x_ptr, r_ptr, scales_ptr, packed_ptr = _sign_row(x_ptr, r_ptr, scales_ptr, packed_ptr, n, block, rows_ptr, HAS_ROWS)
    b = tl.program_id(0)
    start = b.to(tl.int64) * block
    idx = tl.arange(0, BLOCK)
    count = tl.minimum(block, n - start)
    mask = idx < count
    a = _load_a(x_ptr, r_ptr, start + idx, mask, HAS_R)
    if L2:
        ad = a.to(tl.float64)
        scale = tl.sqrt(tl.sum(ad * ad, axis=0) / count.to(tl.float64)).to(tl.float32)
    else:
        scale = (tl.sum(tl.abs(a).to(tl.float64), axis=0) / count.to(tl.float64)).to(tl.float32)
    tl.store(scales_ptr + b, scale)
    pos = a >= 0
    if HAS_R:
        sgn = tl.where(pos, 1.0, -1.0)
        tl.store(r_ptr + start + idx, _to_storage(a - scale * sgn, r_ptr.dtype.element_ty), mask=mask)
    bits = (pos & mask).to(tl.int32)
    byte_offs = start // 8 + tl.arange(0, BLOCK // 8)
    tl.store(packed_ptr + byte_offs, _pack8(bits, BLOCK // 8), mask=tl.arange(0, BLOCK // 8) < (count + 7) // 8)


def sign_ef_triton(x: Tensor, residual: Tensor | None, block: int, l2: bool, rows=None):
    """One tensor ``[n]``, or every row of a stack ``[m, n]`` in the same launches (``rows``: the
    residual's row for each row of x)."""
    m, n = _shape(x)
    nblocks = triton.cdiv(n, block)
    packed = torch.empty(*x.shape[:-1], (n + 7) // 8, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*x.shape[:-1], nblocks, dtype=torch.float32, device=x.device)
    if n == 0 or m == 0:
        return packed, scales
    r = residual if residual is not None else x
    has_r = residual is not None
    rows_t, has_rows = _rows_arg(x, rows)
    if block % 8 == 0 and block <= FUSED_MAX_BLOCK:
        fused = max(8, triton.next_power_of_2(block))
        _sign_ef_fused_kernel[(nblocks, m)](
            x, r, scales, packed, n, block, rows_t, HAS_R=has_r, L2=l2, BLOCK=fused, HAS_ROWS=has_rows,
            num_warps=FUSED_WARPS, **_OPTS,
        )  # fmt: skip
    else:
        _block_stat_kernel[(nblocks, m)](
            x, r, scales, n, block, rows_t, HAS_R=has_r, MODE=1 if l2 else 0, CHUNK=TILE, HAS_ROWS=has_rows, **_OPTS
        )
        _sign_codes_kernel[(_grid(n)[0], m)](
            x, r, scales, packed, n, block, rows_t, HAS_R=has_r, T=TILE, HAS_ROWS=has_rows, **_OPTS
        )
    return packed, scales


@triton.jit
def _store_or_accumulate(out_ptr, offs, value, mask, alpha, ACC: tl.constexpr):
    """ACC: out += alpha * value (product rounded first: fp fusion is off); else out = value."""
    if ACC:
        value = tl.load(out_ptr + offs, mask=mask, other=0.0) + value * alpha
    tl.store(out_ptr + offs, value, mask=mask)


@triton.jit
def _sign_decode_kernel(packed_ptr, scales_ptr, out_ptr, n, block, alpha, ACC: tl.constexpr, T: tl.constexpr):
    """out = scale_b * (+1 | -1), or (ACC) out += alpha * that.

    Traffic: reads 1/8 B, writes 4 B per element (4.125 B/elem, minimal); ACC also reads out (8.125 B/elem,
    against 16.125 for decode-then-add).
    """
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    byte = tl.load(packed_ptr + offs // 8, mask=mask, other=0).to(tl.int32)
    bit = (byte >> (offs % 8).to(tl.int32)) & 1
    scale = tl.load(scales_ptr + offs // block, mask=mask, other=0.0)
    _store_or_accumulate(out_ptr, offs, tl.where(bit == 1, 1.0, -1.0) * scale, mask, alpha, ACC)


def _alpha32(alpha: float) -> float:
    return float(torch.tensor(alpha, dtype=torch.float32))


def sign_decode_triton(packed: Tensor, scales: Tensor, numel: int, block: int) -> Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    if numel:
        _sign_decode_kernel[_grid(numel)](packed, scales, out, numel, block, 1.0, ACC=False, T=TILE, **_OPTS)
    return out


def sign_accumulate_triton(out: Tensor, packed: Tensor, scales: Tensor, block: int, alpha: float) -> None:
    n = out.numel()
    if n:
        _sign_decode_kernel[_grid(n)](packed, scales, out, n, block, _alpha32(alpha), ACC=True, T=TILE, **_OPTS)


@triton.jit
def _sign_majority_kernel(stack_ptr, out_ptr, m, nbytes, NB: tl.constexpr):
    """Per bit, 1 iff at least half of the m rows have it. Traffic: reads m bytes, writes 1 per 8 bits."""
    pid = tl.program_id(0)
    byte_offs = pid.to(tl.int64) * NB + tl.arange(0, NB)
    mask = byte_offs < nbytes
    shifts = tl.arange(0, 8)
    ones = tl.zeros([NB, 8], dtype=tl.int32)
    for row in range(0, m):
        byte = tl.load(stack_ptr + row * nbytes + byte_offs, mask=mask, other=0).to(tl.int32)
        ones += (byte[:, None] >> shifts[None, :]) & 1
    bits = (2 * ones >= m).to(tl.int32)
    tl.store(out_ptr + byte_offs, tl.sum(bits * (1 << shifts)[None, :], axis=1).to(tl.uint8), mask=mask)


def sign_majority_triton(packed_stack: Tensor) -> Tensor:
    m, nbytes = packed_stack.shape
    out = torch.empty(nbytes, dtype=torch.uint8, device=packed_stack.device)
    if nbytes:
        _sign_majority_kernel[_grid(nbytes, TILE // 8)](packed_stack, out, m, nbytes, NB=TILE // 8, **_OPTS)
    return out


# --------------------------------------------------------------------------
# QSGD
# --------------------------------------------------------------------------
@triton.jit
def _qsgd_kernel(
    x_ptr,
    r_ptr,
    norms_ptr,
    words_ptr,
    n,
    bucket,
    seed,
    levels,
    rows_ptr,
    seeds_ptr,
    W: tl.constexpr,
    HAS_R: tl.constexpr,
    T: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    ROW_SEEDS: tl.constexpr,
):
    """Codes L + sign(a) * min(L, floor(L|a|/norm + u)) with u from Philox(seed, i // 4) word i % 4,
    OR-ed into 32-bit words of the little-endian code stream (fields never overlap, so the result
    does not depend on the order of the atomics), and the residual a - (code - L) * norm / L.

    Traffic: reads x, residual (8 B) and norms (cached), writes residual (4 B) and w/8 B:
    12 + w/8 B/elem; with :func:`_block_stat_kernel` first, 20 + w/8 B/elem. A stack's row i
    (ROW_SEEDS) draws from its own seed, seeds[i], and writes its own words (see qsgd_triton).
    """
    i, j = _row(rows_ptr, HAS_ROWS)
    x_ptr += i * n
    r_ptr += j * n
    norms_ptr += i * ((n + bucket - 1) // bucket)
    words_ptr += i * (((n * W + 7) // 8 + 3) // 4 + 1)
    if ROW_SEEDS:
        seed = tl.load(seeds_ptr + i)
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    a = _load_a(x_ptr, r_ptr, offs, mask, HAS_R)
    norm = tl.load(norms_ptr + offs // bucket, mask=mask, other=1.0)
    ctr = (offs // 4).to(tl.uint64)
    zero = tl.zeros([T], dtype=tl.uint32)
    c0, c1, c2, c3 = tl.philox(seed, (ctr & 0xFFFFFFFF).to(tl.uint32), (ctr >> 32).to(tl.uint32), zero, zero)
    lane = offs % 4
    word = tl.where(lane == 0, c0, tl.where(lane == 1, c1, tl.where(lane == 2, c2, c3)))
    u = (word >> 8).to(tl.float32) * (1.0 / 16777216.0)
    lv = levels.to(tl.float32)
    t = lv * tl.abs(a)
    t = t / norm
    t = t + u
    finite = (t == t) & (tl.abs(t) < float("inf"))
    q = tl.where(finite, tl.floor(t), 0.0)
    q = tl.minimum(q, lv).to(tl.int32)
    code = tl.where(a < 0, levels - q, levels + q)
    if HAS_R:
        value = (code - levels).to(tl.float32) * norm
        value = value / lv
        tl.store(r_ptr + offs, _to_storage(a - value, r_ptr.dtype.element_ty), mask=mask)
    bitpos = offs * W
    word_idx = bitpos // 32
    shift = (bitpos % 32).to(tl.uint64)
    field = code.to(tl.uint64) << shift
    lo = (field & 0xFFFFFFFF).to(tl.uint32).to(tl.int32, bitcast=True)
    hi = (field >> 32).to(tl.uint32).to(tl.int32, bitcast=True)
    tl.atomic_or(words_ptr + word_idx, lo, mask=mask & (lo != 0))
    tl.atomic_or(words_ptr + word_idx + 1, hi, mask=mask & (hi != 0))


def qsgd_triton(x: Tensor, residual: Tensor | None, levels: int, bucket: int, seed, rows=None):
    """One tensor ``[n]`` with one ``seed``, or every row of a stack ``[m, n]`` with its own seed
    (``seed``: m ints) in the same launches. Each row's codes go into its own 32-bit words (one
    spare word per row for a field that straddles the last), then are cut to the row's bytes."""
    m, n = _shape(x)
    width = qsgd_bits(levels)
    nbytes = (n * width + 7) // 8
    norms = torch.empty(*x.shape[:-1], triton.cdiv(n, bucket), dtype=torch.float32, device=x.device)
    words = torch.zeros(m, triton.cdiv(nbytes, 4) + 1, dtype=torch.int32, device=x.device)
    if n and m:
        r = residual if residual is not None else x
        has_r = residual is not None
        rows_t, has_rows = _rows_arg(x, rows)
        row_seeds = x.dim() == 2
        seeds_t = _host_ints(seed, x) if row_seeds else x
        _block_stat_kernel[(norms.shape[-1], m)](
            x, r, norms, n, bucket, rows_t, HAS_R=has_r, MODE=2, CHUNK=TILE, HAS_ROWS=has_rows, **_OPTS
        )
        _qsgd_kernel[(_grid(n)[0], m)](
            x, r, norms, words, n, bucket, 0 if row_seeds else seed, levels, rows_t, seeds_t,
            W=width, HAS_R=has_r, T=TILE, HAS_ROWS=has_rows, ROW_SEEDS=row_seeds, **_OPTS,
        )  # fmt: skip
    packed = words.view(torch.uint8)[:, :nbytes]
    return (packed.contiguous() if x.dim() == 2 else packed[0].clone()), norms


@triton.jit
def _qsgd_decode_kernel(
    packed_ptr,
    norms_ptr,
    out_ptr,
    n,
    nbytes,
    bucket,
    levels,
    alpha,
    ACC: tl.constexpr,
    W: tl.constexpr,
    T: tl.constexpr,
):
    """(code - L) * norm / L, or (ACC) out += alpha * that.

    Traffic: reads w/8 B (from up to 3 bytes per code, cached), writes 4 B; ACC also reads out.
    """
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    bitpos = offs * W
    first = bitpos // 8
    raw = tl.zeros([T], dtype=tl.int32)
    for j in tl.static_range(3):
        byte = tl.load(packed_ptr + first + j, mask=mask & (first + j < nbytes), other=0).to(tl.int32)
        raw = raw | (byte << (8 * j))
    code = (raw >> (bitpos % 8).to(tl.int32)) & ((1 << W) - 1)
    norm = tl.load(norms_ptr + offs // bucket, mask=mask, other=0.0)
    value = (code - levels).to(tl.float32) * norm
    _store_or_accumulate(out_ptr, offs, value / levels.to(tl.float32), mask, alpha, ACC)


def _qsgd_decode_launch(out, packed, norms, levels, bucket, alpha, acc: bool) -> None:
    n = out.numel()
    if n:
        _qsgd_decode_kernel[_grid(n)](
            packed, norms, out, n, packed.numel(), bucket, levels, alpha, ACC=acc, W=qsgd_bits(levels), T=TILE, **_OPTS
        )


def qsgd_decode_triton(packed: Tensor, norms: Tensor, numel: int, levels: int, bucket: int) -> Tensor:
    out = torch.empty(numel, dtype=torch.float32, device=packed.device)
    _qsgd_decode_launch(out, packed, norms, levels, bucket, 1.0, False)
    return out


def qsgd_accumulate_triton(out: Tensor, packed: Tensor, norms: Tensor, levels: int, bucket: int, alpha: float) -> None:
    _qsgd_decode_launch(out, packed, norms, levels, bucket, _alpha32(alpha), True)


@triton.jit
def _sign_accumulate_many_kernel(packed_ptr, scales_ptr, alphas_ptr, out_ptr, n, block, m, T: tl.constexpr):
    """out += sum_j alphas[j] * (scale * (+1 | -1)) of payload j = row j of packed [m, ceil(n/8)]
    and scales [m, nblocks]. Each entry takes the payloads' terms in order, each product rounded
    first, in a register: the bits of m sign_accumulate calls.

    Traffic: reads and writes out once (8 B/elem) and each payload's bit: 8 + m/8 B/elem (against
    8.125 m for one launch per payload).
    """
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    nbytes = ((n + 7) // 8).to(tl.int64)
    nblocks = ((n + block - 1) // block).to(tl.int64)
    shift = (offs % 8).to(tl.int32)
    for j in range(m):
        byte = tl.load(packed_ptr + j * nbytes + offs // 8, mask=mask, other=0).to(tl.int32)
        scale = tl.load(scales_ptr + j * nblocks + offs // block, mask=mask, other=0.0)
        value = tl.where(((byte >> shift) & 1) == 1, 1.0, -1.0) * scale
        acc = acc + value * tl.load(alphas_ptr + j)
    tl.store(out_ptr + offs, acc, mask=mask)


@triton.jit
def _qsgd_accumulate_many_kernel(
    packed_ptr,
    norms_ptr,
    alphas_ptr,
    out_ptr,
    n,
    nbytes,
    bucket,
    levels,
    m,
    W: tl.constexpr,
    T: tl.constexpr,
):
    """out += sum_j alphas[j] * (code - L) * norm / L of payload j = row j of packed [m, nbytes]
    and norms [m, nbuckets], in order, each product rounded first: the bits of m
    qsgd_accumulate calls. Traffic: 8 + m w/8 B/elem (reads and writes out once)."""
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < n
    acc = tl.load(out_ptr + offs, mask=mask, other=0.0)
    row_bytes = nbytes.to(tl.int64)
    row_norms = ((n + bucket - 1) // bucket).to(tl.int64)
    bitpos = offs * W
    first = bitpos // 8
    shift = (bitpos % 8).to(tl.int32)
    lv = levels.to(tl.float32)
    for j in range(m):
        raw = tl.zeros([T], dtype=tl.int32)
        for b in tl.static_range(3):
            byte = tl.load(
                packed_ptr + j * row_bytes + first + b, mask=mask & (first + b < nbytes), other=0
            ).to(tl.int32)
            raw = raw | (byte << (8 * b))
        code = (raw >> shift) & ((1 << W) - 1)
        norm = tl.load(norms_ptr + j * row_norms + offs // bucket, mask=mask, other=0.0)
        value = (code - levels).to(tl.float32) * norm
        value = value / lv
        acc = acc + value * tl.load(alphas_ptr + j)
    tl.store(out_ptr + offs, acc, mask=mask)


def _many(out: Tensor, sections, alphas) -> tuple[Tensor, Tensor, Tensor]:
    """The payloads' two sections as [m, ...] stacks on out's device, and the fp32 weights there
    (copied without a host synchronisation)."""
    first, second = (torch.stack(list(s)) for s in sections)
    return first, second, host_to_device(torch.tensor([_alpha32(a) for a in alphas], dtype=torch.float32), out)


def sign_accumulate_many_triton(out: Tensor, packed, scales, block: int, alphas) -> None:
    """Every payload in one launch: the stacks cost m * n/8 bytes to build, one pass over out
    saves 8 (m - 1) bytes per entry."""
    n, m = out.numel(), len(packed)
    if n and m:
        packed, scales, alphas = _many(out, (packed, scales), alphas)
        _sign_accumulate_many_kernel[_grid(n)](packed, scales, alphas, out, n, block, m, T=TILE, **_OPTS)


def qsgd_accumulate_many_triton(out: Tensor, packed, norms, levels: int, bucket: int, alphas) -> None:
    n, m = out.numel(), len(packed)  # as sign_accumulate_many_triton
    if n and m:
        nbytes = packed[0].numel()
        packed, norms, alphas = _many(out, (packed, norms), alphas)
        _qsgd_accumulate_many_kernel[_grid(n)](
            packed, norms, alphas, out, n, nbytes, bucket, levels, m, W=qsgd_bits(levels), T=TILE, **_OPTS
        )


# --------------------------------------------------------------------------
# sparse accumulation
# --------------------------------------------------------------------------
@triton.jit
def _sparse_accumulate_kernel(out_ptr, idx_ptr, val_ptr, m, alpha, T: tl.constexpr):
    """out[idx] += alpha * v with fp32 atomics. Traffic: reads idx + v, one atomic RMW of 4 B per entry.

    Exact (equal to the reference) when the indices are distinct, as in one top-k payload; with
    duplicates, fp32 addition order follows the atomics' order on a GPU.
    """
    offs = tl.program_id(0).to(tl.int64) * T + tl.arange(0, T)
    mask = offs < m
    idx = tl.load(idx_ptr + offs, mask=mask, other=0)
    v = tl.load(val_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.atomic_add(out_ptr + idx, v * alpha, mask=mask)


def sparse_accumulate_triton(out: Tensor, indices: Tensor, values: Tensor, alpha: float) -> None:
    m = indices.numel()
    if m == 0:
        return
    check_indices(indices, out.numel())  # one host sync, as in the reference
    _sparse_accumulate_kernel[_grid(m)](out, indices, values, m, _alpha32(alpha), T=TILE, **_OPTS)


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


# --------------------------------------------------------------------------
# many clients: one [m, n] stack through the same kernels, every row in the same launches (a
# [tiles, m] grid: program_id(1) is the row), each row with its own residual row and outputs
# --------------------------------------------------------------------------
MAX_GRID_ROWS = 65535  # a CUDA grid's second dimension: a taller stack goes in slices of this many rows


def _in_slices(op, x: Tensor, residual: Tensor | None, rows, per_row=None) -> tuple[Tensor, ...]:
    """``op(x_slice, residual_or_its_slice, rows_slice[, per_row_slice])`` over slices of at most
    MAX_GRID_ROWS rows, outputs concatenated (one slice, the usual case: one call)."""
    m = x.shape[0]
    if m <= MAX_GRID_ROWS:
        return op(x, residual, rows) if per_row is None else op(x, residual, rows, per_row)
    parts = []
    for s in range(0, m, MAX_GRID_ROWS):
        e = min(m, s + MAX_GRID_ROWS)
        r = residual if residual is None or rows is not None else residual[s:e]
        args = (x[s:e], r, None if rows is None else list(rows)[s:e])
        parts.append(op(*args) if per_row is None else op(*args, list(per_row)[s:e]))
    return tuple(torch.cat(outs) for outs in zip(*parts))


def topk_ef_rows_triton(x: Tensor, residual: Tensor | None, k: int, index_dtype: torch.dtype, rows=None):
    return _in_slices(lambda x, r, rows: topk_ef_triton(x, r, k, index_dtype, rows), x, residual, rows)


def sign_ef_rows_triton(x: Tensor, residual: Tensor | None, block: int, l2: bool, rows=None):
    return _in_slices(lambda x, r, rows: sign_ef_triton(x, r, block, l2, rows), x, residual, rows)


def qsgd_rows_triton(x: Tensor, residual: Tensor | None, levels: int, bucket: int, seeds, rows=None):
    op = lambda x, r, rows, seeds: qsgd_triton(x, r, levels, bucket, seeds, rows)  # noqa: E731
    return _in_slices(op, x, residual, rows, seeds)


def randk_ef_rows_triton(x: Tensor, residual: Tensor | None, seeds, k: int, rows=None):
    # Rand-k has no kernel of its own on the GPU: the positions come from the host op (as the
    # receiver's do) and the add, gather and zeroing are device-side torch ops, queued with no
    # host synchronisation.
    return randk_ef_rows(x, residual, seeds, k, rows)


# --------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------
_registered: dict[str, torch.library.Library] = {}


def register(dispatch_key: str, skip: tuple[str, ...] = ()) -> None:
    """Serve the fedcomp ops (except ``skip``) on ``dispatch_key`` ("CUDA", or "CPU" under
    TRITON_INTERPRET=1) with these kernels."""
    if dispatch_key in _registered:
        return
    from ._library import SCHEMAS

    lib = torch.library.Library("fedcomp", "IMPL")
    for name in SCHEMAS:
        if name not in skip:
            lib.impl(name, globals()[f"{name}_triton"], dispatch_key)
    _registered[dispatch_key] = lib


# --------------------------------------------------------------------------
# the configurations the wrappers launch (what the AOT compile check compiles)
# --------------------------------------------------------------------------
def _configs() -> list[tuple[str, object, dict, dict, dict]]:
    """(name, kernel, signature, constexprs, options) for every launch configuration used above."""
    f32, i32, i64, i64p = "*fp32", "i32", "i64", "*i64"
    out = []
    # (has_r, HAS_ROWS): no residual; a residual row per row of x; the residual rows named by rows
    for has_r, has_rows in ((False, False), (True, False), (True, True)):
        tag = f"has_r={int(has_r)},rows={int(has_rows)}"
        for mode in (0, 1, 2):
            out.append(
                (
                    f"block_stat[mode={mode},{tag}]",
                    _block_stat_kernel,
                    {"x_ptr": f32, "r_ptr": f32, "out_ptr": f32, "n": i64, "block": i64, "rows_ptr": i64p},
                    {"HAS_R": has_r, "MODE": mode, "CHUNK": TILE, "HAS_ROWS": has_rows},
                )
            )
        out.append(
            (
                f"sign_codes[{tag}]",
                _sign_codes_kernel,
                {
                    "x_ptr": f32,
                    "r_ptr": f32,
                    "scales_ptr": f32,
                    "packed_ptr": "*u8",
                    "n": i64,
                    "block": i64,
                    "rows_ptr": i64p,
                },
                {"HAS_R": has_r, "T": TILE, "HAS_ROWS": has_rows},
            )
        )
        for l2 in (False, True):
            out.append(
                (
                    f"sign_ef_fused[l2={int(l2)},{tag},BLOCK=4096]",
                    _sign_ef_fused_kernel,
                    {
                        "x_ptr": f32,
                        "r_ptr": f32,
                        "scales_ptr": f32,
                        "packed_ptr": "*u8",
                        "n": i64,
                        "block": i64,
                        "rows_ptr": i64p,
                    },
                    {"HAS_R": has_r, "L2": l2, "BLOCK": FUSED_MAX_BLOCK, "HAS_ROWS": has_rows},
                    {"num_warps": FUSED_WARPS},
                )
            )
        for w in (2, 4, 16):
            for row_seeds in (True,) if has_rows else (False, True):  # one seed per row: stacks only
                out.append(
                    (
                        f"qsgd[w={w},{tag},row_seeds={int(row_seeds)}]",
                        _qsgd_kernel,
                        {
                            "x_ptr": f32,
                            "r_ptr": f32,
                            "norms_ptr": f32,
                            "words_ptr": "*i32",
                            "n": i64,
                            "bucket": i64,
                            "seed": "u64",
                            "levels": i32,
                            "rows_ptr": i64p,
                            "seeds_ptr": i64p,
                        },
                        {"W": w, "HAS_R": has_r, "T": TILE, "HAS_ROWS": has_rows, "ROW_SEEDS": row_seeds},
                    )
                )
        out.append(
            (
                f"topk_keys[{tag}]",
                _topk_keys_kernel,
                {"x_ptr": f32, "r_ptr": f32, "keys_ptr": "*i32", "n": i64, "rows_ptr": i64p},
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
                        "a_ptr": f32,
                        "r_ptr": f32,
                        "n": i64,
                        "state_ptr": "*i32",
                        "cap": i64,
                        "offsets_ptr": "*i32",
                        "ntiles": i64,
                        "val_ptr": f32,
                        "idx_ptr": "*i64",
                        "rows_ptr": i64p,
                    },
                    {"HAS_R": has_r, "AT_LEAST": at_least, "T": TILE, "HAS_ROWS": has_rows},
                )
            )
    for acc in (False, True):
        out.append(
            (
                "sign_accumulate" if acc else "sign_decode",
                _sign_decode_kernel,
                {"packed_ptr": "*u8", "scales_ptr": f32, "out_ptr": f32, "n": i64, "block": i64, "alpha": "fp32"},
                {"ACC": acc, "T": TILE},
            )
        )
    out.append(
        (
            "sign_majority",
            _sign_majority_kernel,
            {"stack_ptr": "*u8", "out_ptr": "*u8", "m": i64, "nbytes": i64},
            {"NB": TILE // 8},
        )
    )
    out.append(
        (
            "sign_accumulate_many",
            _sign_accumulate_many_kernel,
            {"packed_ptr": "*u8", "scales_ptr": f32, "alphas_ptr": f32, "out_ptr": f32, "n": i64, "block": i64,
             "m": i32},
            {"T": TILE},
        )
    )  # fmt: skip
    for w in (2, 4, 16):
        out.append(
            (
                f"qsgd_accumulate_many[w={w}]",
                _qsgd_accumulate_many_kernel,
                {"packed_ptr": "*u8", "norms_ptr": f32, "alphas_ptr": f32, "out_ptr": f32, "n": i64, "nbytes": i64,
                 "bucket": i64, "levels": i32, "m": i32},
                {"W": w, "T": TILE},
            )
        )  # fmt: skip
        for acc in (False, True):
            out.append(
                (
                    f"qsgd_{'accumulate' if acc else 'decode'}[w={w}]",
                    _qsgd_decode_kernel,
                    {
                        "packed_ptr": "*u8",
                        "norms_ptr": f32,
                        "out_ptr": f32,
                        "n": i64,
                        "nbytes": i64,
                        "bucket": i64,
                        "levels": i32,
                        "alpha": "fp32",
                    },
                    {"ACC": acc, "W": w, "T": TILE},
                )
            )
    out.append(
        (
            "sparse_accumulate",
            _sparse_accumulate_kernel,
            {"out_ptr": f32, "idx_ptr": "*i64", "val_ptr": f32, "m": i64, "alpha": "fp32"},
            {"T": TILE},
        )
    )
    out.append(
        (
            "gather_keys",
            _gather_keys_kernel,
            {"keys_ptr": "*i32", "sample_ptr": "*i32", "n": i64, "s": i64, "seed": "u64"},
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
                {"keys_ptr": "*i32", "n": i64, "state_ptr": "*i32", "hist_ptr": "*i32"},
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
                {"keys_ptr": "*i32", "n": i64, "state_ptr": "*i32", "counts_ptr": "*i32", "ntiles": i64},
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
                    "ntiles": i64,
                    "state_ptr": "*i32",
                    "cap": i64,
                    "total_ptr": "*i64",
                },
                {"AT_LEAST": at_least, "CHUNK": SCAN_CHUNK},
            )
        )
    return [entry if len(entry) == 5 else (*entry, {}) for entry in out]


LAUNCH_CONFIGS = _configs()
HOT_KERNELS = (
    "sign_ef_fused",
    "sign_codes",
    "qsgd[",
    "topk_keys",
    "histogram",
    "compact",
    "sign_decode",
    "qsgd_decode",
    "sparse_accumulate",
    "sign_accumulate",
    "qsgd_accumulate",
)
