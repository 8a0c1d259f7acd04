"""Sharpness of a trained model: Hessian spectrum estimates, loss landscapes, valley width.

All measurements use a fixed evaluation subset (the first ``samples`` training points
of a seeded permutation) and the mean cross-entropy over it, so two runs are measured
on the same data.

* :func:`top_eigenvalue`: the largest (algebraic) Hessian eigenvalue by power
  iteration on Hessian-vector products (double backward). Stops when the Rayleigh
  quotient changes by less than ``tol`` (relative) between iterations, or after
  ``max_iters``; reports whether it converged. If the dominant eigenvalue is
  negative, a second, shifted power iteration finds the largest algebraic one.
* :func:`hutchinson_trace`: ``E[v^T H v]`` over Rademacher ``v``: an unbiased
  trace estimate, with its standard error.
* :func:`landscape_1d` / :func:`landscape_2d`: loss along filter-normalised random
  directions (Li et al., 2018: each output filter / row of the direction is
  rescaled to the norm of the matching filter of ``w``; 1-D parameters such as
  biases and norm scales get no displacement).
* :func:`valley_width`: along each of ``directions`` filter-normalised directions
  and both signs, the distance at which the loss first exceeds ``loss(w) + rise``
  (bisection after a doubling search), averaged: the "mean valley" width.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedcomp.flat import flatten, unflatten

__all__ = [
    "EigenResult",
    "power_iteration",
    "hutchinson",
    "top_eigenvalue",
    "hutchinson_trace",
    "filter_normalized_direction",
    "landscape_1d",
    "landscape_2d",
    "valley_width",
    "rise_distance",
    "inverse_mean_valley",
    "Objective",
    "evaluation_subset",
    "sharpness_of",
    "measure_run",
]


@dataclass
class EigenResult:
    value: float
    iterations: int
    converged: bool


def power_iteration(
    hvp: Callable[[Tensor], Tensor], dim: int, *, max_iters: int = 100, tol: float = 1e-3, seed: int = 0
) -> EigenResult:
    """Largest algebraic eigenvalue of the symmetric operator ``hvp`` on ``R^dim``."""

    def dominant(op: Callable[[Tensor], Tensor]) -> EigenResult:
        v = torch.randn(dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        v /= v.norm()
        value, prev = 0.0, None
        for it in range(1, max_iters + 1):
            hv = op(v)
            value = float(v @ hv)
            norm = float(hv.norm())
            if norm == 0.0:
                return EigenResult(0.0, it, True)
            v = hv / norm
            if prev is not None and abs(value - prev) <= tol * max(abs(value), 1e-12):
                return EigenResult(value, it, True)
            prev = value
        return EigenResult(value, max_iters, False)

    first = dominant(hvp)
    if first.value >= 0:
        return first
    # the dominant eigenvalue is negative: shift by it to reach the top of the spectrum
    shift = first.value
    second = dominant(lambda v: hvp(v) - shift * v)
    return EigenResult(second.value + shift, first.iterations + second.iterations, first.converged and second.converged)


def hutchinson(hvp: Callable[[Tensor], Tensor], dim: int, *, samples: int = 100, seed: int = 0) -> tuple[float, float]:
    """``(mean, standard error)`` of ``v^T H v`` over ``samples`` Rademacher vectors."""
    gen = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(samples):
        v = torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1
        values.append(float(v @ hvp(v)))
    t = torch.tensor(values, dtype=torch.float64)
    return float(t.mean()), float(t.std() / math.sqrt(samples)) if samples > 1 else 0.0


class Objective:
    """The mean cross-entropy of ``model`` on a fixed batch, as a function of the flat parameters."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, w: Tensor | None = None):
        self.model, self.x, self.y = model, x, y
        flat, self.spec = flatten(model)
        self.w = (flat if w is None else w).detach().clone()
        self.params = dict(model.named_parameters())

    def loss(self, flat: Tensor) -> float:
        with torch.no_grad():
            return float(self._loss(flat))

    def _loss(self, flat: Tensor) -> Tensor:
        logits = torch.func.functional_call(self.model, unflatten(flat, self.spec), (self.x,))
        return F.cross_entropy(logits, self.y)

    def hvp(self, v: Tensor) -> Tensor:
        """``H(w) v`` (float64 in, float64 out on ``v``'s device; computed in float32 on ``w``'s device
        by double backward)."""
        w = self.w.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(self._loss(w), w, create_graph=True)
        (hv,) = torch.autograd.grad(g, w, grad_outputs=v.to(device=w.device, dtype=w.dtype))
        return hv.to(device=v.device, dtype=torch.float64)


