"""Compressors, payload round trips, error feedback, EF21, state, flatten, aggregation."""

from __future__ import annotations

import math
import pickle
import warnings

import pytest
import torch
from _support import DTYPES, assert_same, make_input

import fedcomp
from fedcomp import reference
from fedcomp.wire import randk_indices, splitmix64


def compressors():
    return [
        fedcomp.Identity(),
        fedcomp.TopK(0.05),
        fedcomp.RandK(0.05, seed=7),
        fedcomp.Sign(),
        fedcomp.Sign(block=64, scale="l2"),
        fedcomp.QSGD(levels=4, bucket=128, seed=3),
    ]


COMP_IDS = ["identity", "topk", "randk", "sign", "sign64l2", "qsgd"]


def _same_payload(a: fedcomp.Payload, b: fedcomp.Payload) -> None:
    assert (a.kind, a.dtype, a.numel, a.params) == (b.kind, b.dtype, b.numel, b.params)
    for i, (s, t) in enumerate(zip(a.sections, b.sections)):
        assert_same(s, t, f"section {i}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [0, 1, 7, 1023, 100_003])
@pytest.mark.parametrize("make", range(6), ids=COMP_IDS)
def test_round_trip_is_exact_and_nbytes_is_the_wire_size(backend, make, n, dtype):
    comp = compressors()[make]
    x, _ = make_input(n, dtype, seed=n)
    p = comp.compress(x)
    # compressors skip the constructor's checks (Payload._trusted); what they make passes them
    _same_payload(fedcomp.Payload(p.kind, p.dtype, p.numel, p.params, p.sections), p)
    for q in fedcomp.ErrorFeedback(comp).compress_many(torch.stack([x, x]), ["a", "b"]):
        fedcomp.Payload(q.kind, q.dtype, q.numel, q.params, q.sections)
    wire = p.to_bytes()
    assert len(wire) == p.nbytes == comp.wire_bytes(n, dtype)
    q = fedcomp.Payload.from_bytes(wire)
    _same_payload(p, q)
    assert_same(q.decode(), p.decode(), "decode")
    assert p.decode().shape == (n,) and p.decode().dtype == torch.float32


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_decode_means_what_each_kind_says(backend, dtype):
    n = 5000
    x, _ = make_input(n, dtype, seed=1)
    assert_same(fedcomp.Identity().compress(x).decode(), x.float(), "identity")
    p = fedcomp.TopK(0.01).compress(x)
    values, indices = reference.topk_ef(x, None, 50)
    dense = torch.zeros(n)
    dense[indices] = values.float()
    assert_same(p.decode(), dense, "topk")
    p = fedcomp.Sign(block=100).compress(x)
    packed, scales = reference.sign_ef(x, None, 100, False)
    assert_same(p.decode(), reference.sign_decode(packed, scales, n, 100), "sign")
    p = fedcomp.RandK(0.02, seed=5).compress(x)
    idx = p.indices()
    dense = torch.zeros(n)
    dense[idx] = x[idx].float()
    assert_same(p.decode(), dense, "randk")


def test_wire_sizes_follow_the_readme_formula():
    n = 10**6
    header = 44
    assert fedcomp.Identity().wire_bytes(n) == header + 8 + 4 * n
    assert fedcomp.Identity().wire_bytes(n, torch.bfloat16) == header + 8 + 2 * n
    assert fedcomp.TopK(0.01).wire_bytes(n) == header + 16 + 10_000 * (4 + 4)
    assert fedcomp.TopK(0.01).wire_bytes(2**31) == header + 16 + 21_474_837 * (4 + 8)
    assert fedcomp.RandK(0.01).wire_bytes(n, torch.float16) == header + 8 + 10_000 * 2
    assert fedcomp.Sign().wire_bytes(n) == header + 16 + n // 8 + 4
    assert fedcomp.Sign(block=1000).wire_bytes(n) == header + 16 + n // 8 + 4 * 1000
    assert fedcomp.QSGD(levels=4, bucket=512).wire_bytes(n) == header + 16 + (n * 4 + 7) // 8 + 4 * 1954
    assert fedcomp.QSGD(levels=1, bucket=None).wire_bytes(n) == header + 16 + (n * 2 + 7) // 8 + 4


def test_sign_is_one_bit_per_entry():
    p = fedcomp.Sign().compress(torch.randn(8000))
    assert p.sections[0].numel() == 1000 and p.nbytes < 8000 // 8 + 100


def test_topk_uses_int32_indices_when_they_suffice():
    p = fedcomp.TopK(0.1).compress(torch.randn(1000))
    assert p.sections[1].dtype == torch.int32


# --------------------------------------------------------------------------
# error feedback
# --------------------------------------------------------------------------
@pytest.mark.parametrize("make", [0, 1, 2], ids=COMP_IDS[:3])
def test_error_feedback_invariant_is_exact_over_many_steps(backend, make):
    """Integer-valued inputs make every fp32 sum exact, so the telescoping sum must hold to the bit."""
    ef = fedcomp.ErrorFeedback(compressors()[make])
    n, g = 4099, torch.Generator().manual_seed(0)
    sent, total = torch.zeros(n), torch.zeros(n)
    for _ in range(25):
        x = torch.randint(-1000, 1000, (n,), generator=g).float()
        total += x
        ef.compress(x, key="w").accumulate_into(sent)
    assert_same(sent + ef.residual("w"), total, "sum(decoded) + residual")


@pytest.mark.parametrize("make", [3, 4, 5], ids=COMP_IDS[3:])
def test_error_feedback_invariant_for_quantizers(backend, make):
    ef = fedcomp.ErrorFeedback(compressors()[make])
    n, g = 4099, torch.Generator().manual_seed(0)
    sent, total = torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.float64)
    for _ in range(25):
        x = torch.randn(n, generator=g)
        before = ef.residual("w").clone() if ef.residual("w") is not None else torch.zeros(n)
        p = ef.compress(x, key="w")
        torch.testing.assert_close(p.decode() + ef.residual("w"), x + before, rtol=2e-6, atol=2e-6)
        total += x.double()
        sent += p.decode().double()
    torch.testing.assert_close(sent + ef.residual("w").double(), total, rtol=0, atol=1e-4)


