"""Trainer throughput: rounds per second for each algorithm x compressor on the default setting
(embedded digits, MLP, 20 clients, 5 per round, K = 10), and the share of round time spent in
compression (the fused ``*_ef`` ops and payload construction), on the wire (``to_bytes`` +
``Payload.from_bytes``, which includes the CRC and validation) and in server decode + aggregation
(DPPF's pull-push step, an algorithm step rather than compression, has its own column).

Design target (section 5): compression adds < 5 % to a round's wall time. Each benchmark call runs
10 rounds after 10 warm-up rounds (so FedSynSAM includes one synthetic-set refresh per call).
Run with ``pytest benchmarks/test_bench_trainer.py --benchmark-only``.
"""

from __future__ import annotations

import math

import pytest

from fedsynsam.algorithms import ALGORITHMS
from fedsynsam.config import COMPRESSORS, Config
from fedsynsam.data import load_dataset
from fedsynsam.estimate import summarize
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
            "pull-push (DPPF)",
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
            share("algorithm"),
        ],
    )


@pytest.mark.parametrize(
    "schedule, overrides",
    [
        (
            "trajectory matching, every refresh 100 iterations (first)",
            {"syn_objective": "trajectory", "syn_iters": 100, "syn_refresh_iters": 100},
        ),
        ("trajectory matching: 60 from noise, then 8 warm", {"syn_objective": "trajectory"}),
        ("gradient matching (default): 100 from noise, then 20 warm", {}),
    ],
)
def test_distillation_share_of_a_run(benchmark, table, digits, schedule, overrides):
    """Share of a whole default FedSynSAM run (100 rounds, top-k + EF) spent distilling D_syn (the
    first set plus 9 refreshes), next to what it buys: the median cosine of ĝ with ∇F(w^t) over the
    rounds that use D_syn (``diagnose = "estimate"``, whose time is kept out of the run's seconds).
    The first schedule is the iteration schedule this project had until warm refreshes got their
    own count; its measured share then, with torch.optim's Adam (whose first construction imports
    torch._dynamo) and flat-view unrolls, was 74 % (22 of 30 s)."""
    rounds = 100 if benchmark.enabled else 20
    cfg = Config(algorithm="fedsynsam", compressor="topk", rounds=rounds, diagnose="estimate", **overrides)
    cfg = cfg.validate()
    runs = []

    def run():
        trainer = Trainer(cfg, dataset=digits, log=lambda line: None)
        records = trainer.run(progress=False)
        runs.append((trainer, records))

    benchmark.group = "fedsynsam: one default run"
    benchmark.pedantic(run, rounds=1, warmup_rounds=0, iterations=1)
    trainer, records = runs[-1]
    seconds = sum(r["seconds"] for r in records)
    cosine = summarize(records).get("synthetic", {}).get("median", math.nan)
    table(
        f"FedSynSAM distillation share of a whole run ({rounds} rounds, digits, top-k + EF)",
        ["schedule", "run s", "distillation s", "share", "refreshes", "s/refresh", "median cos(ĝ, ∇F)", "test acc"],
        [
            schedule,
            seconds,
            trainer.timings["distill"],
            f"{100 * trainer.timings['distill'] / seconds:.1f}%",
            len(trainer.state.distill_losses),
            trainer.timings["distill"] / max(len(trainer.state.distill_losses), 1),
            cosine,
            records[-1]["test_acc"],
        ],
    )
