"""The client half of a fedsynsam round on a SuperNode: what a ``train`` message does.

Called by the ClientApp (:mod:`.client_app`), either in its own process or, by default,
in the SuperNode's warm worker (:mod:`.worker`); the same code and the same results
either way. Everything a node keeps between messages is in the ``state`` record that goes
in and comes back (the ClientApp stores it in the node's context):

* ``committed``: the uplink compressor's state (EF residual, warm factors) as of the last
  payload the server aggregated; ``pending`` / ``pending_round``: the state after the last
  payload sent, which becomes committed once the next message says the server used it
  (``accepted_round``). A payload that was lost, corrupted or late leaves the residual as it
  was before that round.
* ``syn``: the client's copy of ``D_syn``, so the server sends it only when it changes.

The node's data, partition and model are built once per run and process (``_cache``).

**On disk, for resumable runs.** A SuperNode started with ``--node-config '... state-dir="DIR"'``
keeps that record in ``DIR/run-KEY/`` instead (:class:`NodeStore`): one file per round it
handled, written atomically (temporary file, fsync, rename) with a SHA-256 of its content,
under the run's key from the server (made when the run starts and kept in its checkpoint,
so a resumed run finds its files; Flower's run id changes on every ``flwr run``). For a
message of round ``t`` the node reads its newest file from before ``t``; files of round
``t`` or later belong to a timeline the server abandoned (it resumed from an earlier
checkpoint) and are deleted.

**Lost state.** The server tells each node the last round whose reply from it came back
(``replied_round``). If that is a round but the node has no state (no file, a damaged file,
or, without ``state-dir``, a SuperNode restarted or a resumed run), the node starts over from
an empty state, that is a zero residual and no ``D_syn``, and says so: the round's record
lists it under ``client_state_lost`` with the reason. It is never silent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import time
from pathlib import Path

import torch
from flwr.app import ConfigRecord

import fedcomp
from fedcomp.flower import pack_state, unpack_state

from ..config import resolve_device
from ..data import load_dataset
from ..rounds import client_update, compress_one, counter, initial_model, partition_for
from ..syncomp import ModelCompressor
from ..synthetic import SyntheticSet
from ..trainer import build_uplink
from . import partition_of, protocol
from .settings import from_run_config, parse_faults

__all__ = ["NodeStore", "train", "handle_request"]

_cache: dict = {}  # (run id, partition) -> what the node needs for that run, built once


def _node(run_config, node_config, run_id):
    cfg, settings = from_run_config(run_config)
    client = partition_of(node_config, cfg.clients)
    key = (run_id, client)
    if key not in _cache:
        _cache.clear()
        device = resolve_device(cfg.device)
        data = load_dataset(cfg.dataset, cfg.data_dir).to(device)
        model, _, spec = initial_model(cfg, data, device)
        idx = torch.tensor(partition_for(cfg, data.y_train)[client], dtype=torch.long, device=device)
        _cache[key] = (cfg, settings, device, data, model, spec, idx)
    return client, _cache[key]


class NodeStore:
    """One client's saved node state for one run: ``FOLDER/run-KEY/client-C.round-R.state``.

    A file is ``b"FSNS1\\n"``, the SHA-256 of the record's bytes, then the bytes
    (``ConfigRecord.deflate``)."""

    MAGIC = b"FSNS1\n"

    def __init__(self, folder, run_key: str, client: int):
        if not re.fullmatch(r"[0-9a-f]{8,64}", str(run_key)):
            raise ValueError(f"run_key must be 8-64 hex digits; got {run_key!r}")
        self.folder = Path(folder) / f"run-{run_key}"
        self.client = int(client)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _rounds(self) -> dict[int, Path]:
        found = {}
        for path in self.folder.glob(f"client-{self.client}.round-*.state"):
            with contextlib.suppress(ValueError):
                found[int(path.name.rsplit("round-", 1)[1].split(".")[0])] = path
        return found

    def save(self, round: int, state: ConfigRecord) -> None:
        data = state.deflate()
        path = self.folder / f"client-{self.client}.round-{round}.state"
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            f.write(self.MAGIC + hashlib.sha256(data).digest() + data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        with contextlib.suppress(OSError):  # the rename itself survives a crash
            fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def load(self, before: int) -> tuple[ConfigRecord | None, str | None]:
        """The newest state saved for a round before ``before``: ``(record, None)``; ``(None, None)``
        if there is none; ``(None, reason)`` if it is damaged. Deletes the files of rounds >= ``before``."""
        rounds = self._rounds()
        for r in [r for r in rounds if r >= before]:
            rounds.pop(r).unlink(missing_ok=True)
        if not rounds:
            return None, None
        newest = max(rounds)
        try:
            blob = rounds[newest].read_bytes()
        except OSError as e:
            return None, f"its saved state of round {newest + 1} cannot be read ({e.strerror})"
        head = len(self.MAGIC) + 32
        if not blob.startswith(self.MAGIC) or len(blob) < head:
            return None, f"its saved state of round {newest + 1} is not a state file"
        if hashlib.sha256(blob[head:]).digest() != blob[len(self.MAGIC) : head]:
            return None, f"its saved state of round {newest + 1} is damaged (checksum mismatch)"
        try:
            return ConfigRecord.inflate(blob[head:]), None
        except Exception as e:  # a valid checksum over bytes that are not a record: written by something else
            return None, f"its saved state of round {newest + 1} is not a record ({type(e).__name__})"

    def prune(self, keep_from: int) -> None:
        """Delete what a resume from the checkpoint of round ``keep_from`` can no longer need: every
        file older than the newest one from before ``keep_from``."""
        rounds = self._rounds()
        older = [r for r in rounds if r < keep_from]
        for r in older:
            if r < max(older):
                rounds[r].unlink(missing_ok=True)


_OF_KIND = {
    "identity": fedcomp.Identity,
    "topk": lambda: fedcomp.TopK(0.01),
    "randk": lambda: fedcomp.RandK(0.01),
    "sign": fedcomp.Sign,
    "qsgd": fedcomp.QSGD,
}


def _faulty(kind: str, payload: fedcomp.Payload, delta: torch.Tensor, timeout: float) -> bytes:
    """The bytes a broken client would send instead of ``payload`` (see settings.parse_faults)."""
    wire = payload.to_bytes()
    if kind == "flip":  # one bit in the middle of the sections
        pos = len(wire) // 2
        return wire[:pos] + bytes([wire[pos] ^ 0x10]) + wire[pos + 1 :]
    if kind == "truncate":
        return wire[: len(wire) // 2]
    if kind == "numel":  # well-formed, same compressor, one entry too many
        return _OF_KIND[payload.kind]().compress(torch.cat([delta, delta[:1]])).to_bytes()
    if kind == "kind":  # well-formed, right size, another compressor
        return (fedcomp.TopK(0.01) if payload.kind == "sign" else fedcomp.Sign()).compress(delta).to_bytes()
    assert kind == "hang", kind
    time.sleep(timeout + 5.0)  # the server has moved on by the time this reply arrives
    return wire


def train(fields, state: ConfigRecord, run_config, node_config, run_id) -> tuple[ConfigRecord, ConfigRecord]:
    """Local steps of the round's plan in ``fields``, then the update compressed.

    ``state`` is the node's record from its context (ignored when the node config has a
    ``state-dir``: the state is then read from and saved to disk). Returns the reply record
    (``payload`` bytes, ``loss``, ``client``, ``round``; ``encode_cos`` for model compressors,
    ``state_lost`` when the node had to start over) and the node's new ``state``.
    """
    started = time.time()
    client, (cfg, settings, device, data, model, spec, idx) = _node(run_config, node_config, run_id)
    this_round, store, lost = int(fields["round"]), None, None
    if node_config.get("state-dir"):
        store = NodeStore(node_config["state-dir"], fields["run_key"], client)
        state, lost = store.load(before=this_round)
        state = ConfigRecord() if state is None else state
    if not state and int(fields["replied_round"]) >= 0:
        lost = lost or (
            f"its saved state is missing (in {store.folder})"
            if store is not None
            else "its state is missing (no state-dir: a restarted SuperNode or a resumed run starts over)"
        )
    cached = None
    if "syn" in state:
        cached = SyntheticSet.from_state_dict(unpack_state(state["syn"], device))
    plan = protocol.decode_plan(fields, spec.numel, data.num_classes, device, cached)
    if plan.synthetic is not None and plan.synthetic is not cached:
        state["syn"] = pack_state(plan.synthetic.state_dict())
    fault = parse_faults(settings.inject_faults).get((plan.round + 1, client))
    if fault == "raise":
        raise RuntimeError(f"injected fault: client {client} raises in round {plan.round + 1}")

    # error feedback: commit the pending state only if the server used that round's payload
    if "pending" in state and int(state["pending_round"]) == int(fields["accepted_round"]):
        state["committed"] = state["pending"]
    uplink = build_uplink(cfg, model, spec, data)
    if "committed" in state:
        uplink.load_state_dict(unpack_state(state["committed"], device))
    seeded = counter(uplink)
    if seeded is not None:
        seeded.calls = plan.first_call

    delta, loss, _ = client_update(cfg, model, spec, data.x_train[idx], data.y_train[idx], plan, client)
    payload = compress_one(uplink, delta, f"client{client}", plan.w)
    state["pending"] = pack_state(uplink.state_dict())
    state["pending_round"] = plan.round
    if store is not None:
        store.save(this_round, state)
        store.prune(int(fields["checkpointed"]))
    wire = payload.to_bytes() if fault is None else _faulty(fault, payload, delta, settings.round_timeout)
    reply = ConfigRecord({"payload": wire, "loss": float(loss), "client": client, "round": plan.round})
    if isinstance(uplink, ModelCompressor):  # how much of the update the payload carried
        reply["encode_cos"] = float(uplink.last_cos)
    if lost:
        reply["state_lost"] = f"{lost}; it started over from a zero residual"
    reply["work"] = [started, time.time()]  # when this message's work began and ended (epoch s)
    return reply, state


def handle_request(request: ConfigRecord) -> ConfigRecord:
    """The warm worker's handler: a ``train`` request (see :func:`fedsynsam.flower.worker.call`)."""
    if request.get("kind") != "train":
        raise ValueError(f"unknown request kind {request.get('kind')!r}; expected 'train'")
    reply, state = train(
        ConfigRecord.inflate(request["fields"]),
        ConfigRecord.inflate(request["state"]),
        dict(ConfigRecord.inflate(request["run_config"])),
        dict(ConfigRecord.inflate(request["node_config"])),
        int(request["run_id"]),
    )
    return ConfigRecord({"reply": reply.deflate(), "state": state.deflate()})
