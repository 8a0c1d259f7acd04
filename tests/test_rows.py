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


@pytest.mark.parametrize("levels, bucket", [(1, 8), (4, 512), (127, 100)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_SIZES)
@pytest.mark.parametrize("m", [1, 3, 5])
def test_qsgd_rows_equal_separate_calls(backend, m, n, dtype, levels, bucket):
    x, _ = _stack(m, n, dtype, seed=n + 2)
    slab = make_input(7 * n, dtype, seed=5)[0].reshape(7, n)
    rows, seeds = [6, 0, 3, 2, 5][:m], [(1 << 62) + 17 * i for i in range(m)]
    for residual, r_rows in ((None, None), (slab.clone(), rows)):
        packed, norms = torch.ops.fedcomp.qsgd_rows(x, residual, levels, bucket, seeds, r_rows)
        r_one = None if residual is None else slab.clone()
        for i in range(m):
            ri = None if r_one is None else r_one[rows[i]]
            p, s = fedcomp.qsgd(x[i], ri, levels, bucket, seed=seeds[i])
            assert_same(packed[i], p, f"codes row {i}")
            assert_same(norms[i], s, f"norms row {i}")
            ri_ref = None if residual is None else slab[rows[i]].clone()
            p_ref, _ = reference.qsgd(x[i], ri_ref, levels, bucket, seeds[i])
            assert_same(packed[i], p_ref, f"codes row {i} vs reference")
        if residual is not None:
            assert_same(residual, r_one, "residual slab (rows not named untouched)")


def test_rows_do_not_depend_on_the_thread_count(backend):
    x, r = _stack(6, 70_001, torch.float32)
    before = torch.get_num_threads()
    outs = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        try:
            r1 = r.clone()
            quantized = torch.ops.fedcomp.qsgd_rows(x, r1.clone(), 4, 512, list(range(6)))
            outs.append((*fedcomp.topk_ef(x, r1, 700), *fedcomp.sign_ef(x, r1.clone(), 64), *quantized, r1))
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
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(4, 5), 1, rows=[1, 1]), ValueError,
         "rows must be 2 distinct ints in [0, 4)"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(4, 5), 1, rows=[0, 4]), ValueError,
         "rows must be 2 distinct ints in [0, 4)"),
        (lambda: fedcomp.sign_ef(torch.zeros(2, 5), torch.zeros(4, 5), 4, rows=[0]), ValueError,
         "rows must be 2 distinct ints"),
        (lambda: fedcomp.sign_ef(torch.zeros(2, 5), torch.zeros(4, 5), 4, rows=[0, -1]), ValueError,
         "rows entry must be >= 0"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(4, 6), 1, rows=[0, 1]), ValueError,
         "residual must be [K, 5] with rows"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), None, 1, rows=[0, 1]), ValueError, "rows needs x of shape [m, n]"),
        (lambda: fedcomp.topk_ef(torch.zeros(5), torch.zeros(4, 5), 1, rows=[0]), ValueError,
         "rows needs x of shape [m, n]"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(4, 5), 1, rows=torch.tensor([0, 1])), TypeError,
         "rows must be a list of ints"),
        (lambda: fedcomp.topk_ef(torch.zeros(2, 5), torch.zeros(4, 5), 1, rows=[0, 1.5]), TypeError,
         "rows entry must be an int"),
        (lambda: fedcomp.randk_ef(torch.zeros(2, 5), None, 1, [1]), ValueError,
         "seed must be an int for x of shape [n], or 2 ints"),
        (lambda: fedcomp.randk_ef(torch.zeros(5), None, 1, [1, 2]), TypeError, "seed must be an int"),
        (lambda: fedcomp.randk_ef(torch.zeros(5), None, 1, -1), ValueError, "seed must be in [0, "),
        (lambda: fedcomp.randk_ef(torch.zeros(5), None, 6, 1), ValueError, "k must be in [0, 5]"),
        (lambda: fedcomp.randk_ef(torch.zeros(5), torch.zeros(4), 1, 1), ValueError, "residual must have the shape"),
        (lambda: fedcomp.randk_ef(torch.zeros(5, dtype=torch.int32), None, 1, 1), TypeError, "x must have dtype"),
        (lambda: fedcomp.randk_ef(torch.zeros(2, 5), torch.zeros(3, 5), 1, [1, 2], rows=[0, 0]), ValueError,
         "rows must be 2 distinct ints"),
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
    plain, alone = make(n), make(n)  # no error feedback: Compressor.compress_many
    for step in range(2):
        many = plain.compress_many(x * (step + 1))
        assert [p.to_bytes() for p in many] == [alone.compress(x[i] * (step + 1)).to_bytes() for i in range(4)]
    with pytest.raises(ValueError, match=r"x must be a \[clients >= 1, n\] tensor"):
        plain.compress_many(x[0])
    with pytest.raises(ValueError, match="keys must be 4 distinct keys"):
        batched.compress_many(x, ["a", "a", "b", "c"])
    with pytest.raises(ValueError, match=r"x must be a \[clients >= 1, n\] tensor"):
        batched.compress_many(torch.zeros(0, n), [])


