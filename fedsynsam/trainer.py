"""The federated training loop with compressed uploads (fedcomp in the hot loop).

Per round ``t``: sample ``per_round`` clients; each starts from ``w^t``, runs ``K``
local steps with its algorithm's perturbation, and uploads ``Delta_i = w_i^K - w^t``
flattened into one buffer and compressed by a fedcomp compressor (with a
per-client error-feedback residual, created at the client's first participation).
The payload goes through ``to_bytes`` / ``Payload.from_bytes`` exactly as on a
network, and the server sets ``w^{t+1} = w^t + server_lr * fedcomp.aggregate(payloads)``.

Every random choice of round ``t`` (client sample, minibatches, synthetic-set
initialisation and starts) comes from generators seeded by ``(seed, t, ...)``, so a
run resumed from its checkpoint after round ``t`` equals the uninterrupted run to
the bit.

Bytes: uplink is the sum of the payloads' ``nbytes``. Downlink per sampled client:
the global model as an identity payload, plus the previous global update ``u^{t-1}``
for MoFedSAM / FedLESAM / FedSynSAM-before-``D_syn`` (dense), plus ``D_syn`` for
FedSynSAM in client mode when the client has not received the current version, or
the round's ``eps`` (dense) in server mode.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

import fedcomp

from . import algorithms as alg
from . import checkpoint as checkpoints
from .config import NOT_IDENTITY, Config, resolve_device
from .data import Dataset, load_dataset
from .estimate import ESTIMATES, EstimateProbe, parse_diagnose, summarize
from .rounds import (
    RoundPlan,
    RoundResult,
    base_compressor,
    client_update,
    compress_one,
    counter,
    dense_bytes,
    initial_model,
    load_flat,
    momentum_for,
    needs_u_prev,
    partition_for,
    perturbation_for,
)
from .rounds import generator as _generator
from .syncomp import FedSynth, ModelCompressor, ThreeSFC
from .synthetic import SyntheticSet, distill

__all__ = ["Trainer", "RunState", "build_uplink", "METRIC_KEYS"]

METRIC_KEYS = ("round", "test_acc", "test_loss", "train_loss", "uplink_bytes", "downlink_bytes", "seconds")
_DIRECTION_ALGOS = ("mofedsam", "fedlesam", "fedsynsam")


def build_uplink(cfg: Config, model=None, spec=None, data: Dataset | None = None, *, seed_offset: int = 0):
    """The client-side compressor for ``cfg`` (wrapped in ErrorFeedback when asked). 3SFC and
    FedSynth use the model as decompressor, so they need ``model``, ``spec`` and ``data``."""
    if cfg.compressor in ("3sfc", "fedsynth"):
        if model is None or spec is None or data is None:
            raise ValueError(f"compressor {cfg.compressor!r} needs the model, its FlatSpec and the dataset")
        common = dict(error_feedback=cfg.error_feedback, seed=cfg.seed + seed_offset)
        if cfg.compressor == "3sfc":
            return ThreeSFC(
                model,
                spec,
                data.input_shape,
                data.num_classes,
                samples=cfg.sfc_samples,
                iters=cfg.sfc_iters,
                lr=cfg.sfc_lr,
                encoder=cfg.sfc_encoder,
                labels=cfg.sfc_labels,
                **common,
            )
        return FedSynth(
            model,
            spec,
            data.input_shape,
            data.num_classes,
            batches=cfg.fedsynth_batches,
            batch_size=cfg.fedsynth_batch_size,
            iters=cfg.fedsynth_iters,
            lr=cfg.fedsynth_lr,
            encoder=cfg.fedsynth_encoder,
            labels=cfg.fedsynth_labels,
            init_step=cfg.lr,
            **common,
        )
    base = base_compressor(cfg, cfg.seed, spec)
    return fedcomp.ErrorFeedback(base) if cfg.error_feedback and cfg.compressor != "none" else base


@dataclass
class RunState:
    """Everything that evolves over rounds (what the checkpoint holds)."""

    round: int  # next round to run
    w: torch.Tensor  # flat global model
    u_prev: torch.Tensor | None = None  # previous global update
    trajectory: list = field(default_factory=list)  # flat global models, oldest first
    # FedSynSAM "sam-gradient": the eps the round from trajectory[i] perturbed along (radius rho)
    perturbations: list = field(default_factory=list)
    synthetic: SyntheticSet | None = None
    last_refresh: int = -1
    client_syn_version: dict = field(default_factory=dict)  # client -> version of D_syn it holds
    distill_losses: list = field(default_factory=list)  # (round, first, last) per refresh
    workers: dict = field(default_factory=dict)  # DPPF: client -> its own flat model


class Trainer:
    """One federated run. ``Trainer(cfg, out_dir).run()``; ``resume=True`` continues from the checkpoint."""

    def __init__(self, cfg: Config, out_dir: str | Path | None = None, *, dataset: Dataset | None = None, log=None):
        self.cfg = cfg.validate()
        self.log = log if log is not None else (lambda line: print(f"fedsynsam: {line}", file=sys.stderr))
        self.out = Path(out_dir) if out_dir is not None else None
        self.device = resolve_device(cfg.device)
        data = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
        self.data = data.to(self.device)
        self.model, w0, self.spec = initial_model(cfg, self.data, self.device)
        self.partition = partition_for(cfg, data.y_train)
        self.client_index = [torch.tensor(p, dtype=torch.long, device=self.device) for p in self.partition]
        self.uplink = build_uplink(cfg, self.model, self.spec, self.data)
        # what a caller's own round runner keeps across a resume (plain data; e.g. the Flower
        # server's per-client bookkeeping): saved in every checkpoint and restored with it
        self.extra_state: dict = {}
        # 3SFC double-way: the server compresses what it broadcasts, with its own residual
        self.downlink = (
            build_uplink(cfg, self.model, self.spec, self.data, seed_offset=7919) if cfg.sfc_double_way else None
        )
        self.state = RunState(round=0, w=w0.clone(), trajectory=[w0.clone()])
        if isinstance(self.uplink, fedcomp.ErrorFeedback):  # every client's residual in one buffer
            self.uplink.reserve(cfg.clients, self.state.w)
        # seconds per part of the rounds: "aggregate" is the server's decode + aggregation (+ the
        # broadcast's compression when the downlink is compressed), "algorithm" DPPF's pull-push
        self.timings = dict.fromkeys(("local", "compress", "wire", "aggregate", "algorithm", "distill", "eval"), 0.0)
        # the estimate diagnostic (simulation only): timed apart, outside a round's "seconds"
        self.diagnose = parse_diagnose(cfg.diagnose)
        self.probe = EstimateProbe(self, oracle="oracle" in self.diagnose) if "estimate" in self.diagnose else None
        self.timings["diagnose"] = 0.0
        self._estimate: dict[int, dict] = {}  # round -> cosines, from plan_round to apply_round
        self._diagnose_seconds = 0.0  # spent on the diagnostic in the round under way
        self._round_eps = None  # sam-gradient: the eps of the round under way (plan_round -> apply_round)

    # -- model helpers -------------------------------------------------------
    @property
    def numel(self) -> int:
        return self.spec.numel

    def load_flat(self, flat: torch.Tensor) -> None:
        load_flat(self.model, flat, self.spec)

    @torch.no_grad()
    def evaluate(self, flat: torch.Tensor | None = None) -> tuple[float, float]:
        """(test accuracy, test loss) of ``flat`` (default: the global model)."""
        self.load_flat(self.state.w if flat is None else flat)
        logits = self.model(self.data.x_test)
        loss = float(F.cross_entropy(logits, self.data.y_test))
        acc = float((logits.argmax(1) == self.data.y_test).float().mean())
        return acc, loss

    # -- one round: plan (server), clients, apply (server) ----------------------
    def _round_source(self) -> str:
        cfg, st = self.cfg, self.state
        if cfg.algorithm in ("fedavg", "dppf"):
            return "none"
        if cfg.algorithm in ("fedsam", "mofedsam"):
            return "batch"
        if cfg.algorithm == "fedsynsam" and st.synthetic is not None:
            return "synthetic" if cfg.perturbation == "client" else "synthetic-server"
        return "previous-update"

    def plan_round(self) -> RoundPlan:
        """The server's half before the clients run: sample, pick the perturbation, gather what to send."""
        cfg, st = self.cfg, self.state
        t = st.round
        clients = torch.randperm(cfg.clients, generator=_generator(cfg.seed, t, 0))[: cfg.per_round].sort().values
        source = self._round_source()
        plan = RoundPlan(round=t, clients=clients.tolist(), source=source, w=st.w)
        if needs_u_prev(cfg, source):
            plan.u_prev = st.u_prev
        if source == "synthetic":
            plan.synthetic = st.synthetic
        elif source == "synthetic-server":  # the server computes g_syn(w^t) once and sends it
            plan.direction = self.synthetic_direction(st.synthetic, st.w)
        seeded = counter(self.uplink)
        plan.first_call = seeded.calls if seeded is not None else 0
        if cfg.algorithm == "fedsynsam" and cfg.syn_objective == "sam-gradient":  # at w^t, before it moves
            self._round_eps = self._round_epsilon(plan)
        if self.probe is not None and self._evaluated(t):
            tic = time.perf_counter()
            self._estimate[t] = self.probe.measure(plan)
            self._diagnose_seconds += time.perf_counter() - tic
        return plan

    def _evaluated(self, t: int) -> bool:
        """Whether round ``t`` (0-based) is evaluated (and, with ``diagnose``, measured)."""
        return (t + 1) % self.cfg.eval_every == 0 or t + 1 == self.cfg.rounds

    def synthetic_direction(self, synthetic: SyntheticSet | None, w: torch.Tensor) -> torch.Tensor | None:
        """``g_syn(w)``: the gradient of the soft-label loss on ``synthetic`` at flat ``w`` (``[numel]``)."""
        if synthetic is None:
            return None
        self.load_flat(w)
        g = torch.autograd.grad(
            alg.soft_cross_entropy(self.model(synthetic.images), synthetic.label_logits),
            list(self.model.parameters()),
        )
        return torch.cat([x.detach().reshape(-1) for x in g])

    def downlink_bytes(self, plan: RoundPlan, client: int) -> int:
        """Bytes sent down to ``client`` for ``plan``: each dense tensor as an identity payload.

        The global model (unless 3SFC double-way, whose compressed aggregate is counted when it
        is made), ``u^{t-1}`` when the clients need it, ``g_syn`` in server mode, and ``D_syn``
        when the client does not hold its current version (then it does).
        """
        dense = dense_bytes(self.numel)
        total = 0 if self.downlink is not None else dense
        if plan.u_prev is not None:
            total += dense
        if plan.direction is not None:
            total += dense
        if self.hand_synthetic(plan, client):
            total += plan.synthetic.nbytes
        return total

    def hand_synthetic(self, plan: RoundPlan, client: int) -> bool:
        """Whether ``client`` lacks the plan's ``D_syn`` and so is sent it; records that it then holds it."""
        st = self.state
        if plan.synthetic is None or st.client_syn_version.get(client) == plan.synthetic.version:
            return False
        st.client_syn_version[client] = plan.synthetic.version
        return True

    def run_clients(self, plan: RoundPlan) -> RoundResult:
        """Every sampled client in this process: local steps, then all updates compressed together
        (one batched op per round for every fedcomp compressor), each payload through the bytes."""
        cfg, st = self.cfg, self.state
        perturbation, momentum = perturbation_for(cfg, plan, self.spec), momentum_for(cfg, plan, self.spec)
        losses, down, finished, encode_cos = [], 0, {}, []
        deltas = st.w.new_empty((len(plan.clients), self.numel))  # row j: client j's update
        for j, c in enumerate(plan.clients):
            down += self.downlink_bytes(plan, c)
            tic = time.perf_counter()
            idx = self.client_index[c]
            _, loss, model_c = client_update(
                cfg,
                self.model,
                self.spec,
                self.data.x_train[idx],
                self.data.y_train[idx],
                plan,
                c,
                perturbation=perturbation,
                momentum=momentum,
                start=st.workers.get(c) if cfg.algorithm == "dppf" else None,
                out=deltas[j],
            )
            losses.append(loss)
            if model_c is not None:
                finished[c] = model_c
            self.timings["local"] += time.perf_counter() - tic
        tic2 = time.perf_counter()
        keys = [f"client{c}" for c in plan.clients]
        if isinstance(self.uplink, fedcomp.ErrorFeedback):  # one batched op (the same bits as one by one)
            sent = self.uplink.compress_many(deltas, keys)
        elif isinstance(self.uplink, fedcomp.PowerSGD):  # no error feedback, a warm start per client
            sent = self.uplink.compress_many(deltas, keys)
        elif isinstance(self.uplink, fedcomp.Compressor):  # no error feedback: batched too
            sent = self.uplink.compress_many(deltas)
        else:  # 3SFC / FedSynth: one client at a time; each payload's cosine with what it encodes
            sent, encode_cos = [], []
            for d, key in zip(deltas, keys):
                sent.append(compress_one(self.uplink, d, key, st.w))
                encode_cos.append(self.uplink.last_cos)
        tic3 = time.perf_counter()
        # the only device -> host copy of the round's uploads, then back as a receiver would
        payloads = [fedcomp.Payload.from_bytes(p.to_bytes(), device=self.device) for p in sent]
        self.timings["compress"] += tic3 - tic2
        self.timings["wire"] += time.perf_counter() - tic3
        return RoundResult(payloads, losses, down, finished=finished, encode_cos=encode_cos)

    def run_round(self, clients=None) -> dict:
        """One round; ``clients`` runs the sampled clients (default: :meth:`run_clients`, in process)."""
        start = time.perf_counter()
        plan = self.plan_round()
        result = (clients or self.run_clients)(plan)
        return self.apply_round(plan, result, start)

    def apply_round(self, plan: RoundPlan, result: RoundResult, start: float | None = None) -> dict:
        """The server's half after the clients: aggregate, update the state, refresh, evaluate.

        A round in which no client's payload arrived keeps the model (and ``u^{t-1}``); its record
        says so with ``train_loss = None``.
        """
        cfg, st = self.cfg, self.state
        t, start = plan.round, time.perf_counter() if start is None else start
        payloads, down = result.payloads, result.downlink_bytes
        tic, downlink_cos = time.perf_counter(), None
        if payloads:
            if isinstance(self.uplink, ModelCompressor):
                update = torch.stack([self.uplink.decode(p, st.w) for p in payloads]).mean(0)
            else:
                update = fedcomp.aggregate(payloads)
            if cfg.server_lr != 1.0:
                update.mul_(cfg.server_lr)
            if self.downlink is not None:
                broadcast = fedcomp.Payload.from_bytes(
                    self.downlink.compress(update, "server", st.w).to_bytes(), device=self.device
                )
                update = self.downlink.decode(broadcast, st.w)
                downlink_cos = self.downlink.last_cos
                down += len(plan.clients) * broadcast.nbytes
            st.w.add_(update)
            st.u_prev = update
        else:
            self.log(f"round {t + 1}: no client's update arrived intact; the global model is kept")
        self.timings["aggregate"] += time.perf_counter() - tic
        tic = time.perf_counter()
        if payloads:  # DPPF: pull each worker toward the new mean, push to keep the spread
            for c, model_c in result.finished.items():
                st.workers[c] = alg.pull_push(model_c, st.w, cfg.dppf_alpha, cfg.dppf_lambda)
        self.timings["algorithm"] += time.perf_counter() - tic
        if payloads:
            st.trajectory.append(st.w.clone())
            del st.trajectory[: -cfg.syn_window]
            if self._round_eps is not None:
                st.perturbations.append(self._round_eps)
                del st.perturbations[: -(cfg.syn_window - 1)]
        st.round = t + 1
        if cfg.algorithm == "fedsynsam":
            self._maybe_refresh()
        tic = time.perf_counter()
        record = {"round": t + 1}
        if self._evaluated(t):
            record["test_acc"], record["test_loss"] = self.evaluate()
        else:
            record["test_acc"] = record["test_loss"] = None
        self.timings["eval"] += time.perf_counter() - tic
        cosines = self._estimate.pop(t, None)
        probe_seconds, self._diagnose_seconds = self._diagnose_seconds, 0.0
        self.timings["diagnose"] += probe_seconds
        record.update(
            train_loss=sum(result.losses) / len(result.losses) if result.losses else None,
            uplink_bytes=sum(p.nbytes for p in payloads),
            downlink_bytes=down,
            seconds=time.perf_counter() - start - probe_seconds,
            perturbation=plan.source,
        )
        if cosines is not None:
            record["estimate"] = cosines
        if result.encode_cos:  # 3SFC / FedSynth: how much of the clients' updates the payloads carried
            record["encode_cos"] = sum(result.encode_cos) / len(result.encode_cos)
        if downlink_cos is not None:
            record["downlink_encode_cos"] = downlink_cos
        if result.failed:
            record["failed_clients"] = result.failed
        if result.state_lost:
            record["client_state_lost"] = result.state_lost
        if cfg.algorithm == "dppf" and st.workers:
            record["worker_spread"] = sum(float((m - st.w).norm()) for m in st.workers.values()) / len(st.workers)
        return record

    def _maybe_refresh(self) -> None:
        cfg, st = self.cfg, self.state
        if len(st.trajectory) < cfg.syn_min_models:
            return
        if st.synthetic is not None and st.round - st.last_refresh < cfg.syn_period:
            return
        tic = time.perf_counter()
        st.synthetic, losses = self._distill(st.synthetic)
        st.last_refresh = st.round
        st.distill_losses.append((st.round, losses[0], losses[-1]))
        self.timings["distill"] += time.perf_counter() - tic
        if self.probe is not None and self.probe.oracle_enabled:  # the same construction, given grad F
            tic = time.perf_counter()
            starts = st.trajectory[: len(st.trajectory) - cfg.syn_span]
            self.probe.oracle, _ = self._distill(self.probe.oracle, self.probe.oracle_targets(starts))
            self._diagnose_seconds += time.perf_counter() - tic

    def _round_epsilon(self, plan: RoundPlan) -> torch.Tensor:
        """The eps (flat, norm rho; zeros where there was none) that ``plan``'s clients started from:
        ``-rho u/||u||`` before the first set, ``rho g_syn(w^t)/||g_syn||`` after it."""
        direction = plan.direction
        if plan.source == "previous-update" and plan.u_prev is not None:
            direction = -plan.u_prev
        elif plan.source == "synthetic":
            direction = self.synthetic_direction(plan.synthetic, plan.w)
        if direction is None:
            return torch.zeros_like(plan.w)
        norm = float(direction.norm())
        if norm == 0.0 or not math.isfinite(norm):
            return torch.zeros_like(plan.w)
        return direction * (self.cfg.rho / norm)

    def _distill(self, init: SyntheticSet | None, targets=None) -> tuple[SyntheticSet, list[float]]:
        """A new synthetic set from the trajectory, warm-started from ``init`` (this round's generator)."""
        cfg, st = self.cfg, self.state
        return distill(
            self.model,
            self.spec,
            st.trajectory,
            input_shape=self.data.input_shape,
            num_classes=self.data.num_classes,
            per_class=cfg.syn_per_class,
            unroll=cfg.syn_unroll,
            span=cfg.syn_span,
            iters=cfg.syn_iters if init is None else cfg.syn_refresh_iters,
            lr_images=cfg.syn_lr_images,
            lr_labels=cfg.syn_lr_labels,
            lr_step=cfg.syn_lr_step,
            init_step=cfg.lr,
            generator=_generator(cfg.seed, st.round, 2),
            version=(init.version + 1) if init is not None else 1,
            init=init,
            objective="gradient" if targets is not None else cfg.syn_objective,
            points=cfg.syn_points,
            targets=targets,
            perturbations=st.perturbations if targets is None and cfg.syn_objective == "sam-gradient" else None,
        )

    # -- checkpoints -----------------------------------------------------------
    def checkpoint(self) -> dict:
        st = self.state
        return {
            "round": st.round,
            "w": st.w,
            "u_prev": st.u_prev,
            "trajectory": st.trajectory,
            "perturbations": st.perturbations,
            "synthetic": None if st.synthetic is None else st.synthetic.state_dict(),
            "last_refresh": st.last_refresh,
            "client_syn_version": st.client_syn_version,
            "uplink": self.uplink.state_dict(),
            "downlink": None if self.downlink is None else self.downlink.state_dict(),
            "workers": st.workers,
            "distill_losses": st.distill_losses,
            "config": self.cfg.to_dict(),
            "oracle": None if self.probe is None or self.probe.oracle is None else self.probe.oracle.state_dict(),
            "extra": self.extra_state,
        }

    def load_checkpoint(self, ckpt: dict) -> None:
        """Continue from :meth:`checkpoint`'s dict (its tensors may be on any device: they are moved)."""
        ckpt = checkpoints.to_device(ckpt, self.device)
        checkpoints.check_same_config(ckpt["config"], self.cfg.to_dict(), NOT_IDENTITY + self.cfg.unused())
        st = self.state
        st.round, st.w, st.u_prev = ckpt["round"], ckpt["w"].clone(), ckpt["u_prev"]
        st.trajectory = [t.clone() for t in ckpt["trajectory"]]
        st.perturbations = [t.clone() for t in ckpt.get("perturbations", [])]
        st.synthetic = None if ckpt["synthetic"] is None else SyntheticSet.from_state_dict(ckpt["synthetic"])
        st.last_refresh = ckpt["last_refresh"]
        st.client_syn_version = dict(ckpt["client_syn_version"])
        st.distill_losses = list(ckpt["distill_losses"])
        self.uplink.load_state_dict(ckpt["uplink"])
        if self.downlink is not None:
            self.downlink.load_state_dict(ckpt["downlink"])
        st.workers = {int(k): v.clone() for k, v in ckpt["workers"].items()}
        if self.probe is not None and ckpt.get("oracle") is not None:
            self.probe.oracle = SyntheticSet.from_state_dict(ckpt["oracle"])
        self.extra_state.clear()
        self.extra_state.update(ckpt.get("extra", {}))

    def _save_checkpoint(self) -> None:
        checkpoints.save(self.checkpoint(), self.out / checkpoints.CHECKPOINT)

    # -- the run ---------------------------------------------------------------
    def run(
        self, *, resume: bool = False, progress: bool = True, stop_after: int | None = None, clients=None
    ) -> list[dict]:
        """Run to ``cfg.rounds`` (or stop after round ``stop_after``); returns every round's record.

        ``clients`` runs each round's sampled clients (:meth:`run_round`); the default runs them here.

        Writes into the output folder: ``config.json``, ``partition.json``, ``metrics.jsonl``,
        ``checkpoint.pt``, ``summary.json`` and the plots.
        """
        from tqdm.auto import tqdm

        records: list[dict] = []
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            metrics = self.out / "metrics.jsonl"
            if resume:
                state, used = checkpoints.load_latest(self.out, map_location=self.device, log=self.log)
                if used.name != checkpoints.CHECKPOINT and (self.out / checkpoints.CHECKPOINT).is_file():
                    # keep the damaged file for inspection, out of the way of the next rotation
                    os.replace(self.out / checkpoints.CHECKPOINT, self.out / (checkpoints.CHECKPOINT + ".bad"))
                try:
                    self.load_checkpoint(state)
                except (KeyError, TypeError, AttributeError, IndexError, RuntimeError) as e:
                    raise checkpoints.CheckpointError(
                        f"{used}: not a checkpoint of this trainer ({type(e).__name__}: {e})"
                    ) from None
                if metrics.is_file():
                    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
                records = [r for r in records if r["round"] <= self.state.round]
            elif metrics.exists() or (self.out / checkpoints.CHECKPOINT).exists():
                raise FileExistsError(
                    f"{self.out} already holds a run; pass --resume to continue it or pick another --out"
                )
            (self.out / "config.json").write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            (self.out / "partition.json").write_text(json.dumps({"clients": self.partition}) + "\n")
            metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        last = self.cfg.rounds if stop_after is None else min(stop_after, self.cfg.rounds)
        bar = tqdm(
            total=self.cfg.rounds,
            initial=self.state.round,
            disable=not progress,
            desc=f"{self.cfg.algorithm}/{self.cfg.compressor}",
            unit="round",
            leave=False,
        )
        while self.state.round < last:
            rec = self.run_round(clients)
            records.append(rec)
            if self.out is not None:
                with (self.out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                if self.state.round % self.cfg.checkpoint_every == 0 or self.state.round == last:
                    self._save_checkpoint()
            bar.update(1)
            if rec["test_acc"] is not None:
                bar.set_postfix(
                    acc=f"{rec['test_acc']:.3f}", up=f"{sum(r['uplink_bytes'] for r in records) / 1e6:.1f}MB"
                )
        bar.close()
        if self.out is not None and self.state.round >= self.cfg.rounds:
            self._finish(records)
        return records

    def _finish(self, records: list[dict]) -> None:
        from .plots import plot_estimate, plot_runs

        evaluated = [r for r in records if r["test_acc"] is not None]
        tail = evaluated[-5:]
        summary = {
            "final_test_acc": evaluated[-1]["test_acc"],
            "final_test_loss": evaluated[-1]["test_loss"],
            "mean_test_acc_last5": sum(r["test_acc"] for r in tail) / len(tail),
            "mean_test_acc": sum(r["test_acc"] for r in evaluated) / len(evaluated),  # over the evaluated rounds
            "best_test_acc": max(r["test_acc"] for r in evaluated),
            "total_uplink_bytes": sum(r["uplink_bytes"] for r in records),
            "total_downlink_bytes": sum(r["downlink_bytes"] for r in records),
            "rounds": self.state.round,
            "parameters": self.numel,
            "seconds": sum(r["seconds"] for r in records),
            "distillations": [list(x) for x in self.state.distill_losses],
            "config": self.cfg.to_dict(),
        }
        encode = [r["encode_cos"] for r in records if r.get("encode_cos") is not None]
        if encode:  # 3SFC / FedSynth: the payloads' mean cosine with what they encode, over rounds
            summary["encode_cos_mean"] = sum(encode) / len(encode)
        summary["timings"] = dict(self.timings)  # seconds per part of the rounds run by this process
        if self.probe is not None:
            summary["estimate"] = summarize(records)
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save({"w": self.state.w, "spec_names": self.spec.names}, self.out / "final_model.pt")
        plot_runs({f"{self.cfg.algorithm}/{self.cfg.compressor}": records}, self.out)
        if self.probe is not None:  # every estimate of the run, against the round
            plot_estimate({"": records}, self.out / "estimate_cosine.png", keys=ESTIMATES[1:])
