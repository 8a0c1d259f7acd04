"""Adam and L-BFGS for the server's and the compressors' small inner optimisations (distillation, 3SFC,
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

__all__ = ["Adam", "lbfgs"]


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


def lbfgs(
    evaluate,
    z: Tensor,
    *,
    max_evals: int,
    lr: float = 1.0,
    history: int = 20,
    c1: float = 1e-4,
    shrink: float = 0.5,
    tolerance: float = 1e-9,
) -> tuple[Tensor, float, int]:
    """Minimise a smooth function of one flat tensor by L-BFGS with a backtracking line search.

    Args:
        evaluate: ``evaluate(z) -> (loss, grad)``: the objective (a float) and its gradient
            (a tensor shaped like ``z``) at ``z``; called at most ``max_evals`` times.
        z: the start, any shape, float32 or float64 (not modified).
        max_evals: the budget of ``evaluate`` calls (the cost measure; every call is one
            forward and backward pass).
        lr: the first trial step along each quasi-Newton direction (1 is the natural step; the
            very first direction, a plain gradient, is scaled to unit length first).
        history: curvature pairs kept (the ``m`` of L-BFGS).
        c1: the Armijo constant; a trial step that does not decrease the loss by
            ``c1 * t * <grad, direction>`` is shrunk by ``shrink`` (another evaluation).
        tolerance: stop when the largest gradient entry or a step's change in loss is below it.

    Returns ``(best z, its loss, evaluations used)``: the best point of every one evaluated, so a
    rejected trial or an early stop never loses a better iterate. Deterministic: the same inputs
    give the same bits. Curvature pairs with ``<s, y> <= 1e-10 <y, y>`` are skipped (no update
    of the inverse-Hessian estimate), which keeps it positive definite without a Wolfe search.
    """
    if isinstance(max_evals, bool) or not isinstance(max_evals, int) or max_evals < 1:
        raise ValueError(f"max_evals must be an integer >= 1; got {max_evals!r}")
    z = z.detach().clone()
    loss, grad = evaluate(z)
    evals, best, best_loss = 1, z.clone(), loss
    pairs: list[tuple[Tensor, Tensor, float]] = []  # (s, y, 1 / <s, y>)
    direction = -grad / grad.norm().clamp_min(1e-30)
    while evals < max_evals and float(grad.abs().max()) > tolerance:
        slope = float(grad.flatten() @ direction.flatten())
        if not slope < 0:  # not a descent direction (numerical trouble): restart from the gradient
            pairs.clear()
            direction = -grad / grad.norm().clamp_min(1e-30)
            slope = float(grad.flatten() @ direction.flatten())
        t, accepted = lr, False
        while evals < max_evals:
            z_new = z + t * direction
            loss_new, grad_new = evaluate(z_new)
            evals += 1
            if loss_new < best_loss:
                best, best_loss = z_new.clone(), loss_new
            if loss_new <= loss + c1 * t * slope:
                accepted = True
                break
            t *= shrink
        if not accepted:
            break
        s, y = (z_new - z).flatten(), (grad_new - grad).flatten()
        sy = float(s @ y)
        if sy > 1e-10 * float(y @ y):
            pairs.append((s, y, 1.0 / sy))
            del pairs[:-history]
        change = abs(loss - loss_new)
        z, loss, grad = z_new, loss_new, grad_new
        if change < tolerance:
            break
        # two-loop recursion: direction = -H grad
        q = grad.flatten().clone()
        alphas = []
        for s_i, y_i, rho_i in reversed(pairs):
            a = rho_i * float(s_i @ q)
            alphas.append(a)
            q.sub_(y_i, alpha=a)
        if pairs:
            s_k, y_k, _ = pairs[-1]
            q.mul_(float(s_k @ y_k) / float(y_k @ y_k))
        for (s_i, y_i, rho_i), a in zip(pairs, reversed(alphas)):
            b = rho_i * float(y_i @ q)
            q.add_(s_i, alpha=a - b)
        direction = -q.view_as(z)
        if not pairs:
            direction = direction / direction.norm().clamp_min(1e-30)
    return best, best_loss, evals