def top_eigenvalue(obj: Objective, *, max_iters: int = 100, tol: float = 1e-3, seed: int = 0) -> EigenResult:
    return power_iteration(obj.hvp, obj.w.numel(), max_iters=max_iters, tol=tol, seed=seed)


def hutchinson_trace(obj: Objective, *, samples: int = 100, seed: int = 0) -> tuple[float, float]:
    return hutchinson(obj.hvp, obj.w.numel(), samples=samples, seed=seed)


def filter_normalized_direction(obj: Objective, generator: torch.Generator) -> Tensor:
    """A random direction with each filter (row of a weight) scaled to the norm of ``w``'s filter."""
    d = torch.randn(obj.w.numel(), generator=generator).to(obj.w.device)  # the same direction on every device
    w_views, d_views = unflatten(obj.w, obj.spec), unflatten(d, obj.spec)
    for name, dv in d_views.items():
        wv = w_views[name]
        if wv.dim() <= 1:
            dv.zero_()
            continue
        rows_d, rows_w = dv.reshape(dv.shape[0], -1), wv.reshape(wv.shape[0], -1)
        rows_d.mul_(rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-12))
    return d


def landscape_1d(obj: Objective, *, span: float = 1.0, points: int = 41, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(alphas [points], losses [points])`` of ``loss(w + alpha d)``, ``alpha`` in ``[-span, span]``."""
    d = filter_normalized_direction(obj, torch.Generator().manual_seed(seed))
    alphas = torch.linspace(-span, span, points)
    return alphas, torch.tensor([obj.loss(obj.w + a * d) for a in alphas.tolist()])


def landscape_2d(obj: Objective, *, span: float = 1.0, points: int = 21, seed: int = 0) -> tuple[Tensor, Tensor]:
    """``(alphas [points], losses [points, points])`` of ``loss(w + a d1 + b d2)``."""
    gen = torch.Generator().manual_seed(seed)
    d1, d2 = filter_normalized_direction(obj, gen), filter_normalized_direction(obj, gen)
    alphas = torch.linspace(-span, span, points)
    grid = torch.tensor([[obj.loss(obj.w + a * d1 + b * d2) for b in alphas.tolist()] for a in alphas.tolist()])
    return alphas, grid


def valley_width(
    obj: Objective, *, rise: float = 0.1, directions: int = 10, max_distance: float = 64.0, seed: int = 0
) -> tuple[float, float]:
    """``(mean, std)`` over directions and signs of the distance at which the loss rises by ``rise``.

    Distances are in units of the filter-normalised direction (1.0 moves every filter by
    its own norm). A side on which the loss never rises within ``max_distance`` counts as
    ``max_distance``.
    """
    base = obj.loss(obj.w)
    gen = torch.Generator().manual_seed(seed)
    widths = []
    for _ in range(directions):
        d = filter_normalized_direction(obj, gen)
        widths += [rise_distance(obj, sign * d, base, rise, max_distance) for sign in (1.0, -1.0)]
    t = torch.tensor(widths)
    return float(t.mean()), float(t.std()) if len(widths) > 1 else 0.0


def rise_distance(obj: Objective, d: Tensor, base: float, rise: float, max_distance: float) -> float:
    """The smallest ``s`` in ``(0, max_distance]`` with ``loss(w + s d) > base + rise`` (doubling search
    from 1/64, then 20 bisections); ``max_distance`` if the loss never rises that far."""
    lo, hi = 0.0, 1.0 / 64
    while hi < max_distance and obj.loss(obj.w + hi * d) <= base + rise:
        lo, hi = hi, hi * 2
    if hi >= max_distance and obj.loss(obj.w + max_distance * d) <= base + rise:
        return max_distance
    hi = min(hi, max_distance)
    for _ in range(20):
        mid = (lo + hi) / 2
        if obj.loss(obj.w + mid * d) <= base + rise:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def inverse_mean_valley(
    obj: Objective, workers: list[Tensor], *, rise: float = 0.1, max_distance: float = 64.0
) -> tuple[float | None, float | None]:
    """``(IMV, mean valley)`` of the averaged model ``obj.w`` and the workers around it.

    Our reading of DPPF's Inverse Mean Valley: along the unit direction from the average to each
    worker (``(x_i - w) / ||x_i - w||``, plain L2 units), the distance at which the loss first rises
    by ``rise``; the mean valley is the mean of those distances and the IMV its inverse (large:
    sharp). ``(None, None)`` when every worker sits on the average (no direction to measure along).
    """
    base = obj.loss(obj.w)
    distances = []
    for x in workers:
        diff = x.to(obj.w.device) - obj.w
        norm = float(diff.norm())
        if norm > 0.0 and math.isfinite(norm):
            distances.append(rise_distance(obj, diff / norm, base, rise, max_distance))
    if not distances:
        return None, None
    mean = sum(distances) / len(distances)
    return 1.0 / mean, mean


def evaluation_subset(n: int, samples: int) -> Tensor:
    """The fixed subset every measurement uses: the first ``samples`` of a permutation of ``range(n)``
    seeded with 0 (CPU int64), so runs of any kind are measured on the same training points."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))[:samples]


def sharpness_of(obj: Objective, *, max_iters: int = 100, tol: float = 1e-3, trace_samples: int = 50) -> dict:
    """λ_max (power iteration), Hessian trace (Hutchinson) and valley width of ``obj`` at ``obj.w``:
    keys ``lambda_max``, ``lambda_max_iterations``, ``lambda_max_converged``, ``hessian_trace``,
    ``hessian_trace_stderr``, ``valley_width``, ``valley_width_std``."""
    eig = top_eigenvalue(obj, max_iters=max_iters, tol=tol)
    trace, stderr = hutchinson_trace(obj, samples=trace_samples)
    width, width_std = valley_width(obj)
    return {
        "lambda_max": eig.value,
        "lambda_max_iterations": eig.iterations,
        "lambda_max_converged": eig.converged,
        "hessian_trace": trace,
        "hessian_trace_stderr": stderr,
        "valley_width": width,
        "valley_width_std": width_std,
    }


def measure_run(
    run_dir,
    *,
    samples: int = 1024,
    max_iters: int = 100,
    tol: float = 1e-3,
    trace_samples: int = 50,
    dataset=None,
    device: str = "auto",
    surface: bool = True,
) -> dict:
    """Measure a finished run: λ_max, Hessian trace, valley width and landscapes of its final model.

    ``samples`` training points (a fixed subset) define the loss; ``surface=False`` skips
    the 21 x 21 2-D landscape (441 loss evaluations, the largest single cost on a CNN).

    Writes the numbers into ``summary.json`` (keys ``lambda_max``, ``lambda_max_iterations``,
    ``lambda_max_converged``, ``hessian_trace``, ``hessian_trace_stderr``, ``valley_width``,
    ``valley_width_std``, ``sharpness_samples``), the curves into ``landscape.pt`` and the
    plots ``landscape_1d.png`` / ``landscape_2d.png``; returns the numbers.
    """
    import json
    from pathlib import Path

    from .checkpoint import load as load_plain
    from .config import Config, resolve_device
    from .data import load_dataset
    from .models import build_model
    from .plots import plot_landscape_1d, plot_landscape_2d

    run_dir = Path(run_dir)
    for name in ("summary.json", "final_model.pt"):
        if not (run_dir / name).is_file():
            raise FileNotFoundError(f"{run_dir / name} is missing: is {run_dir} a finished run?")
    summary = json.loads((run_dir / "summary.json").read_text())
    cfg = Config.from_dict(summary["config"], source=str(run_dir / "summary.json"))
    dev = resolve_device(device)
    data = (dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)).to(dev)
    model = build_model(cfg.model, data.input_shape, data.num_classes).to(dev)
    w = load_plain(run_dir / "final_model.pt", map_location=dev)["w"]
    order = evaluation_subset(len(data.y_train), samples).to(dev)
    obj = Objective(model, data.x_train[order], data.y_train[order], w)
    result = sharpness_of(obj, max_iters=max_iters, tol=tol, trace_samples=trace_samples)
    alphas, curve = landscape_1d(obj)
    curves = {"alphas": alphas, "loss_1d": curve}
    label = f"{cfg.algorithm}/{cfg.compressor} seed {cfg.seed}"
    if surface:
        alphas2, grid = landscape_2d(obj)
        curves.update(alphas_2d=alphas2, loss_2d=grid)
        plot_landscape_2d(alphas2, grid, run_dir / "landscape_2d.png", title=label)
    torch.save(curves, run_dir / "landscape.pt")
    plot_landscape_1d({label: (alphas, curve)}, run_dir / "landscape_1d.png")
    result["sharpness_samples"] = len(order)
    summary.update(result)
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return result