def test_error_feedback_sends_what_the_fused_op_sends(backend):
    x, r = make_input(10_000, torch.float32, seed=4)
    ef = fedcomp.ErrorFeedback(fedcomp.TopK(0.01))
    ef.compress(torch.zeros(10_000), key="k")
    ef.residual("k").copy_(r)
    p = ef.compress(x, key="k")
    r_ref = r.clone()
    values, indices = reference.topk_ef(x, r_ref, 100)
    assert_same(p.sections[0], values, "values")
    assert_same(p.sections[1].long(), indices, "indices")
    assert_same(ef.residual("k"), r_ref, "residual")


def test_error_feedback_warns_when_qsgd_is_not_contractive():
    assert fedcomp.QSGD(4, 512).variance_bound() == pytest.approx(512**0.5 / 4)
    assert fedcomp.QSGD(4, 512).variance_bound(10) == pytest.approx(10 / 16)  # a short tensor: one short bucket
    assert fedcomp.QSGD(4, None).variance_bound() == math.inf and fedcomp.QSGD(4, None).variance_bound(9) == 9 / 16
    with pytest.warns(UserWarning, match=r"ErrorFeedback\(QSGD\(levels=4, bucket=512, seed=0\)\): QSGD's variance "
                      r"bound is 5.66 >= 1.*levels > sqrt\(bucket\)"):  # fmt: skip
        fedcomp.ErrorFeedback(fedcomp.QSGD(4, 512))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fedcomp.ErrorFeedback(fedcomp.QSGD(23, 512))  # variance bound 0.98
        fedcomp.ErrorFeedback(fedcomp.TopK(0.01))


