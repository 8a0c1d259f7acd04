"""Helpers for the test modules: sizes, dtypes, seeded inputs, bit-exact comparison.

(Not a conftest.py: benchmarks/ has its own conftest, and both run in one session.)
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

SIZES = [0, 1, 7, 8, 9, 1023, 2**20 + 3]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FLOWER_NODES = 3  # SuperNodes in the session's local federation (conftest.federation)


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


def tiny_config(**overrides):
    """A trainer setting small enough for 2-round runs, with FedSynSAM distilling from round 2 on."""
    from fedsynsam.config import Config

    values = dict(
        rounds=2,
        clients=4,
        per_round=2,
        local_steps=2,
        alpha=0.5,
        syn_min_models=2,
        syn_span=1,
        syn_window=4,
        syn_period=1,
        syn_iters=3,
        syn_unroll=2,
        syn_per_class=1,
    )
    values.update(overrides)
    return Config(**values)


def strip_seconds(records: list[dict]) -> list[dict]:
    """Round records without their wall-clock field (the rest must be reproducible to the bit)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def distill_digits(
    tr, models, iters, *, seed=0, init=None, objective="trajectory", targets=None, unroll=10, perturbations=None
):
    """:func:`fedsynsam.synthetic.distill` on a digits trainer ``tr``: 10 images per class, span 2,
    5 points per gradient-matching iteration, the optimiser settings of the defaults."""
    from fedsynsam.synthetic import distill

    return distill(
        tr.model,
        tr.spec,
        models,
        input_shape=(1, 8, 8),
        num_classes=10,
        per_class=10,
        unroll=unroll,
        span=2,
        iters=iters,
        lr_images=0.05,
        lr_labels=0.05,
        lr_step=0.01,
        init_step=0.05,
        generator=torch.Generator().manual_seed(seed),
        version=1,
        init=init,
        objective=objective,
        points=5,
        targets=targets,
        perturbations=perturbations,
    )


def docs_script(name: str):
    """``docs/NAME.py`` imported as module ``NAME``: registered in ``sys.modules`` (dataclasses look
    their module up there) with ``docs/`` on the path (the drivers import helpers from beside them)."""
    docs = Path(__file__).resolve().parent.parent / "docs"
    if str(docs) not in sys.path:
        sys.path.insert(0, str(docs))
    spec = importlib.util.spec_from_file_location(name, docs / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
