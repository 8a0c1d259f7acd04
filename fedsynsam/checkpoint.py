"""Checkpoints that load without running code, survive a torn write, and say what is wrong.

A checkpoint is plain data: tensors, numbers, strings, ``None``, lists, tuples and dicts
(keys: strings or ints). :func:`save` refuses anything else before writing, and
:func:`load` reads with ``torch.load(weights_only=True)``, so a checkpoint from someone
else cannot run code on this machine: a file holding any other object is refused.

On disk the file is an ordinary ``torch.save`` archive of::

    {"format": "fedsynsam-checkpoint", "version": 2, "sha256": HEX, "state": STATE}

where ``HEX`` is a SHA-256 over ``STATE``'s structure and every tensor's bytes
(:func:`digest`). ``torch.load`` checks no checksum of its own, so without it a flipped
byte in tensor data would load silently as a wrong number. Files written before this
format (a bare ``STATE`` dict) still load, without the checksum.

Writes are atomic (a temporary file, ``fsync``, ``os.replace``), and the previous good
checkpoint is kept beside the newest (``checkpoint.prev.pt``), so a file cut short or
damaged later costs one checkpoint interval, not the run: :func:`load_latest` falls back
to it and says so.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import struct
import warnings
import zipfile
from pathlib import Path

import torch

__all__ = [
    "CheckpointError",
    "CHECKPOINT",
    "PREVIOUS",
    "save",
    "load",
    "load_latest",
    "digest",
    "check_plain",
    "check_same_config",
    "to_device",
]

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"
_FORMAT = "fedsynsam-checkpoint"
_VERSION = 2
_ENVELOPE_KEYS = {"format", "version", "sha256", "state"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong."""


def _walk(obj, h, where: str) -> None:
    """Feed ``obj`` into hash ``h``; raise TypeError naming ``where`` for anything but plain data."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().to("cpu").contiguous().reshape(-1)
        h.update(b"T" + str(t.dtype).encode() + struct.pack("<q", obj.dim()))
        h.update(struct.pack(f"<{obj.dim()}q", *obj.shape))
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif obj is None or isinstance(obj, (bool, int, float, str)):
        h.update(type(obj).__name__.encode() + b":" + repr(obj).encode() + b";")
    elif isinstance(obj, (list, tuple)):
        h.update((b"L" if isinstance(obj, list) else b"U") + struct.pack("<q", len(obj)))
        for i, v in enumerate(obj):
            _walk(v, h, f"{where}[{i}]")
    elif isinstance(obj, dict):
        h.update(b"D" + struct.pack("<q", len(obj)))
        for k, v in obj.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__} ({k!r}); keys must be str or int")
            _walk(k, h, where)
            _walk(v, h, f"{where}[{k!r}]")
    else:
        raise TypeError(
            f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a checkpoint holds only tensors, "
            "numbers, strings, None, lists, tuples and dicts"
        )


def digest(state) -> str:
    """SHA-256 (hex) of ``state``'s structure, scalars and tensor bytes; TypeError for non-plain data."""
    h = hashlib.sha256()
    _walk(state, h, "state")
    return h.hexdigest()


def check_plain(state) -> None:
    """Raise TypeError naming the first entry of ``state`` that is not plain data."""
    digest(state)


def save(state: dict, path: str | Path, *, keep_previous: bool = True) -> None:
    """Write ``state`` to ``path`` atomically; the file there before becomes ``checkpoint.prev.pt``.

    Raises TypeError (before touching the disk) if ``state`` holds anything but plain data.
    """
    path = Path(path)
    envelope = {"format": _FORMAT, "version": _VERSION, "sha256": digest(state), "state": state}
    tmp = path.with_name(path.name + ".tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(envelope, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.is_file():
            os.replace(path, path.with_name(PREVIOUS))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    try:  # make the renames durable too
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}".strip()


