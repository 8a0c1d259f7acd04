"""topk_ef and topk_threshold_ef against the reference, bit for bit."""

from __future__ import annotations

import pytest
import torch
from _support import DTYPES, SIZES, assert_same, make_input
from hypothesis import given, settings
from hypothesis import strategies as st

import fedcomp
from fedcomp import reference


def _ks(n: int) -> list[int]:
    return sorted({0, min(1, n), n // 100, n // 3, n})


def check_topk(x, r, k, index_dtype=torch.int64):
    r_ref = None if r is None else r.clone()
    values, indices = fedcomp.topk_ef(x, r, k, index_dtype=index_dtype)
    v_ref, i_ref = reference.topk_ef(x, r_ref, k, index_dtype)
    assert_same(indices, i_ref, "indices")
    assert_same(values, v_ref, "values")
    if r is not None:
        assert_same(r, r_ref, "residual")
    return values, indices


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_ef_matches_reference(backend, n, dtype):
    x, r = make_input(n, dtype, seed=n)
    for k in _ks(n):
        check_topk(x, r.clone(), k)
    check_topk(x, None, n // 7)


def test_topk_ef_int32_indices(backend):
    x, r = make_input(5000, torch.float32)
    _, indices = check_topk(x, r, 50, torch.int32)
    assert indices.dtype == torch.int32


@pytest.mark.parametrize("n", [100, 70_000, 2**20 + 3])
def test_topk_ef_planted_ties_at_the_boundary(backend, n):
    # Values drawn from a handful of magnitudes with both signs: the k-th
    # largest |a| is shared by many entries, spread over several chunks.
    g = torch.Generator().manual_seed(1)
    mags = torch.tensor([0.5, 1.0, 1.0, 2.0, 3.0])
    x = mags[torch.randint(0, 5, (n,), generator=g)] * (torch.randint(0, 2, (n,), generator=g) * 2 - 1)
    r = torch.zeros(n)
    for k in (1, n // 10, n // 2, n - 1):
        check_topk(x, r.clone(), k)


@pytest.mark.parametrize("n", [5, 70_000, 2**20 + 3])
def test_topk_ef_all_equal_magnitudes(backend, n):
    # Every key equal: the boundary bin exceeds the candidate cap and the
    # multi-level fallback must pick the lowest indices.
    for fill in (0.0, 1.5):
        x = torch.full((n,), fill)
        x[::2] *= -1
        values, indices = check_topk(x, torch.zeros(n), n // 3)
        assert torch.equal(indices, torch.arange(n // 3))


def _misleading(n: int, where: str) -> torch.Tensor:
    """Large entries placed against the CPU kernel's sample (every 16th entry, from 0)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(n, generator=g) * 1e-3
    on_sample = torch.arange(n) % 16 == 0
    big = torch.randn(n, generator=g) * 100
    if where == "off the sample, 1 in 16":  # the sample sees only noise; the list still holds the top k
        pick = torch.arange(n) % 16 == 3
    elif where == "off the sample, 15 in 16":  # the list would pass its cap: exact fallback
        pick = ~on_sample
    else:  # "on the sample only": the list holds fewer than k entries: exact fallback
        pick = on_sample
    return torch.where(pick, big, x)


@pytest.mark.parametrize("where", ["off the sample, 1 in 16", "off the sample, 15 in 16", "on the sample only"])
@pytest.mark.parametrize("frac", [0.001, 0.01, 0.02])
@pytest.mark.parametrize("n", [20_011, 2**20 + 3])
def test_topk_ef_exact_when_the_sample_misleads(backend, where, frac, n):
    # n >= 2^14 takes the sampled path; its sample decides only how much work
    # is done, so every layout must still give the reference's answer.
    x = _misleading(n, where)
    r = torch.randn(n, generator=torch.Generator().manual_seed(2)) * 1e-4
    check_topk(x, r, int(frac * n))
    check_topk(x, None, int(frac * n))
    xs, rs = torch.stack([x, -x, x.roll(5)]), torch.stack([r, r, -r])  # rows: one sampled call per row
    rs_ref = rs.clone()
    got = fedcomp.topk_ef(xs, rs, int(frac * n))
    want = reference.topk_ef_rows(xs, rs_ref, int(frac * n))
    for a, b, what in zip(got + (rs,), want + (rs_ref,), ("values", "indices", "residual")):
        assert_same(a, b, what)


def test_topk_ef_nonfinite_sorted_first(backend):
    x = torch.tensor([1.0, float("nan"), -float("inf"), 5.0, float("inf"), -2.0])
    _, indices = check_topk(x, torch.zeros(6), 3)
    assert indices.tolist() == [1, 2, 4]


def test_topk_ef_error_feedback_invariant_is_exact(backend):
    x, r = make_input(100_003, torch.float32, seed=3)
    before = x + r
    values, indices = fedcomp.topk_ef(x, r, 1000)
    decoded = torch.zeros_like(x).index_put_((indices,), values)
    assert torch.equal(decoded + r, before)


def test_topk_ef_many_rounds_conserve_the_signal(backend):
    # Sum of everything sent plus the final residual equals the sum of inputs.
    g = torch.Generator().manual_seed(7)
    n = 4099
    sent, fed = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    r32 = torch.zeros(n)
    for _ in range(20):
        x = torch.randint(-8, 8, (n,), generator=g).float()  # integers: every sum exact in fp32
        fed += x.double()
        values, indices = fedcomp.topk_ef(x, r32, 41)
        sent.index_add_(0, indices, values.double())
    assert torch.equal(sent + r32.double(), fed)


def test_topk_ef_independent_of_thread_count(backend):
    x, r = make_input(2**20 + 3, torch.float32, seed=5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        r1 = r.clone()
        out1 = fedcomp.topk_ef(x, r1, 10_000)
    finally:
        torch.set_num_threads(threads)
    r2 = r.clone()
    out2 = fedcomp.topk_ef(x, r2, 10_000)
    for a, b, what in zip(out1 + (r1,), out2 + (r2,), ("values", "indices", "residual")):
        assert_same(a, b, what)


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(st.integers(-4, 4), min_size=0, max_size=300),
    frac=st.floats(0, 1),
    with_residual=st.booleans(),
)
def test_topk_ef_property_small_integers(data, frac, with_residual):
    """Heavy ties (few distinct magnitudes): the tie rule decides most picks."""
    x = torch.tensor(data, dtype=torch.float32)
    k = int(frac * len(data))
    r = torch.linspace(-1, 1, len(data)).round() if with_residual else None
    check_topk(x, r, k)


# --------------------------------------------------------------------------
# topk_threshold_ef
# --------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_topk_threshold_ef_matches_reference(backend, n, dtype):
    x, r = make_input(n, dtype, seed=n + 1)
    for k in _ks(n):
        for capacity in {min(n, 2 * k), k // 2}:
            r1, r2 = r.clone(), r.clone()
            got = fedcomp.topk_threshold_ef(x, r1, k, capacity=capacity, sample_size=512, seed=9)
            want = reference.topk_threshold_ef(x, r2, k, capacity, 512, 9)
            for a, b, what in zip(got, want, ("values", "indices", "count")):
                assert_same(a, b, what)
            assert_same(r1, r2, "residual")


def test_topk_threshold_ef_count_near_k_and_invariant(backend):
    x, r = make_input(2**20, torch.float32, seed=2)
    before = x + r
    k = 10_000
    values, indices, count = fedcomp.topk_threshold_ef(x, r, k, seed=3)
    c = int(count)
    assert 0.8 * k <= c <= 2 * k, c  # 65536-sample estimate of the 1% quantile
    assert torch.all(indices[:c].diff() > 0)
    assert torch.all(values[c:] == 0) and torch.all(indices[c:] == 0)
    decoded = torch.zeros_like(x).index_put_((indices[:c],), values[:c])
    assert torch.equal(decoded + r, before)
    # Padding slots are harmless to sparse_accumulate.
    out = torch.zeros_like(x)
    fedcomp.sparse_accumulate(out, indices, values)
    assert torch.equal(out, decoded)


def test_topk_threshold_ef_overflow_stays_in_residual(backend):
    x = torch.ones(1000)
    r = torch.zeros(1000)
    values, indices, count = fedcomp.topk_threshold_ef(x, r, 10, capacity=5)
    assert int(count) == 5 and indices.tolist() == [0, 1, 2, 3, 4]
    assert r[:5].eq(0).all() and r[5:].eq(1).all()


def test_default_capacity_is_twice_k():
    values, _, _ = fedcomp.topk_threshold_ef(torch.randn(100), None, 7)
    assert values.numel() == 14
    assert fedcomp.topk_threshold_ef(torch.randn(10), None, 7)[0].numel() == 10  # capped at n
