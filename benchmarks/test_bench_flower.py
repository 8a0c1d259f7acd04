"""What running on Flower costs: per-round wall time of a fedsynsam run on a real local
deployment (a SuperLink and one SuperNode per client on 127.0.0.1) against the in-process
trainer on the same setting, and the bytes of Flower's serialised messages against the fedcomp
payloads they carry.

Setting: the trainer's default (embedded digits, MLP, 20 clients, 5 per round, K = 10), so 20
SuperNodes, FedAvg and FedSynSAM with top-k + EF (FedSynSAM distilling from round 3 on, every
2 rounds, so its downlink includes D_syn). Per-round times are the ``seconds`` of each
round's record (server side: plan, the clients' round trip, aggregation, evaluation), median over
the rounds after the first (the first round starts the ClientApp machinery). The Flower round
includes what a deployment pays and the in-process loop does not: each SuperNode polls the
SuperLink (every few seconds) and starts a ClientApp process per message (importing torch).
Each reply carries the ClientApp's timestamps, so the table "where a Flower round goes" splits a
message's life into its phases (``PHASES``; from ``flower_timings.jsonl`` in the run's output).

Under ``--benchmark-disable`` (the test suite's smoke run) the setting shrinks to 3 clients and
3 rounds. Run with ``pytest benchmarks/test_bench_flower.py --benchmark-only``.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch

pytest.importorskip("flwr")

from fedsynsam.config import Config  # noqa: E402
from fedsynsam.flower.deploy import LocalFederation  # noqa: E402
from fedsynsam.flower.settings import AppSettings, write_app  # noqa: E402
from fedsynsam.trainer import Trainer  # noqa: E402

DEFAULT = Config()


@pytest.fixture(scope="module")
def setting(request):
    """(clients, per_round, rounds): the default setting, or a small one for the smoke run."""
    if request.config.getoption("benchmark_disable", False):
        return 3, 2, 3
    return DEFAULT.clients, DEFAULT.per_round, 6


ALGORITHMS = ["fedavg", "fedsynsam"]


def _cfg(algorithm: str, setting) -> Config:
    clients, per_round, rounds = setting
    return Config(
        algorithm=algorithm,
        compressor="topk",
        clients=clients,
        per_round=per_round,
        rounds=rounds,
        syn_min_models=DEFAULT.syn_span + 1,
        syn_period=2,  # FedSynSAM distills from round 3 on
    ).validate()


@pytest.fixture(scope="module")
def in_process(setting):
    """The in-process runs, made before the federation starts (its 20 processes starting up would
    slow them down)."""
    return {a: Trainer(_cfg(a, setting), log=lambda line: None).run(progress=False) for a in ALGORITHMS}


@pytest.fixture(scope="module")
def federation(setting, in_process, tmp_path_factory):
    clients = setting[0]
    with LocalFederation(clients, tmp_path_factory.mktemp("federation"), startup_timeout=120) as fed:
        yield fed
    assert fed.alive() == [], "processes of the federation outlived it"


PHASES = [  # (label, from, to) in out/flower_timings.jsonl
    ("SuperNode picks the message up, ClientApp process starts", "pushed", "process_start"),
    ("ClientApp imports (flwr, fedsynsam.flower)", "process_start", "imported"),
    ("flwr hands the message to the app", "imported", "received"),
    ("to the node's warm worker (incl. waiting for it to start)", "received", "work_start"),
    ("local steps + compression", "work_start", "work_end"),
    ("back to the ClientApp, reply made", "work_end", "replied"),
    ("reply reaches the ServerApp", "replied", "seen"),
]


def phases(path) -> dict[str, float]:
    """Median seconds of each phase over the messages of rounds 2 on (one line per client and round)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    later = [r for r in rows if r["round"] > 1] or rows
    out = {}
    for label, a, b in PHASES:
        spans = [r[b] - r[a] for r in later if r[a] is not None and r[b] is not None]
        out[label] = statistics.median(spans) if spans else float("nan")
    return out


def _per_round(records: list[dict]) -> float:
    later = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]
    return statistics.median(later)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_flower_round_overhead(request, benchmark, table, in_process, federation, setting, tmp_path, algorithm):
    if algorithm != "fedavg" and request.config.getoption("benchmark_disable", False):
        pytest.skip("the suite's smoke run times FedAvg only (FedSynSAM on Flower: tests/test_flower.py)")
    clients, per_round, rounds = setting
    cfg, inproc = _cfg(algorithm, setting), in_process[algorithm]

    out = tmp_path / "out"
    write_app(tmp_path / "app", cfg, AppSettings(out=str(out), connect_timeout=120, round_timeout=300))
    benchmark.group = "flower: one run"
    benchmark.pedantic(lambda: federation.run(tmp_path / "app", timeout=900), rounds=1, warmup_rounds=0, iterations=1)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    wire = json.loads((out / "flower.json").read_text())
    assert len(records) == rounds and wire["supernodes"] == clients
    # what the trainer counts as crossing the wire is what the Flower messages carried
    assert wire["payload_bytes"]["up"] == sum(r["uplink_bytes"] for r in inproc)
    assert wire["payload_bytes"]["down"] == sum(r["downlink_bytes"] for r in inproc)

    t_in, t_fl = _per_round(inproc), _per_round(records)
    spent = phases(out / "flower_timings.jsonl")
    benchmark.extra_info.update(inproc_s_per_round=t_in, flower_s_per_round=t_fl, phases=spent, **wire)
    for label, seconds in spent.items():
        table(
            f"where a Flower round goes: median seconds per message over rounds 2-{rounds} "
            f"({per_round} messages per round side by side; a round lasts about its slowest)",
            ["algorithm", "phase", "s"],
            [algorithm, label, seconds],
        )
    per_msg = rounds * per_round
    table(
        f"fedsynsam on Flower vs in-process: {clients} clients, {per_round} per round, top-k + EF, "
        f"{torch.get_num_threads()} torch threads here (median s/round after round 1)",
        [
            "algorithm",
            "in-process s/round",
            "Flower s/round",
            "Flower overhead s/round",
            "x",
            "payload down B/client",
            "message down B/client",
            "payload up B/client",
            "message up B/client",
            "message/payload up",
        ],
        [
            algorithm,
            t_in,
            t_fl,
            t_fl - t_in,
            f"{t_fl / t_in:.1f}x",
            wire["payload_bytes"]["down"] // per_msg,
            wire["message_bytes"]["down"] // per_msg,
            wire["payload_bytes"]["up"] // per_msg,
            wire["message_bytes"]["up"] // per_msg,
            f"{wire['message_bytes']['up'] / wire['payload_bytes']['up']:.2f}x",
        ],
    )
