"""FedSynSAM's server side: the trajectory of global models and the synthetic set distilled from it.

Our reading of the paper (design.md section 4; every choice is a configurable default):
the server keeps the last ``window`` global models. Once it holds ``min_models`` of
them, and then every ``period`` rounds, it distils a labelled synthetic set ``D_syn``
(``per_class`` images per class, learnable soft labels) whose gradient ``g_syn(w)``
estimates the direction of the federation's gradient ``grad F(w)``. Two objectives:

* ``"gradient"`` (the default): **gradient matching** against the observed trajectory.
  At each stored model ``w^s`` with a model ``M`` rounds later, the server's best view of
  the descent direction is the displacement ``d_s = -(w^{s+M} - w^s)`` (``M`` rounds of
  aggregated updates: more clients, and error feedback's delayed mass largely arrived).
  Adam minimises, over images and label logits, the mean over ``points`` sampled starts

      1 - cos(g_syn(w^s), d_s)

  so that ``D_syn``'s gradient field points like the federation's along the recent
  trajectory, and, being a field (not one vector), carries on to ``w^t``, where no
  displacement is known yet. One double backprop per point and iteration.
* ``"sam-gradient"``: gradient matching where the clients' gradients were taken. A round's
  clients descend along ``grad l(w + eps)``, not ``grad l(w)``, so the displacement from
  ``w^s`` is made of gradients at ``w^s + eps_s``; the server knows each round's ``eps_s``
  (``-rho u^{s-1}/||u^{s-1}||`` before the first set, ``rho g_syn(w^s)/||g_syn||`` after) and
  matches ``g_syn(w^s + eps_s)`` to ``d_s``. At use, ``g_syn(w^t)`` estimates ``grad F(w^t)``.
* ``"trajectory"`` (the first method): trajectory matching. Pick a start ``s``, set
  ``theta_0 = w^s``, unroll ``unroll`` differentiable SGD steps on ``D_syn`` with a
  learnable step size and minimise ``||theta_N - w^{s+M}||^2 / ||w^s - w^{s+M}||^2``.

The server has no data: the images start as Gaussian noise in the (standardised) input
space. The targets may also be given (the *oracle* diagnostic passes ``grad F(w^s)``
itself, :mod:`fedsynsam.estimate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fedcomp
from fedcomp.flat import FlatSpec

from .optim import Adam

__all__ = ["OBJECTIVES", "SyntheticSet", "distill", "matching_loss", "gradient_matching_loss", "displacements"]

OBJECTIVES = ("gradient", "sam-gradient", "trajectory")


@dataclass
class SyntheticSet:
    images: Tensor  # [m, C, H, W] float32
    label_logits: Tensor  # [m, classes] float32
    log_lr: Tensor  # [] float32
    version: int  # refresh counter (1 for the first set)

    @property
    def numel(self) -> int:
        """Floats in :meth:`flat`: images, label logits and the log step size."""
        return self.images.numel() + self.label_logits.numel() + 1

    @property
    def nbytes(self) -> int:
        """Bytes to send it down: :meth:`flat` as a fedcomp identity payload (``52 + 4 * numel``)."""
        return fedcomp.Identity().wire_bytes(self.numel)

    def flat(self) -> Tensor:
        """``[numel]`` float32: images, label logits, log step size (what goes down the wire)."""
        return torch.cat([self.images.reshape(-1), self.label_logits.reshape(-1), self.log_lr.reshape(1)]).float()

    @staticmethod
    def floats_for(like_images: tuple, num_classes: int) -> int:
        """:attr:`numel` of a set whose images have shape ``like_images`` ``[m, C, H, W]``."""
        return like_images[0] * (math.prod(like_images[1:]) + num_classes) + 1

    @classmethod
    def from_flat(cls, flat: Tensor, like_images: tuple, num_classes: int, version: int) -> SyntheticSet:
        """Inverse of :meth:`flat` for ``like_images`` = the images' shape ``[m, C, H, W]``."""
        m, d = like_images[0], math.prod(like_images[1:])
        expected = cls.floats_for(like_images, num_classes)
        if flat.numel() != expected:
            raise ValueError(
                f"a synthetic set of {like_images} images and {num_classes} classes has "
                f"{expected} floats; got {flat.numel()}"
            )
        images = flat[: m * d].reshape(like_images).clone()
        labels = flat[m * d : m * (d + num_classes)].reshape(m, num_classes).clone()
        return cls(images, labels, flat[-1].clone(), int(version))

    def state_dict(self) -> dict:
        return {
            "images": self.images,
            "label_logits": self.label_logits,
            "log_lr": self.log_lr,
            "version": self.version,
        }

    @classmethod
    def from_state_dict(cls, state: dict) -> SyntheticSet:
        return cls(state["images"], state["label_logits"], state["log_lr"], int(state["version"]))


def matching_loss(model, spec, start: Tensor, target: Tensor, images, label_logits, log_lr, steps: int) -> Tensor:
    """``||theta_N - target||^2 / ||start - target||^2`` after ``steps`` unrolled steps from ``start``."""
    from .syncomp import replay

    # D_syn's labels are logits of soft labels: softmax targets (3SFC's and FedSynth's default is raw)
    theta = replay(model, spec, start, [images] * steps, [label_logits] * steps, log_lr, labels="softmax")
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum().clamp_min(1e-12)


