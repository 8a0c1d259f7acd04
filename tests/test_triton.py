"""Triton kernels under TRITON_INTERPRET=1 (set in conftest) against the reference, with the
exactness rules of the CPU tests: indices, values, packed bits, top-k residuals and decodes to
the bit; QSGD codes to the bit; block scales, norms and quantizer residuals within fp32 rounding."""

from __future__ import annotations

import os

import pytest
import torch
from _support import DTYPES, assert_same, make_input

from fedcomp import reference

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("the Triton kernels run on CPU tensors only under TRITON_INTERPRET=1", allow_module_level=True)
from fedcomp import triton as T  # noqa: E402

SIZES = [1, 7, 8, 9, 1023, 4099]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_ef(n, dtype):
    x, r = make_input(n, dtype, seed=n)
    for k in sorted({0, 1, n // 3, n}):
        for with_r in (False, True):
            r1, r2 = (r.clone(), r.clone()) if with_r else (None, None)
            v1, i1 = T.topk_ef_triton(x, r1, k, torch.int32)
            v2, i2 = reference.topk_ef(x, r2, k, torch.int32)
            assert_same(i1, i2, f"indices n={n} k={k}")
            assert_same(v1, v2, f"values n={n} k={k}")
            if with_r:
                assert_same(r1, r2, f"residual n={n} k={k}")


@pytest.mark.parametrize("pattern", ["all-equal", "planted-ties", "nan-inf"])
def test_topk_ef_ties_and_non_finite(pattern):
    n = 3001
    x = torch.ones(n)
    if pattern == "planted-ties":
        x = torch.randn(n, generator=torch.Generator().manual_seed(0))
        x[::5] = 2.5
        x[1::5] = -2.5
    if pattern == "nan-inf":
        x = torch.randn(n, generator=torch.Generator().manual_seed(1))
        x[[3, 100, 2000]] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for k in (1, 400, 1000):
        r1, r2 = torch.zeros(n), torch.zeros(n)
        v1, i1 = T.topk_ef_triton(x, r1, k, torch.int64)
        v2, i2 = reference.topk_ef(x, r2, k)
        assert_same(i1, i2, f"{pattern} indices k={k}")
        assert_same(v1, v2, f"{pattern} values k={k}")
        assert_same(r1, r2, f"{pattern} residual k={k}")


@pytest.mark.parametrize("n", [1, 1023, 4099])
def test_topk_threshold_ef(n):
    x, r = make_input(n, torch.float32, seed=3)
    for k, capacity, sample, seed in ((max(1, n // 10), max(1, n // 5), 256, 9), (n // 2, n // 4, 1000, 1)):
        r1, r2 = r.clone(), r.clone()
        got = T.topk_threshold_ef_triton(x, r1, k, capacity, sample, seed)
        want = reference.topk_threshold_ef(x, r2, k, capacity, sample, seed)
        for a, b, what in zip(got, want, ("values", "indices", "count")):
            assert_same(a, b, f"threshold {what} n={n}")
        assert_same(r1, r2, "threshold residual")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block, l2", [(None, False), (8, True), (7, False), (64, False), (1000, True)])
def test_sign_ef_and_decode(n, dtype, block, l2):
    """block 8/64: the one-pass kernel; None/7/1000: block statistics, then codes."""
    block = n if block is None else block
    x, r = make_input(n, dtype, seed=n + 1)
    r1, r2 = r.clone(), r.clone()
    p1, s1 = T.sign_ef_triton(x, r1, block, l2)
    p2, s2 = reference.sign_ef(x, r2, block, l2)
    assert_same(p1, p2, "packed bits")
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    torch.testing.assert_close(r1.float(), r2.float(), rtol=1e-5, atol=1e-6)
    assert_same(T.sign_decode_triton(p2, s2, n, block), reference.sign_decode(p2, s2, n, block), "decode")
    p3, _ = T.sign_ef_triton(x, None, block, l2)
    assert_same(p3, reference.sign_ef(x, None, block, l2)[0], "bits without residual")


@pytest.mark.parametrize("m", [1, 2, 5])
@pytest.mark.parametrize("nbytes", [1, 130, 1000])
def test_sign_majority(m, nbytes):
    stack = torch.randint(0, 256, (m, nbytes), dtype=torch.uint8, generator=torch.Generator().manual_seed(m))
    assert_same(T.sign_majority_triton(stack), reference.sign_majority(stack), "majority")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("levels, bucket", [(1, 64), (4, 512), (7, 7), (300, 100), (32768, 1000)])
def test_qsgd_and_decode(n, dtype, levels, bucket):
    x, r = make_input(n, dtype, seed=n + 2)
    r1, r2 = r.clone(), r.clone()
    p1, s1 = T.qsgd_triton(x, r1, levels, bucket, 12345)
    p2, s2 = reference.qsgd(x, r2, levels, bucket, 12345)
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)
    # codes to the bit given the same norms (the reference's norms here)
    a = x.float() + r.float()
    codes = reference.qsgd_codes(a, s1, levels, bucket, 12345)
    assert_same(p1, reference.pack_codes(codes, reference.qsgd_bits(levels)), "packed codes")
    torch.testing.assert_close(r1.float(), r2.float(), rtol=1e-5, atol=1e-6)
    assert_same(
        T.qsgd_decode_triton(p2, s2, n, levels, bucket), reference.qsgd_decode(p2, s2, n, levels, bucket), "decode"
    )


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_accumulate_distinct_indices(dtype, index_dtype):
    n = 5000
    out = torch.randn(n, generator=torch.Generator().manual_seed(0))
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(1))[:1234].to(index_dtype)
    vals = torch.randn(1234, generator=torch.Generator().manual_seed(2)).to(dtype)
    o1, o2 = out.clone(), out.clone()
    T.sparse_accumulate_triton(o1, idx, vals, 0.37)
    reference.sparse_accumulate(o2, idx, vals, 0.37)
    assert_same(o1, o2, "out")
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 5000\)"):
        T.sparse_accumulate_triton(o1, torch.tensor([0, 5000]), torch.ones(2), 1.0)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("block", [1, 7, 64, None])
def test_sign_accumulate_equals_decode_then_add(n, block):
    block = n if block is None else block
    x, _ = make_input(n, torch.float32, seed=n + 5)
    packed, scales = reference.sign_ef(x, None, block, False)
    for alpha in (1.0, -0.37):
        out = torch.randn(n, generator=torch.Generator().manual_seed(n))
        expected = out.clone().add_(alpha * reference.sign_decode(packed, scales, n, block))
        T.sign_accumulate_triton(out, packed, scales, block, alpha)
        assert_same(out, expected, f"alpha={alpha}")


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("levels, bucket", [(1, 64), (4, 7), (300, 100), (32768, 1000)])
def test_qsgd_accumulate_equals_decode_then_add(n, levels, bucket):
    x, _ = make_input(n, torch.float32, seed=n + 6)
    packed, norms = reference.qsgd(x, None, levels, bucket, 99)
    out = torch.randn(n, generator=torch.Generator().manual_seed(n))
    expected = out.clone().add_(0.3 * reference.qsgd_decode(packed, norms, n, levels, bucket))
    T.qsgd_accumulate_triton(out, packed, norms, levels, bucket, 0.3)
    assert_same(out, expected, "accumulated")


@pytest.mark.parametrize("n", [0, 7, 1023, 4099])
@pytest.mark.parametrize("m", [1, 3, 6])
def test_accumulate_many_equals_one_accumulate_per_payload(n, m):
    """All payloads in one launch: each entry adds the payloads' terms in list order, so the bits
    are those of one accumulate per payload (sign: blocks of 64, 100 and one per tensor; QSGD:
    2-, 8- and 16-bit codes, buckets of 100 and 512; weights that fp32 rounds)."""
    xs = [make_input(n, torch.float32, seed=n + c)[0] for c in range(m)]
    alphas = [0.5, -1.25, 3.0, 1 / 3, -0.1, 7.0][:m]
    for block in (64, 100, max(n, 1)):
        signs = [reference.sign_ef(x, None, block, block == 100) for x in xs]
        out, expected = torch.ones(n), torch.ones(n)
        T.sign_accumulate_many_triton(out, [p for p, _ in signs], [s for _, s in signs], block, alphas)
        for (p, s), a in zip(signs, alphas):
            reference.sign_accumulate(expected, p, s, block, a)
        assert_same(out, expected, f"sign, block {block}")
    for levels, bucket in ((1, 100), (127, 512), (32767, 100)):
        quants = [reference.qsgd(x, None, levels, bucket, c) for c, x in enumerate(xs)]
        out, expected = torch.ones(n), torch.ones(n)
        T.qsgd_accumulate_many_triton(out, [p for p, _ in quants], [s for _, s in quants], levels, bucket, alphas)
        for (p, s), a in zip(quants, alphas):
            reference.qsgd_accumulate(expected, p, s, levels, bucket, a)
        assert_same(out, expected, f"qsgd, levels {levels}")


def test_empty_inputs():
    x = torch.zeros(0)
    v, i = T.topk_ef_triton(x, torch.zeros(0), 0, torch.int64)
    assert v.numel() == 0 and i.numel() == 0
    p, s = T.sign_ef_triton(x, None, 1, False)
    assert p.numel() == 0 and s.numel() == 0
    p, s = T.qsgd_triton(x, None, 4, 512, 0)
    assert p.numel() == 0 and s.numel() == 0
    assert T.sign_decode_triton(p, s, 0, 1).numel() == 0


@pytest.mark.parametrize("m, n", [(1, 7), (3, 1023), (4, 4099)])
def test_rows_equal_separate_calls(m, n):
    x = torch.stack([make_input(n, torch.float32, seed=i)[0] for i in range(m)])
    r = torch.stack([make_input(n, torch.float32, seed=i)[1] for i in range(m)])
    r1, r2 = r.clone(), r.clone()
    v1, i1 = T.topk_ef_rows_triton(x, r1, n // 5, torch.int64)
    v2, i2 = reference.topk_ef_rows(x, r2, n // 5, torch.int64)
    assert_same(i1, i2, "indices")
    assert_same(v1, v2, "values")
    assert_same(r1, r2, "residual")
    p1, s1 = T.sign_ef_rows_triton(x, r.clone(), 64, False)
    p2, s2 = reference.sign_ef_rows(x, r.clone(), 64, False)
    assert_same(p1, p2, "sign bits")
    torch.testing.assert_close(s1, s2, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, n", [(1, 7), (3, 1023), (2, 4099)])
@pytest.mark.parametrize("residual", ["none", "own", "rows"])
def test_one_launch_stacks_equal_one_call_per_row(m, n, dtype, residual):
    """The batched ops run every row in the same launches (a [tiles, m] grid); each row's outputs
    and residual row equal those of the one-tensor kernels on that row, to the bit: top-k, sign
    through the one-pass kernel (block 64) and the two-pass one (block 100, and one scale per
    row), and QSGD with its own seed per row."""
    x = torch.stack([make_input(n, dtype, seed=20 + i)[0] for i in range(m)])
    slab = torch.stack([make_input(n, dtype, seed=40 + j)[1] for j in range(m + 2)])
    rows = {"none": None, "own": None, "rows": list(range(m + 1, 0, -1))[:m]}[residual]

    def stacked_and_per_row(batched, single):
        r_many = None if residual == "none" else (slab.clone() if rows else slab[:m].clone())
        r_one = None if residual == "none" else r_many.clone()
        got = batched(x, r_many, rows)
        for i in range(m):
            j = i if rows is None else rows[i]
            want = single(x[i], None if r_one is None else r_one[j], i)
            for a, b in zip(got, want):
                assert_same(a[i], b, f"row {i}")
        if r_many is not None:
            assert_same(r_many, r_one, "residual")

    k = max(1, n // 9)
    stacked_and_per_row(
        lambda x, r, rows: T.topk_ef_rows_triton(x, r, k, torch.int64, rows),
        lambda x, r, i: T.topk_ef_triton(x, r, k, torch.int64),
    )
    for block in (64, 100, n):
        stacked_and_per_row(
            lambda x, r, rows, block=block: T.sign_ef_rows_triton(x, r, block, block == 100, rows),
            lambda x, r, i, block=block: T.sign_ef_triton(x, r, block, block == 100),
        )
    seeds = [(3 + i) * 0x9E3779B97F4A7C15 % (1 << 63) for i in range(m)]
    stacked_and_per_row(
        lambda x, r, rows: T.qsgd_rows_triton(x, r, 4, 128, seeds, rows),
        lambda x, r, i: T.qsgd_triton(x, r, 4, 128, seeds[i]),
    )
    if residual != "none":  # and the stack against the reference
        r1, r2 = slab.clone(), slab.clone()
        sel = rows if rows is not None else list(range(m))
        v1, i1 = T.topk_ef_rows_triton(x, r1, k, torch.int64, sel)
        v2, i2 = reference.topk_ef_rows(x, r2, k, torch.int64, sel)
        assert_same(i1, i2, "indices vs reference")
        assert_same(v1, v2, "values vs reference")
        assert_same(r1, r2, "residual vs reference")


@pytest.mark.parametrize("rows", [None, [4, 0, 3, 1, 2]])
def test_stacks_taller_than_a_grid_go_in_slices(monkeypatch, rows):
    """A stack with more rows than a CUDA grid's second dimension takes (MAX_GRID_ROWS, here
    2) runs in slices; the result equals the one-slice call."""
    x = torch.stack([make_input(300, torch.float32, seed=60 + i)[0] for i in range(5)])
    slab = torch.stack([make_input(300, torch.float32, seed=70 + j)[1] for j in range(5)])
    calls = [
        lambda r: T.topk_ef_rows_triton(x, r, 20, torch.int64, rows),
        lambda r: T.sign_ef_rows_triton(x, r, 64, False, rows),
        lambda r: T.qsgd_rows_triton(x, r, 4, 128, [11, 12, 13, 14, 15], rows),
    ]
    for call in calls:
        r_whole, r_sliced = slab.clone(), slab.clone()
        whole = call(r_whole)
        with monkeypatch.context() as mp:
            mp.setattr(T._common, "MAX_GRID_ROWS", 2)
            sliced = call(r_sliced)
        for a, b in zip(sliced, whole):
            assert_same(a, b, "output")
        assert_same(r_sliced, r_whole, "residual")


def test_one_launch_stacks_of_nothing():
    for m, n in ((0, 5), (3, 0)):
        x = torch.zeros(m, n)
        v, i = T.topk_ef_rows_triton(x, torch.zeros(m, n), 0 if n == 0 else 2, torch.int64)
        assert v.shape == (m, 0 if n == 0 else 2) and i.shape == v.shape
        p, s = T.sign_ef_rows_triton(x, None, 8, False)
        assert p.shape == (m, (n + 7) // 8) and s.shape == (m, -(-n // 8))
        q, nr = T.qsgd_rows_triton(x, None, 4, 8, [1] * m)
        assert q.shape == (m, (n * 4 + 7) // 8) and nr.shape == (m, -(-n // 8))


def test_rows_pick_rows_of_a_shared_residual():
    """``rows``: row i of x uses row rows[i] of a [K, n] residual, as the reference does."""
    n, rows = 1023, [3, 0]
    x = torch.stack([make_input(n, torch.float32, seed=i)[0] for i in range(2)])
    slab = torch.stack([make_input(n, torch.float32, seed=10 + j)[1] for j in range(4)])
    r1, r2 = slab.clone(), slab.clone()
    v1, i1 = T.topk_ef_rows_triton(x, r1, 50, torch.int64, rows)
    v2, i2 = reference.topk_ef_rows(x, r2, 50, torch.int64, rows)
    assert_same(i1, i2, "indices")
    assert_same(v1, v2, "values")
    assert_same(r1, r2, "residual")
    r1, r2 = slab.clone(), slab.clone()
    p1, _ = T.sign_ef_rows_triton(x, r1, 64, False, rows)
    p2, _ = reference.sign_ef_rows(x, r2, 64, False, rows)
    assert_same(p1, p2, "sign bits")
    torch.testing.assert_close(r1, r2, rtol=1e-6, atol=0)
    q1, n1 = T.qsgd_rows_triton(x, None, 4, 128, [7, 8], None)
    for i, seed in enumerate([7, 8]):  # each row: the Triton qsgd with that row's seed
        q2, n2 = T.qsgd_triton(x[i], None, 4, 128, seed)
        assert_same(q1[i], q2, f"qsgd codes row {i}")
        assert_same(n1[i], n2, f"qsgd norms row {i}")
