"""Fixtures shared by the test modules: which backends exist here."""

from __future__ import annotations

import os

import pytest

# The Triton kernels run on CPU tensors through Triton's interpreter (tests/test_triton.py).
# It must be chosen before anything imports fedcomp.triton; the ahead-of-time compile
# check runs in a subprocess without it.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "0")

from fedcomp import _backend


def available_backends() -> list[str]:
    """Backends that serve CPU tensors in this process (the reference is the oracle, not a candidate)."""
    return ["cpu"] if _backend.cpu_backend() == "cpu" else []


@pytest.fixture(
    params=available_backends()
    or [
        pytest.param(
            "cpu",
            marks=pytest.mark.skip(reason="the C++ CPU kernels could not be built here: " + str(_backend.cpu_error())),
        )
    ]
)
def backend(request):
    """The backend under test; calls go through the public fedcomp API."""
    return request.param


@pytest.fixture(scope="session")
def federation(tmp_path_factory):
    """A real Flower deployment for the session: a SuperLink and FLOWER_NODES SuperNodes on
    127.0.0.1 (free ports; OMP_NUM_THREADS=1 for bit-exact runs), torn down at the end with a
    check that none of its processes outlived it."""
    pytest.importorskip("flwr")
    from _support import FLOWER_NODES

    from fedsynsam.flower.deploy import LocalFederation

    fed = LocalFederation(FLOWER_NODES, tmp_path_factory.mktemp("federation"), env={"OMP_NUM_THREADS": "1"})
    with fed:
        yield fed
    assert fed.alive() == [], "processes of the federation outlived it"
