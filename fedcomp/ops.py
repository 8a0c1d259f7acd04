"""Public, checked entry points to the fedcomp ops.

Each function validates its arguments (``TypeError`` for a wrong type or
dtype, ``ValueError`` for a wrong value, shape, device or layout, each naming
the argument and what was expected), picks the backend for the tensors'
device (:mod:`fedcomp._backend`), and calls ``torch.ops.fedcomp.<op>``.

Shapes and dtypes
-----------------
``x``: 1-D contiguous float32, float16 or bfloat16 tensor of ``n`` entries.
``residual``: ``None`` (no error feedback) or a tensor like ``x`` (same shape,
dtype and device) that the op updates in place. Error-feedback invariant:
``decode(payload) + residual_after == x + residual_before``, exactly for
top-k in fp32 (values and residual are rounded to the storage dtype for
fp16/bf16), up to fp32 rounding for the quantizers.

Non-finite input: ``topk_ef`` orders NaN above +Inf above every finite value,
so non-finite entries are sent first rather than hidden in the residual;
``sign_ef``/``qsgd`` propagate NaN/Inf into the block scale, so the decoded
block is NaN. No op raises on NaN (that would need a host synchronisation).
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from . import _backend, _library  # noqa: F401  (_library defines the ops)
from .reference import qsgd_bits

__all__ = [
    "topk_ef",
    "topk_threshold_ef",
    "sign_ef",
    "sign_decode",
    "sign_majority",
    "qsgd",
    "qsgd_decode",
    "sparse_accumulate",
    "sign_accumulate",
    "qsgd_accumulate",
]

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int64, torch.int32)
MAX_LEVELS = 1 << 15
_ops = torch.ops.fedcomp


# --------------------------------------------------------------------------
# argument checks
# --------------------------------------------------------------------------
def _names(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def _check_tensor(name: str, t, dtypes, dim: int = 1) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_names(dtypes)}; got {str(t.dtype).replace('torch.', '')}")
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D; got shape {tuple(t.shape)} (use .reshape(-1) to flatten)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous; call .contiguous() first")


def _check_residual(residual, x: Tensor, rows=None) -> None:
    """``rows``: row ``i`` of ``x`` ``[m, n]`` uses row ``rows[i]`` of a ``[K, n]`` residual."""
    if rows is not None:
        if residual is None or x.dim() != 2:
            raise ValueError("rows needs x of shape [m, n] and a residual of shape [K, n]")
        if isinstance(rows, (str, bytes, Tensor)) or not hasattr(rows, "__len__"):
            raise TypeError(f"rows must be a list of ints; got {type(rows).__name__}")
        rows = [_check_int("rows entry", j, 0) for j in rows]
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have the dtype of x ({x.dtype}); got {residual.dtype}")
    if rows is not None:
        if residual.dim() != 2 or residual.shape[1] != x.shape[1]:
            raise ValueError(f"residual must be [K, {x.shape[1]}] with rows; got {tuple(residual.shape)}")
        if len(rows) != x.shape[0] or len(set(rows)) != len(rows) or max(rows) >= residual.shape[0]:
            raise ValueError(
                f"rows must be {x.shape[0]} distinct ints in [0, {residual.shape[0]}), one per row of x; got {rows}"
            )
    elif residual.shape != x.shape:
        raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got {tuple(residual.shape)}")
    if residual.device != x.device:
        raise ValueError(f"residual must be on the device of x ({x.device}); got {residual.device}")
    if not residual.is_contiguous():
        raise ValueError("residual must be contiguous; call .contiguous() first")
    if residual.numel() and residual.data_ptr() == x.data_ptr():
        raise ValueError("residual must not share memory with x")


def _int_list(rows) -> list[int] | None:
    return None if rows is None else [int(j) for j in rows]


def _check_int(name: str, value, lo: int, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int; got {type(value).__name__}")
    value = int(value)
    if value < lo or (hi is not None and value > hi):
        bound = f"in [{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise ValueError(f"{name} must be {bound}; got {value}")
    return value


def _block(block, n: int, name: str = "block") -> int:
    """``None`` means one block holding all ``n`` entries."""
    if block is None:
        return max(n, 1)
    return _check_int(name, block, 1)


def _seed(seed, generator) -> int:
    if seed is not None and generator is not None:
        raise ValueError("pass seed or generator, not both")
    if seed is not None:
        return _check_int("seed", seed, 0, (1 << 63) - 1)
    return int(torch.randint(0, 1 << 62, (1,), generator=generator).item())


def _input(x, residual, *, rows: bool = False, residual_rows=None) -> Tensor:
    """``rows``: ``x`` may also be a ``[m >= 1, n]`` stack (one client per row);
    ``residual_rows``: see :func:`_check_residual`."""
    if rows and isinstance(x, Tensor) and x.dim() == 2:
        _check_tensor("x", x, FLOAT_DTYPES, dim=2)
        if x.shape[0] < 1:
            raise ValueError(f"x must have at least one row (client); got shape {tuple(x.shape)}")
    else:
        if rows and isinstance(x, Tensor) and x.dim() != 1:
            raise ValueError(f"x must be 1-D, or 2-D [clients, n]; got shape {tuple(x.shape)}")
        _check_tensor("x", x, FLOAT_DTYPES)
    _check_residual(residual, x, residual_rows)
    _backend.backend_of(x)
    return x.detach()


# --------------------------------------------------------------------------
# top-k
# --------------------------------------------------------------------------
def topk_ef(
    x: Tensor, residual: Tensor | None, k: int, *, index_dtype: torch.dtype = torch.int64, rows=None
) -> tuple[Tensor, Tensor]:
    """Exact top-k by magnitude with error feedback.

    ``a = x + residual`` (fp32, rounded to ``x.dtype``); picks the ``k`` entries
    of largest ``|a|``, ties broken by the lower index.

    Args:
        x: ``[n]`` float32/float16/bfloat16, contiguous; or ``[m, n]``: ``m`` clients'
            updates in one call (one parallel region on the CPU), each row exactly as the
            1-D op.
        residual: like ``x`` (``[n]`` or ``[m, n]``, one residual row per client) or
            ``None``; set in place to ``a`` with the picked entries zeroed.
        k: number of entries to keep per row, ``0 <= k <= n``.
        index_dtype: ``torch.int64`` (default) or ``torch.int32``.
        rows: with a stack, optionally ``m`` distinct ints: row ``i`` of ``x`` then uses row
            ``rows[i]`` of a ``[K, n]`` residual (many clients' residuals kept in one buffer,
            updated in place with no gather or write-back copy).

    Returns:
        ``(values [k] x.dtype, indices [k] index_dtype)`` (``[m, k]`` each for a stack),
        indices sorted ascending, ``values = a[indices]``.
    """
    x = _input(x, residual, rows=True, residual_rows=rows)
    k = _check_int("k", k, 0, x.shape[-1])
    if index_dtype not in INDEX_DTYPES:
        raise TypeError(f"index_dtype must be {_names(INDEX_DTYPES)}; got {index_dtype}")
    if index_dtype == torch.int32 and x.shape[-1] > 2**31 - 1:
        raise ValueError(f"index_dtype=int32 cannot index {x.shape[-1]} entries; use int64")
    if x.dim() == 2:
        return _ops.topk_ef_rows(x, residual, k, index_dtype, _int_list(rows))
    return _ops.topk_ef(x, residual, k, index_dtype)


def topk_threshold_ef(
    x: Tensor,
    residual: Tensor | None,
    k: int,
    *,
    capacity: int | None = None,
    sample_size: int = 65536,
    seed: int = 0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Approximate top-k: threshold estimated from a sample, fixed-capacity output.

    ``sample_size`` positions are drawn with Philox(``seed``); the threshold ``t`` is
    the ``ceil(k * sample_size / n)``-th largest ``|a|`` among them; entries with
    ``|a| >= t`` are kept in index order until ``capacity`` is full. Entries not kept
    (below ``t``, or past ``capacity``) stay in ``residual``. No host synchronisation.

    Args:
        x: as in :func:`topk_ef`.
        residual: as in :func:`topk_ef`.
        k: target number of entries, ``0 <= k <= n``.
        capacity: size of the output buffers (default ``min(n, 2k)``).
        sample_size: number of sampled positions, ``>= 1``.
        seed: Philox seed of the sample positions, ``0 <= seed < 2**63``.

    Returns:
        ``(values [capacity] x.dtype, indices [capacity] int64, count [] int64)``; slots
        ``>= count`` hold value 0 at index 0 (harmless to :func:`sparse_accumulate`).
    """
    x = _input(x, residual)
    n = x.numel()
    k = _check_int("k", k, 0, n)
    capacity = min(n, 2 * k) if capacity is None else _check_int("capacity", capacity, 0, n)
    sample_size = _check_int("sample_size", sample_size, 1)
    seed = _check_int("seed", seed, 0, (1 << 63) - 1)
    return _ops.topk_threshold_ef(x, residual, k, capacity, sample_size, seed)


