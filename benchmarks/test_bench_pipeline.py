"""Compress + serialise + deserialise + aggregate for 10 clients, against the composite pipeline.

``fedcomp``: ``ErrorFeedback(TopK(0.01) | Sign())`` per client, ``Payload.to_bytes``,
``Payload.from_bytes``, ``fedcomp.aggregate``; ``fedcomp-batched``: the same with the ten
updates compressed in one call (``ErrorFeedback.compress_many`` on a ``[10, n]`` stack, as the
trainer does). ``composite``: the same pipeline
written as existing libraries write it (:func:`fedcomp.bench.composite_pipeline`:
compensate, ``torch.topk``, decompress to dense, subtract, ``torch.save``/``load``,
sum dense tensors). Run with ``pytest benchmarks/ --benchmark-only``.
"""

from __future__ import annotations

import pytest
import torch

import fedcomp
from fedcomp import _backend, bench

CLIENTS = 10
SIZES = [10**6, 10**7]


def _clients(n: int):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(n, generator=g) for _ in range(CLIENTS)], [torch.zeros(n) for _ in range(CLIENTS)]


def _fedcomp_pipeline(xs, ef):
    wires = [ef.compress(x, key=f"client{i}").to_bytes() for i, x in enumerate(xs)]
    return fedcomp.aggregate([fedcomp.Payload.from_bytes(w) for w in wires])


def _fedcomp_batched(stack, ef):
    wires = [p.to_bytes() for p in ef.compress_many(stack, [f"client{i}" for i in range(len(stack))])]
    return fedcomp.aggregate([fedcomp.Payload.from_bytes(w) for w in wires])


@pytest.mark.parametrize("provider", ["fedcomp", "fedcomp-batched", "composite"])
@pytest.mark.parametrize("kind", ["topk", "sign"])
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_pipeline(record, n, kind, provider):
    if provider == "fedcomp" and _backend.cpu_backend() != "cpu":
        pytest.skip(f"C++ CPU kernels not built: {_backend.cpu_error()}")
    xs, residuals = _clients(n)
    if provider.startswith("fedcomp"):
        ef = fedcomp.ErrorFeedback(fedcomp.TopK(0.01) if kind == "topk" else fedcomp.Sign())
        if provider == "fedcomp":
            fn = lambda: _fedcomp_pipeline(xs, ef)  # noqa: E731
        else:  # the clients' updates arrive together as one [clients, n] stack: one batched op
            stack = torch.stack(xs)
            del xs
            fn = lambda: _fedcomp_batched(stack, ef)  # noqa: E731
    else:
        fn = lambda: bench.composite_pipeline(xs, residuals, kind)  # noqa: E731
    # Steady state, as in a training loop: the first calls at 10^7 also pay for the allocator
    # learning the sizes (glibc serves them from fresh mmaps, page by page, until its threshold
    # has grown), so 3 warm-up rounds before the timed ones, for every provider.
    record(f"pipeline {kind}+EF x{CLIENTS} clients", n, provider, fn, 5 if n < 10**7 else 3, warmup=3)


def test_pipelines_agree_on_the_first_round():
    """The baseline does the same work: its first-round average equals fedcomp's (top-k has no ties here)."""
    xs, residuals = _clients(10_000)
    ours = _fedcomp_pipeline(xs, fedcomp.ErrorFeedback(fedcomp.TopK(0.01)))
    torch.testing.assert_close(bench.composite_pipeline(xs, residuals, "topk"), ours, rtol=1e-6, atol=1e-7)
    ours = _fedcomp_pipeline(xs, fedcomp.ErrorFeedback(fedcomp.Sign()))
    torch.testing.assert_close(bench.composite_pipeline(xs, [torch.zeros(10_000) for _ in xs], "sign"), ours)