def gradient_matching_loss(model, spec, points, targets, images, label_logits) -> Tensor:
    """``mean_s (1 - cos(g_syn(w^s), d_s))`` over ``points`` ``w^s`` and ``targets`` ``d_s`` (flat
    ``[numel]`` each), ``g_syn`` the gradient of the soft-label loss on ``(images, label_logits)``;
    differentiable in ``images`` ``[m, C, H, W]`` and ``label_logits`` ``[m, classes]``."""
    from .syncomp import synthetic_gradient

    total = images.new_zeros(())
    for w, d in zip(points, targets):
        g = synthetic_gradient(model, spec, w, images, label_logits, create_graph=True, labels="softmax")
        total = total + (1.0 - (g @ d) / (g.norm() * d.norm()).clamp_min(1e-30))
    return total / len(points)


def displacements(trajectory: list[Tensor], span: int) -> list[Tensor]:
    """``d_s = -(w^{s+span} - w^s)`` for every start ``s`` with a model ``span`` rounds later:
    the gradient-matching targets at ``trajectory[:-span]`` (``len(trajectory) - span`` tensors)."""
    return [trajectory[s] - trajectory[s + span] for s in range(len(trajectory) - span)]


def distill(
    model: nn.Module,
    spec: FlatSpec,
    trajectory: list[Tensor],
    *,
    input_shape,
    num_classes: int,
    per_class: int,
    unroll: int,
    span: int,
    iters: int,
    lr_images: float,
    lr_labels: float,
    lr_step: float,
    init_step: float,
    generator: torch.Generator,
    version: int,
    init: SyntheticSet | None = None,
    objective: str = "gradient",
    points: int = 5,
    targets: list[Tensor] | None = None,
    perturbations: list[Tensor] | None = None,
) -> tuple[SyntheticSet, list[float]]:
    """Distil a synthetic set from ``trajectory`` (flat ``[numel]`` float32 global models, oldest first).

    Args:
        span: ``M``, the number of rounds between a start and its target model (``"trajectory"``)
            or across which a displacement is taken (``"gradient"``).
        init: a previous set to continue from (warm start); else noise and one-hot labels.
        objective: ``"gradient"`` (gradient matching) or ``"trajectory"`` (trajectory matching);
            see the module docstring.
        points: ``"gradient"``: starts sampled (without replacement) per iteration.
        targets: ``"gradient"``: the direction at each of ``trajectory[:-span]`` (default:
            :func:`displacements`); the oracle diagnostic passes ``grad F`` there.
        perturbations: ``"sam-gradient"``: the ``eps`` each round from ``trajectory[s]``
            perturbed along (flat, norm ``rho``): its clients descended along gradients at
            ``w^s + eps_s``, so ``g_syn`` is matched there (at least ``len(trajectory) - span``).

    Returns:
        ``(set, losses)`` with the matching loss of every iteration.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown syn_objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    if len(trajectory) <= span:
        raise ValueError(f"trajectory holds {len(trajectory)} models; need more than span={span}")
    at = trajectory  # where g_syn is matched
    if objective == "sam-gradient":
        if perturbations is None or len(perturbations) < len(trajectory) - span:
            got = "none" if perturbations is None else len(perturbations)
            raise ValueError(f"sam-gradient needs the eps of each of {len(trajectory) - span} starts; got {got}")
        at = [w + e for w, e in zip(trajectory, perturbations)]
    if objective in ("gradient", "sam-gradient"):
        targets = displacements(trajectory, span) if targets is None else targets
        if len(targets) != len(trajectory) - span:
            raise ValueError(f"targets must have {len(trajectory) - span} tensors (one per start); got {len(targets)}")
    m = per_class * num_classes
    device = trajectory[0].device
    if init is None:  # drawn on the CPU generator, then moved: the same start on every device
        images = torch.randn((m, *input_shape), generator=generator).to(device)
        label_logits = 3.0 * torch.eye(num_classes, device=device).repeat_interleave(per_class, dim=0)
        log_lr = torch.tensor(math.log(init_step), device=device)
    else:
        images, label_logits, log_lr = init.images.clone(), init.label_logits.clone(), init.log_lr.clone()
    images.requires_grad_(True)
    label_logits.requires_grad_(True)
    log_lr.requires_grad_(True)
    opt = Adam([([images], lr_images), ([label_logits], lr_labels), ([log_lr], lr_step)])
    starts = len(trajectory) - span
    losses = []
    for _ in range(iters):
        if objective != "trajectory":
            chosen = torch.randperm(starts, generator=generator)[:points].tolist()
            loss = gradient_matching_loss(
                model, spec, [at[s] for s in chosen], [targets[s] for s in chosen], images, label_logits
            )
        else:
            s = int(torch.randint(0, starts, (1,), generator=generator))
            loss = matching_loss(model, spec, trajectory[s], trajectory[s + span], images, label_logits, log_lr, unroll)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out = SyntheticSet(images.detach(), label_logits.detach(), log_lr.detach(), version)
    return out, losses
