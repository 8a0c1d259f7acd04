"""Sharpness measurements against exact answers, and the compare grid with sharpness."""

from __future__ import annotations

import json

import pytest
import torch

from fedsynsam.cli import main
from fedsynsam.sharpness import (
    Objective,
    hutchinson,
    hutchinson_trace,
    inverse_mean_valley,
    landscape_1d,
    landscape_2d,
    power_iteration,
    rise_distance,
    top_eigenvalue,
    valley_width,
)


def _tiny_objective(seed=0) -> Objective:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    x = torch.randn(64, 4)
    y = torch.randint(0, 3, (64,))
    return Objective(model, x, y)


def _explicit_hessian(obj: Objective) -> torch.Tensor:
    n = obj.w.numel()
    return torch.stack([obj.hvp(torch.eye(n, dtype=torch.float64)[i]) for i in range(n)])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_eigenvalue_matches_the_explicit_hessian(seed):
    obj = _tiny_objective(seed)
    h = _explicit_hessian(obj)
    h = (h + h.T) / 2
    exact = float(torch.linalg.eigvalsh(h).max())
    est = top_eigenvalue(obj, max_iters=500, tol=1e-7)
    assert est.converged
    assert est.value == pytest.approx(exact, rel=1e-3)
    assert hutchinson_trace(obj, samples=2000)[0] == pytest.approx(float(torch.trace(h)), rel=0.1)


def test_power_iteration_finds_the_largest_algebraic_eigenvalue():
    q, _ = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    a = q @ torch.diag(torch.tensor([-9.0, -3.0, 0.5, 1.0, 2.0, 4.0], dtype=torch.float64)) @ q.T
    est = power_iteration(lambda v: a @ v, 6, max_iters=2000, tol=1e-10)
    assert est.value == pytest.approx(4.0, rel=1e-4)  # not -9, the dominant-magnitude one


def test_hutchinson_is_unbiased_on_a_known_matrix():
    g = torch.Generator().manual_seed(1)
    m = torch.randn(20, 20, dtype=torch.float64, generator=g)
    a = m + m.T
    mean, stderr = hutchinson(lambda v: a @ v, 20, samples=4000, seed=3)
    assert abs(mean - float(torch.trace(a))) < 4 * stderr
    # averaged over many independent estimates, the error shrinks like 1/sqrt(samples)
    means = [hutchinson(lambda v: a @ v, 20, samples=50, seed=s)[0] for s in range(200)]
    assert abs(sum(means) / len(means) - float(torch.trace(a))) < 4 * float(torch.tensor(means).std()) / 200**0.5


def test_landscapes_and_valley_width():
    obj = _tiny_objective()
    alphas, losses = landscape_1d(obj, points=11)
    assert losses.shape == (11,) and float(losses[5]) == pytest.approx(obj.loss(obj.w))
    alphas2, grid = landscape_2d(obj, points=5)
    assert grid.shape == (5, 5) and float(grid[2, 2]) == pytest.approx(obj.loss(obj.w))
    width, spread = valley_width(obj, rise=0.05, directions=3)
    assert 0 < width <= 64 and spread >= 0
    assert valley_width(obj, rise=0.5, directions=3)[0] > width  # a larger rise is reached further away


def test_inverse_mean_valley_measures_where_the_loss_rises_toward_each_worker():
    obj = _tiny_objective()
    base, rise = obj.loss(obj.w), 0.05
    g = torch.Generator().manual_seed(4)
    workers = [obj.w + 0.3 * torch.randn(obj.w.numel(), generator=g) for _ in range(3)]
    imv, mean_valley = inverse_mean_valley(obj, workers, rise=rise)
    distances = []
    for x in workers:
        u = (x - obj.w) / (x - obj.w).norm()
        r = rise_distance(obj, u, base, rise, 64.0)
        # the bisection's answer: the loss is at base + rise there, and below it a little closer
        assert obj.loss(obj.w + r * u) == pytest.approx(base + rise, abs=1e-3)
        assert obj.loss(obj.w + 0.9 * r * u) < base + rise
        distances.append(r)
    assert mean_valley == pytest.approx(sum(distances) / 3) and imv == pytest.approx(3 / sum(distances))
    assert inverse_mean_valley(obj, [obj.w.clone(), obj.w.clone()]) == (None, None)  # no direction


def test_compare_with_sharpness_end_to_end(tmp_path, capsys):
    """The tiny grid of the issue (about 20 s here; no timing assertion: the machine is shared)."""
    out = tmp_path / "grid"
    argv = ["compare", "--algorithms", "fedavg", "--compressors", "none,topk", "--seeds", "0,1"]
    argv += ["--rounds", "3", "--clients", "4", "--per-round", "2", "--local-steps", "2"]
    argv += ["--sharpness", "--out", str(out), "--quiet"]
    assert main(argv) == 0
    table = (out / "results.md").read_text()
    assert "λ_max" in table and "valley width" in table
    for name in ("lambda_max.png", "landscape_1d.png", "accuracy_vs_round.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 5000, name
    run = out / "fedavg-topk-s1"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["lambda_max"] > 0 and summary["hessian_trace"] > 0
    assert (run / "landscape_2d.png").stat().st_size > 5000
    capsys.readouterr()
    assert main(["sharpness", str(run), "--max-iters", "5", "--trace-samples", "3"]) == 0
    assert "λ_max" in capsys.readouterr().out


def test_sharpness_cli_errors(tmp_path, capsys):
    assert main(["sharpness", str(tmp_path)]) == 2
    assert "summary.json is missing" in capsys.readouterr().err
    assert main(["sharpness", str(tmp_path), "--tol", "2"]) == 2
    assert "--tol must be in (0, 1)" in capsys.readouterr().err


def test_measure_run_options_reach_it_through_the_grid(tmp_path):
    """``sharpness_options`` of run_grid: a smaller sample and no 2-D surface."""
    from fedsynsam.compare import run_grid

    base = dict(rounds=2, clients=4, per_round=2, local_steps=2)
    out = tmp_path / "grid"
    run_grid(base, ["fedavg"], ["none"], [0], out, progress=False, sharpness=True,
             sharpness_options={"samples": 64, "surface": False})  # fmt: skip
    run = out / "fedavg-none-s0"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["sharpness_samples"] == 64 and summary["lambda_max"] > 0
    assert not (run / "landscape_2d.png").exists() and (run / "landscape_1d.png").is_file()
    assert set(torch.load(run / "landscape.pt")) == {"alphas", "loss_1d"}
