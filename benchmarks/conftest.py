"""Collects the medians of every benchmark and prints ratio tables at the end.

For each op and n the table gives each provider's median time, its speed-up
over the torch composite of the same op measured in the same run, and its
time relative to one in-place add of the same n (the memory-bound yardstick
of design.md section 5).
"""

from __future__ import annotations

from collections import defaultdict

import pytest

from fedcomp.bench import format_table

_RESULTS: dict[tuple[str, int], dict[str, float]] = defaultdict(dict)
_TABLES: dict[str, tuple[list[str], list[list[object]]]] = {}


@pytest.fixture
def table():
    """Call as table(title, header, row): appends a row to a table printed at the end of the run."""

    def add(title: str, header: list[str], row: list[object]) -> None:
        _TABLES.setdefault(title, (header, []))[1].append(row)

    return add


@pytest.fixture
def record(benchmark):
    """Call as record(op, n, provider, fn, rounds, warmup=1): benchmarks fn and stores its median (ms)."""

    def run(op: str, n: int, provider: str, fn, rounds: int, warmup: int = 1):
        benchmark.group = f"{op} n={n:.0e}"
        benchmark.pedantic(fn, rounds=rounds, warmup_rounds=warmup, iterations=1)
        if benchmark.stats is not None:  # None under --benchmark-disable (the test suite's smoke run)
            _RESULTS[(op, n)][provider] = benchmark.stats.stats.median * 1e3

    return run


@pytest.fixture(scope="session")
def spawn_ranks(request, tmp_path_factory):
    """Call as ``spawn_ranks(worker, world, name)``: runs ``worker(rank, port, out, small)`` on
    ``world`` processes (``small``: the suite's ``--benchmark-disable`` smoke run) and returns
    what they saved to ``out/name``."""
    import torch
    import torch.multiprocessing as mp

    from fedsynsam.flower.deploy import free_port

    small = bool(request.config.getoption("benchmark_disable", False))

    def run(worker, world: int, name: str):
        out = tmp_path_factory.mktemp(name.partition(".")[0])
        mp.spawn(worker, args=(free_port(), str(out), small), nprocs=world, join=True)
        return torch.load(out / name, weights_only=False)

    return run


def pytest_terminal_summary(terminalreporter):
    for title, (header, rows) in _TABLES.items():
        terminalreporter.write_sep("=", title)
        terminalreporter.write_line(format_table(header, rows))
    if not _RESULTS:
        return
    adds = {n: times["add"] for (op, n), times in _RESULTS.items() if op == "add" and "add" in times}
    rows = []
    for (op, n), times in sorted(_RESULTS.items()):
        if op == "add":
            continue
        composite = times.get("composite")
        for provider, ms in sorted(times.items()):
            rows.append(
                [
                    op,
                    f"{n:.0e}",
                    provider,
                    ms,
                    f"{composite / ms:.1f}x" if composite else "",
                    f"{ms / adds[n]:.1f}x" if n in adds else "",
                ]
            )
    terminalreporter.write_sep("=", "fedcomp ratio table (median ms)")
    terminalreporter.write_line(
        format_table(["op", "n", "provider", "median ms", "speed-up vs composite", "time / in-place add"], rows)
    )
