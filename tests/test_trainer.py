"""The federated trainer: every algorithm x compressor, bytes, reproducibility, resume, CLI."""

from __future__ import annotations

import json

import pytest
import torch
from _support import strip_seconds as _strip
from _support import tiny_config as tiny

import fedcomp
from fedsynsam.algorithms import ALGORITHMS
from fedsynsam.cli import main
from fedsynsam.config import COMPRESSORS, Config
from fedsynsam.data import load_dataset
from fedsynsam.trainer import METRIC_KEYS, Trainer, build_uplink

DIGITS = load_dataset("digits")


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_every_algorithm_and_compressor_runs(algorithm, compressor):
    trainer = Trainer(tiny(algorithm=algorithm, compressor=compressor, rounds=3), dataset=DIGITS)
    records = trainer.run(progress=False)
    assert [r["round"] for r in records] == [1, 2, 3]
    for r in records:
        assert set(METRIC_KEYS) <= set(r)
        assert 0.0 <= r["test_acc"] <= 1.0 and r["train_loss"] > 0
    assert torch.isfinite(trainer.state.w).all()
    if algorithm == "fedsynsam":
        assert trainer.state.synthetic is not None
        assert records[-1]["perturbation"] == "synthetic"


def test_qsgd_runs_without_error_feedback_unless_its_quantizer_is_contractive():
    """QSGD at 4 levels per 512-entry bucket has variance bound 5.66: error feedback on it grew the
    residual until the model was NaN (round 100 of FedAvg on digits). Unset, error feedback is now
    off for QSGD (it is unbiased) and on for the others; asked for explicitly, it is refused."""
    assert Config(compressor="qsgd").validate().error_feedback is False
    assert all(Config(compressor=c).validate().error_feedback for c in COMPRESSORS if c != "qsgd")
    assert Config(compressor="topk", error_feedback=False).validate().error_feedback is False
    message = (
        r"error_feedback with qsgd needs qsgd_levels > sqrt\(qsgd_bucket\) = 22.6: QSGD's variance bound at "
        r"qsgd_levels=4, qsgd_bucket=512 is 5.66 >= 1"
    )
    with pytest.raises(ValueError, match=message):
        Config(compressor="qsgd", error_feedback=True).validate()
    assert Config(compressor="qsgd", error_feedback=True, qsgd_levels=23).validate().error_feedback
    trainer = Trainer(Config(compressor="qsgd", rounds=60), dataset=DIGITS)
    records = trainer.run(progress=False)
    assert torch.isfinite(trainer.state.w).all() and records[-1]["test_acc"] > 0.8
    contractive = Trainer(Config(compressor="qsgd", error_feedback=True, qsgd_levels=32, rounds=60), dataset=DIGITS)
    records = contractive.run(progress=False)
    assert torch.isfinite(contractive.state.w).all() and records[-1]["test_acc"] > 0.8


def test_uplink_bytes_equal_the_payload_formulas():
    for compressor in COMPRESSORS:
        cfg = tiny(compressor=compressor)
        trainer = Trainer(cfg, dataset=DIGITS)
        records = trainer.run(progress=False)
        per_client = trainer.uplink.wire_bytes(trainer.numel)
        assert all(r["uplink_bytes"] == cfg.per_round * per_client for r in records), compressor
    topk = build_uplink(tiny(compressor="topk")).wire_bytes(26122)
    assert topk == 44 + 16 + 262 * 8  # k = ceil(0.01 * 26122) values + int32 indices


def test_downlink_bytes_follow_the_algorithm():
    dense = fedcomp.Identity().wire_bytes(26122)
    rec = Trainer(tiny(algorithm="fedavg", rounds=3), dataset=DIGITS).run(progress=False)
    assert [r["downlink_bytes"] for r in rec] == [2 * dense] * 3
    rec = Trainer(tiny(algorithm="fedlesam", rounds=3), dataset=DIGITS).run(progress=False)
    assert [r["downlink_bytes"] for r in rec] == [2 * dense, 4 * dense, 4 * dense]  # + u^{t-1} from round 2
    trainer = Trainer(tiny(algorithm="fedsynsam", rounds=4, clients=2, syn_min_models=3), dataset=DIGITS)
    rec = trainer.run(progress=False)
    syn = trainer.state.synthetic.nbytes
    assert syn == fedcomp.Identity().wire_bytes(10 * 64 + 10 * 10 + 1) == 52 + 4 * (10 * 64 + 10 * 10 + 1)
    # round 1: model only; round 2: model + u^1 (no D_syn yet); later: model + D_syn when its version is new
    assert rec[0]["downlink_bytes"] == 2 * dense
    assert rec[1]["downlink_bytes"] == 4 * dense
    assert [r["downlink_bytes"] for r in rec[2:]] == [2 * (dense + syn)] * 2  # refreshed every round here
    server = Trainer(tiny(algorithm="fedsynsam", rounds=3, perturbation="server"), dataset=DIGITS).run(progress=False)
    assert server[2]["downlink_bytes"] == 2 * (dense + dense) and server[2]["perturbation"] == "synthetic-server"


