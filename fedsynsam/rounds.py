"""One round, split where a network would split it: what the server plans and sends, what a
client computes from that, and what comes back.

The in-process :class:`fedsynsam.trainer.Trainer` and the Flower app
(:mod:`fedsynsam.flower`) both run a round as

1. server: :meth:`Trainer.plan_round` -> a :class:`RoundPlan` (sampled clients, ``w^t``, the
   perturbation source and the tensors it needs, the uplink's call counter);
2. each client ``c``: :func:`client_update` (local steps with the algorithm's perturbation,
   ``Delta_c = w_c^K - w^t``), then its compressor encodes ``Delta_c`` into a payload's bytes;
3. server: :meth:`Trainer.apply_round` with the payloads that arrived intact.

Step 2 is the same function in both, fed the same tensors, so a Flower run equals the
in-process run to the bit (design.md section 4 for the algorithms).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

import fedcomp
from fedcomp.flat import FlatSpec, flatten, unflatten

from . import algorithms as alg
from .config import Config
from .data import Dataset, dirichlet_partition, shard_partition
from .models import build_model
from .syncomp import ModelCompressor
from .synthetic import SyntheticSet

__all__ = [
    "RoundPlan",
    "RoundResult",
    "generator",
    "perturbation_for",
    "momentum_for",
    "base_compressor",
    "client_update",
    "counter",
    "partition_for",
    "initial_model",
    "load_flat",
    "compress_one",
]


def generator(*key: int) -> torch.Generator:
    """A CPU generator seeded by a tuple of small ints (seed, round, purpose, client)."""
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k) + 1) % (2**63 - 1)
    return torch.Generator().manual_seed(h)


@dataclass
class RoundPlan:
    """What the server decided for round ``round`` and what a client needs to run it.

    ``source`` is the perturbation's origin: ``none`` (FedAvg, DPPF), ``batch`` (FedSAM,
    MoFedSAM), ``previous-update`` (FedLESAM; FedSynSAM before its first synthetic set),
    ``synthetic`` (FedSynSAM client mode: ``synthetic`` is sent) or ``synthetic-server``
    (FedSynSAM server mode: ``direction`` = ``g_syn(w^t)`` is sent). All tensors are flat
    ``[numel]`` float32 on the server's device.
    """

    round: int
    clients: list[int]
    source: str
    w: Tensor
    u_prev: Tensor | None = None  # sent when the algorithm needs it (momentum or direction)
    direction: Tensor | None = None  # synthetic-server: g_syn(w^t)
    synthetic: SyntheticSet | None = None  # synthetic: the current D_syn
    first_call: int = 0  # the uplink's call counter before this round's first client


@dataclass
class RoundResult:
    """What came back from the sampled clients, in the order of ``RoundPlan.clients``."""

    payloads: list  # fedcomp.Payload of each client whose reply was valid
    losses: list  # their mean local losses
    downlink_bytes: int
    failed: list = field(default_factory=list)  # {"client", "reason"} of each client that failed
    finished: dict = field(default_factory=dict)  # DPPF: client -> its model after the local steps
    # 3SFC / FedSynth: each payload's cosine with the vector it encodes (update + residual)
    encode_cos: list = field(default_factory=list)
    # Flower: {"client", "reason"} of each client whose node lost its saved state (it started over)
    state_lost: list = field(default_factory=list)


def partition_for(cfg: Config, labels: Tensor) -> list[list[int]]:
    """Training-sample indices of each of ``cfg.clients`` clients (the same on every node for a seed)."""
    if cfg.partition == "dirichlet":
        return dirichlet_partition(labels, cfg.clients, cfg.alpha, cfg.seed)
    return shard_partition(labels, cfg.clients, cfg.shards_per_client, cfg.seed)


def initial_model(cfg: Config, data: Dataset, device) -> tuple[torch.nn.Module, Tensor, FlatSpec]:
    """The run's model on ``device``, initialised from ``cfg.seed`` on the CPU (the same start on
    every device, on the server and on every node), its flat ``[numel]`` parameters and layout."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
    w0, spec = flatten(model)
    return model, w0, spec


def base_compressor(cfg, seed: int, spec: FlatSpec | None = None) -> fedcomp.Compressor:
    """The fedcomp compressor named by ``cfg.compressor`` (none, topk, randk, sign, qsgd, powersgd),
    built from ``cfg``'s ``ratio``, ``sign_block``, ``qsgd_levels``, ``qsgd_bucket`` and
    ``powersgd_rank``; ``seed`` seeds rand-k, QSGD and PowerSGD's first factors; PowerSGD takes
    the model's tensor shapes from ``spec`` (``None``: the DDP hook, which reads its buckets')."""
    if cfg.compressor == "powersgd":
        return fedcomp.PowerSGD(cfg.powersgd_rank, shapes=None if spec is None else spec.shapes, seed=seed)
    return {
        "none": lambda: fedcomp.Identity(),
        "topk": lambda: fedcomp.TopK(cfg.ratio),
        "randk": lambda: fedcomp.RandK(cfg.ratio, seed=seed),
        "sign": lambda: fedcomp.Sign(block=cfg.sign_block),
        "qsgd": lambda: fedcomp.QSGD(levels=cfg.qsgd_levels, bucket=cfg.qsgd_bucket, seed=seed),
    }[cfg.compressor]()


