"""Safe loading: checkpoints are plain data read with weights_only, damaged files give clear
errors and fall back to the previous checkpoint, CIFAR pickles go through a restricted unpickler."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from _support import strip_seconds as _strip
from _support import tiny_config as tiny

from fedsynsam import checkpoint as ckpt
from fedsynsam.cli import main
from fedsynsam.data import load_dataset, load_restricted_pickle
from fedsynsam.trainer import Trainer

DIGITS = load_dataset("digits")


class _WritesAFile:
    """An object whose unpickling would create ``path``: proof that code ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _state_equal(a, b) -> bool:
    return ckpt.digest(a) == ckpt.digest(b)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(algorithm="fedsynsam", compressor="topk"),
        dict(algorithm="mofedsam", compressor="randk"),
        dict(algorithm="fedlesam", compressor="qsgd"),
        dict(algorithm="fedavg", compressor="sign"),
        dict(algorithm="fedsam", compressor="3sfc", sfc_double_way=True, sfc_iters=2),
        dict(algorithm="dppf", compressor="fedsynth", fedsynth_iters=2),
    ],
)
def test_every_checkpoint_is_plain_data_that_torch_loads_with_weights_only(tmp_path, overrides):
    trainer = Trainer(tiny(rounds=3, **overrides), tmp_path, dataset=DIGITS)
    trainer.run(progress=False)
    state = trainer.checkpoint()
    ckpt.check_plain(state)
    raw = torch.load(tmp_path / ckpt.CHECKPOINT, weights_only=True)  # torch's own safe loader takes it
    assert raw["format"] == "fedsynsam-checkpoint" and _state_equal(raw["state"], state)
    assert _state_equal(ckpt.load(tmp_path / ckpt.CHECKPOINT), state)
    prev = ckpt.load(tmp_path / ckpt.PREVIOUS)
    assert prev["round"] == 2 and state["round"] == 3


def _run_with_checkpoints(tmp_path, rounds=4):
    out = tmp_path / "run"
    Trainer(tiny(rounds=rounds, compressor="topk"), out, dataset=DIGITS).run(progress=False)
    return out / ckpt.CHECKPOINT


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.1, 0.5, 0.9, 0.999])
def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path, fraction):
    path = _run_with_checkpoints(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ckpt.CheckpointError, match=str(path).replace("\\", "\\\\") + r": .*(empty|truncated)"):
        ckpt.load(path)


def test_every_flipped_byte_is_caught_or_harmless(tmp_path):
    """Over a sweep of positions (every byte of the pickle, a stride over the rest): a flip either
    raises CheckpointError or loads the identical state; never a silently different number."""
    path = _run_with_checkpoints(tmp_path, rounds=2)
    good = ckpt.load(path)
    data = path.read_bytes()
    pkl = data.find(b"data.pkl")
    # a stride over the file, every byte of the pickle, and every byte of the zip's end records
    positions = set(range(0, len(data), 97)) | set(range(pkl, min(len(data), pkl + 1500)))
    positions = sorted(positions | set(range(max(0, len(data) - 200), len(data))))
    caught = harmless = 0
    for pos in positions:
        bad = bytearray(data)
        bad[pos] ^= 0x04
        path.write_bytes(bytes(bad))
        try:
            loaded = ckpt.load(path)
        except ckpt.CheckpointError as e:
            assert str(path) in str(e)
            caught += 1
            continue
        assert _state_equal(loaded, good), f"flip at byte {pos} loaded a different state"
        harmless += 1
    assert caught > len(positions) // 4  # tensor bytes and the header are covered, not only padding


def test_a_flip_in_tensor_data_is_reported_as_a_checksum_mismatch(tmp_path):
    path = _run_with_checkpoints(tmp_path, rounds=2)
    data = bytearray(path.read_bytes())
    w = ckpt.load(path)["w"]
    at = bytes(data).find(w[:8].numpy().tobytes())  # the global model's first floats
    assert at > 0
    data[at + 1] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError, match="do not match the SHA-256"):
        ckpt.load(path)


def test_a_foreign_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = _run_with_checkpoints(tmp_path, rounds=2)
    state = ckpt.load(path)
    state["uplink"]["extra"] = _WritesAFile(marker)
    with pytest.raises(TypeError, match=r"state\['uplink'\]\['extra'\] is a .*_WritesAFile"):
        ckpt.save(state, path)  # save refuses before writing
    clean = {**state, "uplink": {k: v for k, v in state["uplink"].items() if k != "extra"}}
    assert _state_equal(ckpt.load(path), clean)
    torch.save({"format": "fedsynsam-checkpoint", "version": 2, "sha256": "0" * 64, "state": state}, path)
    with pytest.raises(ckpt.CheckpointError, match=r"refused: .*GLOBAL .*open.*could run code"):
        ckpt.load(path)
    torch.save(state, path)  # the bare, earlier layout with a foreign object: refused too
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load(path)
    assert not marker.exists()


