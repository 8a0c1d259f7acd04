"""sparse_accumulate, sign_accumulate and qsgd_accumulate against the reference."""

from __future__ import annotations

import re

import pytest
import torch
from _support import DTYPES, SIZES, assert_same

import fedcomp
from fedcomp import reference


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [s for s in SIZES if s > 0])
def test_sparse_accumulate_matches_reference(backend, n, dtype, index_dtype):
    g = torch.Generator().manual_seed(n)
    out = torch.randn(n, generator=g)
    m = 3 * n + 5  # duplicates, accumulated in list order
    indices = torch.randint(0, n, (m,), generator=g).to(index_dtype)
    values = torch.randn(m, generator=g).to(dtype)
    o1, o2 = out.clone(), out.clone()
    assert fedcomp.sparse_accumulate(o1, indices, values, 0.37) is o1
    reference.sparse_accumulate(o2, indices, values, 0.37)
    assert_same(o1, o2, "out")


@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32], ids=str)
@pytest.mark.parametrize("layout", ["distinct", "runs of duplicates", "one index"])
def test_sparse_accumulate_sorted_indices_split_across_threads(backend, layout, index_dtype):
    # Ascending indices (top-k and rand-k payloads) are split into runs of the
    # list; a cut never separates equal indices, so duplicates still add in list order.
    g = torch.Generator().manual_seed(3)
    n, m = 100_003, 40_000
    if layout == "distinct":
        indices = torch.randperm(n, generator=g)[:m].sort().values
    elif layout == "runs of duplicates":
        indices = torch.randint(0, 50, (m,), generator=g).sort().values * 2000
    else:
        indices = torch.full((m,), 77)
    indices = indices.to(index_dtype)
    values = torch.randn(m, generator=g)
    out = torch.randn(n, generator=g)
    want = out.clone()
    reference.sparse_accumulate(want, indices, values, 0.3)
    threads = torch.get_num_threads()
    for t in (1, 2, 3):
        torch.set_num_threads(t)
        try:
            got = fedcomp.sparse_accumulate(out.clone(), indices, values, 0.3)
        finally:
            torch.set_num_threads(threads)
        assert_same(got, want, f"out with {t} threads")


def test_sparse_accumulate_of_many_payloads_equals_dense_sum(backend):
    n, clients = 50_000, 10
    out = torch.zeros(n)
    dense = torch.zeros(n, dtype=torch.float64)
    for c in range(clients):
        x = torch.randn(n, generator=torch.Generator().manual_seed(c))
        values, indices = fedcomp.topk_ef(x, None, 500)
        fedcomp.sparse_accumulate(out, indices, values, 1 / clients)
        dense[indices] += values.double() / clients
    torch.testing.assert_close(out.double(), dense, rtol=1e-6, atol=1e-7)


def test_sparse_accumulate_empty(backend):
    out = torch.ones(4)
    fedcomp.sparse_accumulate(out, torch.zeros(0, dtype=torch.int64), torch.zeros(0))
    assert torch.equal(out, torch.ones(4))


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_sparse_accumulate_out_of_range_raises_index_error(backend, bad):
    out = torch.zeros(4)
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 4\)"):
        fedcomp.sparse_accumulate(out, torch.tensor([0, bad]), torch.ones(2))
    with pytest.raises(IndexError, match=r"indices must lie in \[0, 4\)"):
        reference.sparse_accumulate(out, torch.tensor([0, bad]), torch.ones(2), 1.0)


# -- decoding straight into the accumulator -----------------------------------------------
ACC_BLOCKS = [None, 1, 3, 8, 100, 70_001]
ALPHAS = [1.0, 0.1, -0.37, 1e-3]


def _acc_start(n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(n + 11))


@pytest.mark.parametrize("n", SIZES)
def test_sign_accumulate_equals_decode_then_add_to_the_bit(backend, n):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n))
    for block in ACC_BLOCKS:
        b = max(n, 1) if block is None else block
        packed, scales = fedcomp.sign_ef(x, None, block)
        for alpha in ALPHAS:
            out, expected = _acc_start(n), _acc_start(n)
            assert fedcomp.sign_accumulate(out, packed, scales, block, alpha) is out
            expected.add_(alpha * reference.sign_decode(packed, scales, n, b))  # decode, then add
            assert_same(out, expected, f"block={block}, alpha={alpha}")
            ref = _acc_start(n)
            reference.sign_accumulate(ref, packed, scales, b, alpha)
            assert_same(ref, expected, "reference")