def test_error_feedback_keys_are_independent_and_checked():
    ef = fedcomp.ErrorFeedback(fedcomp.TopK(0.1))
    ef.compress(torch.randn(10), key="a")
    ef.compress(torch.randn(20), key="b")
    assert ef.residual("a").numel() == 10 and ef.residual("b").numel() == 20
    with pytest.raises(ValueError, match="key 'a' holds 10 entries"):
        ef.compress(torch.randn(11), key="a")
    with pytest.raises(TypeError, match="key 'a' has dtype"):
        ef.compress(torch.randn(10, dtype=torch.float64).half(), key="a")
    with pytest.raises(TypeError, match="key must be a str"):
        ef.compress(torch.randn(10), key=3)
    ef.reset("a")
    assert ef.residual("a") is None and ef.residual("b") is not None


def test_ef21_semantics(backend):
    inner = fedcomp.TopK(0.05)
    sender, receiver = fedcomp.EF21(inner), fedcomp.EF21(fedcomp.TopK(0.05))
    n, g = 2000, torch.Generator().manual_seed(1)
    for _ in range(6):
        x = torch.randn(n, generator=g)
        g_old = sender.estimate("c").clone() if sender.estimate("c") is not None else torch.zeros(n)
        p = sender.compress(x, key="c")
        _same_payload(p, fedcomp.TopK(0.05).compress(x - g_old))
        assert_same(sender.estimate("c"), g_old + p.decode(), "g <- g + decode")
        assert_same(
            receiver.receive(fedcomp.Payload.from_bytes(p.to_bytes()), key="c"), sender.estimate("c"), "receiver"
        )
    # the estimate tracks a fixed x: ||x - g|| shrinks geometrically
    x = torch.randn(n, generator=g)
    errors = []
    for _ in range(30):
        sender.compress(x, key="fixed")
        errors.append(float((x - sender.estimate("fixed")).norm()))
    assert errors[-1] < 0.5 * errors[0]


@pytest.mark.parametrize("wrapper", [fedcomp.ErrorFeedback, fedcomp.EF21])
@pytest.mark.parametrize("make", range(6), ids=COMP_IDS)
def test_state_dict_restores_exactly(backend, wrapper, make, tmp_path):
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(3000, generator=g) for _ in range(5)]
    a = wrapper(compressors()[make])
    for x in xs[:3]:
        a.compress(x, key="client-1")
    torch.save(a.state_dict(), tmp_path / "state.pt")
    later = [a.compress(x, key="client-1").to_bytes() for x in xs[3:]]
    b = wrapper(compressors()[make])
    b.load_state_dict(torch.load(tmp_path / "state.pt"))
    assert [b.compress(x, key="client-1").to_bytes() for x in xs[3:]] == later
    pickle.loads(pickle.dumps(b))


def test_wrappers_reject_bad_input():
    with pytest.raises(TypeError, match="compressor must be a fedcomp Compressor"):
        fedcomp.ErrorFeedback("topk")
    with pytest.raises(TypeError, match="not another ErrorFeedback"):
        fedcomp.EF21(fedcomp.ErrorFeedback(fedcomp.TopK(0.1)))
    with pytest.raises(ValueError, match="state is missing 'residuals'"):
        fedcomp.ErrorFeedback(fedcomp.TopK(0.1)).load_state_dict({})


