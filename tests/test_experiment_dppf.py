"""docs/experiment_dppf.py: every run is a valid configuration, records made with other settings
are refused, and the report's paired rows are right on hand-made summaries."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _support import docs_script

from fedsynsam.dp import DPConfig

exp = docs_script("experiment_dppf")


def test_every_run_is_a_valid_config():
    units = exp.units()
    for key in units:
        DPConfig.from_dict(exp.settings(*key)).validate()
    assert len(units) == len(exp.CONFIGS) * 2 * 3 + 3
    assert {exp.settings(*k)["steps"] for k in units} == {800}  # the same SGD steps for every method
    assert (
        len({(exp.settings(*k)["dppf_alpha"], exp.settings(*k)["dppf_lambda"]) for k in units if "dppf" in k[1]}) == 2
    )


def _summary(key, **values) -> dict:
    cfg = DPConfig.from_dict(exp.settings(*key)).validate().to_dict()
    return {"config": cfg, "workers": exp.WORKERS, **values}


def _write(out: Path, key, **values) -> None:
    path = exp.folder(out, *key)
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(_summary(key, **values)))


def test_records_with_other_settings_are_refused(tmp_path):
    key = ("iid", "dppf-t4-a", "none", 0)
    summary = _summary(key)
    summary["config"]["dppf_lambda"] = 0.5
    records = tmp_path / "runs.jsonl"
    records.write_text(
        json.dumps({"grid": "iid", "config": "dppf-t4-a", "compressor": "none", "seed": 0, "summary": summary}) + "\n"
    )
    with pytest.raises(ValueError, match="dppf_lambda"):
        exp.Results(tmp_path / "runs", records)


def test_report_pairs_runs_by_seed(tmp_path):
    out, records = tmp_path / "runs", tmp_path / "runs.jsonl"
    measures = dict(
        lambda_max=5.0, hessian_trace=50.0, valley_width=0.5, final_spread=0.3, sent_bytes_per_worker=1e6, seconds=30.0
    )
    for s, (dppf, local) in enumerate([(0.97, 0.96), (0.98, 0.96), (0.97, 0.97)]):
        for config, acc in (("dppf-t4-a", dppf), ("localsgd-t4", local)):
            gap = 0.02 if config == "localsgd-t4" else 0.01
            _write(out, ("iid", config, "none", s), final_test_acc=acc, generalization_gap_acc=gap,
                   generalization_gap_loss=gap, inverse_mean_valley=1.0 + gap * 10, **measures)  # fmt: skip
    results = exp.Results(out, records)
    for key in exp.units():
        results.record(*key)
    assert len(records.read_text().splitlines()) == 6
    text = exp.report(exp.Results(tmp_path / "elsewhere", records), tmp_path / "dest")  # from the records alone
    # DPPF - local SGD: +1, +2, 0 pp -> mean +1.00, 2 of 3 seeds positive
    row = next(line for line in text.splitlines() if line.startswith("| DPPF, τ=4, α=0.1, λ=0.02 − local SGD |"))
    assert "+1.00 [" in row and "] 2/3" in row
    assert "-1.00 [-1.00, -1.00] 3/3" in row  # the gap, lower for DPPF in every seed
    assert "| IMV | +" in text  # the IMV rises with the gap in these summaries
    assert (tmp_path / "dest" / "results.md").read_text() == text
