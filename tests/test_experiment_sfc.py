"""docs/experiment_sfc.py: the grids are valid configurations, numbers are recorded and read back
without the run folders, and the paired rows are right on hand-made runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import docs_script

from fedsynsam.config import Config, load_toml

exp = docs_script("experiment_sfc")


def test_the_grids_are_valid_configs_at_matched_bytes():
    base = {k: v for k, v in load_toml(exp.CONFIG).items() if k not in ("algorithms", "compressors", "seeds")}
    former = dict(zip(exp.FORMER[::2], exp.FORMER[1::2]))
    for name, (extra, compressors) in exp.GRIDS.items():
        settings = {k.lstrip("-").replace("-", "_"): v for k, v in dict(zip(extra[::2], extra[1::2])).items()}
        assert (settings == {}) == (name == "sfc") and (not settings or len(settings) == len(former))
        for c in compressors:
            Config(**base, **settings, compressor=c).validate()
    assert {(g, c) for _, g, c in exp.ROWS} == {(g, c) for g, (_, cs) in exp.GRIDS.items() for c in cs}


def _run(folder: Path, accuracy: list[float], cos: float | None) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"round": i + 1, "test_acc": a}) for i, a in enumerate(accuracy)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {
        "mean_test_acc_last5": sum(accuracy[-5:]) / 5,
        "seconds": 10.0,
        "total_uplink_bytes": 3232 * 10 * len(accuracy),
        "rounds": len(accuracy),
        "config": {"per_round": 10},
    }
    if cos is not None:
        summary["encode_cos_mean"] = cos
    (folder / "summary.json").write_text(json.dumps(summary))


def test_report_pairs_by_seed_and_survives_without_the_runs(tmp_path):
    out, records = tmp_path / "runs", tmp_path / "records.jsonl"
    for s, bump in zip(exp.SEEDS, (0.01, 0.02, 0.03)):
        _run(out / "sfc" / f"fedavg-3sfc-s{s}", [0.5] * 25 + [0.8 + bump] * 5, 0.7)
        _run(out / "sfc-adam" / f"fedavg-3sfc-s{s}", [0.5] * 25 + [0.8] * 5, 0.5)
    text = exp.report(exp.collect(out, records), tmp_path / "dest")
    # new - former, per seed +1, +2, +3 pp on the last five rounds: mean +2, t(2) interval
    assert "| 3SFC: new − former encoder | +2.00 [-0.48, +4.48] 3/3 |" in text
    assert "| 3SFC, L-BFGS, raw labels (new default) | 3 | 0.820 ± 0.010 |" in text
    assert (tmp_path / "dest" / "sfc_accuracy_vs_round.png").is_file()
    again = exp.report(exp.collect(tmp_path / "gone", records), tmp_path / "dest2")
    assert again == text
    assert len(records.read_text().splitlines()) == 6


@pytest.mark.parametrize("missing", ["sfc", "sfc-adam"])
def test_a_pair_with_one_side_missing_is_left_blank(tmp_path, missing):
    out = tmp_path / "runs"
    for grid in ("sfc", "sfc-adam"):
        if grid != missing:
            for s in exp.SEEDS:
                _run(out / grid / f"fedavg-3sfc-s{s}", [0.5] * 30, 0.6)
    text = exp.report(exp.collect(out, tmp_path / "r.jsonl"), tmp_path / "dest")
    assert "| 3SFC: new − former encoder | — | — | — |" in text
