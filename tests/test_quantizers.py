"""sign_ef / sign_decode / sign_majority / qsgd / qsgd_decode against the reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _support import DTYPES, SIZES, assert_same, make_input
from hypothesis import given, settings
from hypothesis import strategies as st

import fedcomp
from fedcomp import reference

BLOCKS = [None, 1, 3, 8, 100, 65536, 70_001]
RES_TOL = {torch.float32: (1e-5, 1e-6), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def _block(block, n):
    return max(n, 1) if block is None else block


@pytest.mark.parametrize("scale", ["mean", "l2"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_sign_ef_matches_reference(backend, n, dtype, scale):
    x, r = make_input(n, dtype, seed=n + 2)
    rtol, atol = RES_TOL[dtype]
    for block in BLOCKS:
        r1, r2 = r.clone(), r.clone()
        packed, scales = fedcomp.sign_ef(x, r1, block, scale)
        p_ref, s_ref = reference.sign_ef(x, r2, _block(block, n), scale == "l2")
        assert_same(packed, p_ref, f"packed bits (block={block})")
        torch.testing.assert_close(scales, s_ref, rtol=1e-6, atol=0)
        torch.testing.assert_close(r1, r2, rtol=rtol, atol=atol)
        assert_same(
            fedcomp.sign_decode(packed, scales, n, block),
            reference.sign_decode(packed, scales, n, _block(block, n)),
            "decoded",
        )


def test_sign_bit_order_is_numpy_little(backend):
    x = torch.randn(1003)
    packed, _ = fedcomp.sign_ef(x, None, 17)
    want = np.packbits((x >= 0).numpy(), bitorder="little")
    assert np.array_equal(packed.numpy(), want)


def test_sign_ef_zero_and_nan_policy(backend):
    x = torch.tensor([0.0, -0.0, -1.0, float("nan"), 2.0, -3.0, 1.0, 1.0, -1.0])
    packed, scales = fedcomp.sign_ef(x, None, block=4)
    # bits: 0.0 -> 1, -0.0 -> 1 (>= 0), NaN -> 0; the NaN poisons its block's scale only.
    assert packed.tolist() == [0b11010011, 0]
    assert torch.isnan(scales[0]) and torch.isfinite(scales[1:]).all()


def test_sign_ef_error_feedback_invariant(backend):
    x, r = make_input(100_001, torch.float32, seed=4)
    before = x + r
    packed, scales = fedcomp.sign_ef(x, r, 4096)
    decoded = fedcomp.sign_decode(packed, scales, x.numel(), 4096)
    torch.testing.assert_close(decoded + r, before, rtol=0, atol=1e-6)


def test_sign_ef_independent_of_thread_count(backend):
    x, r = make_input(2**20 + 3, torch.float32, seed=6)
    threads = torch.get_num_threads()
    outs = []
    for nthreads in (1, threads):
        torch.set_num_threads(nthreads)
        rr = r.clone()
        outs.append(fedcomp.sign_ef(x, rr, 70_001) + (rr,))
    torch.set_num_threads(threads)
    for a, b, what in zip(*outs, ("packed", "scales", "residual")):
        assert_same(a, b, what)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("nbytes", [0, 1, 13, 5000])
def test_sign_majority_matches_reference(backend, rows, nbytes):
    g = torch.Generator().manual_seed(rows * 100 + nbytes)
    stack = torch.randint(0, 256, (rows, nbytes), dtype=torch.uint8, generator=g)
    assert_same(fedcomp.sign_majority(stack), reference.sign_majority(stack), "majority")


def test_sign_majority_ties_give_one(backend):
    stack = torch.tensor([[0b10101010], [0b01010101]], dtype=torch.uint8)
    assert fedcomp.sign_majority(stack).tolist() == [0xFF]


# --------------------------------------------------------------------------
# QSGD
# --------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 4, 127, 300])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", SIZES)
def test_qsgd_matches_reference(backend, n, dtype, levels):
    x, r = make_input(n, dtype, seed=n + levels)
    rtol, atol = RES_TOL[dtype]
    for bucket in (None, 5, 512):
        b = _block(bucket, n)
        r1, r2 = r.clone(), r.clone()
        packed, norms = fedcomp.qsgd(x, r1, levels, bucket, seed=11)
        p_ref, n_ref = reference.qsgd(x, r2, levels, b, 11)
        torch.testing.assert_close(norms, n_ref, rtol=1e-6, atol=0)
        # Codes are a pure function of (a, norm, u): exact given the kernel's norms.
        a = x.float() + r.float()
        codes = reference.qsgd_codes(a, norms, levels, b, 11)
        assert_same(packed, reference.pack_codes(codes, reference.qsgd_bits(levels)), "packed codes")
        torch.testing.assert_close(r1, r2, rtol=rtol, atol=atol)
        assert_same(
            fedcomp.qsgd_decode(packed, norms, n, levels, bucket),
            reference.qsgd_decode(packed, norms, n, levels, b),
            "decoded",
        )


@pytest.mark.parametrize("levels", [1, 4, 16])
def test_qsgd_is_unbiased(backend, levels):
    # Mean of 400 independent decodes vs x: each coordinate's decode has
    # variance <= norm^2 / (4 L^2); test the mean error at 6 sigma.
    x = torch.randn(2000, generator=torch.Generator().manual_seed(levels))
    bucket, trials = 100, 400
    acc = torch.zeros(2000, dtype=torch.float64)
    for seed in range(trials):
        packed, norms = fedcomp.qsgd(x, None, levels, bucket, seed=seed)
        acc += fedcomp.qsgd_decode(packed, norms, 2000, levels, bucket).double()
    mean = acc / trials
    norm = norms.repeat_interleave(bucket).double()
    sigma = norm / (2 * levels) / trials**0.5
    z = ((mean - x.double()) / sigma).abs()
    assert z.max() < 6, z.max()
    # and the average bias over all coordinates is far smaller still
    assert abs(((mean - x.double()) / sigma).mean()) < 6 / 2000**0.5


def test_qsgd_code_width_and_payload_size(backend):
    for levels, width in [(1, 2), (2, 3), (3, 3), (4, 4), (7, 4), (8, 5), (127, 8), (128, 9)]:
        assert reference.qsgd_bits(levels) == width
        packed, _ = fedcomp.qsgd(torch.randn(1001), None, levels, 64, seed=0)
        assert packed.numel() == (1001 * width + 7) // 8


def test_qsgd_zero_bucket_and_nan(backend):
    x = torch.zeros(10)
    x[5:] = torch.tensor([1.0, float("nan"), 2.0, 3.0, 4.0])
    packed, norms = fedcomp.qsgd(x, None, 4, 5, seed=0)
    out = fedcomp.qsgd_decode(packed, norms, 10, 4, 5)
    assert torch.equal(out[:5], torch.zeros(5))
    assert torch.isnan(out[5:]).all()


def test_qsgd_generator_draws_fresh_seeds(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096)
    a = fedcomp.qsgd(x, None, 2, 512, generator=g)[0]
    b = fedcomp.qsgd(x, None, 2, 512, generator=g)[0]
    c = fedcomp.qsgd(x, None, 2, 512, generator=torch.Generator().manual_seed(0))[0]
    assert not torch.equal(a, b) and torch.equal(a, c)


def test_philox_matches_triton_reference_vector():
    # Philox4x32-10 known-answer test (Random123 kat_vectors: counter 0, key 0).
    words = reference._philox4x32_10(0, torch.zeros(1, dtype=torch.int64))
    assert [int(w) for w in words] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]


@settings(max_examples=40, deadline=None)
@given(
    data=st.lists(st.floats(-1e3, 1e3, width=32), min_size=0, max_size=200),
    block=st.integers(1, 40),
    levels=st.integers(1, 9),
)
def test_quantizers_property(data, block, levels):
    x = torch.tensor(data, dtype=torch.float32)
    n = x.numel()
    packed, scales = fedcomp.sign_ef(x, None, block)
    assert_same(packed, reference.sign_ef(x, None, block, False)[0], "sign bits")
    packed, norms = fedcomp.qsgd(x, None, levels, block, seed=3)
    codes = reference.qsgd_codes(x, norms, levels, block, 3)
    assert_same(packed, reference.pack_codes(codes, reference.qsgd_bits(levels)), "qsgd codes")
    assert fedcomp.qsgd_decode(packed, norms, n, levels, block).shape == (n,)