def test_runs_are_reproducible():
    cfg = tiny(algorithm="fedsam", compressor="qsgd", rounds=3)
    a = Trainer(cfg, dataset=DIGITS).run(progress=False)
    b = Trainer(cfg, dataset=DIGITS).run(progress=False)
    assert _strip(a) == _strip(b)
    c = Trainer(tiny(algorithm="fedsam", compressor="qsgd", rounds=3, seed=1), dataset=DIGITS).run(progress=False)
    assert _strip(a) != _strip(c)


@pytest.mark.parametrize(
    "algorithm, compressor",
    [("fedsynsam", "topk"), ("mofedsam", "randk"), ("fedlesam", "qsgd"), ("fedavg", "sign"), ("fedavg", "powersgd")],
)
def test_resume_equals_the_uninterrupted_run_bit_for_bit(tmp_path, algorithm, compressor):
    cfg = tiny(algorithm=algorithm, compressor=compressor, rounds=6)
    full = Trainer(cfg, tmp_path / "full", dataset=DIGITS)
    full_records = full.run(progress=False)
    first = Trainer(cfg, tmp_path / "split", dataset=DIGITS)
    first.run(progress=False, stop_after=3)
    assert not (tmp_path / "split" / "summary.json").exists()
    second = Trainer(cfg, tmp_path / "split", dataset=DIGITS)
    resumed = second.run(progress=False, resume=True)
    assert _strip(resumed) == _strip(full_records)
    assert torch.equal(second.state.w, full.state.w)
    for key, r in full.uplink.state_dict().get("residuals", {}).items():
        assert torch.equal(second.uplink.state_dict()["residuals"][key], r)
    if compressor == "powersgd":  # and every client's warm-start factors
        saved, resumed_q = full.uplink.state_dict()["compressor"]["q"], second.uplink.state_dict()["compressor"]["q"]
        assert saved.keys() == resumed_q.keys() and len(saved) > 1
        assert all(torch.equal(a, b) for k in saved for a, b in zip(saved[k], resumed_q[k]))
    if algorithm == "fedsynsam":
        assert torch.equal(second.state.synthetic.images, full.state.synthetic.images)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == list(range(1, 7))


def test_error_feedback_residuals_exist_only_for_clients_that_took_part():
    trainer = Trainer(tiny(compressor="topk", clients=10, per_round=2, rounds=2), dataset=DIGITS)
    trainer.run(progress=False)
    keys = set(trainer.uplink.residuals)
    assert 2 <= len(keys) <= 4 and all(k.startswith("client") for k in keys)


def test_output_folder(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(rounds=3, compressor="topk"), out, dataset=DIGITS).run(progress=False)
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "partition.json", "metrics.jsonl", "summary.json", "checkpoint.pt"} <= names
    assert {"accuracy_vs_round.png", "accuracy_vs_bytes.png"} <= names
    assert (out / "accuracy_vs_round.png").stat().st_size > 5000
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 3 and summary["total_uplink_bytes"] > 0
    partition = json.loads((out / "partition.json").read_text())["clients"]
    assert sorted(i for p in partition for i in p) == list(range(len(DIGITS.y_train)))
    with pytest.raises(FileExistsError, match="already holds a run"):
        Trainer(tiny(rounds=3), out, dataset=DIGITS).run(progress=False)
    with pytest.raises(ValueError, match="another config"):
        Trainer(tiny(rounds=3, lr=0.1, compressor="topk"), out, dataset=DIGITS).run(progress=False, resume=True)


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"algorithm": "fedprox"}, "unknown algorithm 'fedprox'; choose one of fedavg, fedsam, mofedsam"),
        ({"compressor": "zip"}, "unknown compressor 'zip'; choose one of none, topk, randk, sign, qsgd"),
        ({"dataset": "imagenet"}, "unknown dataset 'imagenet'; choose one of digits"),
        ({"model": "vit"}, "unknown model 'vit'"),
        ({"per_round": 30}, r"per_round must be in \[1, clients=20\]; got 30"),
        ({"ratio": 0.0}, r"ratio must be in \(0.0, 1.0\]; got 0.0"),
        ({"ratio": 1.5}, r"ratio must be in \(0.0, 1.0\]"),
        ({"rounds": 0}, "rounds must be an integer >= 1; got 0"),
        ({"alpha": -1.0}, r"alpha must be in \(0.0, 3.4e38 \(the largest float32\)\]"),
        ({"rho": float("nan")}, "rho must be in"),
        ({"mofedsam_alpha": 2.0}, r"mofedsam_alpha must be in \[0.0, 1.0\]"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*32\)"),
        ({"dataset": "mnist"}, "set data_dir"),
        ({"syn_min_models": 50}, r"syn_min_models must be in \[syn_span\+1=3, syn_window=20\]"),
    ],
)
def test_config_rejects_bad_values(overrides, match):
    with pytest.raises(ValueError, match=match):
        Config(**overrides).validate()


