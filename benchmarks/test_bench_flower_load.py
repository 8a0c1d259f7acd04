"""How large a Flower federation this machine holds: many SuperNodes on 127.0.0.1, a fedsynsam
run with 10 % of the replies broken at random, and what it costs.

Setting (``FLOWER_LOAD_NODES`` / ``FLOWER_LOAD_ROUNDS`` override the first two): 50 SuperNodes
(one partition each, with their warm workers unless ``NODE_CONFIG`` says otherwise), 10
sampled per round, 30 rounds, FedAvg + top-k + EF on the embedded digits. Faults: every (round, client) pair fails
with probability 0.1 (seeded), with one of ``raise``, ``flip``, ``truncate``, ``numel``,
``kind`` (the app's fault injector; ``hang`` is left out so that rounds are not timed by
``round_timeout``).

Checked: every round has its record; every client that failed was one whose fault was
injected, and every injected fault of a client that replied is in its round's record, so
no update was lost that was not injected. Reported: seconds per round, the federation's
memory (proportional set size, so shared pages count once) per process kind and per
SuperNode with its SuperExec and warm worker, and the SuperLink's CPU share.

Runs only with ``--benchmark-only`` (``pytest benchmarks/test_bench_flower_load.py
--benchmark-only -s``; 17 minutes here): it does not fit the test suite's time.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time

import pytest

pytest.importorskip("flwr")

from fedsynsam.config import Config  # noqa: E402
from fedsynsam.flower.deploy import LocalFederation  # noqa: E402
from fedsynsam.flower.settings import AppSettings, write_app  # noqa: E402

NODES = int(os.environ.get("FLOWER_LOAD_NODES", "50"))
ROUNDS = int(os.environ.get("FLOWER_LOAD_ROUNDS", "30"))
PER_ROUND = 10
FAULT_RATE = 0.1
KINDS = ("raise", "flip", "truncate", "numel", "kind")
TICK = os.sysconf("SC_CLK_TCK")
# extra node config: "" runs the nodes as deployed (a warm worker each, 354 MB per node here);
# FLOWER_LOAD_NODE_CONFIG="warm-worker=false" imports torch per message instead (185 MB per node)
NODE_CONFIG = os.environ.get("FLOWER_LOAD_NODE_CONFIG", "")


def faults(nodes: int, rounds: int, rate: float, seed: int = 0) -> dict[tuple[int, int], str]:
    """(round, client) -> fault kind, each pair with probability ``rate``."""
    rng = random.Random(seed)
    return {(r, c): rng.choice(KINDS) for r in range(1, rounds + 1) for c in range(nodes) if rng.random() < rate}


def _kind(pid: int) -> str | None:
    try:
        cmd = open(f"/proc/{pid}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    for name in ("flower-superlink", "flower-supernode", "flower-superexec", "fedsynsam.flower.worker"):
        if name in cmd:
            return name
    if "flwr-serverapp" in cmd:
        return "flwr-serverapp"
    if "flwr-clientapp" in cmd:
        return "flwr-clientapp"
    return "other"


def _pss_mb(pid: int) -> float:
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _cpu_s(pid: int) -> float:
    try:
        fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / TICK
    except (OSError, IndexError, ValueError):
        return 0.0


def memory(pids) -> dict[str, tuple[int, float]]:
    """Process kind -> (count, total PSS MB)."""
    out: dict[str, list] = {}
    for pid in pids:
        kind = _kind(pid)
        if kind is not None:
            entry = out.setdefault(kind, [0, 0.0])
            entry[0] += 1
            entry[1] += _pss_mb(pid)
    return {k: (n, mb) for k, (n, mb) in out.items()}


def test_flower_load(request, benchmark, table, tmp_path):
    if request.config.getoption("benchmark_disable", False):
        pytest.skip("the load benchmark runs under --benchmark-only (17 minutes here); see the module docstring")
    injected = faults(NODES, ROUNDS, FAULT_RATE)
    cfg = Config(algorithm="fedavg", compressor="topk", clients=NODES, per_round=PER_ROUND, rounds=ROUNDS).validate()
    out = tmp_path / "out"
    spec = ",".join(f"{k}:{c}@{r}" for (r, c), k in sorted(injected.items()))
    write_app(
        tmp_path / "app", cfg, AppSettings(out=str(out), connect_timeout=600, round_timeout=120, inject_faults=spec)
    )
    with LocalFederation(NODES, tmp_path / "federation", startup_timeout=300, node_config=NODE_CONFIG) as fed:
        link = fed.procs[0].pid
        sampled: list[dict] = []

        def sample():  # the federation's memory once the rounds run (every warm worker started)
            metrics = out / "metrics.jsonl"
            while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= min(5, ROUNDS)):
                if not running:
                    return
                time.sleep(1.0)
            sampled.append(memory(fed.alive()))

        running = True
        watcher = threading.Thread(target=sample, daemon=True)
        watcher.start()
        cpu0, wall0 = _cpu_s(link), time.monotonic()
        benchmark.group = "flower: load"
        try:
            benchmark.pedantic(lambda: fed.run(tmp_path / "app", timeout=3600), rounds=1, iterations=1)
        finally:
            running = False
        link_share = (_cpu_s(link) - cpu0) / (time.monotonic() - wall0)
        watcher.join(timeout=5)

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == list(range(1, ROUNDS + 1)), "a round has no record"
    failed = {(r["round"], f["client"]) for r in records for f in r.get("failed_clients", [])}
    replied = {
        (row["round"], row["client"])
        for row in map(json.loads, (out / "flower_timings.jsonl").read_text().splitlines())
    }
    assert failed <= set(injected), f"lost updates that were not injected: {sorted(failed - set(injected))}"
    missed = {p for p in replied if p in injected} - failed
    assert not missed, f"injected faults that were aggregated: {sorted(missed)}"

    seconds = [r["seconds"] for r in records[1:]] or [records[0]["seconds"]]
    mem = sampled[0] if sampled else {}
    per_node = sum(
        mb for k, (n, mb) in mem.items() if k in ("flower-supernode", "flower-superexec", "fedsynsam.flower.worker")
    )
    per_node /= max(NODES, 1)
    benchmark.extra_info.update(
        nodes=NODES, rounds=ROUNDS, failed=len(failed), memory=mem, superlink_cpu=link_share, s_per_round=seconds
    )
    title = (
        f"Flower under load: {NODES} SuperNodes on {os.cpu_count()} cores, {PER_ROUND} per round, {ROUNDS} rounds, "
        f"{FAULT_RATE:.0%} of (round, client) pairs fail (injected)"
    )
    table(title, ["measure", "value"], ["rounds with a record", f"{len(records)} of {ROUNDS}"])
    table(title, ["measure", "value"], ["failed replies (all injected)", f"{len(failed)} of {ROUNDS * PER_ROUND}"])
    table(title, ["measure", "value"], ["s per round, median (rounds 2 on)", f"{statistics.median(seconds):.2f}"])
    table(title, ["measure", "value"], ["s per round, max", f"{max(seconds):.2f}"])
    table(title, ["measure", "value"], ["SuperLink CPU, share of one core", f"{link_share:.1%}"])
    table(title, ["measure", "value"], ["MB per SuperNode (+ its SuperExec and warm worker), PSS", f"{per_node:.0f}"])
    table(title, ["measure", "value"], ["node config", NODE_CONFIG or "(default: warm workers)"])
    total = sum(mb for _, mb in mem.values())
    table(title, ["measure", "value"], ["MB for the whole federation, PSS", f"{total:.0f}"])
    for kind, (n, mb) in sorted(mem.items()):
        table(f"{title}: memory by process", ["process", "count", "MB each (PSS)"], [kind, n, f"{mb / n:.0f}"])
