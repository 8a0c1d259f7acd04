"""What every family's Triton kernels share: launch constants, host helpers, the device helpers
(magnitude keys, storage rounding, row addressing, the fused load of x + residual), the block
statistic of sign and QSGD, and the slicing of tall stacks."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")  # every launch passes enable_fp_fusion=False anyway

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from torch import Tensor  # noqa: E402

from .._host import host_to_device  # noqa: E402

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


@triton.jit
def _store_or_accumulate(out_ptr, offs, value, mask, alpha, ACC: tl.constexpr):
    """ACC: out += alpha * value (product rounded first: fp fusion is off); else out = value."""
    if ACC:
        value = tl.load(out_ptr + offs, mask=mask, other=0.0) + value * alpha
    tl.store(out_ptr + offs, value, mask=mask)


def _alpha32(alpha: float) -> float:
    return float(torch.tensor(alpha, dtype=torch.float32))


def _many(out: Tensor, sections, alphas) -> tuple[Tensor, Tensor, Tensor]:
    """The payloads' two sections as [m, ...] stacks on out's device, and the fp32 weights there
    (copied without a host synchronisation)."""
    first, second = (torch.stack(list(s)) for s in sections)
    return first, second, host_to_device(torch.tensor([_alpha32(a) for a in alphas], dtype=torch.float32), out)


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


# --------------------------------------------------------------------------
# launch configurations (what the AOT compile check compiles): each family lists its own
# --------------------------------------------------------------------------
F32, I32, I64, I64P = "*fp32", "i32", "i64", "*i64"
# (has_r, HAS_ROWS): no residual; a residual row per row of x; the residual rows named by rows
RESIDUAL_VARIANTS = ((False, False), (True, False), (True, True))


def variant_tag(has_r: bool, has_rows: bool) -> str:
    return f"has_r={int(has_r)},rows={int(has_rows)}"


def launch_configs() -> list[tuple]:
    """(name, kernel, signature, constexprs[, options]) of the block statistic."""
    return [
        (
            f"block_stat[mode={mode},{variant_tag(has_r, has_rows)}]",
            _block_stat_kernel,
            {"x_ptr": F32, "r_ptr": F32, "out_ptr": F32, "n": I64, "block": I64, "rows_ptr": I64P},
            {"HAS_R": has_r, "MODE": mode, "CHUNK": TILE, "HAS_ROWS": has_rows},
        )
        for has_r, has_rows in RESIDUAL_VARIANTS
        for mode in (0, 1, 2)
    ]
