"""Shared fixtures: which backends exist here, seeded inputs, mismatch reports."""

from __future__ import annotations

import pytest
import torch

import fedcomp
from fedcomp import _backend

SIZES = [0, 1, 7, 8, 9, 1023, 2**20 + 3]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def available_backends() -> list[str]:
    """Backends that serve CPU tensors in this process (the reference is the oracle, not a candidate)."""
    return ["cpu"] if _backend.cpu_backend() == "cpu" else []


@pytest.fixture(params=available_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="the C++ CPU kernels could not be built here: " + str(_backend.cpu_error())))])
def backend(request):
    """The backend under test; calls go through the public fedcomp API."""
    return request.param


def make_input(n: int, dtype: torch.dtype, seed: int = 0, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * scale).to(dtype)
    r = (torch.randn(n, generator=g) * 0.1 * scale).to(dtype)
    return x, r


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Equality to the bit (so -0.0 != 0.0), reporting the first mismatching indices."""
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    bad = torch.nonzero(_bits(actual) != _bits(expected)).flatten()
    assert bad.numel() == 0, (
        f"{what}: {bad.numel()} mismatches, first at {bad[:5].tolist()}: "
        f"got {actual[bad[:5]].tolist()}, expected {expected[bad[:5]].tolist()}"
    )


__all__ = ["SIZES", "DTYPES", "make_input", "assert_same", "fedcomp"]
