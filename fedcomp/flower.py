"""fedcomp compression for any Flower app (Message API, flwr >= 1.42): a client mod and a strategy.

Client side, one line in the ClientApp::

    app = ClientApp(mods=[fedcomp.flower.compression_mod(fedcomp.TopK(0.01))])

The mod lets the train function run as before, then replaces the model it returns by the
*update* ``returned - received`` of the floating-point arrays, compressed with error feedback
(the residual lives in the node's context state and never leaves it). The reply still holds
one ArrayRecord, now with one uint8 array ``"fedcomp.payload"``: the payload's wire bytes
(:meth:`fedcomp.Payload.to_bytes`). Arrays that are not floating point (e.g. BatchNorm's
``num_batches_tracked``) are not sent; the server keeps its own.

Server side, the strategy instead of Flower's FedAvg::

    strategy = fedcomp.flower.FedAvg(fraction_train=1.0)   # any FedAvg argument

It decodes and checks each payload (CRC, size), sums them with :func:`fedcomp.aggregate`
weighted like FedAvg (``num-examples``), and adds the result to the model it sent. A reply
whose payload fails the checks is left out of that round, with a log line. A reply without a
payload (a client without the mod) counts as the dense update ``its model - the model sent``.
"""

from __future__ import annotations

import io
from logging import WARNING

import numpy as np
import torch

from .aggregation import aggregate
from .compressors import Compressor, ErrorFeedback, Identity
from .wire import Payload

__all__ = ["compression_mod", "FedAvg", "PAYLOAD_KEY", "flat_floats", "with_floats", "pack_state", "unpack_state"]

PAYLOAD_KEY = "fedcomp.payload"
_STATE = "fedcomp.mod"


def _is_float(array) -> bool:
    return np.issubdtype(np.dtype(array.dtype), np.floating)


def flat_floats(record) -> torch.Tensor:
    """The floating-point arrays of an ArrayRecord, in order, as one ``[numel]`` float32 tensor."""
    parts = [
        torch.from_numpy(np.asarray(a.numpy(), dtype=np.float32)).reshape(-1) for a in record.values() if _is_float(a)
    ]
    return torch.cat(parts) if parts else torch.zeros(0)


def with_floats(record, flat: torch.Tensor):
    """A copy of ``record`` whose floating-point arrays are taken from ``flat`` (inverse of :func:`flat_floats`)."""
    from flwr.app import Array, ArrayRecord

    need = sum(a.numpy().size for a in record.values() if _is_float(a))
    if need != flat.numel():
        raise ValueError(f"the record holds {need} floating-point entries; got {flat.numel()}")
    out, pos = {}, 0
    for name, a in record.items():
        if _is_float(a):
            arr = a.numpy()
            out[name] = Array(flat[pos : pos + arr.size].numpy().reshape(arr.shape).astype(arr.dtype))
            pos += arr.size
        else:
            out[name] = a
    return ArrayRecord(out)


def pack_state(state: dict) -> bytes:
    """Plain data (tensors, numbers, strings, lists, dicts) as bytes (``torch.save``)."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def unpack_state(buf: bytes, device="cpu") -> dict:
    """Inverse of :func:`pack_state`, loaded with ``weights_only=True`` (no code runs)."""
    return torch.load(io.BytesIO(buf), map_location=device, weights_only=True)


def compression_mod(compressor: Compressor, *, error_feedback: bool = True, arrays_key: str | None = None):
    """A Flower client mod that uploads ``compressor(returned - received)`` instead of the model.

    Args:
        compressor: a fedcomp compressor (:class:`~fedcomp.TopK`, :class:`~fedcomp.Sign`, ...).
        error_feedback: keep the error-feedback residual per node (in its context state).
        arrays_key: the ArrayRecord of the train message that holds the model (default: the
            only one).
    """
    from flwr.app import Array, ArrayRecord, ConfigRecord, MessageType

    if not isinstance(compressor, Compressor):
        raise TypeError(f"compressor must be a fedcomp Compressor (e.g. fedcomp.TopK(0.01)); got {compressor!r}")

    def mod(msg, context, call_next):
        if msg.metadata.message_type != MessageType.TRAIN or not msg.has_content():
            return call_next(msg, context)
        key = arrays_key or next(iter(msg.content.array_records), None)
        if key is None or key not in msg.content.array_records:
            raise ValueError(f"compression_mod: the train message holds no ArrayRecord {arrays_key or ''!r}")
        received = flat_floats(msg.content.array_records[key])
        reply = call_next(msg, context)
        if not reply.has_content() or not reply.content.array_records:
            return reply
        rkey = next(iter(reply.content.array_records))
        returned = reply.content.array_records[rkey]
        delta = flat_floats(returned) - received
        if error_feedback:
            ef = ErrorFeedback(compressor)
            state = context.state.config_records.get(_STATE)
            if state is not None:
                ef.load_state_dict(unpack_state(state["ef"]))
            payload = ef.compress(delta, "update")
            context.state[_STATE] = ConfigRecord({"ef": pack_state(ef.state_dict())})
        else:
            payload = compressor.compress(delta)
        wire = np.frombuffer(payload.to_bytes(), dtype=np.uint8).copy()
        reply.content[rkey] = ArrayRecord({PAYLOAD_KEY: Array(wire)})
        return reply

    return mod


def _strategy_base():
    try:
        from flwr.serverapp.strategy import FedAvg as FlowerFedAvg
    except ImportError as e:  # pragma: no cover - the test extra pulls flwr
        raise ImportError('fedcomp.flower needs Flower: pip install "fedcomp[flower]"') from e
    return FlowerFedAvg


class FedAvg(_strategy_base()):
    """Flower's Message-API FedAvg that decodes fedcomp payloads (see the module docstring)."""

    def configure_train(self, server_round, arrays, config, grid):
        self._sent = arrays  # the model the updates are relative to
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):
        from flwr.common import log

        valid, _ = self._check_and_log_replies(replies, is_train=True)
        plain = [m for m in valid if PAYLOAD_KEY not in next(iter(m.content.array_records.values()))]
        if not valid or len(plain) == len(valid):
            return super().aggregate_train(server_round, valid)
        base = flat_floats(self._sent)
        payloads, weights, used = [], [], []
        for m in valid:
            record = next(iter(m.content.array_records.values()))
            weight = float(next(iter(m.content.metric_records.values()))[self.weighted_by_key])
            if PAYLOAD_KEY not in record:  # a client without the mod: its model, as a dense update
                payloads.append(Identity().compress(flat_floats(record) - base))
            else:
                try:
                    p = Payload.from_bytes(record[PAYLOAD_KEY].numpy().tobytes())
                    if p.numel != base.numel():
                        raise ValueError(f"payload holds {p.numel} entries; the model has {base.numel()}")
                except ValueError as e:
                    log(WARNING, "fedcomp: round %s: a reply from node %s is left out: %s", server_round,
                        m.metadata.src_node_id, e)  # fmt: skip
                    continue
                payloads.append(p)
            weights.append(weight)
            used.append(m)
        if not used:
            log(WARNING, "fedcomp: round %s: no valid payload; the model is kept", server_round)
            return None, None
        total = sum(weights)
        update = aggregate(payloads, [w / total for w in weights])
        arrays = with_floats(self._sent, base + update)
        metrics = self.train_metrics_aggr_fn([m.content for m in used], self.weighted_by_key)
        return arrays, metrics
