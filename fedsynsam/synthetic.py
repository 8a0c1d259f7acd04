"""FedSynSAM's server side: the trajectory of global models and the synthetic set distilled from it.

Our reading of the paper (design.md section 4; every choice is a configurable default):
the server keeps the last ``window`` global models. Once it holds ``min_models`` of
them, and then every ``period`` rounds, it distils a labelled synthetic set ``D_syn``
(``per_class`` images per class, learnable soft labels, a learnable step size) by
trajectory matching: pick a start ``s`` in the window, set ``theta_0 = w^s``, unroll
``unroll`` differentiable SGD steps on ``D_syn`` and minimise

    ||theta_N - w^{s+M}||^2 / ||w^s - w^{s+M}||^2

over images, label logits and log step size with Adam. The server has no data: the
images start as Gaussian noise in the (standardised) input space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import fedcomp
from fedcomp.flat import FlatSpec

from .optim import Adam

__all__ = ["SyntheticSet", "distill", "matching_loss"]


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

    theta = replay(model, spec, start, [images] * steps, [label_logits] * steps, log_lr)
    return (theta - target).pow(2).sum() / (start - target).pow(2).sum().clamp_min(1e-12)


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
) -> tuple[SyntheticSet, list[float]]:
    """Distil a synthetic set from ``trajectory`` (flat global models, oldest first).

    Args:
        span: ``M``, the number of rounds between the start and the target model.
        init: a previous set to continue from (warm start); else noise and one-hot labels.

    Returns:
        ``(set, losses)`` with the matching loss of every iteration.
    """
    if len(trajectory) <= span:
        raise ValueError(f"trajectory holds {len(trajectory)} models; need more than span={span}")
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
        s = int(torch.randint(0, starts, (1,), generator=generator))
        loss = matching_loss(model, spec, trajectory[s], trajectory[s + span], images, label_logits, log_lr, unroll)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    out = SyntheticSet(images.detach(), label_logits.detach(), log_lr.detach(), version)
    return out, losses
