"""fedcomp.PowerSGD: the low-rank payload against the math it claims (exact at rank <= r, the
best rank-r approximation after enough warm-started calls, the error-feedback invariant), its
layout rule, state, wire round trip and bad input."""

from __future__ import annotations

import math
import struct
import zlib

import pytest
import torch

import fedcomp
from fedcomp.lowrank import orthonormalize
from fedcomp.wire import HEADER_BYTES, Payload

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# odd sizes, a conv kernel (viewed as [out, in*kh*kw]), vectors between matrices, a tiny matrix
SHAPES = [(37, 23), (23,), (19, 3, 3, 3), (19,), (5, 2), (41, 29)]
NUMEL = sum(math.prod(s) for s in SHAPES)


def _low_rank(shape, r, g, device) -> torch.Tensor:
    rows, cols = shape[0], math.prod(shape[1:])
    return (torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)).reshape(shape).to(device)


def _flat(parts) -> torch.Tensor:
    return torch.cat([p.reshape(-1) for p in parts])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_a_matrix_of_rank_at_most_r_comes_back_exactly(device, rank):
    g = torch.Generator().manual_seed(rank)
    parts = [_low_rank(s, rank, g, device) if len(s) > 1 else torch.randn(s, generator=g).to(device) for s in SHAPES]
    x = _flat(parts)
    comp = fedcomp.PowerSGD(rank, shapes=SHAPES, min_compression_rate=0)
    payload = comp.compress(x, key="a")
    assert any(r == rank for _, _, r in payload.layout())  # something was compressed at this rank
    torch.testing.assert_close(payload.decode(), x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_warm_start_converges_to_the_best_rank_r_approximation():
    """Warm-started calls on the same matrix are subspace iteration: the error falls to the SVD's."""
    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(60, 60, generator=g))
    v, _ = torch.linalg.qr(torch.randn(40, 40, generator=g))
    s = torch.tensor([10.0, 7.0, 3.0] + [0.3 * 0.9**i for i in range(37)])
    m = u[:, :40] @ torch.diag(s) @ v.T
    best = float(torch.linalg.matrix_norm(m - u[:, :2] @ torch.diag(s[:2]) @ v[:, :2].T))
    comp = fedcomp.PowerSGD(2, shapes=[(60, 40)])
    errors = [float(torch.linalg.vector_norm(comp.compress(m.reshape(-1)).decode() - m.reshape(-1))) for _ in range(30)]
    assert errors[0] > 1.05 * best  # a random start is not the answer ...
    assert errors[-1] <= 1.001 * best  # ... the iteration gets there
    cold = fedcomp.PowerSGD(2, shapes=[(60, 40)], warm_start=False)
    cold_errors = [
        float(torch.linalg.vector_norm(cold.compress(m.reshape(-1)).decode() - m.reshape(-1))) for _ in range(5)
    ]
    assert min(cold_errors) > 1.05 * best  # and without warm start it does not
    assert len(set(cold_errors)) == 5  # a fresh Q per call


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_error_feedback_keeps_what_was_not_sent(device, dtype):
    """sum(decoded) + residual == sum(x) over many calls (to rounding), and the residual stays bounded."""
    ef = fedcomp.ErrorFeedback(fedcomp.PowerSGD(1, shapes=SHAPES))
    g = torch.Generator().manual_seed(1)
    sent = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    total = torch.zeros(NUMEL, dtype=torch.float64, device=device)
    for _ in range(25):
        x = torch.randn(NUMEL, generator=g).to(device, dtype)
        total += x.double()
        payload = ef.compress(x, key="client0")
        assert payload.dtype == dtype and payload.sections[1].dtype == dtype
        sent += payload.decode().double()
    residual = ef.residual("client0")
    assert residual.dtype == dtype
    tol = {torch.float32: 1e-4, torch.float16: 0.05, torch.bfloat16: 0.5}[dtype]
    torch.testing.assert_close(sent + residual.double(), total, rtol=0, atol=tol)
    assert float(residual.float().norm()) < float(total.norm())  # bounded: not the whole sum