# --------------------------------------------------------------------------
# sign
# --------------------------------------------------------------------------
def sign_ef(
    x: Tensor, residual: Tensor | None, block: int | None = None, scale: str = "mean", *, rows=None
) -> tuple[Tensor, Tensor]:
    """1-bit sign quantization with per-block scales and error feedback.

    ``a = x + residual`` (fp32). Per block of ``block`` contiguous entries (the last
    may be short; ``None``: one block) ``scale_b = mean(|a_b|)`` (``scale="l2"``:
    ``||a_b||_2 / sqrt(n_b)``). Bit ``i`` is ``a_i >= 0``, stored as bit ``i % 8`` of
    byte ``i // 8``. ``residual <- a - scale_b * (+1 | -1)``.

    ``x`` may be an ``[m, n]`` stack of ``m`` clients' updates (with an ``[m, n]`` residual,
    or a ``[K, n]`` residual and ``rows``, as in :func:`topk_ef`): each row gets exactly the
    1-D op, in one call.

    Returns:
        ``(packed [ceil(n/8)] uint8, scales [ceil(n/block)] float32)``; for a stack
        ``[m, ceil(n/8)]`` and ``[m, ceil(n/block)]``.
    """
    x = _input(x, residual, rows=True, residual_rows=rows)
    block = _block(block, x.shape[-1])
    if scale not in ("mean", "l2"):
        raise ValueError(f"scale must be 'mean' or 'l2'; got {scale!r}")
    if x.dim() == 2:
        return _ops.sign_ef_rows(x, residual, block, scale == "l2", _int_list(rows))
    return _ops.sign_ef(x, residual, block, scale == "l2")


