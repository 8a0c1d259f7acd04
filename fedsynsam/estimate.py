"""How well a round's perturbation direction estimates the federation's gradient (a diagnostic).

Every SAM variant perturbs along an *estimate* of ``grad F(w^t)``, where ``F`` is the mean
cross-entropy over every client's training samples. In simulation the trainer holds all of
them, so it can measure each estimate directly: the cosine between the direction and
``grad F(w^t)``. FedSynSAM's claim is that its synthetic set gives a better one than
FedLESAM's ``-u^{t-1}``; this module measures that claim every round.

Nothing here feeds back into training: the probe reads the round's plan and the server's
state, and writes numbers into the round's record (``Config.diagnose = "estimate"``).

Estimates measured at ``w^t`` (each ``None`` when it does not exist that round):

==================  ================================================================
key                 direction
==================  ================================================================
``previous_update`` ``-u^{t-1}`` (FedLESAM's; also MoFedSAM's momentum direction)
``minibatch``       the gradient of a client's first minibatch at ``w^t`` (FedSAM's
                    first step), the mean cosine over the round's clients
``synthetic``       ``g_syn(w^t)``, the gradient on ``D_syn`` (FedSynSAM, once it has one)
``oracle``          ``g_syn(w^t)`` of the *oracle* set: built like ``D_syn`` at the same
                    refreshes but matched to ``grad F`` at the trajectory points
                    (``diagnose = "estimate,oracle"``; a ceiling, never used to train)
``eps``             whichever of the above the round's clients perturb along first
==================  ================================================================
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from fedcomp.flat import FlatSpec, unflatten

__all__ = [
    "DIAGNOSTICS",
    "ESTIMATES",
    "parse_diagnose",
    "federation_gradient",
    "cosine",
    "summarize",
    "EstimateProbe",
]

DIAGNOSTICS = ("estimate", "oracle")
ESTIMATES = ("eps", "previous_update", "minibatch", "synthetic", "oracle")
_EPS_OF_SOURCE = {
    "none": None,
    "batch": "minibatch",
    "previous-update": "previous_update",
    "synthetic": "synthetic",
    "synthetic-server": "synthetic",
}


def parse_diagnose(text: str) -> tuple[str, ...]:
    """``"estimate,oracle"`` -> ``("estimate", "oracle")``; ValueError naming ``diagnose`` otherwise."""
    if not isinstance(text, str):
        raise ValueError(f"diagnose must be a comma-separated string of {', '.join(DIAGNOSTICS)}; got {text!r}")
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    bad = [n for n in names if n not in DIAGNOSTICS]
    if bad:
        raise ValueError(f"unknown diagnose {bad[0]!r}; choose from {', '.join(DIAGNOSTICS)} (comma-separated)")
    if "oracle" in names and "estimate" not in names:
        raise ValueError("diagnose 'oracle' is a column of the estimate diagnostic: use diagnose = 'estimate,oracle'")
    return names


def federation_gradient(model: nn.Module, spec: FlatSpec, w: Tensor, x: Tensor, y: Tensor, chunk: int = 256) -> Tensor:
    """``grad F(w)``, ``F = mean_i CE(f_w(x_i), y_i)`` over all ``N`` samples, as ``[numel]`` float32.

    Computed in chunks of ``chunk`` samples (summed losses, divided by ``N``), so memory does not
    grow with ``N``. ``x``: ``[N, C, H, W]`` float32, ``y``: ``[N]`` int64, ``w``: flat ``[numel]``.
    """
    if len(y) == 0:
        raise ValueError("federation_gradient needs at least one sample")
    params = {k: v.detach().clone().requires_grad_(True) for k, v in unflatten(w, spec).items()}
    total = [torch.zeros_like(p) for p in params.values()]
    for i in range(0, len(y), chunk):
        loss = F.cross_entropy(functional_call(model, params, (x[i : i + chunk],)), y[i : i + chunk], reduction="sum")
        for acc, g in zip(total, torch.autograd.grad(loss, list(params.values()))):
            acc.add_(g)
    return torch.cat([g.reshape(-1) for g in total]).div_(len(y))


def cosine(a: Tensor | None, b: Tensor) -> float | None:
    """``<a, b> / (||a|| ||b||)`` in float64; ``None`` if ``a`` is ``None`` or either norm is 0 or not finite."""
    if a is None:
        return None
    a64, b64 = a.double(), b.double()
    den = float(a64.norm() * b64.norm())
    if not math.isfinite(den) or den == 0.0:
        return None
    return float(a64 @ b64) / den


def summarize(records: list[dict]) -> dict:
    """Per estimate, over the records that measured it: ``{"median", "q1", "q3", "rounds"}``.

    Quartiles are the inclusive method's (``statistics.quantiles``); an estimate never measured
    is left out. ``synthetic``'s rounds are those that had a ``D_syn``; FedSynSAM's ``eps`` also
    counts its FedLESAM rounds before the first set.
    """
    import statistics

    out = {}
    for key in ESTIMATES:
        values = [r["estimate"][key] for r in records if r.get("estimate") and r["estimate"].get(key) is not None]
        if values:
            q1, med, q3 = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
            out[key] = {"median": med, "q1": q1, "q3": q3, "rounds": len(values)}
    return out


class EstimateProbe:
    """Measures, at the start of each round, the cosine of every available estimate with ``grad F(w^t)``.

    Args:
        trainer: the :class:`fedsynsam.trainer.Trainer` whose rounds are measured (its model,
            layout, data, partition and state are read, never written).
    """

    def __init__(self, trainer, oracle: bool = False):
        self.trainer = trainer
        index = torch.cat(trainer.client_index) if trainer.client_index else torch.empty(0, dtype=torch.long)
        self.x, self.y = trainer.data.x_train[index], trainer.data.y_train[index]
        self.oracle_enabled = oracle
        self.oracle = None  # the oracle SyntheticSet (checkpointed by the trainer)
        self._cache: list[tuple[Tensor, Tensor]] = []  # (w, grad F(w)) of recent models

    def gradient(self, w: Tensor) -> Tensor:
        """``grad F(w)`` over every client's training samples (``[numel]`` float32), remembered
        for the last ``syn_window + 1`` models asked for (the oracle asks again for the trajectory's)."""
        for seen, g in self._cache:
            if torch.equal(seen, w):
                return g
        tr = self.trainer
        g = federation_gradient(tr.model, tr.spec, w, self.x, self.y)
        self._cache.append((w.clone(), g))
        del self._cache[: -(tr.cfg.syn_window + 1)]
        return g

    def minibatch_gradients(self, plan) -> list[Tensor]:
        """The gradient at ``plan.w`` of each of the plan's clients' first minibatch: the batch that
        :func:`fedsynsam.rounds.client_update` draws first, from a copy of its generator."""
        from .rounds import generator

        tr, cfg = self.trainer, self.trainer.cfg
        out = []
        for c in plan.clients:
            idx = tr.client_index[c]
            order = torch.randperm(len(idx), generator=generator(cfg.seed, plan.round, 1, c)).to(idx.device)
            batch = idx[order[: cfg.batch_size]]
            out.append(federation_gradient(tr.model, tr.spec, plan.w, tr.data.x_train[batch], tr.data.y_train[batch]))
        return out

    def oracle_targets(self, starts: list[Tensor]) -> list[Tensor]:
        """``grad F`` at each of ``starts`` (the trajectory points the server's targets sit at)."""
        return [self.gradient(w) for w in starts]

    def measure(self, plan) -> dict:
        """``{estimate: cosine or None}`` for :data:`ESTIMATES` at ``plan.w``."""
        tr = self.trainer
        st = tr.state
        g = self.gradient(plan.w)
        batch = [cosine(b, g) for b in self.minibatch_gradients(plan)]
        batch = [c for c in batch if c is not None]
        out = {
            "previous_update": cosine(None if st.u_prev is None else -st.u_prev, g),
            "minibatch": sum(batch) / len(batch) if batch else None,
            "synthetic": cosine(tr.synthetic_direction(st.synthetic, plan.w), g),
            "oracle": cosine(tr.synthetic_direction(self.oracle, plan.w), g),
        }
        eps_key = _EPS_OF_SOURCE[plan.source]
        out["eps"] = None if eps_key is None else out[eps_key]
        if plan.source == "previous-update" and st.u_prev is None:
            out["eps"] = None  # the first round of FedLESAM has no direction: eps = 0
        return {k: out[k] for k in ESTIMATES}
