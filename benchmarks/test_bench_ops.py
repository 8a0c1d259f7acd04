"""Each op x provider x n against the torch composite of the same op, in one run.

The inputs and the calls are ``fedcomp-bench``'s (:data:`fedcomp.bench.CASES`), so the suite,
the command and the demo time the same thing. Providers: ``cpu`` (the C++ kernels, what
``auto`` picks for CPU tensors here), ``reference`` (the pure-PyTorch spec, only up to 10^6:
it sorts), ``composite`` (the op written as a chain of ATen calls), and ``add`` (one
in-place add of the same n, the yardstick). Run:

    pytest benchmarks/ --benchmark-only

For sizes, dtypes, backends and roofline fractions of your own, use ``fedcomp-bench``.
"""

from __future__ import annotations

import pytest
import torch

from fedcomp import _backend, bench
from fedcomp.bench import CASES, Params

SIZES = [10**5, 10**6, 10**7]
PROVIDERS = {"cpu": "auto", "reference": "reference", "composite": "composite"}
OPS = ["topk_ef", "randk_ef", "sign_ef", "qsgd", "sign_decode", "qsgd_decode", "sign_majority",
       "sign_accumulate_many", "sparse_accumulate", "pipeline_topk"]  # fmt: skip


def _rounds(n: int, provider: str) -> int:
    return {10**5: 30, 10**6: 10, 10**7: 7}[n] if provider in ("cpu", "add") else (5 if n < 10**7 else 3)


def _skip_unavailable(provider: str, n: int) -> None:
    if provider == "cpu" and _backend.cpu_backend() != "cpu":
        pytest.skip(f"C++ CPU kernels not built: {_backend.cpu_error()}")
    if provider == "reference" and n > 10**6:
        pytest.skip("the reference sorts the whole input; timed up to 10^6 only")


@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_add_yardstick(record, n):
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(n, generator=g), torch.randn(n, generator=g)
    record("add", n, "add", lambda: bench.composite_add(x, r), _rounds(n, "add"))


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("n", SIZES, ids=lambda n: f"n={n:.0e}")
def test_op(record, n, op, provider):
    _skip_unavailable(provider, n)
    case = CASES[op]
    if PROVIDERS[provider] not in case.backends():
        pytest.skip(f"no {provider} variant of {op}")
    inputs = case.make(n, torch.float32, torch.device("cpu"), Params())
    record(op, n, provider, case.call(PROVIDERS[provider], inputs), _rounds(n, provider))