def counter(uplink):
    """The object whose ``calls`` numbers the uplink's random draws (seeded compressors), or ``None``."""
    base = getattr(uplink, "compressor", uplink)
    return base if hasattr(base, "calls") else None


def load_flat(model: torch.nn.Module, flat: Tensor, spec: FlatSpec) -> None:
    """Copy the flat ``[numel]`` parameters ``flat`` into ``model`` (laid out as ``spec``)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, view in unflatten(flat, spec).items():
            params[name].copy_(view)


def compress_one(uplink, delta: Tensor, key: str, w: Tensor) -> fedcomp.Payload:
    """One client's payload: ``uplink`` is a fedcomp compressor, an ErrorFeedback (residual of
    ``key``) or a model compressor (3SFC / FedSynth, decoding at global model ``w``)."""
    if isinstance(uplink, ModelCompressor):
        return uplink.compress(delta, key, w)
    if isinstance(uplink, (fedcomp.ErrorFeedback, fedcomp.PowerSGD)):  # state per key
        return uplink.compress(delta, key)
    return uplink.compress(delta)


def _split(flat: Tensor, spec: FlatSpec) -> list[Tensor]:
    return [v.clone() for v in unflatten(flat, spec).values()]


def perturbation_for(cfg: Config, plan: RoundPlan, spec: FlatSpec) -> alg.Perturbation:
    """The perturbation every client of ``plan`` uses (the same on the server and on a node)."""
    if plan.source == "none":
        return alg.NoPerturbation()
    if plan.source == "batch":
        return alg.BatchGradient(cfg.rho)
    if plan.source == "synthetic":
        return alg.SyntheticGradient(plan.synthetic.images, plan.synthetic.label_logits, cfg.rho)
    if plan.source == "synthetic-server":
        return alg.FixedDirection(_split(plan.direction, spec), cfg.rho)
    if plan.source == "previous-update":
        return alg.FixedDirection(None if plan.u_prev is None else _split(-plan.u_prev, spec), cfg.rho)
    raise ValueError(f"unknown perturbation source {plan.source!r}")


def momentum_for(cfg: Config, plan: RoundPlan, spec: FlatSpec) -> list[Tensor] | None:
    """MoFedSAM's server momentum ``m = -u^{t-1} / (K eta)`` per parameter (``None`` otherwise)."""
    if cfg.algorithm != "mofedsam" or plan.u_prev is None:
        return None
    return _split(-plan.u_prev / (cfg.local_steps * cfg.lr), spec)


def needs_u_prev(cfg: Config, source: str) -> bool:
    """Whether clients need ``u^{t-1}`` this round (MoFedSAM's momentum, FedLESAM's direction)."""
    return cfg.algorithm == "mofedsam" or source == "previous-update"


def client_update(
    cfg: Config,
    model: torch.nn.Module,
    spec: FlatSpec,
    x: Tensor,
    y: Tensor,
    plan: RoundPlan,
    client: int,
    *,
    perturbation: alg.Perturbation | None = None,
    momentum: list[Tensor] | None = None,
    start: Tensor | None = None,
    out: Tensor | None = None,
) -> tuple[Tensor, float, Tensor | None]:
    """Client ``client``'s local steps of ``plan`` on its data ``(x, y)``.

    Starts from ``start`` (DPPF's own model) or ``plan.w``; ``perturbation`` and ``momentum``
    default to :func:`perturbation_for` / :func:`momentum_for` of the plan (the trainer builds
    them once per round). Returns ``(delta [numel] float32, mean local loss, the model after the
    steps or None)``; the last is only kept for DPPF. ``delta`` is written into ``out`` if given.
    """
    if perturbation is None:
        perturbation = perturbation_for(cfg, plan, spec)
        momentum = momentum_for(cfg, plan, spec)
    load_flat(model, plan.w if start is None else start, spec)
    loss = alg.local_train(
        model,
        x,
        y,
        steps=cfg.local_steps,
        batch_size=cfg.batch_size,
        lr=cfg.lr,
        perturbation=perturbation,
        generator=generator(cfg.seed, plan.round, 1, client),
        momentum=momentum,
        alpha=cfg.mofedsam_alpha if momentum is not None else 1.0,
        weight_decay=cfg.weight_decay,
    )
    delta = flatten(model, out=out)[0]
    finished = delta.clone() if cfg.algorithm == "dppf" else None
    delta.sub_(plan.w)
    return delta, loss, finished


def dense_bytes(numel: int) -> int:
    """Wire bytes of one dense float32 tensor of ``numel`` entries (an identity payload)."""
    return fedcomp.Identity().wire_bytes(numel)