def test_rows_opcheck(backend):
    x, r = _stack(3, 1000, torch.float32)
    torch.library.opcheck(torch.ops.fedcomp.topk_ef_rows.default, (x, r.clone(), 10, torch.int64))
    torch.library.opcheck(torch.ops.fedcomp.sign_ef_rows.default, (x, r.clone(), 64, True))
    slab = torch.randn(5, 1000)
    torch.library.opcheck(torch.ops.fedcomp.topk_ef_rows.default, (x, slab.clone(), 10, torch.int32, [4, 0, 2]))
    torch.library.opcheck(torch.ops.fedcomp.sign_ef_rows.default, (x, slab.clone(), 64, False, [1, 3, 0]))
    torch.library.opcheck(torch.ops.fedcomp.qsgd_rows.default, (x, None, 4, 128, [5, 6, 7]))
    torch.library.opcheck(torch.ops.fedcomp.qsgd_rows.default, (x, slab.clone(), 4, 128, [5, 6, 7], [2, 4, 0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 1023, 26_122])
def test_rows_pick_residual_rows_of_a_shared_buffer(backend, n, dtype):
    """``rows``: row i of x updates row rows[i] of a [K, n] residual in place, exactly as the
    stack of those rows would be; rows not named are untouched."""
    x, _ = _stack(3, n, dtype, seed=n + 5)
    slab = torch.stack([make_input(n, dtype, seed=50 + j)[1] for j in range(6)])
    rows = [4, 0, 2]
    k = max(1, n // 10)
    for op, args in ((fedcomp.topk_ef, (k,)), (fedcomp.sign_ef, (64,))):
        got_slab, want_stack = slab.clone(), slab[rows].clone()
        got = op(x, got_slab, *args, rows=rows)
        want = op(x, want_stack, *args)
        for a, b in zip(got, want):
            assert_same(a, b, f"{op.__name__} output")
        assert_same(got_slab[rows], want_stack, f"{op.__name__} named rows")
        assert_same(got_slab[[1, 3, 5]], slab[[1, 3, 5]], f"{op.__name__} other rows")
        ref_slab = slab.clone()
        ref = getattr(reference, op.__name__ + "_rows")(
            x, ref_slab, *args, *((torch.int64,) if op is fedcomp.topk_ef else (False,)), rows=rows
        )
        assert_same(ref_slab, got_slab, f"{op.__name__} residual vs reference")
        assert_same(ref[0], got[0], f"{op.__name__} first output vs reference")


def test_compress_many_refuses_a_key_whose_residual_does_not_fit():
    """A known key whose residual has another length or dtype than x's rows: the error names the
    key, and no residual changes."""
    ef = fedcomp.ErrorFeedback(fedcomp.TopK(0.1))
    ef.compress_many(torch.randn(2, 100), ["a", "b"])
    before = {k: ef.residual(k).clone() for k in "ab"}
    with pytest.raises(ValueError, match="state for key 'a' holds 100 entries on cpu; got 50"):
        ef.compress_many(torch.randn(2, 50), ["c", "a"])
    with pytest.raises(TypeError, match="state for key 'b' has dtype torch.float32; got x of dtype torch.float16"):
        ef.compress_many(torch.randn(2, 100, dtype=torch.float16), ["b", "d"])
    for k in "ab":
        assert_same(ef.residual(k), before[k], f"residual {k}")


def test_pooled_residuals_grow_reset_and_restore():
    """ErrorFeedback keeps short residuals as rows of shared buffers: more keys than one buffer
    holds (batched per buffer), a reset key's row comes back zeroed to the next key, and
    state_dict / load_state_dict continue to the bit."""
    n, keys = 1000, [f"c{i}" for i in range(20)]
    x, _ = _stack(20, n, torch.float32, seed=3)
    many, one = fedcomp.ErrorFeedback(fedcomp.TopK(0.02)), fedcomp.ErrorFeedback(fedcomp.TopK(0.02))
    order = [keys[i] for i in (17, 2, 9, 0, 19, 5, 11)]  # spread over the first buffers
    for step in range(2):
        for chunk in (keys[:8], keys[8:], order):
            xs = torch.stack([x[keys.index(k)] * (step + 1) for k in chunk])
            got = many.compress_many(xs, chunk)
            want = [one.compress(xs[i], k) for i, k in enumerate(chunk)]
            assert [p.to_bytes() for p in got] == [p.to_bytes() for p in want]
    assert len(many._pools[(n, torch.float32, torch.device("cpu"))]) > 1  # the test spans buffers
    for k in keys:
        assert_same(many.residual(k), one.residual(k), k)
    state = many.state_dict()
    many.reset("c3")
    assert many.residual("c3") is None
    fresh = many.compress_many(x[:1], ["new"])  # takes c3's row: it must start from zeros
    assert fresh[0].to_bytes() == fedcomp.ErrorFeedback(fedcomp.TopK(0.02)).compress(x[0], "new").to_bytes()
    restored = fedcomp.ErrorFeedback(fedcomp.TopK(0.02))
    restored.load_state_dict(state)
    for k in keys:
        assert_same(restored.residual(k), one.residual(k), f"restored {k}")
    a = restored.compress_many(x[:5] * 3, keys[:5])
    b = [one.compress(x[i] * 3, keys[i]) for i in range(5)]
    assert [p.to_bytes() for p in a] == [p.to_bytes() for p in b]
    with pytest.raises(ValueError, match="state for key 'c0' holds 1000 entries"):
        restored.compress(torch.zeros(999), "c0")


def test_reserve_puts_every_key_in_one_buffer():
    """reserve(count, like): the first count keys share one buffer, so compress_many over any
    of them is one batched call; state_dict still holds only the keys that were used."""
    n = 777
    x, _ = _stack(6, n, torch.float32, seed=4)
    ef = fedcomp.ErrorFeedback(fedcomp.Sign(64))
    ef.reserve(20, x)
    calls = []
    encode_rows = ef.compressor._encode_rows
    ef.compressor._encode_rows = lambda *a: calls.append(a[2]) or encode_rows(*a)
    for step in range(4):
        ef.compress_many(x, [f"c{(3 * step + i) % 20}" for i in range(6)])
    assert len(calls) == 4 and len(ef._pools[(n, torch.float32, torch.device("cpu"))]) == 1
    assert sorted(ef.state_dict()["residuals"]) == sorted({f"c{(3 * s + i) % 20}" for s in range(4) for i in range(6)})
    ef.reserve(3, x)  # enough free rows already: no new buffer
    assert len(ef._pools[(n, torch.float32, torch.device("cpu"))]) == 1
    with pytest.raises(ValueError, match="count must be >= 0"):
        ef.reserve(-1, x)
    with pytest.raises(TypeError, match="like must be"):
        ef.reserve(2, [1.0])


@pytest.mark.parametrize("with_residual", [True, False])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", ROW_SIZES)
def test_randk_ef_equals_the_reference_and_randk_indices(backend, n, dtype, with_residual):
    """randk_ef: positions are randk_indices(seed); values and residual rows as the reference
    (and as the composite a = x + r; a[idx]; a[idx] = 0), for a stack, a stack with rows, and 1-D."""
    m, k, seeds = 3, max(0, n // 10), [5, 2**62 + 11, 0]
    x, r = _stack(m, n, dtype, seed=n + 2)
    res = r.clone() if with_residual else None
    values, positions = fedcomp.randk_ef(x, res, k, seeds)
    assert values.shape == (m, k) and positions.shape == (m, k) and positions.dtype == torch.int64
    ref_r = r.clone() if with_residual else None
    ref_v, ref_p = reference.randk_ef_rows(x, ref_r, seeds, k)
    assert_same(values, ref_v, "values")
    assert_same(positions, ref_p, "positions")
    for i, s in enumerate(seeds):
        idx = fedcomp.wire.randk_indices(s, k, n)
        assert_same(positions[i], idx, f"positions row {i}")
        a = (x[i].float() + r[i].float()).to(dtype) if with_residual else x[i]
        assert_same(values[i], a[idx], f"values row {i}")
        if with_residual:
            assert_same(res[i], a.index_fill(0, idx, 0), f"residual row {i}")
            assert_same(ref_r[i], res[i], f"residual row {i} vs reference")
        r1 = r[i].clone() if with_residual else None
        v1, p1 = fedcomp.randk_ef(x[i], r1, k, s)
        assert_same(v1, values[i], f"1-D values row {i}")
        assert_same(p1, positions[i], f"1-D positions row {i}")
    if with_residual:
        slab = torch.stack([make_input(n, dtype, seed=70 + j)[1] for j in range(5)])
        got_slab, want = slab.clone(), slab[[4, 1, 3]].clone()
        v2, _ = fedcomp.randk_ef(x, got_slab, k, seeds, rows=[4, 1, 3])
        v3, _ = fedcomp.randk_ef(x, want, k, seeds)
        assert_same(v2, v3, "values with rows")
        assert_same(got_slab[[4, 1, 3]], want, "named rows")
        assert_same(got_slab[[0, 2]], slab[[0, 2]], "other rows")


def test_randk_ef_opcheck(backend):
    x, r = _stack(3, 1000, torch.float32)
    seeds = [1, 2, 2**63 - 1]
    torch.library.opcheck(torch.ops.fedcomp.randk_ef_rows.default, (x, r.clone(), seeds, 10))
    torch.library.opcheck(torch.ops.fedcomp.randk_ef_rows.default, (x, None, seeds, 0))
    torch.library.opcheck(torch.ops.fedcomp.randk_ef_rows.default, (x, torch.randn(4, 1000), seeds, 7, [3, 0, 1]))