# --------------------------------------------------------------------------
# rand-k
# --------------------------------------------------------------------------
def randk_ef(x: Tensor, residual: Tensor | None, k: int, seed, *, rows=None) -> tuple[Tensor, Tensor]:
    """Rand-k with error feedback: the ``k`` positions of ``seed`` (those of
    :func:`fedcomp.wire.randk_indices`, which a receiver regenerates from the seed alone),
    ``a = x + residual`` (rounded to ``x.dtype``), ``values = a[positions]``, and ``residual``
    set in place to ``a`` with the positions zeroed.

    Args:
        x: ``[n]`` float32/float16/bfloat16, contiguous, with an int ``seed``; or ``[m, n]``
            with ``m`` seeds, one per row (one call, one parallel region on the CPU).
        residual: like ``x``, or ``None``; with a stack, a ``[K, n]`` residual and ``rows``
            as in :func:`topk_ef`.
        k: positions per row, ``0 <= k <= n``.
        seed: ``0 <= seed < 2**63`` (a list of them for a stack).

    Returns:
        ``(values [k] x.dtype, positions [k] int64)``, ascending positions (``[m, k]`` each
        for a stack).
    """
    x = _input(x, residual, rows=True, residual_rows=rows)
    n = x.shape[-1]
    k = _check_int("k", k, 0, n)
    if n >= 1 << 62:
        raise ValueError(f"x must have fewer than 2**62 entries per row; got {n}")
    one = x.dim() == 1
    seeds = [seed] if one else seed
    if (
        isinstance(seeds, (str, bytes, Tensor))
        or not hasattr(seeds, "__len__")
        or len(seeds) != (1 if one else x.shape[0])
    ):
        raise ValueError(f"seed must be an int for x of shape [n], or {x.shape[0]} ints for x of shape [m, n]")
    seeds = [_check_int("seed", s, 0, (1 << 63) - 1) for s in seeds]
    if one:
        values, positions = _ops.randk_ef_rows(x[None], None if residual is None else residual[None], seeds, k, None)
        return values[0], positions[0]
    return _ops.randk_ef_rows(x, residual, seeds, k, _int_list(rows))


