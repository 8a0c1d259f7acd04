"""Candidate constructions of FedSynSAM's synthetic set, measured by the cosine of its gradient with
the federation's gradient ∇F(w^t) (issue 23; the table in docs/experiment-mnist.md).

    python docs/estimate_candidates.py record --compressor topk   # a trajectory, with ∇F per round
    python docs/estimate_candidates.py try --compressor topk --span 3 --period 5 --refresh 10
    python docs/estimate_candidates.py targets --compressor topk   # how good the server's targets are

``record`` runs FedLESAM (mnist5k + CNN, α = 0.1, 20 clients / 5 per round, 100 rounds, the
settings of docs/experiment-mnist.toml) and saves every global model ``w^t`` with ∇F(w^t) to
``runs/candidates/<compressor>-s<seed>.pt``. FedLESAM is FedSynSAM before its first set, so the
trajectory is the one FedSynSAM's server would see had it never perturbed along ĝ.

``try`` replays the server's schedule on that trajectory: from round 10 on, every ``period``
rounds, it distils a set from the last ``window`` models (the first from noise with ``first``
Adam iterations, then warm ``refresh`` iterations) and measures cos(ĝ(w^t), ∇F(w^t)) at every
round the set serves, before the next refresh. It prints one JSON line: the median and quartiles
of those cosines and the distillation's seconds. Objectives:

* ``gradient`` (``--span M``): 1 − cos(ĝ(w^s), −(w^{s+M} − w^s)), as fedsynsam.synthetic;
* ``pathsum`` (``--span M``): 1 − cos(Σ_{j<M} ĝ(w^{s+j}), −(w^{s+M} − w^s)): the displacement
  is the sum of the updates made at w^s … w^{s+M−1}, so the set's gradients there are summed too;
* ``masked`` (``--span M``): 1 − cos(ĝ(w^s) ⊙ 1[d_s ≠ 0], d_s): under top-k the displacement has
  entries only where some upload did, so ĝ is compared there only;
* ``perturbed`` (``--span M``): ``gradient`` with ĝ taken at w^s + ε_s, the point whose gradient
  the clients actually descended along (ε_s = FedLESAM's −ρ u^{s−1}/‖u^{s−1}‖ on this trajectory);
* ``oracle``: ``gradient`` with ∇F(w^s) as the target (the ceiling; a diagnostic).

``targets`` measures the server's information itself: the median over rounds of
cos(−(w^{s+M} − w^s), ∇F(w^s)), the target at each point, for M = 1…4, and of cos(∇F(w^{t−1}),
∇F(w^t)) (how far the true gradient turns in one round).

The offline replay is an approximation of a FedSynSAM run (whose trajectory depends on ĝ); the
estimate grids of docs/experiment_mnist.py measure the chosen default in the loop.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from fedsynsam.config import Config, load_toml
from fedsynsam.estimate import cosine
from fedsynsam.optim import Adam
from fedsynsam.syncomp import synthetic_gradient
from fedsynsam.synthetic import gradient_matching_loss
from fedsynsam.trainer import Trainer

HERE = Path(__file__).resolve().parent
OUT = Path("runs/candidates")
RHO = load_toml(HERE / "experiment-mnist.toml")["rho"]


def _config(compressor: str, seed: int) -> Config:
    base = load_toml(HERE / "experiment-mnist.toml")
    return Config.from_dict(
        {**base, "algorithm": "fedlesam", "compressor": compressor, "seed": seed, "eval_every": 10}
    ).validate()


def record(compressor: str, seed: int) -> Path:
    """Run FedLESAM and save ``{"w": [T+1, numel], "g": [T+1, numel]}`` (∇F at every model)."""
    torch.set_num_threads(1)
    cfg = _config(compressor, seed)
    tr = Trainer(_with(cfg, diagnose="estimate"), log=lambda line: None)
    ws, gs = [], []
    for _ in range(cfg.rounds):
        ws.append(tr.state.w.clone())
        gs.append(tr.probe.gradient(tr.state.w))
        tr.run_round()
    ws.append(tr.state.w.clone())
    gs.append(tr.probe.gradient(tr.state.w))
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{compressor}-s{seed}.pt"
    torch.save({"w": torch.stack(ws), "g": torch.stack(gs)}, path)
    return path


def _with(cfg: Config, **changes) -> Config:
    return Config.from_dict({**cfg.to_dict(), **changes}).validate()


def _loss(objective, model, spec, W, G, starts, span, images, labels):
    if objective == "pathsum":
        total = images.new_zeros(())
        for s in starts:
            g = sum(synthetic_gradient(model, spec, W[s + j], images, labels, create_graph=True) for j in range(span))
            d = W[s] - W[s + span]
            total = total + 1 - (g @ d) / (g.norm() * d.norm()).clamp_min(1e-30)
        return total / len(starts)
    if objective == "masked":
        total = images.new_zeros(())
        for s in starts:
            g = synthetic_gradient(model, spec, W[s], images, labels, create_graph=True)
            d = W[s] - W[s + span]
            g = g * (d != 0)
            total = total + 1 - (g @ d) / (g.norm() * d.norm()).clamp_min(1e-30)
        return total / len(starts)
    if objective == "perturbed":  # the displacement is made of gradients at w^s + eps_s: match there
        points = []
        for s in starts:
            eps = W[s - 1] - W[s] if s > 0 else torch.zeros_like(W[s])  # FedLESAM's -u^{s-1}
            norm = eps.norm()
            points.append(W[s] + (RHO / norm) * eps if norm > 0 else W[s])
        targets = [W[s] - W[s + span] for s in starts]
        return gradient_matching_loss(model, spec, points, targets, images, labels)
    targets = [G[s] if objective == "oracle" else W[s] - W[s + span] for s in starts]
    return gradient_matching_loss(model, spec, [W[s] for s in starts], targets, images, labels)


def try_candidate(args) -> dict:
    torch.set_num_threads(1)
    data = torch.load(OUT / f"{args.compressor}-s{args.seed}.pt")
    W, G = data["w"], data["g"]
    cfg = _config(args.compressor, args.seed)
    tr = Trainer(cfg, log=lambda line: None)  # for its model and data layout only
    model, spec = tr.model, tr.spec
    shape, classes = tr.data.input_shape, tr.data.num_classes
    m = args.per_class * classes
    cosines, seconds, syn = [], 0.0, None
    rounds = len(W) - 1
    for r in range(10, rounds, args.period):
        gen = torch.Generator().manual_seed(r)
        starts_all = list(range(max(0, r - args.window), r - args.span + 1))
        if syn is None:
            images = torch.randn((m, *shape), generator=gen)
            labels = 3.0 * torch.eye(classes).repeat_interleave(args.per_class, 0)
        else:
            images, labels = syn
        images, labels = images.clone().requires_grad_(True), labels.clone().requires_grad_(True)
        opt = Adam([([images], args.lr), ([labels], 0.05)])
        tic = time.perf_counter()
        for _ in range(args.first if syn is None else args.refresh):
            chosen = torch.randperm(len(starts_all), generator=gen)[: args.points].tolist()  # as distill()
            loss = _loss(args.objective, model, spec, W, G, [starts_all[i] for i in chosen], args.span, images, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
        seconds += time.perf_counter() - tic
        syn = (images.detach(), labels.detach())
        for t in range(r, min(r + args.period, rounds)):
            cosines.append(cosine(synthetic_gradient(model, spec, W[t], *syn), G[t]))
    q1, med, q3 = statistics.quantiles(cosines, n=4, method="inclusive")
    out = {k: v for k, v in vars(args).items() if k != "command"}
    out.update(median=round(med, 3), q1=round(q1, 3), q3=round(q3, 3), distill_seconds=round(seconds, 1))
    return out


def targets(args) -> dict:
    data = torch.load(OUT / f"{args.compressor}-s{args.seed}.pt")
    W, G = data["w"], data["g"]
    out = {"compressor": args.compressor, "seed": args.seed}
    for span in (1, 2, 3, 4):
        out[f"span{span}"] = round(
            statistics.median(cosine(W[s] - W[s + span], G[s]) for s in range(10, len(W) - span)), 3
        )
    out["previous_true_gradient"] = round(statistics.median(cosine(G[t - 1], G[t]) for t in range(10, len(W))), 3)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["record", "try", "targets"])
    p.add_argument("--compressor", default="topk", choices=["topk", "none", "sign"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--objective", default="gradient", choices=["gradient", "pathsum", "masked", "perturbed", "oracle"])
    p.add_argument("--span", type=int, default=2)
    p.add_argument("--points", type=int, default=5, help="starts per Adam iteration")
    p.add_argument("--window", type=int, default=20)
    p.add_argument("--period", type=int, default=10)
    p.add_argument("--first", type=int, default=100)
    p.add_argument("--refresh", type=int, default=20)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.05, help="Adam step on the images")
    args = p.parse_args(argv)
    if args.command == "record":
        print(record(args.compressor, args.seed))
    elif args.command == "targets":
        print(json.dumps(targets(args)))
    else:
        print(json.dumps(try_candidate(args)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
