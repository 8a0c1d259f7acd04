"""The synchronisation of local SGD and DPPF: every worker's model averaged, the same on every rank.

Uncompressed, the average is an all-reduce of the flat models divided by the world size. With a
compressor, the payloads' wire bytes (:meth:`fedcomp.Payload.to_bytes`) are all-gathered, and
every rank decodes them with :meth:`fedcomp.Payload.from_bytes` and aggregates them in rank order,
so that every rank computes ``xbar = xbar_prev + mean_i decode(payload_i)`` from the same bytes in
the same order: the same bits. What worker ``i`` sends depends on where the method leaves it:

* local SGD (every worker restarts from ``xbar``): ``C(x_i - xbar_prev + e_i)``, its change since
  the last average with its error-feedback residual ``e_i`` (``error_feedback``);
* DPPF (workers stay apart): ``C(x_i - y_i)``, where ``y_i`` is the position worker ``i`` has
  published so far (``y_i += decode(payload_i)``, starting at the initial model) and
  ``xbar = mean_i y_i``. What a payload leaves out stays in ``x_i - y_i`` and is sent later (error
  feedback on positions, as in EF21), so no separate residual is kept. Sending the change since
  ``xbar_prev`` with a residual instead would count a worker's untransmitted offset from the average
  twice, once in the residual and again in the next difference (it drove the workers apart: spread
  7.6 instead of 0.2 with top-k 1 % on mnist5k).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

import fedcomp

from ..rounds import base_compressor
from .config import DPConfig

__all__ = ["Synchronizer", "all_gather_bytes"]


def all_gather_bytes(blob: bytes, device: torch.device, group=None, *, size: int | None = None) -> list[bytes]:
    """Every rank's ``blob``, in rank order.

    ``size``: the length every rank's blob has, when all know it (one collective); ``None``: sizes
    may differ between ranks and are exchanged first. ``device`` is where the collective's tensors
    live: the CPU for gloo, the rank's GPU for NCCL.
    """
    world = dist.get_world_size(group)
    raw = torch.frombuffer(bytearray(blob), dtype=torch.uint8).to(device)
    if size is not None:
        if raw.numel() != size:
            raise ValueError(f"blob has {raw.numel()} bytes; every rank was to send {size}")
        lengths = [size] * world
    else:
        count = torch.tensor([raw.numel()], dtype=torch.int64, device=device)
        counts = [torch.zeros_like(count) for _ in range(world)]
        dist.all_gather(counts, count, group=group)
        lengths = [int(c) for c in counts]
    padded = torch.zeros(max(lengths), dtype=torch.uint8, device=device)
    padded[: raw.numel()] = raw
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded, group=group)
    return [g[:n].cpu().numpy().tobytes() for g, n in zip(gathered, lengths)]


class Synchronizer:
    """Averages the workers' flat models (``[numel]`` float32) over the process group.

    Args:
        cfg: the run's settings (``compressor``, its parameters, ``error_feedback``, ``sign_majority``).
        x0: the flat model every worker starts from (the same on every rank): the first reference.
        comm_device: where collectives run (CPU for gloo, the rank's GPU for NCCL).
        group: the process group (``None``: the default one).
        spec: the model's layout (PowerSGD reads its tensor shapes).

    ``bytes_sent`` counts what this worker sent (dense: ``4 * numel`` per synchronisation, the
    payload an all-reduce contributes; compressed: the payload's wire bytes, header included).
    """

    def __init__(self, cfg: DPConfig, x0: Tensor, comm_device: torch.device, group=None, spec=None):
        self.cfg, self.group, self.comm_device = cfg, group, comm_device
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.compressor = None
        self.reference: Tensor | None = None  # xbar_prev
        self.published: Tensor | None = None  # DPPF: y_i, this worker's published position
        if cfg.compressor != "none":
            # rand-k / QSGD draws differ per rank (independent noise averages out); seeded for resume
            base = base_compressor(cfg, seed=cfg.seed * 1009 + self.rank, spec=spec)
            if cfg.method == "dppf":
                self.compressor, self.published = base, x0.detach().clone()
            else:
                self.compressor = fedcomp.ErrorFeedback(base) if cfg.error_feedback else base
            self.reference = x0.detach().clone()
        self.bytes_sent = 0

    def average(self, x: Tensor) -> tuple[Tensor, int]:
        """``(xbar, bytes this worker sent)``: the average of every rank's ``x``, bit-identical on every rank."""
        if self.compressor is None:
            buf = x.detach().clone()
            dist.all_reduce(buf, group=self.group)
            sent = buf.numel() * buf.element_size()
            self.bytes_sent += sent
            return buf.div_(self.world), sent
        delta = x.detach() - (self.reference if self.published is None else self.published)
        if isinstance(self.compressor, (fedcomp.ErrorFeedback, fedcomp.PowerSGD)):
            payload = self.compressor.compress(delta, key="sync")
        else:
            payload = self.compressor.compress(delta)
        blob = payload.to_bytes()
        # top-k, sign, QSGD and PowerSGD payloads of a given model have one size: every rank knows it
        size = self.compressor.wire_bytes(delta.numel(), delta.dtype)
        gathered = all_gather_bytes(blob, self.comm_device, self.group, size=size)
        payloads = [fedcomp.Payload.from_bytes(b, device=x.device) for b in gathered]
        mean = fedcomp.aggregate(payloads, sign="majority" if self.cfg.sign_majority else "mean")
        self.reference = self.reference + mean
        if self.published is not None:
            self.published = self.published + payloads[self.rank].decode()
        self.bytes_sent += len(blob)
        return self.reference.clone(), len(blob)

    def state_dict(self) -> dict:
        return {
            "reference": None if self.reference is None else self.reference.clone(),
            "published": None if self.published is None else self.published.clone(),
            "compressor": None if self.compressor is None else self.compressor.state_dict(),
            "bytes_sent": self.bytes_sent,
        }

    def load_state_dict(self, state: dict) -> None:
        if (state["compressor"] is None) != (self.compressor is None):
            raise ValueError("synchronizer state was saved with another compressor setting")
        if self.compressor is not None:
            self.reference = state["reference"].clone()
            if self.published is not None:
                self.published = state["published"].clone()
            self.compressor.load_state_dict(state["compressor"])
        self.bytes_sent = int(state["bytes_sent"])
