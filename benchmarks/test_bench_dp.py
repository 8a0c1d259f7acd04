"""What data-parallel training costs on torch.distributed: time per SGD step and per
synchronisation of ``ddp``, ``localsgd`` and ``dppf`` on 4 gloo ranks (127.0.0.1), and the
synchronisation's bytes and time with fedcomp's top-k 1 % + EF against an uncompressed
all-reduce of the same model, measured in the same run.

Setting: mnist5k + CNN (20,538 parameters), batch 32 per worker; 30 timed repetitions after 5
warm-up ones, median over repetitions of the slowest rank's time (a collective ends when its
slowest member does). Under ``--benchmark-disable`` (the suite's smoke run) it shrinks to the
digits MLP and 3 repetitions. Run with ``pytest benchmarks/test_bench_dp.py --benchmark-only -s``.

Each rank uses one torch thread; with 4 ranks on fewer cores than 4 the ranks share cores, and
the times say so (the header gives the core count).
"""

from __future__ import annotations

import datetime
import os
import statistics
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from fedsynsam.dp import DPConfig

pytestmark = pytest.mark.skipif(
    not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo is not available"
)

WORLD = 4


def _slowest(seconds: list[float]) -> list[float]:
    """Per repetition, the slowest rank's time (every rank holds the list afterwards)."""
    t = torch.tensor(seconds, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def _timed(fn, reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        tic = time.perf_counter()
        fn()
        times.append(time.perf_counter() - tic)
    return _slowest(times)


def _worker(rank: int, port: int, out: str, small: bool) -> None:
    from fedsynsam.data import load_dataset
    from fedsynsam.dp import Synchronizer
    from fedsynsam.dp.trainer import DataParallelTrainer, _flat

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=datetime.timedelta(seconds=300))
    torch.set_num_threads(1)
    reps, warmup = (3, 1) if small else (30, 5)
    setting = dict(dataset="digits", model="mlp") if small else dict(dataset="mnist5k", model="cnn")
    data, cpu, res = load_dataset(setting["dataset"]), torch.device("cpu"), {}
    try:
        for method in ("ddp", "localsgd", "dppf"):
            for compressor in ("none", "topk"):
                cfg = DPConfig(method=method, compressor=compressor, device="cpu", measure=False, **setting)
                tr = DataParallelTrainer(cfg, Path(out) / f"{method}-{compressor}", device=cpu, dataset=data)
                step = _timed(tr._sgd_step, reps, warmup)
                sync = _timed(tr._synchronise, reps, warmup) if method != "ddp" else None
                res[(method, compressor)] = {"step": step, "sync": sync, "numel": tr.numel}
        # the synchronisation alone: fedcomp top-k + EF through the all-gather vs a dense all-reduce
        x = _flat(tr.model)
        for compressor in ("none", "topk"):
            cfg = DPConfig(compressor=compressor, device="cpu", measure=False, **setting)
            sync = Synchronizer(cfg, x, cpu)
            noise = torch.Generator().manual_seed(rank)

            def once(sync=sync, noise=noise):
                sync.average(x + 1e-3 * torch.randn(x.numel(), generator=noise))

            times = _timed(once, reps, warmup)
            res[("average", compressor)] = {"sync": times, "bytes": sync.bytes_sent / (reps + warmup)}
        buf = x.clone()
        res[("all_reduce", "none")] = {
            "sync": _timed(lambda: dist.all_reduce(buf), reps, warmup),
            "bytes": 4 * x.numel(),
        }
        if rank == 0:
            torch.save(res, Path(out) / "bench.pt")
        # every rank past its last collective before any closes its connections: a rank that tears
        # down while a peer still reads from it makes gloo abort that peer (seen once, under load)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def measured(spawn_ranks):
    return spawn_ranks(_worker, WORLD, "bench.pt")


def _ms(times) -> float:
    return statistics.median(times) * 1e3


def test_dp_step_and_synchronisation_times(benchmark, table, measured):
    benchmark.pedantic(lambda: None, rounds=1, iterations=1)  # the numbers come from the ranks
    header = f"fedsynsam dp on {WORLD} gloo ranks, {os.cpu_count()} cores here (median ms, slowest rank)"
    cols = ["method", "sync compressor", "ms / SGD step", "ms / synchronisation", "ms per step at τ=4"]
    for (method, compressor), r in measured.items():
        if method not in ("ddp", "localsgd", "dppf"):
            continue
        step, sync = _ms(r["step"]), (_ms(r["sync"]) if r["sync"] is not None else 0.0)
        assert step > 0
        table(
            header, cols, [method, compressor, step, sync if r["sync"] is not None else "every step", step + sync / 4]
        )
    dense = measured[("all_reduce", "none")]
    rows = [
        ("dense all-reduce (torch)", dense),
        ("Synchronizer, uncompressed (all-reduce)", measured[("average", "none")]),
        ("Synchronizer, top-k 1 % + EF (all-gather of payload bytes)", measured[("average", "topk")]),
    ]
    base = _ms(dense["sync"])
    for name, r in rows:
        table(
            f"one synchronisation of the model ({measured[('ddp', 'none')]['numel']:,} parameters) on {WORLD} ranks",
            ["path", "bytes sent / worker", "bytes vs dense", "ms", "time vs dense all-reduce"],
            [
                name,
                int(r["bytes"]),
                f"{r['bytes'] / dense['bytes']:.3f}x",
                _ms(r["sync"]),
                f"{_ms(r['sync']) / base:.2f}x",
            ],
        )
    assert measured[("average", "topk")]["bytes"] < dense["bytes"] / 10
