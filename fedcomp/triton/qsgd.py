"""QSGD: stochastic quantisation to 2L+1 levels per bucket (Philox uniforms), its decode and
accumulate (one payload or many)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..reference import qsgd_bits
from ._common import (
    _OPTS,
    F32,
    I32,
    I64,
    I64P,
    RESIDUAL_VARIANTS,
    TILE,
    _alpha32,
    _block_stat_kernel,
    _grid,
    _host_ints,
    _in_slices,
    _load_a,
    _many,
    _row,
    _rows_arg,
    _shape,
    _store_or_accumulate,
    _to_storage,
    variant_tag,
)


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
            byte = tl.load(packed_ptr + j * row_bytes + first + b, mask=mask & (first + b < nbytes), other=0).to(
                tl.int32
            )
            raw = raw | (byte << (8 * b))
        code = (raw >> shift) & ((1 << W) - 1)
        norm = tl.load(norms_ptr + j * row_norms + offs // bucket, mask=mask, other=0.0)
        value = (code - levels).to(tl.float32) * norm
        value = value / lv
        acc = acc + value * tl.load(alphas_ptr + j)
    tl.store(out_ptr + offs, acc, mask=mask)


def qsgd_accumulate_many_triton(out: Tensor, packed, norms, levels: int, bucket: int, alphas) -> None:
    n, m = out.numel(), len(packed)  # as sign_accumulate_many_triton
    if n and m:
        nbytes = packed[0].numel()
        packed, norms, alphas = _many(out, (packed, norms), alphas)
        _qsgd_accumulate_many_kernel[_grid(n)](
            packed, norms, alphas, out, n, nbytes, bucket, levels, m, W=qsgd_bits(levels), T=TILE, **_OPTS
        )


def qsgd_rows_triton(x: Tensor, residual: Tensor | None, levels: int, bucket: int, seeds, rows=None):
    op = lambda x, r, rows, seeds: qsgd_triton(x, r, levels, bucket, seeds, rows)  # noqa: E731
    return _in_slices(op, x, residual, rows, seeds)


def launch_configs() -> list[tuple]:
    """(name, kernel, signature, constexprs) of every QSGD launch above."""
    out = []
    for has_r, has_rows in RESIDUAL_VARIANTS:
        tag = variant_tag(has_r, has_rows)
        for w in (2, 4, 16):
            for row_seeds in (True,) if has_rows else (False, True):  # one seed per row: stacks only
                out.append(
                    (
                        f"qsgd[w={w},{tag},row_seeds={int(row_seeds)}]",
                        _qsgd_kernel,
                        {
                            "x_ptr": F32,
                            "r_ptr": F32,
                            "norms_ptr": F32,
                            "words_ptr": "*i32",
                            "n": I64,
                            "bucket": I64,
                            "seed": "u64",
                            "levels": I32,
                            "rows_ptr": I64P,
                            "seeds_ptr": I64P,
                        },
                        {"W": w, "HAS_R": has_r, "T": TILE, "HAS_ROWS": has_rows, "ROW_SEEDS": row_seeds},
                    )
                )
    for w in (2, 4, 16):
        out.append(
            (
                f"qsgd_accumulate_many[w={w}]",
                _qsgd_accumulate_many_kernel,
                {"packed_ptr": "*u8", "norms_ptr": F32, "alphas_ptr": F32, "out_ptr": F32, "n": I64, "nbytes": I64,
                 "bucket": I64, "levels": I32, "m": I32},
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
                        "norms_ptr": F32,
                        "out_ptr": F32,
                        "n": I64,
                        "nbytes": I64,
                        "bucket": I64,
                        "levels": I32,
                        "alpha": "fp32",
                    },
                    {"ACC": acc, "W": w, "T": TILE},
                )
            )
    return out
