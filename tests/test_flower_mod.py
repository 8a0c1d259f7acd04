"""fedcomp as a drop-in for any Flower app: the client mod and the strategy, alone and in the
example app (examples/flower-compressed) on a real local deployment."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

import fedcomp  # noqa: E402
from fedcomp.flower import PAYLOAD_KEY, FedAvg, compression_mod, flat_floats, with_floats  # noqa: E402


@pytest.fixture(autouse=True)
def _task_identity(monkeypatch):
    """Messages built outside a Flower process need the identity Flower sets in its own."""
    from flwr.supercore.task_identity import TaskIdentity

    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 1)):
        monkeypatch.setattr(TaskIdentity, name, value)


EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flower-compressed"


def _model_record(seed: int) -> ArrayRecord:
    g = torch.Generator().manual_seed(seed)
    return ArrayRecord(
        {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g), "steps": torch.tensor([3])}
    )


def _train_message(arrays: ArrayRecord) -> Message:
    return Message(RecordDict({"arrays": arrays, "config": ConfigRecord({})}), dst_node_id=1, message_type="train")


def _context() -> Context:
    return Context(run_id=1, node_id=1, node_config={}, state=RecordDict(), run_config={})


def _client(trained: ArrayRecord, examples: int = 10):
    def call_next(msg, context):
        return Message(
            RecordDict({"arrays": trained, "metrics": MetricRecord({"num-examples": examples})}), reply_to=msg
        )

    return call_next


def test_flat_floats_round_trip_and_skip_integer_arrays():
    rec = _model_record(0)
    flat = flat_floats(rec)
    assert flat.numel() == 40 * 30 + 30
    back = with_floats(rec, flat + 1)
    assert torch.equal(flat_floats(back), flat + 1)
    assert np.array_equal(back["steps"].numpy(), rec["steps"].numpy())
    with pytest.raises(ValueError, match="1230 floating-point entries; got 5"):
        with_floats(rec, torch.zeros(5))


def test_mod_sends_the_compressed_update_and_keeps_the_residual_on_the_node():
    sent, trained = _model_record(0), _model_record(1)
    mod, context = compression_mod(fedcomp.TopK(0.1)), _context()
    ef = fedcomp.ErrorFeedback(fedcomp.TopK(0.1))  # what the mod must reproduce
    delta = flat_floats(trained) - flat_floats(sent)
    for _ in range(3):
        reply = mod(_train_message(sent), context, _client(trained))
        record = reply.content["arrays"]
        assert list(record.keys()) == [PAYLOAD_KEY]
        wire = record[PAYLOAD_KEY].numpy().tobytes()
        expected = ef.compress(delta, "update")
        assert wire == expected.to_bytes()
        assert len(wire) == fedcomp.TopK(0.1).wire_bytes(delta.numel()) < delta.numel()  # < 1/4 of dense
    assert reply.content["metrics"]["num-examples"] == 10


def test_mod_passes_other_messages_and_refuses_bad_arguments():
    mod = compression_mod(fedcomp.Sign())
    query = Message(RecordDict({}), dst_node_id=1, message_type="query")
    out = mod(query, _context(), lambda m, c: Message(RecordDict({"x": ConfigRecord({"a": 1})}), reply_to=m))
    assert out.content["x"]["a"] == 1
    with pytest.raises(TypeError, match="compressor must be a fedcomp Compressor"):
        compression_mod("topk")


class _Grid:
    pass


def test_strategy_decodes_payloads_weights_them_and_drops_corrupt_ones():
    sent = _model_record(0)
    strategy = FedAvg(fraction_train=1.0)
    strategy._sent = sent
    base = flat_floats(sent)
    updates = [torch.randn(base.numel(), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    comp = fedcomp.Sign()
    payloads = [comp.compress(u) for u in updates]
    replies = []
    for i, p in enumerate(payloads):
        wire = bytearray(p.to_bytes())
        if i == 2:
            wire[len(wire) // 2] ^= 1  # corrupted on the way
        rec = ArrayRecord({PAYLOAD_KEY: Array(np.frombuffer(bytes(wire), dtype=np.uint8).copy())})
        content = RecordDict({"arrays": rec, "metrics": MetricRecord({"num-examples": 10 * (i + 1)})})
        replies.append(Message(content, reply_to=_train_message(sent)))
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = base + fedcomp.aggregate(payloads[:2], [1 / 3, 2 / 3])
    assert torch.equal(flat_floats(arrays), expected)
    assert np.array_equal(arrays["steps"].numpy(), sent["steps"].numpy())


def test_the_example_app_learns_with_compressed_uploads(federation, tmp_path):
    out = tmp_path / "results.json"
    (tmp_path / "run.toml").write_text(f'num-server-rounds = 3\nout = "{out}"\n')
    log = federation.run(EXAMPLE, tmp_path / "run.toml", timeout=600)
    results = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in results] == [0, 1, 2, 3]
    assert results[-1]["test_acc"] > results[0]["test_acc"] + 0.2, results
    assert "fedcomp: round" not in log  # no payload was refused
