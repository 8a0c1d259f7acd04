"""docs/experiment_mnist.py: the grids are valid configurations, and the paired analysis (95 %
Student-t interval, seeds agreeing) is right on hand-made summaries."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
from _support import docs_script

from fedsynsam.config import Config

exp = docs_script("experiment_mnist")


def test_every_run_of_every_grid_is_a_valid_config():
    units = 0
    for g in exp.GRIDS:
        for a, c, s in g.units:
            Config.from_dict({**exp.BASE, **g.overrides, "algorithm": a, "compressor": c, "seed": s}).validate()
            units += 1
    # main grids, ρ sweep, ablations, the estimate grids (3 algorithms x 3 compressors, and the
    # first objective with top-k and none, on 5 seeds)
    assert units == 2 * 5 * 3 * 5 + 4 * 4 * 3 + 5 * 3 + 3 * 3 * 5 + 2 * 5
    assert exp.BASE["dataset"] == "mnist5k" and exp.BASE["model"] == "cnn"


def _write(out: Path, grid: str, a: str, c: str, s: int, **values) -> None:
    run = out / grid / f"{a}-{c}-s{s}"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps(values))


def _config(grid: str, a: str, c: str, s: int) -> dict:
    g = exp._grid(grid)
    cfg = Config.from_dict({**exp.BASE, **g.overrides, "algorithm": a, "compressor": c, "seed": s})
    return cfg.validate().to_dict()  # as a run saves it


def test_paired_interval_and_agreement(tmp_path):
    accs = {"none": [0.90, 0.92, 0.91, 0.93, 0.89], "topk": [0.88, 0.91, 0.92, 0.90, 0.86]}
    for c, values in accs.items():
        for s, v in enumerate(values):
            if not (c == "topk" and s == 4):  # one run unfinished: that seed drops out of the pairing
                _write(tmp_path, "alpha0.1", "fedavg", c, s, mean_test_acc_last5=v, lambda_max=1.0)
    _write(tmp_path, "alpha0.1", "fedavg", "topk", 4, mean_test_acc_last5=0.5)  # trained, not yet measured
    results = exp.Results(tmp_path, tmp_path / "runs.jsonl")
    diffs = exp.paired(results, "alpha0.1", ("fedavg", "topk"), "alpha0.1", ("fedavg", "none"), "mean_test_acc_last5")
    assert diffs == pytest.approx([-0.02, -0.01, 0.01, -0.03])
    sub = exp.paired(results, "alpha0.1", ("fedavg", "topk"), "alpha0.1", ("fedavg", "none"), "mean_test_acc_last5",
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


def test_selected_parts():
    main, sub, every = exp.selected("main"), exp.selected("sub"), exp.selected("all")
    estimate = exp.selected("estimate")
    assert len(main) == 150 and len(every) == 268 and len(set(every)) == 268 and len(estimate) == 55 + 15
    fedavg = [("alpha0.1", "fedavg", c, s) for s in exp.MAIN_SEEDS for c in exp.COMPRESSORS]
    assert estimate[55:] == fedavg  # claim 3's baseline, last
    assert set(estimate[:55]) == {t for t in every if t[0] in exp.ESTIMATE_GRIDS}
    # seed by seed through top-k and none (FedSynSAM first), sign after every seed of those
    assert estimate[0] == ("estimate", "fedsynsam", "topk", 0)
    assert [t[3] for t in estimate[:8]] == [0] * 8 and {t[2] for t in estimate[:8]} == {"topk", "none"}
    assert {t[2] for t in estimate[40:55]} == {"sign"} and "sign" not in {t[2] for t in estimate[:40]}
    # the sub-grids plus the main-grid runs they are paired with (every algorithm, top-k, α = 0.1)
    base = {("alpha0.1", a, "topk", s) for a in exp.ALGORITHMS for s in exp.SUB_SEEDS}
    assert set(sub) == (set(every) - set(main) - set(estimate)) | base and len(sub) == 63 + 15
    assert [t[3] for t in main[:30]] == [0] * 30  # seed by seed, so an early stop leaves pairs
    with pytest.raises(ValueError, match="part must be one of all, main, sub, estimate; got 'rho'"):
        exp.selected("rho")


def test_records_survive_without_the_run_folders(tmp_path):
    out, records = tmp_path / "runs", tmp_path / "runs.jsonl"
    keys = [("alpha0.1", "fedavg", "topk", s) for s in (0, 1)] + [("rho0.1", "fedsam", "topk", 0)]
    for i, key in enumerate(keys):
        _write(out, *key, config=_config(*key), mean_test_acc_last5=0.9 + i / 100, lambda_max=10.0 + i)
    _write(out, "alpha0.1", "fedsam", "topk", 0, config=_config("alpha0.1", "fedsam", "topk", 0))  # not measured
    results = exp.Results(out, records)
    assert [results.record(*k) for k in keys] == [True] * 3
    assert not results.record(*keys[0])  # the same summary is not appended twice
    assert not results.record("alpha0.1", "fedsam", "topk", 0)  # unmeasured runs are not recorded
    assert len(records.read_text().splitlines()) == 3
    shutil.rmtree(out)
    again = exp.Results(out, records)
    assert [again.get(*k)["lambda_max"] for k in keys] == [10.0, 11.0, 12.0]
    assert again.measured(*keys[2]) and not again.measured("alpha0.1", "fedsam", "topk", 0)
    assert again.folder(*keys[0]) == {}
    # a summary made with other settings than its grid's is refused, naming the line
    bad = {"grid": "rho0.1", "algorithm": "fedsam", "compressor": "topk", "seed": 1,
           "summary": {"config": _config("rho0.2", "fedsam", "topk", 1), "lambda_max": 1.0}}  # fmt: skip
    with records.open("a") as f:
        f.write(json.dumps(bad) + "\n")
    with pytest.raises(ValueError, match=r"runs.jsonl:4 was run with other settings than grid rho0.1 \(rho\)"):
        exp.Results(out, records)


def test_report_writes_what_the_runs_support_and_keeps_the_rest(tmp_path):
    out, records, dest = tmp_path / "runs", tmp_path / "runs.jsonl", tmp_path / "report"
    dest.mkdir()
    (dest / "claims.md").write_text("the main grids' tables, from an earlier checkout\n")
    for s in exp.SUB_SEEDS:  # FedAvg top-k on the sweep's seeds, and FedSAM at ρ = 0.1
        runs = ((("alpha0.1", "fedavg", "topk", s), 0.90, 12.0), (("rho0.1", "fedsam", "topk", s), 0.91 + s / 100, 4.0))
        for key, acc, lam in runs:
            _write(out, *key, config=_config(*key), mean_test_acc_last5=acc, lambda_max=lam, hessian_trace=1.0,
                   valley_width=0.5)  # fmt: skip
    text = exp.report(exp.Results(out, records), dest)
    assert (dest / "claims.md").read_text() == "the main grids' tables, from an earlier checkout\n"
    assert "claims.md: no finished run for it" in text
    sweep = (dest / "sweep.md").read_text()
    assert "| fedsam | 0.1 | 3 | 92.00 | 4.00 | +2.00 [-0.48, +4.48] n=3 |" in sweep
    assert (dest / "rho_sweep.png").read_bytes()[:4] == b"\x89PNG"


def test_estimate_report_on_hand_made_summaries(tmp_path):
    """The estimate table's means over seeds, the per-seed comparison and claim 2's column."""
    out, records, dest = tmp_path / "runs", tmp_path / "runs.jsonl", tmp_path / "report"
    medians = {  # (grid, algorithm, compressor, key): per seed 0, 1
        ("estimate", "fedsynsam", "topk", "synthetic"): (0.5, 0.4),
        ("estimate", "fedsynsam", "topk", "oracle"): (0.9, 0.9),
        ("estimate", "fedlesam", "topk", "eps"): (-0.1, 0.0),
        ("estimate", "fedlesam", "none", "eps"): (-0.3, -0.3),
        ("estimate", "fedsam", "topk", "eps"): (0.3, 0.45),
    }
    runs = {}
    for (grid, a, c, key), values in medians.items():
        for s, v in enumerate(values):
            runs.setdefault((grid, a, c, s), {})[key] = {"median": v, "q1": v, "q3": v, "rounds": 50}
    for (grid, a, c, s), est in runs.items():
        _write(out, grid, a, c, s, config=_config(grid, a, c, s), estimate=est, mean_test_acc_last5=0.9,
               lambda_max=5.0, hessian_trace=1.0, valley_width=0.5)  # fmt: skip
    exp.report(exp.Results(out, records), dest)
    text = (dest / "estimate.md").read_text()
    assert "| FedSynSAM, gradient matching (default): ĝ | +0.45 [-0.19, +1.09] n=2 | not run | not run |" in text
    assert "| oracle: gradient matching to ∇F (diagnostic, not used) | +0.90 [+0.90, +0.90] n=2 |" in text
    # seed 0: 0.5 beats max(-0.1, 0.3); seed 1: 0.4 does not beat 0.45
    assert "| topk | 1/2 | +0.08 [-1.51, +1.66] n=2 | +0.25 [-0.39, +0.89] n=2 |" in text