def test_a_checkpoint_of_the_earlier_layout_still_resumes(tmp_path):
    cfg = tiny(rounds=4, algorithm="fedlesam", compressor="sign")
    full = Trainer(cfg, tmp_path / "full", dataset=DIGITS).run(progress=False)
    first = Trainer(cfg, tmp_path / "split", dataset=DIGITS)
    first.run(progress=False, stop_after=2)
    torch.save(first.checkpoint(), tmp_path / "split" / ckpt.CHECKPOINT)  # as the trainer wrote it before
    os.remove(tmp_path / "split" / ckpt.PREVIOUS)
    resumed = Trainer(cfg, tmp_path / "split", dataset=DIGITS).run(progress=False, resume=True)
    assert _strip(resumed) == _strip(full)


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_resume_falls_back_to_the_previous_checkpoint_and_still_ends_equal(tmp_path, damage):
    cfg = tiny(rounds=6, algorithm="fedsynsam", compressor="topk")
    full = Trainer(cfg, tmp_path / "full", dataset=DIGITS).run(progress=False)
    out = tmp_path / "split"
    Trainer(cfg, out, dataset=DIGITS).run(progress=False, stop_after=4)
    newest = out / ckpt.CHECKPOINT
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        newest.write_bytes(bytes(data[: len(data) // 3]))
    elif damage == "flip":
        at = bytes(data).find(ckpt.load(newest)["w"][:8].numpy().tobytes())
        data[at] ^= 0x80
        newest.write_bytes(bytes(data))
    else:
        newest.unlink()
    lines = []
    resumed = Trainer(cfg, out, dataset=DIGITS, log=lines.append).run(progress=False, resume=True)
    assert len(lines) == 1 and "resuming from checkpoint.prev.pt (round 3)" in lines[0], lines
    assert ("missing" in lines[0]) == (damage == "delete")
    assert _strip(resumed) == _strip(full)
    assert [json.loads(x)["round"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 7))
    assert (out / "checkpoint.pt.bad").exists() == (damage != "delete")
    assert ckpt.load(out / ckpt.PREVIOUS)["round"] == 5 and ckpt.load(newest)["round"] == 6


def test_cli_resume_with_no_readable_checkpoint_is_one_clear_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--rounds", "3", "--clients", "4", "--per-round", "2", "--quiet"]) == 0
    (out / ckpt.CHECKPOINT).write_bytes(b"PK\x03\x04 cut short")
    (out / ckpt.PREVIOUS).write_bytes(b"")
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--rounds", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    assert "no readable checkpoint" in err[0] and "checkpoint.prev.pt: the file is empty" in err[0]


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    out = tmp_path / "run"
    Trainer(tiny(rounds=2), out, dataset=DIGITS).run(progress=False, stop_after=1)
    state = ckpt.load(out / ckpt.CHECKPOINT)
    del state["trajectory"]
    ckpt.save(state, out / ckpt.CHECKPOINT)
    with pytest.raises(ckpt.CheckpointError, match="not a checkpoint of this trainer .*trajectory"):
        Trainer(tiny(rounds=2), out, dataset=DIGITS).run(progress=False, resume=True)


def test_an_interrupted_write_leaves_the_last_checkpoint_intact(tmp_path, monkeypatch):
    path = _run_with_checkpoints(tmp_path, rounds=2)
    before = path.read_bytes()

    def disk_full(obj, f, *a, **k):
        f.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space left"):
        ckpt.save({"round": 3}, path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith("checkpoint")) == [
        ckpt.PREVIOUS,
        ckpt.CHECKPOINT,
    ]


# -- CIFAR pickles ---------------------------------------------------------------
def _cifar_dir(tmp_path, protocol=2):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": b"training batch",
            b"labels": rng.integers(0, 10, 4).tolist(),
            b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
            b"filenames": [b"a.png"] * 4,
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    return root


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_cifar_batches_of_every_pickle_protocol_load(tmp_path, protocol):
    _cifar_dir(tmp_path, protocol)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (20, 3, 32, 32) and d.y_test.shape == (4,)


@pytest.mark.parametrize(
    "payload",
    [
        lambda marker: {b"data": _WritesAFile(marker), b"labels": [0]},
        lambda marker: [_WritesAFile(marker)],
        lambda marker: {b"labels": np.array([_WritesAFile(marker)], dtype=object)},
    ],
    ids=["in-dict", "top-level", "object-array"],
)
def test_a_malicious_cifar_pickle_is_refused_and_never_run(tmp_path, payload):
    root = _cifar_dir(tmp_path)
    marker = tmp_path / "code-ran"
    evil = pickle.dumps(payload(marker), protocol=2)
    pickle.loads(evil)  # the crafted pickle really does create the file when unpickled naively
    assert marker.exists()
    marker.unlink()
    (root / "data_batch_2").write_bytes(evil)
    with pytest.raises(ValueError, match=r"data_batch_2: refused: the pickle asks for .*nothing of it was run"):
        load_dataset("cifar10", tmp_path)
    assert not marker.exists()


def test_restricted_unpickler_refuses_other_codecs_and_callables(tmp_path):
    path = tmp_path / "p"
    path.write_bytes(b"c_codecs\nencode\n(Vabc\nVrot13\ntR.")  # _codecs.encode("abc", "rot13")
    with pytest.raises(ValueError, match="refused: .*_codecs.encode with encoding 'rot13'"):
        load_restricted_pickle(path)
    path.write_bytes(b"cos\nsystem\n(Vtrue\ntR.")
    with pytest.raises(ValueError, match=r"refused: the pickle asks for os.system"):
        load_restricted_pickle(path)
    path.write_bytes(pickle.dumps({b"x": (1, 2.5, "s", b"b", None, True)}, protocol=0))
    assert load_restricted_pickle(path) == {b"x": (1, 2.5, "s", b"b", None, True)}
