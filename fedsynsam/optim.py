"""Adam for the server's and the compressors' small inner optimisations (distillation, 3SFC,
FedSynth), without ``torch.optim``.

Constructing any ``torch.optim`` optimizer imports ``torch._dynamo`` the first time, about 1.5 s
of a process's life on a 2-core CPU; in a short FedSynSAM run that import was the largest
single cost of the first distillation, and a 3SFC client paid it too. :class:`Adam` performs
``torch.optim.Adam``'s single-tensor update (the one torch uses for CPU tensors) op for op, so
the results equal it to the bit there (tested); on CUDA torch defaults to its ``foreach``
kernels, which this does not claim to match bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["Adam"]


class Adam:
    """Adam (Kingma & Ba) with no weight decay and no amsgrad.

    Args:
        groups: ``[(tensors, lr), ...]``: leaf tensors with ``requires_grad`` and their step
            size (one group per learning rate).
        betas, eps: as in ``torch.optim.Adam``.

    Call :meth:`zero_grad`, ``loss.backward()``, :meth:`step` as with a torch optimizer. A
    tensor whose ``.grad`` is ``None`` at a step is left alone (its moments do not advance).
    """

    def __init__(self, groups: list[tuple[list[Tensor], float]], betas=(0.9, 0.999), eps: float = 1e-8):
        self.groups = []
        for params, lr in groups:
            if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
                raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
            for p in params:
                if not p.is_leaf or not p.requires_grad:
                    raise ValueError("Adam optimises leaf tensors with requires_grad=True")
            self.groups.append((list(params), float(lr)))
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.state: dict[int, tuple[Tensor, Tensor, list[int]]] = {}

    def zero_grad(self) -> None:
        for params, _ in self.groups:
            for p in params:
                p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        b1, b2 = self.beta1, self.beta2
        for params, lr in self.groups:
            for p in params:
                if p.grad is None:
                    continue
                if id(p) not in self.state:
                    self.state[id(p)] = (torch.zeros_like(p), torch.zeros_like(p), [0])
                exp_avg, exp_avg_sq, step = self.state[id(p)]
                step[0] += 1
                grad = p.grad
                exp_avg.lerp_(grad, 1 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
                bias_correction1 = 1 - b1 ** step[0]
                bias_correction2 = 1 - b2 ** step[0]
                denom = (exp_avg_sq.sqrt() / math.sqrt(bias_correction2)).add_(self.eps)
                p.addcdiv_(exp_avg, denom, value=-(lr / bias_correction1))
