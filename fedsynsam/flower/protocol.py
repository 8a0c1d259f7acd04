"""What the fedsynsam Flower messages hold, and the checks on what comes back.

Every tensor travels as fedcomp wire bytes (:meth:`fedcomp.Payload.to_bytes`, CRC-32
checked): dense tensors as identity payloads, the client's update as the payload its
compressor made. Flower's float arrays are not used.

Down (a ``train`` message, record ``"fedsynsam"``):

==================  =====  ====================================================
key                 type   meaning
==================  =====  ====================================================
``round``           int    the round ``t`` (0-based)
``client``          int    the partition this message is for
``call``            int    the uplink's call number for this client (seeded compressors)
``accepted_round``  int    last round whose payload of this client was aggregated (-1: none)
``source``          str    perturbation source (:class:`fedsynsam.rounds.RoundPlan`)
``w``               bytes  the global model ``w^t``
``u_prev``          bytes  ``u^{t-1}`` (MoFedSAM, FedLESAM) -- only when needed
``direction``       bytes  ``g_syn(w^t)`` (FedSynSAM server mode) -- only when needed
``syn``             bytes  ``D_syn`` flat -- only when the client lacks this version
``syn_version``     int    the version of ``D_syn`` the round uses (0: none)
``syn_shape``       [int]  the synthetic images' shape ``[m, C, H, W]``
==================  =====  ====================================================

Up (the reply, record ``"fedsynsam"``): ``payload`` (bytes), ``loss`` (float), ``client``
and ``round`` (int). A ``query`` message asks a node for its ``partition-id`` and
``num-partitions``.
"""

from __future__ import annotations

import torch
from torch import Tensor

import fedcomp

from ..rounds import RoundPlan
from ..synthetic import SyntheticSet
from . import RECORD  # the record's name, shared with the torch-free ClientApp

__all__ = ["RECORD", "dense_bytes_of", "dense_from", "encode_plan", "decode_plan", "check_reply"]


def dense_bytes_of(t: Tensor) -> bytes:
    """A flat float32 tensor as identity-payload bytes (exact bits, CRC-checked)."""
    return fedcomp.Identity().compress(t.detach().float().reshape(-1)).to_bytes()


def dense_from(buf: bytes, numel: int, device, name: str) -> Tensor:
    """Inverse of :func:`dense_bytes_of`; ValueError naming ``name`` if it is not ``numel`` floats."""
    p = fedcomp.Payload.from_bytes(buf, device=device)
    if p.kind != "identity" or p.numel != numel or p.dtype != torch.float32:
        raise ValueError(f"{name}: expected {numel} float32 entries (identity); got {p}")
    return p.decode()


def encode_plan(plan: RoundPlan, client: int, call: int, accepted_round: int, send_syn: bool) -> tuple[dict, int]:
    """The message fields for ``client`` and the downlink bytes they carry (tensors only)."""
    fields = {
        "round": plan.round,
        "client": client,
        "call": call,
        "accepted_round": accepted_round,
        "source": plan.source,
        "w": dense_bytes_of(plan.w),
        "syn_version": 0 if plan.synthetic is None else plan.synthetic.version,
    }
    if plan.u_prev is not None:
        fields["u_prev"] = dense_bytes_of(plan.u_prev)
    if plan.direction is not None:
        fields["direction"] = dense_bytes_of(plan.direction)
    if plan.synthetic is not None:
        fields["syn_shape"] = list(plan.synthetic.images.shape)
        if send_syn:
            fields["syn"] = dense_bytes_of(plan.synthetic.flat())
    down = sum(len(fields[k]) for k in ("w", "u_prev", "direction", "syn") if k in fields)
    return fields, down


def decode_plan(fields, numel: int, num_classes: int, device, cached_syn: SyntheticSet | None) -> RoundPlan:
    """A node's :class:`RoundPlan` from the message fields (``clients`` holds only its own)."""
    plan = RoundPlan(
        round=int(fields["round"]),
        clients=[int(fields["client"])],
        source=str(fields["source"]),
        w=dense_from(fields["w"], numel, device, "w"),
        first_call=int(fields["call"]),
    )
    if "u_prev" in fields:
        plan.u_prev = dense_from(fields["u_prev"], numel, device, "u_prev")
    if "direction" in fields:
        plan.direction = dense_from(fields["direction"], numel, device, "direction")
    version = int(fields["syn_version"])
    if version:
        if "syn" in fields:
            shape = tuple(int(s) for s in fields["syn_shape"])
            floats = dense_from(fields["syn"], SyntheticSet.floats_for(shape, num_classes), device, "syn")
            plan.synthetic = SyntheticSet.from_flat(floats, shape, num_classes, version)
        elif cached_syn is not None and cached_syn.version == version:
            plan.synthetic = cached_syn
        else:
            held = "none" if cached_syn is None else cached_syn.version
            raise RuntimeError(f"the round uses synthetic set version {version}, but this node holds {held}")
    return plan


def check_reply(fields, *, client: int, round: int, numel: int, kind: str, device) -> fedcomp.Payload:
    """The payload of a reply, or ValueError saying what is wrong with it."""
    for key in ("payload", "loss", "client", "round"):
        if key not in fields:
            raise ValueError(f"reply lacks {key!r}")
    if int(fields["client"]) != client or int(fields["round"]) != round:
        raise ValueError(f"reply is for client {fields['client']} round {fields['round']}")
    payload = fedcomp.Payload.from_bytes(fields["payload"], device=device)
    if payload.kind != kind:
        raise ValueError(f"payload is {payload.kind!r}; this run's uplink sends {kind!r}")
    if payload.numel != numel:
        raise ValueError(f"payload holds {payload.numel} entries; expected {numel}")
    if payload.dtype != torch.float32:
        raise ValueError(f"payload dtype is {payload.dtype}; expected torch.float32")
    return payload