def test_cli_train_with_a_toml_config_and_resume(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text(
        'algorithm = "fedlesam"\ncompressor = "sign"\nrounds = 3\nclients = 4\nper-round = 2\nlocal_steps = 2\n'
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(toml), "--rounds", "2", "--out", str(out), "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["rounds"] == 2
    assert "fedlesam/sign: round 2" in capsys.readouterr().out
    assert main(["train", "--out", str(out), "--resume", "--rounds", "3", "--quiet"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["round"] for x in lines] == [1, 2, 3]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--out", "X", "--algorithm", "fedprox"], "unknown algorithm 'fedprox'; choose one of"),
        (["train", "--out", "X", "--ratio", "2"], r"ratio must be in \(0.0, 1.0\]; got 2.0"),
        (["train", "--out", "X", "--config", "missing.toml"], "config file missing.toml does not exist"),
        (["train", "--out", "X", "--resume"], "no checkpoint at"),
        (
            ["train", "--out", "X", "--dataset", "mnist", "--data-dir", "nowhere"],
            "data directory nowhere does not exist",
        ),
    ],
)
def test_cli_reports_bad_input(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(argv + ["--quiet"]) == 2
    err = capsys.readouterr().err
    assert "fedsynsam train: error:" in err
    assert __import__("re").search(message, err), err


def test_cli_rejects_malformed_flags(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--rounds", "many"])
    assert "invalid int value: 'many'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--out", "x", "--error-feedback", "maybe"])
    assert "expected true or false; got 'maybe'" in capsys.readouterr().err


def test_toml_with_an_unknown_key_is_rejected(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("algoritm = 'fedavg'\n")
    assert main(["train", "--config", str(toml), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert "unknown setting(s) algoritm" in capsys.readouterr().err


def test_compare_grid_end_to_end_and_restart(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = ["compare", "--algorithms", "fedavg,fedsynsam", "--compressors", "none,topk", "--seeds", "0,1"]
    argv += ["--rounds", "3", "--clients", "4", "--per-round", "2", "--local-steps", "2", "--syn-iters", "3"]
    argv += ["--syn-min-models", "2", "--syn-span", "1", "--syn-period", "1", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert table.count("\n| fed") == 4 and "± " in table
    assert (out / "results.csv").read_text().startswith("algorithm,compressor,seeds,final_acc_mean")
    assert (out / "accuracy_vs_bytes.png").stat().st_size > 5000
    stamp = (out / "fedavg-none-s0" / "summary.json").stat().st_mtime_ns
    capsys.readouterr()
    assert main(argv) == 0  # everything finished: nothing reruns
    assert (out / "fedavg-none-s0" / "summary.json").stat().st_mtime_ns == stamp
    assert "| fedsynsam | topk |" in capsys.readouterr().out
    # a run stopped before its first checkpoint (metrics written, no checkpoint, no summary)
    # starts over on the next call, as if it had never begun, instead of refusing the folder
    run = out / "fedavg-topk-s1"
    want = (run / "summary.json").read_text()
    for name in ("summary.json", "checkpoint.pt", "checkpoint.prev.pt"):
        (run / name).unlink(missing_ok=True)
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    assert main(argv) == 0
    got, old = json.loads((run / "summary.json").read_text()), json.loads(want)
    assert got["final_test_acc"] == old["final_test_acc"] and got["rounds"] == old["rounds"] == 3
