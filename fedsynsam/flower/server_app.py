"""The fedsynsam ServerApp: the in-process trainer's server half, with Flower messages for clients.

The server is a :class:`fedsynsam.trainer.Trainer` (global model, trajectory and ``D_syn``,
sampling, ``fedcomp.aggregate``, checkpoints, ``config.json`` / ``metrics.jsonl`` /
``summary.json`` / plots in ``out``, plus ``flower.json``: the bytes of Flower's serialised
messages against the fedcomp payloads they carried); :class:`FlowerClients` replaces its
in-process client loop. A client whose reply is an error, fails the payload checks (CRC, kind, size) or misses
``round_timeout`` costs that client only: the round aggregates the rest and its record lists
``failed_clients`` with the reasons. A round with no valid reply keeps the model.
"""

from __future__ import annotations

import json
import math
import sys
import time
import uuid
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from ..rounds import RoundPlan, RoundResult, counter
from ..syncomp import ModelCompressor
from ..trainer import Trainer
from . import protocol
from .settings import from_run_config

__all__ = ["app", "FlowerClients", "TIMING"]

app = ServerApp()
# errors the SuperLink itself puts in a reply: the message expired, or its node left the federation
_UNAVAILABLE = (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE)


def _log(line: str) -> None:
    print(f"fedsynsam: {line}", file=sys.stderr, flush=True)