def test_layout_rule_vectors_and_small_matrices_go_dense_and_consecutive_ones_merge():
    comp = fedcomp.PowerSGD(2, shapes=SHAPES)
    # (5, 2) would send 2 * (5 + 2) = 14 of 10 entries: dense, merged with the vectors around it
    assert comp.layout_for(SHAPES) == [(37, 23, 2), (23, 1, 0), (19, 27, 2), (19 + 10, 1, 0), (41, 29, 2)]
    assert fedcomp.PowerSGD(2, shapes=SHAPES, min_compression_rate=0).layout_for(SHAPES)[3:5] == [(19, 1, 0), (5, 2, 2)]
    assert fedcomp.PowerSGD(64, shapes=SHAPES).layout_for(SHAPES) == [(NUMEL, 1, 0)]  # nothing would shrink
    assert fedcomp.PowerSGD(3, shapes=[(0, 5), (4,)]).layout_for([(0, 5), (4,)]) == [(4, 1, 0)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_wire_round_trip_and_sizes(dtype):
    comp = fedcomp.PowerSGD(3, shapes=SHAPES)
    x = torch.randn(NUMEL, generator=torch.Generator().manual_seed(2)).to(dtype)
    payload = comp.compress(x, key="k")
    wire = payload.to_bytes()
    assert len(wire) == payload.nbytes == comp.wire_bytes(NUMEL, dtype)
    layout = comp.layout_for(SHAPES)
    factors = sum((rows + cols) * r for rows, cols, r in layout) + sum(rows * cols for rows, cols, r in layout if not r)
    assert comp.wire_bytes(NUMEL, dtype, header=False) == 24 * len(layout) + factors * (
        2 if dtype == torch.float16 else 4
    )
    back = Payload.from_bytes(wire)
    assert back.kind == "lowrank" and back.params == {"rank": 3, "segments": len(layout)}
    assert torch.equal(back.decode(), payload.decode())
    assert payload.compression_ratio > 3


def test_aggregate_adds_every_clients_factors():
    comp = fedcomp.PowerSGD(2, shapes=SHAPES)
    g = torch.Generator().manual_seed(3)
    payloads = [comp.compress(torch.randn(NUMEL, generator=g), key=f"c{i}") for i in range(4)]
    weights = [0.1, 0.2, 0.3, 0.4]
    expected = sum(w * p.decode() for w, p in zip(weights, payloads))
    torch.testing.assert_close(fedcomp.aggregate(payloads, weights), expected, rtol=1e-6, atol=1e-6)
    # mixed with another kind, and through accumulate_into
    dense = fedcomp.Identity().compress(torch.ones(NUMEL))
    torch.testing.assert_close(fedcomp.aggregate([payloads[0], dense], [1.0, 2.0]), payloads[0].decode() + 2)


def test_state_dict_continues_bit_for_bit_and_keys_are_independent():
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(NUMEL, generator=g) for _ in range(6)]
    a = fedcomp.ErrorFeedback(fedcomp.PowerSGD(2, shapes=SHAPES, seed=9))
    full = [a.compress(x, key="c").to_bytes() for x in xs]
    b = fedcomp.ErrorFeedback(fedcomp.PowerSGD(2, shapes=SHAPES, seed=9))
    first = [b.compress(x, key="c").to_bytes() for x in xs[:3]]
    c = fedcomp.ErrorFeedback(fedcomp.PowerSGD(2, shapes=SHAPES, seed=9))
    c.load_state_dict(b.state_dict())
    assert first + [c.compress(x, key="c").to_bytes() for x in xs[3:]] == full
    # the same seed and key draw the same first Q; another key or seed another one
    fresh = [fedcomp.PowerSGD(2, shapes=SHAPES, seed=s).compress(xs[0], key=k).to_bytes() for s, k in
             [(9, "c"), (9, "c"), (9, "d"), (8, "c")]]  # fmt: skip
    assert fresh[0] == fresh[1] and fresh[0] != fresh[2] and fresh[0] != fresh[3]
    # compress_many == one by one
    many = fedcomp.PowerSGD(2, shapes=SHAPES).compress_many(torch.stack(xs[:3]), ["x", "y", "z"])
    one = fedcomp.PowerSGD(2, shapes=SHAPES)
    assert [p.to_bytes() for p in many] == [one.compress(x, key=k).to_bytes() for x, k in zip(xs[:3], "xyz")]


def test_ef21_with_powersgd_keeps_sender_and_receiver_equal():
    sender, receiver = (
        fedcomp.EF21(fedcomp.PowerSGD(2, shapes=SHAPES)),
        fedcomp.EF21(fedcomp.PowerSGD(2, shapes=SHAPES)),
    )
    g = torch.Generator().manual_seed(5)
    target = torch.randn(NUMEL, generator=g)
    for _ in range(10):
        got = receiver.receive(Payload.from_bytes(sender.compress(target, key="k").to_bytes()), key="k")
    assert torch.equal(got, sender.estimate("k"))
    assert float((got - target).norm()) < 0.5 * float(target.norm())  # the estimate approaches x