def load(path: str | Path, *, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`save` (or a bare state dict of the earlier format).

    Never runs code from the file (``weights_only=True``). Raises FileNotFoundError if there is
    no file, and :class:`CheckpointError` naming the file and the problem if it is empty,
    truncated, corrupted (checksum mismatch), or holds objects other than plain data.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); the write that made it did not finish")
    try:  # is_zipfile itself raises on some damaged end records (e.g. "span multiple disks")
        is_zip = zipfile.is_zipfile(path)
    except Exception:
        is_zip = False
    if not is_zip:
        raise CheckpointError(
            f"{path}: not a checkpoint archive ({size} bytes; truncated or overwritten: no zip directory at its end)"
        )
    try:
        with warnings.catch_warnings():  # a damaged protocol byte makes torch warn before it fails
            warnings.simplefilter("ignore")
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Weights only load failed" in msg:
            # torch's message is several paragraphs; keep the sentence that names what was refused
            found = re.search(r"(Unsupported global: GLOBAL \S+|[^\n.]*GLOBAL \S+ whose module \S+ is blocked)", msg)
            detail = found.group(1).strip() if found else "an object that weights_only loading refuses"
            raise CheckpointError(
                f"{path}: refused: it holds something other than tensors, numbers, strings, lists and dicts "
                f"({detail}); loading it could run code, so it is not loaded"
            ) from None
        raise CheckpointError(f"{path}: corrupted ({_first_line(e)})") from None
    except Exception as e:  # torch's zip reader, EOF, bad records: all mean a damaged file
        raise CheckpointError(f"{path}: truncated or corrupted ({_first_line(e)})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a checkpoint dict")
    if not _ENVELOPE_KEYS & set(obj):
        return obj  # the earlier format: the state dict itself, no checksum
    if set(obj) != _ENVELOPE_KEYS or obj["format"] != _FORMAT or not isinstance(obj["sha256"], str):
        raise CheckpointError(f"{path}: corrupted: its header is damaged (keys {sorted(map(str, obj))})")
    if obj["version"] != _VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {obj['version']!r}; this fedsynsam reads version {_VERSION}"
        )
    try:
        ok = digest(obj["state"]) == obj["sha256"]
    except TypeError as e:  # cannot happen through weights_only, but never trust the file
        raise CheckpointError(f"{path}: {e}") from None
    if not ok:
        raise CheckpointError(f"{path}: corrupted: its contents do not match the SHA-256 stored with them")
    return obj["state"]


def load_latest(folder: str | Path, *, map_location="cpu", log=print) -> tuple[dict, Path]:
    """The newest readable checkpoint in ``folder``: ``checkpoint.pt``, else ``checkpoint.prev.pt``.

    When the newest is missing or unreadable and the previous one serves, ``log`` gets one line
    saying so. Raises FileNotFoundError if neither exists, CheckpointError if none is readable.
    """
    folder = Path(folder)
    newest, previous = folder / CHECKPOINT, folder / PREVIOUS
    try:
        return load(newest, map_location=map_location), newest
    except (FileNotFoundError, CheckpointError) as e:
        if not previous.is_file():
            if isinstance(e, FileNotFoundError):
                raise FileNotFoundError(f"no checkpoint at {newest}") from None
            raise
        try:
            state = load(previous, map_location=map_location)
        except CheckpointError as e2:
            raise CheckpointError(f"no readable checkpoint in {folder}: {e}; and {e2}") from None
        why = "is missing" if isinstance(e, FileNotFoundError) else f"is unreadable ({str(e).split(': ', 1)[-1]})"
        log(f"{newest.name} {why}; resuming from {previous.name} (round {state.get('round', '?')})")
        return state, previous


def check_same_config(saved: dict, now: dict, may_differ=()) -> None:
    """Raise ValueError listing the settings (other than ``may_differ``) in which a checkpoint's
    config differs from the run's."""
    diff = {k: (v, now.get(k)) for k, v in saved.items() if now.get(k) != v and k not in may_differ}
    if diff:
        raise ValueError(f"checkpoint was written with another config; differing settings (saved, now): {diff}")


def to_device(obj, device):
    """``obj`` (nested dicts, lists, tuples) with every tensor moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj
