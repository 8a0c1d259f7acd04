"""docs/experiment_mnist.py: the grids are valid configurations, and the paired analysis (95 %
Student-t interval, seeds agreeing) is right on hand-made summaries."""

from __future__ import annotations

import importlib.util
import json
import math
import statistics
import sys
from pathlib import Path

import pytest

from fedsynsam.config import Config

_PATH = Path(__file__).resolve().parent.parent / "docs" / "experiment_mnist.py"
_spec = importlib.util.spec_from_file_location("experiment_mnist", _PATH)
exp = importlib.util.module_from_spec(_spec)
sys.modules["experiment_mnist"] = exp  # dataclasses look their module up there
_spec.loader.exec_module(exp)


def test_every_run_of_every_grid_is_a_valid_config():
    units = 0
    for g in exp.GRIDS:
        for a, c, s in g.units:
            Config.from_dict({**exp.BASE, **g.overrides, "algorithm": a, "compressor": c, "seed": s}).validate()
            units += 1
    assert units == 2 * 5 * 3 * 5 + 4 * 4 * 3 + 5 * 3  # main grids, ρ sweep, ablations
    assert exp.BASE["dataset"] == "mnist5k" and exp.BASE["model"] == "cnn"


def _write(out: Path, grid: str, a: str, c: str, s: int, **values) -> None:
    run = out / grid / f"{a}-{c}-s{s}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(values))


def test_paired_interval_and_agreement(tmp_path):
    accs = {"none": [0.90, 0.92, 0.91, 0.93, 0.89], "topk": [0.88, 0.91, 0.92, 0.90, 0.86]}
    for c, values in accs.items():
        for s, v in enumerate(values):
            if not (c == "topk" and s == 4):  # one run unfinished: that seed drops out of the pairing
                _write(tmp_path, "alpha0.1", "fedavg", c, s, mean_test_acc_last5=v)
    diffs = exp.paired(tmp_path, "alpha0.1", ("fedavg", "topk"), "alpha0.1", ("fedavg", "none"), "mean_test_acc_last5")
    assert diffs == pytest.approx([-0.02, -0.01, 0.01, -0.03])
    sub = exp.paired(tmp_path, "alpha0.1", ("fedavg", "topk"), "alpha0.1", ("fedavg", "none"), "mean_test_acc_last5",
                     exp.SUB_SEEDS)  # fmt: skip
    assert sub == pytest.approx([-0.02, -0.01, 0.01])  # a sub-grid compares on its own seeds only
    m, lo, hi = exp.interval(diffs, 100.0)
    half = 3.182 * statistics.stdev(diffs) * 100 / math.sqrt(4)  # t(0.975, 3 degrees of freedom)
    assert m == pytest.approx(-1.25) and lo == pytest.approx(m - half) and hi == pytest.approx(m + half)
    assert exp.cell(diffs, 100.0, -1).endswith(" 3/4")  # three seeds lower, as claimed
    assert exp.cell([], 100.0, -1) == "n/a"
    assert exp.cell([0.004], 100.0, 0) == "+0.40 n=1"  # one seed: the mean, no interval
    assert math.isnan(exp.interval([0.5], 1.0)[1])


def test_claims_and_sweep_plots_are_written(tmp_path):
    rows = [("1: a − b", [-0.01, -0.02, -0.015]), ("2: c − d", [0.3]), ("3: e − f", [])]  # 3, 1 and 0 seeds
    effects = {g: {key: rows for key, _, _ in exp.FOREST} for g in ("α = 0.1", "α = 0.5")}
    claims = exp.plot_claims(effects, tmp_path / "claims.png")
    points = {"fedsam": [(0.1, 94.0, 7.0), (0.01, 94.5, 9.0)], "fedsynsam": [(0.05, 94.8, 11.0)]}
    sweep = exp.plot_sweep(points, (94.6, 12.7), tmp_path / "rho_sweep.png")
    for path in (claims, sweep):
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
