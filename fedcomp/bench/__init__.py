"""Benchmarking fedcomp: the torch-composite baselines, the op cases with their traffic model,
the timing harness and the ``fedcomp-bench`` command (``python -m fedcomp.bench``).

One timing path: the command, the pytest-benchmark suite (``benchmarks/``) and the demo
(``python -m fedcomp.demo``) all build their inputs from :data:`CASES` or time through
:func:`time_call`.
"""

from __future__ import annotations

from .cases import BACKENDS, CASES, DTYPES, Case, Inputs, Params, traffic_bytes
from .cli import format_table, main
from .composites import (
    composite_add,
    composite_decode_mean,
    composite_pipeline,
    composite_qsgd,
    composite_randk_ef,
    composite_sign_accumulate,
    composite_sign_decode,
    composite_sign_ef,
    composite_sparse_accumulate,
    composite_topk_ef,
    pack_bits,
    unpack_bits,
)
from .harness import Row, Unavailable, bandwidth, check_backend, measure, median_ms, run, time_call

__all__ = [
    "BACKENDS",
    "CASES",
    "DTYPES",
    "Case",
    "Inputs",
    "Params",
    "Row",
    "Unavailable",
    "bandwidth",
    "check_backend",
    "composite_add",
    "composite_decode_mean",
    "composite_pipeline",
    "composite_qsgd",
    "composite_randk_ef",
    "composite_sign_accumulate",
    "composite_sign_decode",
    "composite_sign_ef",
    "composite_sparse_accumulate",
    "composite_topk_ef",
    "format_table",
    "main",
    "measure",
    "median_ms",
    "pack_bits",
    "run",
    "time_call",
    "traffic_bytes",
    "unpack_bits",
]
