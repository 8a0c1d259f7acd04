"""Local training and the SAM perturbations of every algorithm (design.md section 4).

Every local step is ``w <- w - eta * d`` with ``d = grad l(w + eps; batch)``; MoFedSAM
mixes in the server momentum: ``d = alpha * grad l(w + eps) + (1 - alpha) * m`` with
``m = -u^{t-1} / (K * eta)``. The perturbation ``eps`` is the one pluggable piece:

==========  =======================================  ==============================
algorithm   eps at a local step                      source
==========  =======================================  ==============================
fedavg      0                                        :class:`NoPerturbation`
fedsam      ``rho * g / ||g||``, g = batch gradient  :class:`BatchGradient`
mofedsam    as fedsam                                :class:`BatchGradient`
fedlesam    ``-rho * u^{t-1} / ||u^{t-1}||``         :class:`FixedDirection`
fedsynsam   ``rho * g_syn / ||g_syn||``              :class:`SyntheticGradient` (client mode)
                                                     or :class:`FixedDirection` (server mode)
dppf        0 (local SGD; pull-push after a round)   :class:`NoPerturbation`, :func:`pull_push`
==========  =======================================  ==============================

``||.||`` is always the global L2 norm over all parameters (not a per-tensor norm).
A zero or non-finite direction gives ``eps = 0`` for that step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ALGORITHMS",
    "Perturbation",
    "NoPerturbation",
    "BatchGradient",
    "FixedDirection",
    "SyntheticGradient",
    "scale_to_radius",
    "soft_cross_entropy",
    "local_train",
    "pull_push",
]

ALGORITHMS = ("fedavg", "fedsam", "mofedsam", "fedlesam", "fedsynsam", "dppf")


def global_norm(tensors) -> float:
    """``sqrt(sum ||t||^2)`` over all tensors, in float64."""
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


def scale_to_radius(direction: list[Tensor], rho: float) -> list[Tensor] | None:
    """``rho * direction / ||direction||`` with the global norm; ``None`` if the norm is 0 or not finite."""
    norm = global_norm(direction)
    if not math.isfinite(norm) or norm == 0.0:
        return None
    return [d * (rho / norm) for d in direction]


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """Mean of ``-sum softmax(target) * log_softmax(logits)`` (the loss of a soft-labelled set)."""
    return -(F.softmax(target_logits, dim=1) * F.log_softmax(logits, dim=1)).sum(1).mean()


class Perturbation:
    """Where eps comes from. ``epsilon`` returns per-parameter tensors or ``None`` (no perturbation)."""

    extra_backprops = 0

    def epsilon(self, model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor) -> list[Tensor] | None:
        raise NotImplementedError


class NoPerturbation(Perturbation):
    def epsilon(self, model, params, x, y):
        return None


class BatchGradient(Perturbation):
    """FedSAM: ``eps = rho * g / ||g||`` with ``g`` the gradient of the current minibatch at ``w``."""

    extra_backprops = 1

    def __init__(self, rho: float):
        self.rho = rho

    def epsilon(self, model, params, x, y):
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params)
        return scale_to_radius(list(g), self.rho)


class FixedDirection(Perturbation):
    """One direction for the whole round (FedLESAM's ``-u^{t-1}``; FedSynSAM's server-side ``g_syn(w^t)``)."""

    def __init__(self, direction: list[Tensor] | None, rho: float):
        self.eps = None if direction is None else scale_to_radius(direction, rho)

    def epsilon(self, model, params, x, y):
        return self.eps


class SyntheticGradient(Perturbation):
    """FedSynSAM (client mode): ``eps = rho * g_syn / ||g_syn||``, ``g_syn`` = gradient of the
    soft-label loss on the synthetic set at the current local iterate."""

    extra_backprops = 1

    def __init__(self, images: Tensor, label_logits: Tensor, rho: float):
        self.images, self.label_logits, self.rho = images, label_logits, rho

    def epsilon(self, model, params, x, y):
        g = torch.autograd.grad(soft_cross_entropy(model(self.images), self.label_logits), params)
        return scale_to_radius(list(g), self.rho)


def local_train(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    perturbation: Perturbation,
    generator: torch.Generator,
    momentum: list[Tensor] | None = None,
    alpha: float = 1.0,
    weight_decay: float = 0.0,
) -> float:
    """Run ``steps`` local steps on ``(x, y)`` in place on ``model``; returns the mean descent loss.

    Minibatches walk through a fresh random permutation of the client's data, reshuffled
    when exhausted. ``momentum`` (MoFedSAM) is ``m`` per parameter, mixed with weight
    ``1 - alpha``. The loss reported is that of the descent pass (at ``w + eps``).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    n = len(y)
    # the permutation comes from the CPU generator (the same batches on every device); the
    # loss is summed on the device and read once at the end (no host sync per step)
    order, pos, total = torch.randperm(n, generator=generator).to(y.device), 0, y.new_zeros((), dtype=torch.float64)
    for _ in range(steps):
        if pos >= n:
            order, pos = torch.randperm(n, generator=generator).to(y.device), 0
        idx = order[pos : pos + batch_size]
        pos += batch_size
        xb, yb = x[idx], y[idx]
        eps = perturbation.epsilon(model, params, xb, yb)
        if eps is not None:
            saved = [p.detach().clone() for p in params]
            with torch.no_grad():
                for p, e in zip(params, eps):
                    p.add_(e)
        loss = F.cross_entropy(model(xb), yb)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            if eps is not None:
                for p, s in zip(params, saved):
                    p.copy_(s)
            for i, (p, g) in enumerate(zip(params, grads)):
                d = g if momentum is None else alpha * g + (1.0 - alpha) * momentum[i]
                if weight_decay:
                    d = d + weight_decay * p
                p.sub_(d, alpha=lr)
        total += loss.detach()
    return float(total) / max(steps, 1)


def pull_push(x: Tensor, mean: Tensor, alpha: float, lam: float) -> Tensor:
    """DPPF's step for one worker: ``x - alpha (x - mean) + lam (x - mean) / ||x - mean||``.

    The pull (``alpha``) draws the worker toward the consensus, the push (``lam``) keeps it a
    fixed distance away: along a direction with no gradient, ``d <- (1 - alpha) d + lam``
    settles at ``d = lam / alpha``, so the workers span a valley of that width. Returns a new
    flat tensor; a worker exactly at the mean is only pulled (the push has no direction).
    """
    diff = x - mean
    norm = float(diff.norm())
    out = x - alpha * diff
    if norm > 0.0 and math.isfinite(norm):
        out = out + (lam / norm) * diff
    return out