@pytest.mark.parametrize(
    "make, exc, match",
    [
        (lambda: fedcomp.TopK(0), ValueError, r"ratio must be in \(0, 1\]; got 0"),
        (lambda: fedcomp.TopK(1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (lambda: fedcomp.TopK("1%"), TypeError, "ratio must be a float"),
        (lambda: fedcomp.RandK(0.1, seed=-1), ValueError, "seed must be in"),
        (lambda: fedcomp.Sign(block=0), ValueError, "block must be >= 1"),
        (lambda: fedcomp.Sign(scale="max"), ValueError, "scale must be 'mean' or 'l2'"),
        (lambda: fedcomp.QSGD(levels=0), ValueError, "levels must be in"),
        (lambda: fedcomp.TopK(0.1, segments=[3, -1]), ValueError, "segments entry must be >= 0"),
        (lambda: fedcomp.TopK(0.1).compress([1.0, 2.0]), TypeError, "x must be a torch.Tensor"),
        (lambda: fedcomp.TopK(0.1).compress(torch.zeros(4, dtype=torch.int32)), TypeError, "x must have dtype"),
        (lambda: fedcomp.TopK(0.1).compress(torch.zeros(4, 4).t()), ValueError, "x must be contiguous"),
        (
            lambda: fedcomp.ErrorFeedback(fedcomp.Sign()).compress_many(torch.zeros(2, 4, dtype=torch.int64), "ab"),
            TypeError,
            "x must have dtype",
        ),
        (lambda: fedcomp.TopK(0.1, segments=[3, 3]).compress(torch.zeros(7)), ValueError, "segments sum to 6"),
    ],
)
def test_compressors_reject_bad_input(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_per_tensor_topk_keeps_a_share_of_every_segment(backend):
    sizes = (1000, 10, 5000, 1)
    x = torch.cat([torch.randn(s) * (100.0 if i == 2 else 1.0) for i, s in enumerate(sizes)])
    p = fedcomp.TopK(0.01, segments=sizes).compress(x)
    idx = p.indices().long()
    counts = [int(((idx >= a) & (idx < a + s)).sum()) for a, s in zip((0, 1000, 1010, 6010), sizes)]
    assert counts == [10, 1, 50, 1]
    assert bool((idx[1:] > idx[:-1]).all())
    glob = fedcomp.TopK(0.01).compress(x).indices().long()
    assert bool(((glob >= 1010) & (glob < 6010)).all())  # the global top-k takes only the loud tensor


# --------------------------------------------------------------------------
# rand-k positions
# --------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 65537, 10**6])
def test_randk_positions_are_distinct_sorted_and_deterministic(n):
    for k in {0, 1, n // 3, n}:
        idx = randk_indices(12345, k, n)
        assert idx.numel() == k and idx.dtype == torch.int64
        if k:
            assert int(idx.min()) >= 0 and int(idx.max()) < n
            assert bool((idx[1:] > idx[:-1]).all())
        assert torch.equal(idx, randk_indices(12345, k, n))


def test_randk_positions_are_pinned_by_the_wire_format():
    # A receiver built from another version must regenerate the sender's positions:
    # these values come from the first (numpy) implementation of the permutation.
    assert randk_indices(12345, 8, 1000).tolist() == [167, 173, 305, 461, 652, 720, 797, 838]
    assert randk_indices(2**62 + 7, 6, 26122).tolist() == [453, 3720, 6855, 9504, 10667, 14532]


@pytest.mark.parametrize("n", [1, 2, 3, 7, 100, 26_122, 65_536, 65_537, 10**6 + 3])
def test_randk_positions_kernel_matches_reference(backend, n):
    keys = torch.tensor([splitmix64(77 + n, r) for r in range(4)])
    for k in sorted({0, 1, n // 100, n // 3, n}):
        if n > 10**5 and k > n // 100:
            continue  # the reference walks the permutation in Python-sized steps
        assert_same(torch.ops.fedcomp.randk_positions(keys, k, n), reference.randk_positions(keys, k, n), "positions")


@pytest.mark.parametrize("k, n", [(1, 2**40 + 5), (7, 2**40 + 5), (3, 2**61 + 1), (5000, 10**9)])
def test_randk_positions_kernel_matches_reference_when_n_dwarfs_k(backend, k, n):
    """Few positions in a huge range: the kernel sorts its picks instead of using a bitmap of [0, n)."""
    keys = torch.tensor([splitmix64(5 + k, r) for r in range(4)])
    assert_same(torch.ops.fedcomp.randk_positions(keys, k, n), reference.randk_positions(keys, k, n), "positions")


def test_randk_positions_kernel_rejects_bad_arguments(backend):
    keys = torch.zeros(4, dtype=torch.int64)
    for args in ((keys[:3], 1, 10), (keys.int(), 1, 10), (keys, 11, 10), (keys, -1, 10), (keys, 1, 2**62)):
        with pytest.raises(RuntimeError, match="round_keys must be"):
            torch.ops.fedcomp.randk_positions(*args)


def test_randk_positions_look_uniform():
    n, k = 100_000, 5_000
    idx = randk_indices(9, k, n)
    hist = torch.bincount(idx // 10_000, minlength=10).double()
    chi2 = float(((hist - k / 10) ** 2 / (k / 10)).sum())
    assert chi2 < 30  # 9 degrees of freedom: p < 0.001 above 27.9
    assert not torch.equal(idx, randk_indices(10, k, n))


# --------------------------------------------------------------------------
# flatten
# --------------------------------------------------------------------------
def test_flatten_round_trip_of_a_model():
    model = torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    flat, spec = fedcomp.flatten(model)
    assert flat.shape == (5 * 3 + 3 + 3 * 2 + 2,) and spec.sizes == (15, 3, 6, 2)
    views = fedcomp.unflatten(flat, spec)
    for name, p in model.named_parameters():
        assert torch.equal(views[name], p)
    views["0.weight"].zero_()
    assert float(flat[:15].abs().sum()) == 0
    with pytest.raises(ValueError, match="flat must be a 1-D tensor of 26 entries"):
        fedcomp.unflatten(flat[:-1], spec)
    with pytest.raises(TypeError, match="source must be an nn.Module"):
        fedcomp.flatten(3)
    with pytest.raises(ValueError, match="no tensors"):
        fedcomp.flatten([])


# --------------------------------------------------------------------------
# aggregation
# --------------------------------------------------------------------------
def test_aggregate_equals_the_dense_sum(backend):
    n, g = 20_000, torch.Generator().manual_seed(5)
    comps = compressors()
    payloads = [comps[i % len(comps)].compress(torch.randn(n, generator=g)) for i in range(12)]
    weights = [0.5 + i / 7 for i in range(12)]
    dense = torch.zeros(n, dtype=torch.float64)
    for p, w in zip(payloads, weights):
        dense += w * p.decode().double()
    torch.testing.assert_close(fedcomp.aggregate(payloads, weights).double(), dense, rtol=1e-6, atol=1e-6)
    sparse = [fedcomp.TopK(0.01).compress(torch.randn(n, generator=g)) for _ in range(10)]
    exact = torch.zeros(n)
    for p in sparse:
        exact += p.decode()
    assert_same(fedcomp.aggregate(sparse, [1.0] * 10), exact, "sum of top-k payloads")
    out = torch.full((n,), 9.0)
    assert fedcomp.aggregate(sparse, out=out) is out


def test_aggregate_sign_majority(backend):
    n, g = 1000, torch.Generator().manual_seed(6)
    payloads = [fedcomp.Sign(block=100).compress(torch.randn(n, generator=g)) for _ in range(5)]
    got = fedcomp.aggregate(payloads, sign="majority")
    votes = torch.stack([p.decode().sign() for p in payloads]).sum(0)
    scale = torch.stack([p.sections[1] for p in payloads]).mean(0).repeat_interleave(100)
    torch.testing.assert_close(got, torch.where(votes >= 0, scale, -scale))


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda p: fedcomp.aggregate([]), ValueError, "must not be empty"),
        (lambda p: fedcomp.aggregate([p, "x"]), TypeError, r"payloads\[1\] must be a fedcomp Payload"),
        (
            lambda p: fedcomp.aggregate([p, fedcomp.TopK(0.1).compress(torch.ones(9))]),
            ValueError,
            r"payloads\[1\] has numel 9",
        ),
        (lambda p: fedcomp.aggregate([p], [1.0, 2.0]), ValueError, "one entry per payload"),
        (lambda p: fedcomp.aggregate([p], [float("nan")]), ValueError, r"weights\[0\] must be a finite"),
        (lambda p: fedcomp.aggregate([p], sign="vote"), ValueError, "sign must be 'mean' or 'majority'"),
        (lambda p: fedcomp.aggregate([p], sign="majority"), ValueError, "needs sign payloads"),
        (lambda p: fedcomp.aggregate([p], out=torch.zeros(3)), ValueError, r"out must be a contiguous \[10\] float32"),
    ],
)
def test_aggregate_rejects_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call(fedcomp.TopK(0.1).compress(torch.ones(10)))
