"""Trainer throughput: rounds per second for each algorithm x compressor on the default setting
(embedded digits, MLP, 20 clients, 5 per round, K = 10), and the share of round time spent in
compression (the fused ``*_ef`` ops and payload construction), on the wire (``to_bytes`` +
``Payload.from_bytes``, which includes the CRC and validation) and in server decode + aggregation.

Design target (section 5): compression adds < 5 % to a round's wall time. Each benchmark call runs
10 rounds after 10 warm-up rounds (so FedSynSAM includes one synthetic-set refresh per call).
Run with ``pytest benchmarks/test_bench_trainer.py --benchmark-only``.
"""

from __future__ import annotations

import pytest

from fedsynsam.algorithms import ALGORITHMS
from fedsynsam.config import COMPRESSORS, Config
from fedsynsam.data import load_dataset
from fedsynsam.trainer import Trainer

ROUNDS = 10


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_rounds_per_second(benchmark, table, digits, algorithm, compressor):
    trainer = Trainer(Config(algorithm=algorithm, compressor=compressor, rounds=10**6), dataset=digits)
    for _ in range(ROUNDS):
        trainer.run_round()
    for key in trainer.timings:
        trainer.timings[key] = 0.0
    benchmark.group = "trainer: 10 rounds"
    calls = []

    def ten_rounds():
        calls.append(sum(trainer.run_round()["seconds"] for _ in range(ROUNDS)))

    benchmark.pedantic(ten_rounds, rounds=3 if benchmark.enabled else 1, warmup_rounds=0, iterations=1)
    total = sum(calls)
    t = trainer.timings
    share = lambda *keys: f"{100 * sum(t[k] for k in keys) / total:.1f}%"  # noqa: E731
    table(
        "fedsynsam trainer: default setting, per round",
        [
            "algorithm",
            "compressor",
            "rounds/s",
            "ms/round",
            "compress",
            "wire (to/from bytes)",
            "decode+aggregate",
            "compress+decode+aggregate",
            "local training",
            "distillation",
        ],
        [
            algorithm,
            compressor,
            len(calls) * ROUNDS / total,
            1e3 * total / (len(calls) * ROUNDS),
            share("compress"),
            share("wire"),
            share("aggregate"),
            share("compress", "aggregate"),
            share("local"),
            share("distill"),
        ],
    )