class FlowerClients:
    """Runs a round's sampled clients on the SuperNodes that hold their partitions."""

    def __init__(
        self,
        grid: Grid,
        trainer: Trainer,
        *,
        round_timeout: float,
        connect_timeout: float,
        poll_interval: float = 0.1,
        discovery_batch: int = 10,
        log=_log,
    ):
        self.grid, self.trainer, self.log = grid, trainer, log
        self.discovery_batch = discovery_batch
        self.round_timeout, self.poll_interval = round_timeout, poll_interval
        self.pushed, self.seen = 0.0, {}  # when the last exchange pushed; message id -> reply seen
        self.nodes = self._discover(trainer.cfg.clients, connect_timeout)
        self.strangers: set[int] = set()  # node ids that answered a query with no partition of this run
        self.message_bytes = {"down": 0, "up": 0}  # Flower's serialised messages, for the benchmark

    def exchange(self, messages: list[Message], timeout: float) -> list[Message]:
        """Push ``messages``, then pull their replies every ``poll_interval`` seconds until every one
        has come back or ``timeout`` seconds have passed; returns the replies that came.

        Flower's ``Grid.send_and_receive`` does the same with a fixed 3 s between pulls, so a round
        lasted a multiple of 3 s whatever its clients took.
        """
        self.pushed, self.seen = time.time(), {}
        pending = set(self.grid.push_messages(messages))
        replies, deadline = [], time.monotonic() + timeout
        while pending:
            came = list(self.grid.pull_messages(pending))
            self.seen.update((m.metadata.reply_to_message_id, time.time()) for m in came)
            replies += came
            pending -= {m.metadata.reply_to_message_id for m in came}
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(self.poll_interval, left))
        return replies

    def _ask(self, node_ids, timeout: float, refused: set | None = None) -> dict[int, int]:
        """``partition-id -> node id`` from the nodes ``node_ids`` that answered a query in ``timeout``.

        A node that cannot serve this run, or claims a partition another one holds, raises
        ValueError; with a ``refused`` set it is added there instead (a run in progress goes on)."""
        msgs = [Message(RecordDict({}), dst_node_id=n, message_type=MessageType.QUERY, ttl=timeout) for n in node_ids]
        found: dict[int, int] = {}
        for reply in self.exchange(msgs, timeout) if msgs else ():
            node = reply.metadata.src_node_id
            if reply.has_error() and reply.error.code in _UNAVAILABLE:
                continue  # Flower's own: the query expired unanswered or its node left
            problem = f"SuperNode {node} cannot serve this run: {_reason(reply)}" if reply.has_error() else None
            pid = None if problem else int(reply.content[protocol.RECORD]["partition-id"])
            if pid in found:
                problem = f"SuperNodes {found[pid]} and {node} both hold partition-id={pid}"
            if problem is None:
                found[pid] = node
            elif refused is None:
                raise ValueError(problem)
            else:
                self.log(problem)
                refused.add(node)
        return found

    def _discover(self, clients: int, timeout: float) -> dict[int, int]:
        """``partition-id -> node id`` for every partition, asking each connected node once."""
        nodes: dict[int, int] = {}
        asked: set[int] = set()
        began = time.monotonic()
        deadline = began + timeout
        while len(nodes) < clients:
            if time.monotonic() > deadline:
                missing = sorted(set(range(clients)) - set(nodes))
                raise TimeoutError(
                    f"connect_timeout={timeout:g}s: no SuperNode holds partition-id {missing} of "
                    f"num-partitions={clients} (start one per partition with --node-config "
                    f"'partition-id=I num-partitions={clients}'); connected: {sorted(nodes)}"
                )
            # a batch at a time: every query starts a ClientApp process (and the node's warm
            # worker); fifty at once on a small machine outlived Flower's task tokens
            new = [n for n in self.grid.get_node_ids() if n not in asked][: self.discovery_batch]
            if not new:
                time.sleep(0.5)
                continue
            asked.update(new)
            for pid, node in self._ask(new, min(max(deadline - time.monotonic(), 1.0), 60.0)).items():
                if pid in nodes:
                    raise ValueError(f"SuperNodes {nodes[pid]} and {node} both hold partition-id={pid}")
                nodes[pid] = node
            asked -= set(new) - set(nodes.values())  # a node that did not answer is asked again
        self.log(f"{clients} SuperNodes connected, one per partition ({time.monotonic() - began:.1f} s)")
        return nodes

    def _rejoined(self, plan: RoundPlan) -> None:
        """A SuperNode that restarted comes back with a new node id: before a round, ask the nodes
        that joined since the last look which partition they hold, and send that partition's
        messages there from now on (a node that does not answer in time is asked again later)."""
        new = set(self.grid.get_node_ids()) - set(self.nodes.values()) - self.strangers
        if not new:
            return
        found = self._ask(sorted(new), min(self.round_timeout, 30.0), refused=self.strangers)
        for pid, node in found.items():
            if 0 <= pid < self.trainer.cfg.clients:
                self.log(
                    f"round {plan.round + 1}: partition {pid} is now on SuperNode {node} (was {self.nodes.get(pid)})"
                )
                self.nodes[pid] = node
        self.strangers |= {n for n in found.values() if n not in self.nodes.values()}

    def _book(self) -> dict:
        """What the server keeps per client across a resume (in the trainer's checkpoint): the run's
        key for the nodes' saved state, and per client the last round whose payload was aggregated
        and the last round whose reply came back."""
        book = self.trainer.extra_state.setdefault("flower", {})
        book.setdefault("run_key", uuid.uuid4().hex)
        book.setdefault("accepted", {})
        book.setdefault("replied", {})
        return book

    def __call__(self, plan: RoundPlan) -> RoundResult:
        tr = self.trainer
        st, uplink = tr.state, tr.uplink
        self._rejoined(plan)
        book = self._book()
        checkpointed = (plan.round // tr.cfg.checkpoint_every) * tr.cfg.checkpoint_every
        expect_kind = "identity" if isinstance(uplink, ModelCompressor) else uplink.kind
        expect_numel = uplink.floats() if isinstance(uplink, ModelCompressor) else tr.numel
        msgs, down = {}, 0
        for j, c in enumerate(plan.clients):
            send_syn = tr.hand_synthetic(plan, c)
            fields, nbytes = protocol.encode_plan(plan, c, plan.first_call + j, book["accepted"].get(c, -1), send_syn)
            fields.update(run_key=book["run_key"], replied_round=book["replied"].get(c, -1), checkpointed=checkpointed)
            down += nbytes
            content = RecordDict({protocol.RECORD: ConfigRecord(fields)})
            msg = Message(
                content,
                dst_node_id=self.nodes[c],
                message_type=MessageType.TRAIN,
                group_id=str(plan.round + 1),
                ttl=self.round_timeout,
            )
            msgs[c] = msg
            self.message_bytes["down"] += _wire_size(msg)
        seeded = counter(uplink)
        if seeded is not None:  # the clients used calls first_call .. first_call + m - 1
            seeded.calls = plan.first_call + len(plan.clients)
        by_node = {}
        for reply in self.exchange(list(msgs.values()), self.round_timeout):
            by_node[reply.metadata.src_node_id] = reply
        self._log_timings(plan, by_node)
        payloads, losses, failed, encode_cos, lost = [], [], [], [], []
        for c in plan.clients:
            reply = by_node.get(self.nodes[c])
            try:
                if reply is None:
                    raise ValueError(f"no reply within round_timeout={self.round_timeout:g}s")
                if reply.has_error():
                    raise ValueError(f"the ClientApp failed: {_reason(reply)}")
                self.message_bytes["up"] += _wire_size(reply)
                fields = reply.content[protocol.RECORD]
                book["replied"][c] = plan.round
                if "state_lost" in fields:
                    lost.append({"client": c, "reason": str(fields["state_lost"])})
                    st.client_syn_version.pop(c, None)  # its copy of D_syn went with its state
                payload = protocol.check_reply(
                    fields, client=c, round=plan.round, numel=expect_numel, kind=expect_kind, device=tr.device
                )
            except (ValueError, KeyError, TypeError) as e:
                failed.append({"client": c, "reason": str(e)})
                # it may not hold D_syn (never got it, or its node lost its state): send it next time
                st.client_syn_version.pop(c, None)
                self.log(f"round {plan.round + 1}: client {c} failed: {e}")
                continue
            payloads.append(payload)
            losses.append(float(fields["loss"]))
            if "encode_cos" in fields:
                encode_cos.append(float(fields["encode_cos"]))
            book["accepted"][c] = plan.round
        return RoundResult(payloads, losses, down, failed=failed, encode_cos=encode_cos, state_lost=lost)

    def _log_timings(self, plan: RoundPlan, by_node: dict) -> None:
        """One line per replying client in ``out/flower_timings.jsonl`` (epoch seconds): when the
        server pushed; when the ClientApp process started, finished importing and got the message;
        when the work (in the node's warm worker, or in the ClientApp) began and ended; when the
        ClientApp replied; when the server saw the reply. Same-machine clocks only (loopback)."""
        out = self.trainer.out
        if out is None:
            return
        lines = []
        for c in plan.clients:
            reply = by_node.get(self.nodes[c])
            if reply is None or reply.has_error() or "timing" not in reply.content[protocol.RECORD]:
                continue
            marks = [float(t) for t in reply.content[protocol.RECORD]["timing"]]
            seen = self.seen.get(reply.metadata.reply_to_message_id, float("nan"))
            times = dict(pushed=self.pushed, **dict(zip(TIMING, marks)), seen=seen)
            times = {k: None if math.isnan(v) else v for k, v in times.items()}
            lines.append(json.dumps({"round": plan.round + 1, "client": c, **times}))
        with open(out / "flower_timings.jsonl", "a") as f:
            f.write("".join(line + "\n" for line in lines))


# the ClientApp's reply["timing"], in order (epoch seconds)
TIMING = ("process_start", "imported", "received", "work_start", "work_end", "replied")


def _wire_size(obj) -> int:
    """Serialised bytes of a Flower message: its own object plus every nested one."""
    return len(obj.deflate()) + sum(_wire_size(child) for child in (obj.children or {}).values())


def _reason(reply: Message) -> str:
    reason = (reply.error.reason or "").strip().splitlines()
    return reason[-1] if reason else f"error code {reply.error.code}"


@app.main()
def main(grid: Grid, context: Context) -> None:
    """One fedsynsam run over the federation's SuperNodes; outputs in the run config's ``out``."""
    cfg, settings = from_run_config(context.run_config)
    trainer = Trainer(cfg, settings.out, log=_log)
    _log(f"{cfg.algorithm}/{cfg.compressor}, {cfg.rounds} rounds, {cfg.per_round} of {cfg.clients} clients per round")
    clients = FlowerClients(
        grid,
        trainer,
        round_timeout=settings.round_timeout,
        connect_timeout=settings.connect_timeout,
        poll_interval=settings.poll_interval,
        discovery_batch=settings.discovery_batch,
    )
    start = time.perf_counter()
    records = trainer.run(resume=settings.resume, progress=False, clients=_Logged(clients, cfg.rounds))
    last = [r for r in records if r["test_acc"] is not None][-1]
    wire = {
        "supernodes": len(clients.nodes),
        "message_bytes": clients.message_bytes,
        "payload_bytes": {
            "down": sum(r["downlink_bytes"] for r in records),
            "up": sum(r["uplink_bytes"] for r in records),
        },
    }
    (Path(settings.out) / "flower.json").write_text(json.dumps(wire, indent=1) + "\n")
    _log(
        f"done: round {last['round']}, test accuracy {last['test_acc']:.4f}, "
        f"uplink {sum(r['uplink_bytes'] for r in records) / 1e6:.2f} MB, {time.perf_counter() - start:.1f} s; "
        f"Flower messages {clients.message_bytes['down'] / 1e6:.2f} MB down, "
        f"{clients.message_bytes['up'] / 1e6:.2f} MB up -> {settings.out}"
    )


class _Logged:
    """One log line per round (the server's progress in ``flwr run --stream``)."""

    def __init__(self, clients: FlowerClients, rounds: int):
        self.clients, self.rounds = clients, rounds

    def __call__(self, plan: RoundPlan) -> RoundResult:
        tic = time.perf_counter()
        result = self.clients(plan)
        ok = len(result.payloads)
        self.clients.log(
            f"round {plan.round + 1}/{self.rounds}: {ok} of {len(plan.clients)} clients, "
            f"{time.perf_counter() - tic:.1f} s"
        )
        return result
