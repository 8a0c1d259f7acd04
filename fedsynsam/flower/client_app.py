"""The fedsynsam ClientApp: one partition per SuperNode, its EF residual in the node's state.

Start each SuperNode with ``--node-config "partition-id=I num-partitions=N"`` (N = the run's
``clients``); the node finds its samples with the same partition as the in-process trainer
for the run's seed.

Error feedback only moves forward on what the server used: after compressing, the node keeps
the updated compressor state as *pending* for that round; the next message says which round
of this client the server last aggregated (``accepted_round``), and only then does the pending
state become the committed one. A payload that was lost, corrupted or late leaves the residual
as it was before that round.
"""

from __future__ import annotations

import os
import time

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

import fedcomp
from fedcomp.flower import pack_state, unpack_state

from ..config import resolve_device
from ..data import load_dataset
from ..rounds import client_update, compress_one, counter, initial_model, partition_for
from ..syncomp import ModelCompressor
from ..synthetic import SyntheticSet
from ..trainer import build_uplink
from . import protocol
from .settings import from_run_config, parse_faults

__all__ = ["app"]

app = ClientApp()

_cache: dict = {}  # one ClientApp process may serve several messages: data and model once per run
_IMPORTED = time.time()  # when this module (and torch, fedcomp, fedsynsam) finished importing


def _process_start() -> float:
    """When this process started, in epoch seconds (Linux: /proc, 10 ms resolution); NaN elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def _node(context: Context):
    cfg, settings = from_run_config(context.run_config)
    try:
        client = int(context.node_config["partition-id"])
        parts = int(context.node_config["num-partitions"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            f"this SuperNode needs --node-config 'partition-id=I num-partitions=N'; got {dict(context.node_config)}"
        ) from None
    if parts != cfg.clients or not 0 <= client < parts:
        raise ValueError(
            f"node-config partition-id={client} num-partitions={parts} does not fit the run's clients={cfg.clients}"
        )
    key = (context.run_id, client)
    if key not in _cache:
        _cache.clear()
        device = resolve_device(cfg.device)
        data = load_dataset(cfg.dataset, cfg.data_dir).to(device)
        model, _, spec = initial_model(cfg, data, device)
        idx = torch.tensor(partition_for(cfg, data.y_train)[client], dtype=torch.long, device=device)
        _cache[key] = (cfg, settings, device, data, model, spec, idx)
    return client, _cache[key]


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (the server maps partitions to nodes with it)."""
    client, (cfg, *_rest) = _node(context)
    info = ConfigRecord({"partition-id": client, "num-partitions": cfg.clients})
    return Message(RecordDict({protocol.RECORD: info}), reply_to=msg)


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


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local steps of the round's plan, then the update compressed; the payload goes back as bytes."""
    started = time.time()
    client, (cfg, settings, device, data, model, spec, idx) = _node(context)
    fields = msg.content[protocol.RECORD]
    state = context.state.config_records.get(protocol.RECORD, ConfigRecord())
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
    context.state[protocol.RECORD] = state
    wire = payload.to_bytes() if fault is None else _faulty(fault, payload, delta, settings.round_timeout)
    reply = ConfigRecord({"payload": wire, "loss": float(loss), "client": client, "round": plan.round})
    if isinstance(uplink, ModelCompressor):  # how much of the update the payload carried
        reply["encode_cos"] = float(uplink.last_cos)
    # where a round's time goes (the server writes them to flower_timings.jsonl): process start,
    # imports done, this message's handling from start to end, in epoch seconds
    reply["timing"] = [_process_start(), _IMPORTED, started, time.time()]
    return Message(RecordDict({protocol.RECORD: reply}), reply_to=msg)
