"""The fedsynsam ClientApp: one partition per SuperNode, its EF residual in the node's state.

Start each SuperNode with ``--node-config "partition-id=I num-partitions=N"`` (N = the run's
``clients``); the node finds its samples with the same partition as the in-process trainer
for the run's seed. What a ``train`` message does is in :mod:`.node`; by default it runs in
the SuperNode's warm worker (:mod:`.worker`), so this module imports only Flower and the
standard library: Flower starts a new process for every message.

Error feedback only moves forward on what the server used: after compressing, the node keeps
the updated compressor state as *pending* for that round; the next message says which round
of this client the server last aggregated (``accepted_round``), and only then does the pending
state become the committed one. A payload that was lost, corrupted or late leaves the residual
as it was before that round.
"""

from __future__ import annotations

import os
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from . import RECORD, partition_of, worker

__all__ = ["app"]

app = ClientApp()
_IMPORTED = time.time()  # when this module finished importing


def _process_start() -> float:
    """When this process started, in epoch seconds (Linux: /proc, 10 ms resolution); NaN elsewhere."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        since_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 of proc(5): starttime
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME) + since_boot
    except (OSError, ValueError, IndexError, AttributeError):
        return float("nan")


def _worker_socket(context: Context):
    """The socket of this node's warm worker, or None when the node config turns it off."""
    if not worker.enabled(context.node_config):
        return None
    return worker.socket_path(context.node_id, os.getppid())  # the parent: the node's SuperExec


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Which partition this node holds (the server maps partitions to nodes with it).

    Cheap on purpose: it reads the node config only, and starts the node's warm worker in
    the background so that the first ``train`` message finds it ready."""
    clients = context.run_config.get("clients")
    client = partition_of(context.node_config, clients)
    path = _worker_socket(context)
    if path is not None:
        worker.start(path, os.getppid(), wait=False)
    info = ConfigRecord({"partition-id": client, "num-partitions": int(clients)})
    return Message(RecordDict({RECORD: info}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Local steps of the round's plan, then the update compressed; the payload goes back as bytes."""
    started = time.time()
    fields = msg.content[RECORD]
    state = context.state.config_records.get(RECORD, ConfigRecord())
    path = _worker_socket(context)
    if path is None:
        from .node import train as work  # torch, fedcomp and fedsynsam, in this process

        reply, state = work(fields, state, dict(context.run_config), dict(context.node_config), context.run_id)
    else:
        request = ConfigRecord(
            {
                "kind": "train",
                "fields": fields.deflate(),
                "state": state.deflate(),
                "run_config": ConfigRecord(dict(context.run_config)).deflate(),
                "node_config": ConfigRecord(dict(context.node_config)).deflate(),
                "run_id": int(context.run_id),
            }
        )
        timeout = float(context.run_config.get("round_timeout", 120.0)) + 30.0
        answer = worker.call(path, os.getppid(), request, timeout)
        reply, state = ConfigRecord.inflate(answer["reply"]), ConfigRecord.inflate(answer["state"])
    context.state[RECORD] = state
    # where a round's time goes (the server writes them to flower_timings.jsonl): this process's
    # start, its imports done, the message's arrival here, the work's start and end, the reply
    # leaving here, in epoch seconds
    work_start, work_end = reply.pop("work")
    reply["timing"] = [_process_start(), _IMPORTED, started, work_start, work_end, time.time()]
    return Message(RecordDict({RECORD: reply}), reply_to=msg)
