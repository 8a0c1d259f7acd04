"""Each op x provider x n against the torch composite of the same op, in one run.

Providers: ``cpu`` (fused C++ kernels through the public API), ``reference``
(the pure-PyTorch spec, only up to 10^6: it sorts), ``composite`` (the op
written as a chain of ATen calls, fedcomp.bench), and ``add`` (one in-place
add of the same n, the yardstick). Run:

    pytest benchmarks/ --benchmark-only
"""

from __future__ import annotations

import pytest
import torch

import fedcomp
from fedcomp import _backend, bench, reference

SIZES = [10**5, 10**6, 10**7]
PROVIDERS = ["cpu", "reference", "composite"]


def _inputs(n: int):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1


def _rounds(n: int, provider: str) -> int:
    return {10**5: 30, 10**6: 10, 10**7: 7}[n] if provider in ("cpu", "add") else (5 if n < 10**7 else 3)


def _skip_unavailable(provider: str, n: int) -> None:
    if provider == "cpu" and _backend.cpu_backend() != "cpu":
        pytest.skip(f"C++ CPU kernels not built: {_backend.cpu_error()}")
    if provider == "reference" and n > 10**6:
        pytest.skip("the reference sorts the whole input; timed up to 10^6 only")


def _ops(n: int, x, r):
    k = n // 100
    bucket = 512
    packed, scales = fedcomp.sign_ef(x, r.clone(), 4096)
    codes, norms = fedcomp.qsgd(x, None, 4, bucket, seed=0)
    idx = torch.randint(0, n, (10 * k,), generator=torch.Generator().manual_seed(1))
    vals = torch.randn(10 * k)
    out = torch.zeros(n)
    stack = torch.randint(0, 256, (10, (n + 7) // 8), dtype=torch.uint8)
    signs = fedcomp.Sign().compress_many(torch.stack([x + 0.01 * i for i in range(10)]))  # one scale each
    mean = torch.empty(n)
    return {
        "topk_ef": {
            "cpu": lambda: fedcomp.topk_ef(x, r, k),
            "reference": lambda: reference.topk_ef(x, r, k),
            "composite": lambda: bench.composite_topk_ef(x, r, k),
        },
        "randk_ef": {
            "cpu": lambda: fedcomp.randk_ef(x, r, k, 7),
            "reference": lambda: reference.randk_ef_rows(x[None], r[None], [7], k),
            "composite": lambda: bench.composite_randk_ef(x, r, k),
        },
        "sign_ef": {
            "cpu": lambda: fedcomp.sign_ef(x, r),
            "reference": lambda: reference.sign_ef(x, r, n, False),
            "composite": lambda: bench.composite_sign_ef(x, r),
        },
        "qsgd": {
            "cpu": lambda: fedcomp.qsgd(x, r, 4, bucket, seed=0),
            "reference": lambda: reference.qsgd(x, r, 4, bucket, 0),
            "composite": lambda: bench.composite_qsgd(x, r, 4, bucket),
        },
        "sign_decode": {
            "cpu": lambda: fedcomp.sign_decode(packed, scales, n, 4096),
            "reference": lambda: reference.sign_decode(packed, scales, n, 4096),
            "composite": lambda: (
                torch.where(
                    torch.from_numpy(__import__("numpy").unpackbits(packed.numpy(), count=n, bitorder="little")).bool(),
                    1.0,
                    -1.0,
                )
                * scales.repeat_interleave(4096)[:n]
            ),
        },
        "qsgd_decode": {
            "cpu": lambda: fedcomp.qsgd_decode(codes, norms, n, 4, bucket),
            "reference": lambda: reference.qsgd_decode(codes, norms, n, 4, bucket),
        },
        "sign_majority (10 rows)": {
            "cpu": lambda: fedcomp.sign_majority(stack),
            "reference": lambda: reference.sign_majority(stack),
        },
        "aggregate (10 sign payloads)": {
            "cpu": lambda: fedcomp.aggregate(signs, out=mean),
            "reference": lambda: sum(reference.sign_decode(*p.sections, n, n) for p in signs) / 10,
            "composite": lambda: bench.composite_decode_mean([p.sections for p in signs], n, "sign"),
        },
        "sparse_accumulate (10 x 1%)": {
            "cpu": lambda: fedcomp.sparse_accumulate(out, idx, vals, 0.1),
            "reference": lambda: reference.sparse_accumulate(out, idx, vals, 0.1),
            "composite": lambda: out.index_add_(0, idx, vals, alpha=0.1),
        },
    }


OPS = list(_ops(8, *_inputs(8)).keys())


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_add_yardstick(record, n):
    x, r = _inputs(n)
    record("add", n, "add", lambda: bench.composite_add(x, r), _rounds(n, "add"))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_op(record, n, op, provider):
    _skip_unavailable(provider, n)
    x, r = _inputs(n)
    fn = _ops(n, x, r)[op].get(provider)
    if fn is None:
        pytest.skip(f"no {provider} variant of {op}")
    record(op, n, provider, fn, _rounds(n, provider))