@pytest.mark.parametrize("levels", [1, 4, 127, 300])
@pytest.mark.parametrize("n", SIZES)
def test_qsgd_accumulate_equals_decode_then_add_to_the_bit(backend, n, levels):
    x = torch.randn(n, generator=torch.Generator().manual_seed(n + levels))
    for bucket in (None, 7, 512):
        b = max(n, 1) if bucket is None else bucket
        packed, norms = fedcomp.qsgd(x, None, levels, bucket, seed=n)
        for alpha in (1.0, 0.3):
            out, expected = _acc_start(n), _acc_start(n)
            fedcomp.qsgd_accumulate(out, packed, norms, levels, bucket, alpha)
            expected.add_(alpha * reference.qsgd_decode(packed, norms, n, levels, b))
            assert_same(out, expected, f"bucket={bucket}, alpha={alpha}")


def test_accumulating_many_sign_payloads_equals_the_dense_weighted_sum(backend):
    n, clients = 10_007, 6
    out, expected = torch.zeros(n), torch.zeros(n)
    for c in range(clients):
        x = torch.randn(n, generator=torch.Generator().manual_seed(c))
        packed, scales = fedcomp.sign_ef(x, None, 64)
        fedcomp.sign_accumulate(out, packed, scales, 64, 1 / clients)
        expected.add_(fedcomp.sign_decode(packed, scales, n, 64) * (1 / clients))
    assert_same(out, expected, "sum of 6 clients")


@pytest.mark.parametrize("kind", ["sign", "qsgd"])
@pytest.mark.parametrize("n", SIZES)
def test_accumulate_many_equals_one_accumulate_per_payload_to_the_bit(backend, n, kind):
    """The fused many-payload call (what aggregate uses) against the reference's accumulates, one
    payload after another in list order; for blocks smaller and larger than a work item and odd
    code widths (QSGD with 300 levels: 10 bits)."""
    alphas = [0.3, -1.7, 1e-3, 2.5, 1.0]
    for block, levels in ((3, 1), (100, 4), (70_001, 300)):
        packed, scales = [], []
        for c in range(len(alphas)):
            x = torch.randn(n, generator=torch.Generator().manual_seed(10 * n + c))
            if kind == "sign":
                p, s = fedcomp.sign_ef(x, None, block)
            else:
                p, s = fedcomp.qsgd(x, None, levels, block, seed=c)
            packed.append(p)
            scales.append(s)
        out, expected = _acc_start(n), _acc_start(n)
        if kind == "sign":
            torch.ops.fedcomp.sign_accumulate_many(out, packed, scales, block, alphas)
            for p, s, a in zip(packed, scales, alphas):
                reference.sign_accumulate(expected, p, s, block, a)
        else:
            torch.ops.fedcomp.qsgd_accumulate_many(out, packed, scales, levels, block, alphas)
            for p, s, a in zip(packed, scales, alphas):
                reference.qsgd_accumulate(expected, p, s, levels, block, a)
        assert_same(out, expected, f"block={block}, levels={levels}")


def test_aggregate_fuses_runs_of_one_kind_and_keeps_list_order(backend, monkeypatch):
    """Consecutive sign/QSGD payloads with the same block size are one fused call; a payload of
    another kind or block size ends the run, and the sum keeps list order (the same bits as one
    accumulate per payload)."""
    n = 5_003
    xs = torch.randn(7, n, generator=torch.Generator().manual_seed(1))
    payloads = [
        fedcomp.Sign(64).compress(xs[0]),
        fedcomp.Sign(64).compress(xs[1]),
        fedcomp.TopK(0.1).compress(xs[2]),
        fedcomp.Sign(64).compress(xs[3]),
        fedcomp.Sign(128).compress(xs[4]),
        fedcomp.QSGD(4, 512, seed=1).compress(xs[5]),
        fedcomp.QSGD(4, 512, seed=2).compress(xs[6]),
    ]
    weights = [0.5, -0.25, 1.5, 0.125, 2.0, 0.3, -0.7]
    expected = torch.zeros(n)
    for p, w in zip(payloads, weights):
        p.accumulate_into(expected, w)
    calls = []
    for name in ("sign_accumulate_many", "qsgd_accumulate_many", "sign_accumulate", "sparse_accumulate"):
        op = getattr(torch.ops.fedcomp, name)
        monkeypatch.setattr(torch.ops.fedcomp, name, lambda *a, _op=op, _name=name: calls.append(_name) or _op(*a))
    assert_same(fedcomp.aggregate(payloads, weights), expected, "aggregate of a mixed list")
    assert calls == ["sign_accumulate_many", "sparse_accumulate", "sign_accumulate", "sign_accumulate",
                     "qsgd_accumulate_many"]  # fmt: skip