def test_orthonormalize_is_stable_on_rank_deficient_and_zero_input():
    p = torch.randn(50, 1) @ torch.ones(1, 3)  # rank 1 in 3 columns
    q = orthonormalize(p)
    torch.testing.assert_close(q.T @ q, torch.eye(3), rtol=0, atol=1e-5)
    assert torch.equal(orthonormalize(torch.zeros(7, 1)), torch.zeros(7, 1))
    m = torch.zeros(8, 6)
    payload = fedcomp.PowerSGD(2, shapes=[(8, 6)], min_compression_rate=0).compress(m.reshape(-1))
    assert torch.equal(payload.decode(), torch.zeros(48))


def test_bad_arguments_say_what_is_expected():
    with pytest.raises(ValueError, match=r"rank must be in \[1, "):
        fedcomp.PowerSGD(0)
    with pytest.raises(TypeError, match="rank must be an int"):
        fedcomp.PowerSGD(2.0)
    with pytest.raises(TypeError, match="shapes must be a sequence of tensor shapes"):
        fedcomp.PowerSGD(2, shapes="3x4")
    with pytest.raises(ValueError, match=r"shapes\[1\] entry must be >= 0"):
        fedcomp.PowerSGD(2, shapes=[(3, 4), (-1,)])
    with pytest.raises(ValueError, match="min_compression_rate must be a finite number >= 0"):
        fedcomp.PowerSGD(2, min_compression_rate=float("nan"))
    with pytest.raises(TypeError, match="warm_start must be a bool"):
        fedcomp.PowerSGD(2, warm_start="yes")
    with pytest.raises(ValueError, match="PowerSGD needs the shapes of the tensors"):
        fedcomp.PowerSGD(2).compress(torch.zeros(12))
    with pytest.raises(ValueError, match="shapes hold 12 entries but x has 13"):
        fedcomp.PowerSGD(2, shapes=[(3, 4)]).compress(torch.zeros(13))
    with pytest.raises(ValueError, match="pass keys, one per row"):
        fedcomp.PowerSGD(2, shapes=[(3, 4)]).compress_many(torch.zeros(2, 12))
    comp = fedcomp.PowerSGD(1, shapes=[(8, 8)])
    comp.compress(torch.ones(64), key="k")
    comp.shapes = ((4, 16),)
    with pytest.raises(ValueError, match="PowerSGD state for key 'k' holds factors of shapes"):
        comp.compress(torch.ones(64), key="k")
    with pytest.raises(ValueError, match="must hold 'q' and 'draws'"):
        comp.load_state_dict({"q": {}})


def _recrc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_layout_that_does_not_add_up_is_refused_even_with_a_valid_checksum():
    payload = fedcomp.PowerSGD(2, shapes=[(6, 5), (3,)], min_compression_rate=0).compress(torch.randn(33))
    wire = bytearray(payload.to_bytes()[:-4])
    table_end = HEADER_BYTES + 8 * 4
    for field, value, message in [
        (0, 7, "hold more than numel=33 entries"),  # rows 6 -> 7
        (0, 5, "hold 28 entries; numel is 33"),  # rows 6 -> 5
        (2, 3, r"need rows, cols >= 0 and 0 <= r <= min\(rows, cols, rank=2\)"),  # r above the rank
        (1, -5, "need rows, cols >= 0"),
    ]:
        bad = bytearray(wire)
        struct.pack_into("<q", bad, table_end + 8 * field, value)
        with pytest.raises(ValueError, match="inconsistent lowrank payload layout: .*" + message):
            Payload.from_bytes(_recrc(bytes(bad)))
    # a payload built by hand is checked the same way
    layout, p, q, dense = payload.sections
    with pytest.raises(ValueError, match="low-rank segment 0"):
        Payload("lowrank", torch.float32, 33, payload.params, (torch.tensor([6, 5, 3, 3, 1, 0]), p, q, dense))
    with pytest.raises(ValueError, match="section 1 of a lowrank payload must be a 1-D torch.float32 tensor"):
        Payload("lowrank", torch.float32, 33, payload.params, (layout, p[:-1], q, dense))
