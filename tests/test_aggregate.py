"""sparse_accumulate against the reference."""

from __future__ import annotations

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
