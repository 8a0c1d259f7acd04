"""Many clients in one call: topk_ef / sign_ef over an [m, n] stack equal m separate 1-D calls
to the bit (values, indices, bits, scales, residual rows), on every backend, and compress_many."""

from __future__ import annotations

import pytest
import torch
from _support import DTYPES, assert_same, make_input

import fedcomp
from fedcomp import reference

ROW_SIZES = [0, 1, 7, 1023, 26_122]


def _stack(m: int, n: int, dtype, seed: int = 0):
    xs, rs = zip(*(make_input(n, dtype, seed=seed + i) for i in range(m)))
    return torch.stack(xs), torch.stack(rs)


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_SIZES)
@pytest.mark.parametrize("m", [1, 2, 5])
def test_topk_ef_rows_equal_separate_calls(backend, m, n, dtype, with_residual):
    x, r = _stack(m, n, dtype, seed=n)
    k = max(0, n // 10)
    r_rows = r.clone() if with_residual else None
    values, indices = fedcomp.topk_ef(x, r_rows, k, index_dtype=torch.int32)
    assert values.shape == (m, k) and indices.shape == (m, k)
    ref_r = r.clone() if with_residual else None
    ref_v, ref_i = reference.topk_ef_rows(x, ref_r, k, torch.int32)
    for i in range(m):
        ri = r[i].clone() if with_residual else None
        v, idx = fedcomp.topk_ef(x[i], ri, k, index_dtype=torch.int32)
        assert_same(values[i], v, f"values row {i}")
        assert_same(indices[i], idx, f"indices row {i}")
        if with_residual:
            assert_same(r_rows[i], ri, f"residual row {i}")
    assert_same(values, ref_v, "values vs reference")
    assert_same(indices, ref_i, "indices vs reference")
    if with_residual:
        assert_same(r_rows, ref_r, "residual vs reference")


@pytest.mark.parametrize("block", [None, 1, 8, 100, 512])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_SIZES)
@pytest.mark.parametrize("m", [1, 3, 4])
def test_sign_ef_rows_equal_separate_calls(backend, m, n, dtype, block):
    x, r = _stack(m, n, dtype, seed=n + 1)
    r_rows = r.clone()
    packed, scales = fedcomp.sign_ef(x, r_rows, block)
    for i in range(m):
        ri = r[i].clone()
        p, s = fedcomp.sign_ef(x[i], ri, block)
        assert_same(packed[i], p, f"bits row {i}")
        assert_same(scales[i], s, f"scales row {i}")
        assert_same(r_rows[i], ri, f"residual row {i}")
    p_ref, _ = reference.sign_ef_rows(x, r.clone(), max(n, 1) if block is None else block, False)
    assert_same(packed, p_ref, "bits vs reference")


def test_rows_do_not_depend_on_the_thread_count(backend):
    x, r = _stack(6, 70_001, torch.float32)
    before = torch.get_num_threads()
    outs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        try:
            r1 = r.clone()
            outs.append((*fedcomp.topk_ef(x, r1, 700), *fedcomp.sign_ef(x, r1.clone(), 64), r1))
        finally:
            torch.set_num_threads(before)
    for other in outs[1:]:
        for a, b in zip(outs[0], other):
            assert_same(a, b, "1 thread vs more")


@pytest.mark.parametrize(
    "call, exc, text",
    [
        (lambda: fedcomp.topk_ef(torch.zeros(0, 5), None, 1), ValueError, "x must have at least one row"),
        (lambda: fedcomp.sign_ef(torch.zeros(0, 5), None, 4), ValueError, "x must have at least one row"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 2, 2), None, 1), ValueError, "x must be 1-D, or 2-D [clients, n]"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(3, 5), 1), ValueError,
         "residual must have the shape of x (2, 5)"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(10), 1), ValueError, "residual must have the shape"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), None, 6), ValueError, "k must be in [0, 5]"),
        (lambda: fedcomp.sign_ef(torch.zeros(4, 5).t(), None, 4), ValueError, "x must be contiguous"),
        (lambda: fedcomp.sign_ef(torch.zeros(2, 5), torch.zeros(2, 5, device="meta"), 4), ValueError,
         "residual must be on the device"),
    ],
)  # fmt: skip
def test_stack_bad_input_names_the_argument(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)


@pytest.mark.parametrize(
    "make", [lambda n: fedcomp.TopK(0.05), lambda n: fedcomp.Sign(64), lambda n: fedcomp.QSGD(4, 64, seed=3),
             lambda n: fedcomp.RandK(0.05, seed=2), lambda n: fedcomp.TopK(0.1, segments=(n // 4, n - n // 4))],
    ids=["topk", "sign", "qsgd", "randk", "topk-per-tensor"],
)  # fmt: skip
@pytest.mark.parametrize("n", [1000, 1 << 18], ids=["batched", "row-by-row"])
def test_compress_many_equals_one_call_per_client(backend, make, n):
    x, _ = _stack(4, n, torch.float32, seed=9)
    keys = [f"client{i}" for i in (3, 0, 7, 1)]
    batched, single = fedcomp.ErrorFeedback(make(n)), fedcomp.ErrorFeedback(make(n))
    for step in range(3):  # residuals carry over between calls
        xs = x * (step + 1)
        many = batched.compress_many(xs, keys)
        one = [single.compress(xs[i], key=k) for i, k in enumerate(keys)]
        for a, b in zip(many, one):
            assert a.to_bytes() == b.to_bytes()
        for k in keys:
            assert_same(batched.residual(k), single.residual(k), f"residual {k}")
    with pytest.raises(ValueError, match="keys must be 4 distinct keys"):
        batched.compress_many(x, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match=r"x must be a \[clients >= 1, n\] tensor"):
        batched.compress_many(torch.zeros(0, n), [])


def test_rows_opcheck(backend):
    x, r = _stack(3, 1000, torch.float32)
    torch.library.opcheck(torch.ops.fedcomp.topk_ef_rows.default, (x, r.clone(), 10, torch.int64))
    torch.library.opcheck(torch.ops.fedcomp.sign_ef_rows.default, (x, r.clone(), 64, True))
