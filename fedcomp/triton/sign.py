"""Sign quantisation (signSGD / EF-SignSGD): one scale per block, one bit per entry; decode,
accumulate (one payload or many) and the bitwise majority vote."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._common import (
    _OPTS,
    F32,
    FUSED_MAX_BLOCK,
    FUSED_WARPS,
    I32,
    I64,
    I64P,
    RESIDUAL_VARIANTS,
    TILE,
    _alpha32,
    _block_stat_kernel,
    _grid,
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


def sign_accumulate_many_triton(out: Tensor, packed, scales, block: int, alphas) -> None:
    """Every payload in one launch: the stacks cost m * n/8 bytes to build, one pass over out
    saves 8 (m - 1) bytes per entry."""
    n, m = out.numel(), len(packed)
    if n and m:
        packed, scales, alphas = _many(out, (packed, scales), alphas)
        _sign_accumulate_many_kernel[_grid(n)](packed, scales, alphas, out, n, block, m, T=TILE, **_OPTS)


def sign_ef_rows_triton(x: Tensor, residual: Tensor | None, block: int, l2: bool, rows=None):
    return _in_slices(lambda x, r, rows: sign_ef_triton(x, r, block, l2, rows), x, residual, rows)


def launch_configs() -> list[tuple]:
    """(name, kernel, signature, constexprs[, options]) of every sign launch above."""
    out = []
    for has_r, has_rows in RESIDUAL_VARIANTS:
        tag = variant_tag(has_r, has_rows)
        codes_sig = {
            "x_ptr": F32,
            "r_ptr": F32,
            "scales_ptr": F32,
            "packed_ptr": "*u8",
            "n": I64,
            "block": I64,
            "rows_ptr": I64P,
        }
        constexprs = {"HAS_R": has_r, "T": TILE, "HAS_ROWS": has_rows}
        out.append((f"sign_codes[{tag}]", _sign_codes_kernel, codes_sig, constexprs))
        for l2 in (False, True):
            out.append(
                (
                    f"sign_ef_fused[l2={int(l2)},{tag},BLOCK=4096]",
                    _sign_ef_fused_kernel,
                    codes_sig,
                    {"HAS_R": has_r, "L2": l2, "BLOCK": FUSED_MAX_BLOCK, "HAS_ROWS": has_rows},
                    {"num_warps": FUSED_WARPS},
                )
            )
    for acc in (False, True):
        out.append(
            (
                "sign_accumulate" if acc else "sign_decode",
                _sign_decode_kernel,
                {"packed_ptr": "*u8", "scales_ptr": F32, "out_ptr": F32, "n": I64, "block": I64, "alpha": "fp32"},
                {"ACC": acc, "T": TILE},
            )
        )
    out.append(
        (
            "sign_majority",
            _sign_majority_kernel,
            {"stack_ptr": "*u8", "out_ptr": "*u8", "m": I64, "nbytes": I64},
            {"NB": TILE // 8},
        )
    )
    out.append(
        (
            "sign_accumulate_many",
            _sign_accumulate_many_kernel,
            {"packed_ptr": "*u8", "scales_ptr": F32, "alphas_ptr": F32, "out_ptr": F32, "n": I64, "block": I64,
             "m": I32},
            {"T": TILE},
        )
    )  # fmt: skip
    return out
