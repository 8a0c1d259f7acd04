"""Fixtures shared by the test modules: which backends exist here."""

from __future__ import annotations

import pytest

from fedcomp import _backend


def available_backends() -> list[str]:
    """Backends that serve CPU tensors in this process (the reference is the oracle, not a candidate)."""
    return ["cpu"] if _backend.cpu_backend() == "cpu" else []


@pytest.fixture(params=available_backends() or [pytest.param("cpu", marks=pytest.mark.skip(
    reason="the C++ CPU kernels could not be built here: " + str(_backend.cpu_error())))])
def backend(request):
    """The backend under test; calls go through the public fedcomp API."""
    return request.param