def test_accumulate_many_kernel_checks_its_lists(backend):
    out, packed = torch.zeros(8), torch.zeros(1, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="one entry per payload"):
        torch.ops.fedcomp.sign_accumulate_many(out, [packed, packed], [torch.ones(1)], 8, [1.0, 1.0])
    with pytest.raises(RuntimeError, match="length does not match numel"):
        torch.ops.fedcomp.qsgd_accumulate_many(out, [packed], [torch.ones(1)], 4, 8, [1.0])


ACC_BAD = [
    (lambda: fedcomp.sign_accumulate(torch.zeros(8).half(), torch.zeros(1, dtype=torch.uint8), torch.ones(1)),
     TypeError, "out must have dtype float32"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(9), torch.zeros(1, dtype=torch.uint8), torch.ones(1)),
     ValueError, "packed must hold 2 bytes for numel=9"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(8), torch.zeros(1, dtype=torch.uint8), torch.ones(2), 8),
     ValueError, "scales must hold 1 entries"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(8, device="meta"), torch.zeros(1, dtype=torch.uint8),
                                     torch.ones(1)), ValueError, "out must be on the device of the payload"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(8), torch.zeros(1, dtype=torch.uint8), torch.ones(1), 0),
     ValueError, "block must be >= 1"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(8), torch.zeros(1, dtype=torch.uint8), torch.ones(1),
                                     alpha=float("inf")), ValueError, "alpha must be finite"),
    (lambda: fedcomp.sign_accumulate(torch.zeros(2, 4), torch.zeros(1, dtype=torch.uint8), torch.ones(1)),
     ValueError, "out must be 1-D"),
    (lambda: fedcomp.qsgd_accumulate(torch.zeros(8), torch.zeros(5, dtype=torch.uint8), torch.ones(1), 4, None),
     ValueError, "packed must hold 4 bytes"),
    (lambda: fedcomp.qsgd_accumulate(torch.zeros(8), torch.zeros(4, dtype=torch.uint8), torch.ones(1), 0, None),
     ValueError, "levels must be in [1, 32768]"),
    (lambda: fedcomp.qsgd_accumulate(torch.zeros(8), torch.zeros(4, dtype=torch.uint8), torch.ones(1), 4, None,
                                     alpha="x"), TypeError, "alpha must be a float"),
]  # fmt: skip


@pytest.mark.parametrize("call, exc, text", ACC_BAD, ids=[t for _, _, t in ACC_BAD])
def test_accumulate_bad_input_names_the_argument(call, exc, text):
    with pytest.raises(exc, match=re.escape(text)):
        call()


def test_accumulators_and_sections_must_be_contiguous_and_on_one_device():
    """aggregate and accumulate_into call the kernels directly once the accumulator is checked:
    a strided accumulator, or a payload whose sections are strided or on two devices, is refused."""
    x = torch.randn(64)
    p = fedcomp.TopK(0.25).compress(x)
    strided = torch.zeros(128)[::2]
    with pytest.raises(ValueError, match=r"out must be a contiguous \[64\] float32 tensor"):
        fedcomp.aggregate([p], out=strided)
    with pytest.raises(ValueError, match="out must be contiguous"):
        p.accumulate_into(strided)
    values, indices = p.sections
    with pytest.raises(ValueError, match="section 1 of a topk payload must be a contiguous tensor on the device"):
        fedcomp.Payload("topk", torch.float32, 64, {"k": 16}, (values, indices.to("meta")))
    with pytest.raises(ValueError, match="section 0 of a topk payload must be a contiguous tensor"):
        fedcomp.Payload("topk", torch.float32, 64, {"k": 16}, (torch.zeros(32)[::2], indices))
    want = torch.zeros(64).index_add_(0, indices.long(), values)
    assert torch.equal(fedcomp.aggregate([p], [1.0]), want)