def _check_stream(packed, scales, numel, block, width: int, scales_name: str) -> tuple[int, int]:
    _check_tensor("packed", packed, (torch.uint8,))
    _check_tensor(scales_name, scales, (torch.float32,))
    numel = _check_int("numel", numel, 0)
    block = _block(block, numel)
    want = (numel * width + 7) // 8
    if packed.numel() != want:
        raise ValueError(f"packed must hold {want} bytes for numel={numel}; got {packed.numel()}")
    nblocks = -(-numel // block)
    if scales.numel() != nblocks:
        raise ValueError(
            f"{scales_name} must hold {nblocks} entries for numel={numel}, block={block}; got {scales.numel()}"
        )
    if scales.device != packed.device:
        raise ValueError(f"{scales_name} must be on the device of packed ({packed.device}); got {scales.device}")
    _backend.backend_of(packed)
    return numel, block


def sign_decode(packed: Tensor, scales: Tensor, numel: int, block: int | None = None) -> Tensor:
    """Dense ``[numel]`` float32: ``scale_b * (+1 if bit else -1)``.

    Args:
        packed: ``[ceil(numel/8)]`` uint8 from :func:`sign_ef`.
        scales: ``[ceil(numel/block)]`` float32.
        numel: number of entries.
        block: the block size given to :func:`sign_ef` (``None``: one block).
    """
    numel, block = _check_stream(packed, scales, numel, block, 1, "scales")
    return _ops.sign_decode(packed, scales, numel, block)


def sign_majority(packed_stack: Tensor) -> Tensor:
    """Bitwise majority vote (signSGD with majority vote) over ``m`` packed sign vectors.

    Args:
        packed_stack: ``[m, nbytes]`` uint8, ``m >= 1``, one packed sign vector per row.

    Returns:
        ``[nbytes]`` uint8 where each bit is 1 iff at least half of the rows have it set
        (ties give 1).
    """
    _check_tensor("packed_stack", packed_stack, (torch.uint8,), dim=2)
    if packed_stack.shape[0] < 1:
        raise ValueError("packed_stack must have at least one row")
    _backend.backend_of(packed_stack)
    return _ops.sign_majority(packed_stack)


# --------------------------------------------------------------------------
# QSGD
# --------------------------------------------------------------------------
def qsgd(
    x: Tensor,
    residual: Tensor | None = None,
    levels: int = 4,
    bucket: int | None = 512,
    *,
    seed: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Unbiased stochastic quantization (QSGD), bit-packed, optionally with error feedback.

    ``a = x + residual`` (fp32). Per bucket ``norm_b = ||a_b||_2``; ``q_i =
    min(L, floor(L * |a_i| / norm_b + u_i))`` with ``u_i`` from Philox(seed, i); the code
    ``L + sign(a_i) q_i`` takes ``2L+1`` values, stored in ``ceil(log2(2L+1))`` bits.
    ``E[qsgd_decode(...)] = a``. ``residual <- a - decode``.

    Args:
        x: as in :func:`topk_ef`.
        residual: as in :func:`topk_ef`.
        levels: ``L``, ``1 <= L <= 32768``.
        bucket: entries per bucket (``None``: one bucket).
        seed: Philox seed; if ``None`` one is drawn from ``generator`` (or torch's default).

    Returns:
        ``(packed [ceil(n * bits / 8)] uint8, norms [ceil(n/bucket)] float32)``.
    """
    x = _input(x, residual)
    levels = _check_int("levels", levels, 1, MAX_LEVELS)
    bucket = _block(bucket, x.numel(), "bucket")
    return _ops.qsgd(x, residual, levels, bucket, _seed(seed, generator))


def qsgd_decode(packed: Tensor, norms: Tensor, numel: int, levels: int, bucket: int | None = 512) -> Tensor:
    """Dense ``[numel]`` float32 ``(code - L) * norm_b / L`` from :func:`qsgd`'s output."""
    levels = _check_int("levels", levels, 1, MAX_LEVELS)
    numel, bucket = _check_stream(packed, norms, numel, bucket, qsgd_bits(levels), "norms")
    return _ops.qsgd_decode(packed, norms, numel, levels, bucket)


# --------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------
def sparse_accumulate(out: Tensor, indices: Tensor, values: Tensor, alpha: float = 1.0) -> Tensor:
    """``out[indices] += alpha * values`` in place; duplicate indices accumulate.

    Args:
        out: ``[n]`` float32 dense accumulator (e.g. the server's aggregate).
        indices: ``[m]`` int64 or int32, each in ``[0, n)`` (``IndexError`` otherwise).
        values: ``[m]`` float32/float16/bfloat16.
        alpha: finite scale (e.g. a client weight).

    Returns:
        ``out``.
    """
    _check_tensor("out", out, (torch.float32,))
    _check_tensor("indices", indices, INDEX_DTYPES)
    _check_tensor("values", values, FLOAT_DTYPES)
    if indices.numel() != values.numel():
        raise ValueError(f"indices and values must have the same length; got {indices.numel()} and {values.numel()}")
    for name, t in (("indices", indices), ("values", values)):
        if t.device != out.device:
            raise ValueError(f"{name} must be on the device of out ({out.device}); got {t.device}")
    alpha = _check_alpha(alpha)
    _backend.backend_of(out)
    _ops.sparse_accumulate(out, indices, values.detach(), alpha)
    return out


def _check_accumulator(out, packed) -> None:
    _check_tensor("out", out, (torch.float32,))
    if isinstance(packed, Tensor) and out.device != packed.device:
        raise ValueError(f"out must be on the device of the payload (packed is on {packed.device}); got {out.device}")


def _check_alpha(alpha) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real):
        raise TypeError(f"alpha must be a float; got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite; got {alpha!r}")
    return float(alpha)


def sign_accumulate(
    out: Tensor, packed: Tensor, scales: Tensor, block: int | None = None, alpha: float = 1.0
) -> Tensor:
    """``out += alpha * sign_decode(packed, scales, out.numel(), block)`` in place, with no dense temporary.

    Each entry gets ``out_i + fp32(alpha * scale_b * (+1 | -1))``: the product is rounded to fp32
    before the add (no fused multiply-add), so the result equals decode-then-add
    ``out.add_(alpha * decoded)`` to the bit on every backend.

    Args:
        out: ``[numel]`` float32 accumulator, contiguous, on the payload's device.
        packed: ``[ceil(numel/8)]`` uint8 from :func:`sign_ef`.
        scales: ``[ceil(numel/block)]`` float32.
        block: the block size given to :func:`sign_ef` (``None``: one block).
        alpha: finite weight (e.g. a client's ``1/m``).

    Returns:
        ``out``.
    """
    _check_accumulator(out, packed)
    _, block = _check_stream(packed, scales, out.numel(), block, 1, "scales")
    alpha = _check_alpha(alpha)
    _ops.sign_accumulate(out, packed, scales, block, alpha)
    return out


def qsgd_accumulate(
    out: Tensor, packed: Tensor, norms: Tensor, levels: int, bucket: int | None = 512, alpha: float = 1.0
) -> Tensor:
    """``out += alpha * qsgd_decode(packed, norms, out.numel(), levels, bucket)`` in place, no dense temporary.

    Each entry gets ``out_i + fp32(alpha * ((code - L) * norm_b / L))`` (the decoded value exactly as
    :func:`qsgd_decode` computes it, the product rounded before the add): equal to decode-then-add
    to the bit on every backend.

    Args:
        out: ``[numel]`` float32 accumulator on the payload's device.
        packed: as returned by :func:`qsgd`.
        norms: as returned by :func:`qsgd`.
        levels: as given to :func:`qsgd`.
        bucket: as given to :func:`qsgd`.
        alpha: finite weight.

    Returns:
        ``out``.
    """
    _check_accumulator(out, packed)
    levels = _check_int("levels", levels, 1, MAX_LEVELS)
    _, bucket = _check_stream(packed, norms, out.numel(), bucket, qsgd_bits(levels), "norms")
    alpha = _check_alpha(alpha)
    _ops.qsgd_accumulate(out, packed, norms, levels, bucket, alpha)
    return out
