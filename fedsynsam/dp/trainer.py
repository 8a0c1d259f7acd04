"""One data-parallel run: this process is one rank (one worker) of a torch.distributed group.

Every worker starts from the same model (seeded), samples its own minibatches from its own shard
(an epoch's order drawn from ``(seed, rank, epoch)``, so no sampler state needs saving), and takes
plain SGD steps. Every ``sync_every`` steps comes a record: the methods' synchronisation
(``localsgd`` / ``dppf``; ``ddp`` averages gradients every step through DDP), then statistics
reduced over the workers, and on rank 0 the test accuracy of the average and the files.

Rank 0 writes what ``fedsynsam train`` writes: ``config.json``, ``shards.json``, ``metrics.jsonl``
(a record per synchronisation: ``sync``, ``step``, ``test_acc``, ``test_loss``, ``train_loss``,
``sent_bytes`` (mean over workers), ``spread`` (mean ``||x_i - xbar||`` before the synchronisation
moves the workers), ``seconds``), ``checkpoint.pt`` (every worker's state, gathered),
``summary.json`` (with the final measures) and plots. Resuming at the same world size continues
bit for bit.
"""

from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from fedcomp.ddp import CompressionState, compression_hook

from .. import checkpoint as checkpoints
from ..algorithms import pull_push
from ..config import resolve_device
from ..data import Dataset, dirichlet_partition, load_dataset
from ..models import build_model
from ..rounds import base_compressor, generator, initial_model, load_flat
from ..sharpness import Objective, evaluation_subset, inverse_mean_valley, sharpness_of
from .config import DP_NOT_IDENTITY, DPConfig
from .sync import Synchronizer

__all__ = ["DataParallelTrainer", "init_process_group", "shards_for", "RECORD_KEYS"]

RECORD_KEYS = ("sync", "step", "test_acc", "test_loss", "train_loss", "sent_bytes", "spread", "seconds")


def init_process_group(cfg: DPConfig) -> torch.device:
    """Join the group torchrun describes (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``):
    NCCL when ``cfg.device`` resolves to CUDA (each rank on ``cuda:LOCAL_RANK``), else gloo.
    Returns the rank's device."""
    device = resolve_device(cfg.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=cfg.timeout))
    return device


def shards_for(cfg: DPConfig, labels: torch.Tensor, world: int) -> list[list[int]]:
    """The training-sample indices of each of ``world`` workers: equal random shards (``iid``) or a
    Dirichlet(``alpha``) label skew. Raises ValueError when the workers outnumber what can be dealt."""
    n = len(labels)
    if world > n:
        raise ValueError(f"world size {world}: more workers than the {n} training samples of {cfg.dataset}")
    if cfg.partition == "iid":
        order = torch.randperm(n, generator=generator(cfg.seed, 0)).tolist()
        shards = [sorted(order[r::world]) for r in range(world)]
    else:
        shards = dirichlet_partition(labels, world, cfg.alpha, cfg.seed)
    smallest = min(len(s) for s in shards)
    if smallest < cfg.batch_size:
        raise ValueError(
            f"batch_size must be <= the smallest shard's {smallest} samples ({world} workers share "
            f"{n} samples of {cfg.dataset}); got {cfg.batch_size}"
        )
    return shards


def _cpu(obj):
    return checkpoints.to_device(obj, torch.device("cpu"))


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


class DataParallelTrainer:
    """This rank's worker. ``DataParallelTrainer(cfg, out).run()`` after :func:`init_process_group`."""

    def __init__(self, cfg: DPConfig, out_dir: str | Path, *, device: torch.device, dataset: Dataset | None = None):
        self.cfg = cfg.validate()
        self.out = Path(out_dir)
        self.device = device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.comm_device = device  # gloo: CPU tensors; NCCL: the rank's GPU
        data = dataset if dataset is not None else load_dataset(cfg.dataset, cfg.data_dir)
        self.shards = shards_for(cfg, data.y_train, self.world)
        self.shard_index = [torch.tensor(s, dtype=torch.long) for s in self.shards]
        self.data = data.to(device)
        self.model, x0, self.spec = initial_model(cfg, data, device)  # the same start on every rank
        self.numel = self.spec.numel
        self._eval_model = build_model(cfg.model, data.input_shape, data.num_classes).to(device)
        self.hook_state = None
        self.sync = None
        if cfg.method == "ddp":
            ids = [device.index] if device.type == "cuda" else None
            self.net = DistributedDataParallel(self.model, device_ids=ids)
            if cfg.compressor != "none":
                # iteration 0 all-reduces (DDP rebuilds its buckets after it); every later one compresses
                self.hook_state = CompressionState(
                    base_compressor(cfg, seed=cfg.seed * 1009 + self.rank),
                    error_feedback=cfg.error_feedback,
                    start_iter=1,
                    min_compression_rate=0.0,
                )
                self.net.register_comm_hook(self.hook_state, compression_hook)
        else:
            self.net = self.model
            self.sync = Synchronizer(cfg, x0, self.comm_device, spec=self.spec)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.step = 0
        self.last_workers: list[torch.Tensor] | None = None  # rank 0: the workers before the last sync
        self._xbar: torch.Tensor | None = None  # the last synchronisation's average
        self._x_before: torch.Tensor | None = None  # this worker before the last synchronisation moved it

    # -- training ----------------------------------------------------------------
    def batch_indices(self, step: int, rank: int | None = None) -> torch.Tensor:
        """The training-sample indices of worker ``rank``'s (default: this one's) minibatch at ``step``:
        each epoch of its shard in an order drawn from ``(seed, rank, epoch)``, the last partial batch dropped."""
        rank = self.rank if rank is None else rank
        shard = self.shard_index[rank]
        epoch, j = divmod(step, len(shard) // self.cfg.batch_size)
        perm = torch.randperm(len(shard), generator=generator(self.cfg.seed, 1, rank, epoch))
        chosen = perm[j * self.cfg.batch_size : (j + 1) * self.cfg.batch_size]
        return shard[chosen].to(self.device)

    def _sgd_step(self) -> torch.Tensor:
        idx = self.batch_indices(self.step)
        x, y = self.data.x_train[idx], self.data.y_train[idx]
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()
        self.step += 1
        return loss.detach()

    def _synchronise(self) -> tuple[torch.Tensor, int, float]:
        """``(xbar, bytes sent, ||x - xbar||)``; moves this worker as its method says."""
        x = _flat(self.model)
        if self.sync is None:  # ddp: the workers never left each other
            return x, 0, 0.0
        xbar, sent = self.sync.average(x)
        spread = float((x - xbar).norm())
        if self.cfg.method == "localsgd":
            load_flat(self.model, xbar, self.spec)
        else:
            load_flat(self.model, pull_push(x, xbar, self.cfg.dppf_alpha, self.cfg.dppf_lambda), self.spec)
        return xbar, sent, spread

    @torch.no_grad()
    def evaluate(self, flat: torch.Tensor, split: str = "test") -> tuple[float, float]:
        """(accuracy, mean cross-entropy) of the flat model on the test or training set."""
        model = self._eval_model
        load_flat(model, flat, self.spec)
        x, y = (self.data.x_test, self.data.y_test) if split == "test" else (self.data.x_train, self.data.y_train)
        correct, total = 0, 0.0
        for i in range(0, len(y), 1024):
            logits = model(x[i : i + 1024])
            total += float(F.cross_entropy(logits, y[i : i + 1024], reduction="sum"))
            correct += int((logits.argmax(1) == y[i : i + 1024]).sum())
        return correct / len(y), total / len(y)

    # -- checkpoints -------------------------------------------------------------------
    def worker_state(self) -> dict:
        """This worker's part of a checkpoint (CPU tensors)."""
        state = {"x": _flat(self.model).cpu()}
        if self._xbar is not None:  # what the final measures need, so that a run stopped during them finishes
            state.update(xbar=self._xbar.cpu(), x_before=self._x_before.cpu())
        if self.sync is not None:
            state["sync"] = _cpu(self.sync.state_dict())
        if self.hook_state is not None:
            hs = self.hook_state
            state["hook"] = {
                "compressor": _cpu(hs.compressor.state_dict()),
                **{
                    k: getattr(hs, k)
                    for k in ("iter", "bytes_sent", "bytes_dense", "compressed_buckets", "allreduced_buckets")
                },
            }
        return state

    def load_worker_state(self, state: dict) -> None:
        state = checkpoints.to_device(state, self.device)
        load_flat(self.model, state["x"], self.spec)
        if "xbar" in state:
            self._xbar, self._x_before = state["xbar"], state["x_before"]
        if self.sync is not None:
            self.sync.load_state_dict(state["sync"])
        if self.hook_state is not None:
            hook = dict(state["hook"])
            self.hook_state.compressor.load_state_dict(hook.pop("compressor"))
            for k, v in hook.items():
                setattr(self.hook_state, k, v)

    def _save_checkpoint(self, syncs: int) -> None:
        states = [None] * self.world if self.rank == 0 else None
        dist.gather_object(self.worker_state(), states, dst=0)
        if self.rank == 0:
            checkpoints.save(
                {
                    "step": self.step,
                    "sync": syncs,
                    "world": self.world,
                    "config": self.cfg.to_dict(),
                    "workers": states,
                },
                self.out / checkpoints.CHECKPOINT,
            )

    def _resume(self) -> list[dict]:
        """Rank 0 reads the checkpoint and hands each rank its state; returns the records kept."""
        box = [None]
        if self.rank == 0:
            try:
                state, used = checkpoints.load_latest(
                    self.out, log=lambda line: print(f"fedsynsam dp: {line}", file=sys.stderr)
                )
                checkpoints.check_same_config(state["config"], self.cfg.to_dict(), DP_NOT_IDENTITY)
                if state["world"] != self.world:
                    raise ValueError(
                        f"the checkpoint in {self.out} was written by {state['world']} workers; this run has "
                        f"{self.world} (resume at the same world size)"
                    )
                box = [{"ok": state}]
            except (OSError, ValueError) as e:
                box = [{"error": f"{type(e).__name__}: {e}"}]
        dist.broadcast_object_list(box, src=0)
        if "error" in box[0]:
            raise ValueError(box[0]["error"].split(": ", 1)[1])
        state = box[0]["ok"]
        self.step = int(state["step"])
        self.load_worker_state(state["workers"][self.rank])
        if self._xbar is not None and self.step >= self.cfg.steps:  # stopped before or during the measures
            self.last_workers = [w["x_before"].to(self.device) for w in state["workers"]]
        records = []
        metrics = self.out / "metrics.jsonl"
        if self.rank == 0 and metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            records = [r for r in records if r["step"] <= self.step]
        return records

    # -- the run -----------------------------------------------------------------
    def run(self, *, resume: bool = False, progress: bool = True, stop_after: int | None = None) -> list[dict]:
        """Train to ``cfg.steps`` (or stop after step ``stop_after``, a multiple of ``sync_every``);
        returns the records (on rank 0; other ranks get an empty list)."""
        from tqdm.auto import tqdm

        cfg = self.cfg
        records: list[dict] = []
        metrics = self.out / "metrics.jsonl"
        if resume:
            records = self._resume()
        elif self.rank == 0 and (metrics.exists() or (self.out / checkpoints.CHECKPOINT).exists()):
            raise FileExistsError(f"{self.out} already holds a run; pass --resume to continue it or pick another --out")
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
            (self.out / "shards.json").write_text(json.dumps({"workers": self.shards}) + "\n")
            metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
        last = cfg.steps if stop_after is None else min(stop_after, cfg.steps)
        bar = tqdm(
            total=cfg.steps,
            initial=self.step,
            disable=not progress or self.rank != 0,
            desc=f"{cfg.method}/{cfg.compressor}",
            unit="step",
            leave=False,
        )
        while self.step < last:
            rec = self._interval()
            if self.rank == 0:
                records.append(rec)
                with metrics.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
                bar.update(cfg.sync_every)
                if rec["test_acc"] is not None:
                    bar.set_postfix(acc=f"{rec['test_acc']:.3f}", spread=f"{rec['spread']:.3g}")
            if rec["sync"] % cfg.checkpoint_every == 0 or self.step == last:
                self._save_checkpoint(rec["sync"])
        bar.close()
        if self.step >= cfg.steps and self.last_workers is not None:
            self._finish(records)
        return records

    def _interval(self) -> dict:
        """``sync_every`` SGD steps and a synchronisation; the record (complete on rank 0)."""
        cfg = self.cfg
        tic = time.perf_counter()
        hook_before = self.hook_state.bytes_sent if self.hook_state is not None else 0
        loss = torch.zeros((), device=self.device)
        for _ in range(cfg.sync_every):
            loss += self._sgd_step()
        x_before = self._x_before = _flat(self.model)
        xbar, sent, spread = self._synchronise()
        if cfg.method == "ddp":  # what DDP sent: the hook counts it, plain DDP all-reduces fp32 gradients
            sent = (
                self.hook_state.bytes_sent - hook_before
                if self.hook_state is not None
                else 4 * self.numel * cfg.sync_every
            )
        stats = torch.tensor(
            [float(loss) / cfg.sync_every, float(sent), spread], dtype=torch.float64, device=self.comm_device
        )
        dist.all_reduce(stats)
        stats = (stats / self.world).tolist()
        sync = self.step // cfg.sync_every
        if self.step >= cfg.steps:  # the final measures need every worker's position before the last sync
            gathered = [torch.empty_like(x_before) for _ in range(self.world)]
            dist.all_gather(gathered, x_before)
            self.last_workers = gathered
        rec = {"sync": sync, "step": self.step, "test_acc": None, "test_loss": None}
        if self.rank == 0 and (sync % cfg.eval_every == 0 or self.step >= cfg.steps):
            rec["test_acc"], rec["test_loss"] = self.evaluate(xbar)
        self._xbar = xbar
        rec.update(train_loss=stats[0], sent_bytes=stats[1], spread=stats[2], seconds=time.perf_counter() - tic)
        return rec

    def _finish(self, records: list[dict]) -> None:
        """Rank 0: the final measures of the average and ``summary.json``, ``final_model.pt``, plots."""
        if self.rank != 0:
            return
        from ..plots import plot_dp

        xbar = self._xbar
        test_acc, test_loss = self.evaluate(xbar, "test")
        train_acc, train_loss = self.evaluate(xbar, "train")
        measures = {}
        if self.cfg.measure:  # on the same fixed training subset as `fedsynsam sharpness --samples`
            threads = torch.get_num_threads()
            if self.device.type == "cpu":  # the other workers have finished: use the cores, then give
                torch.set_num_threads(max(threads, os.cpu_count() or 1))  # them back (the process goes on)
            try:
                order = evaluation_subset(len(self.data.y_train), self.cfg.measure_samples)
                order = order.to(self.device)
                obj = Objective(self._eval_model, self.data.x_train[order], self.data.y_train[order], xbar)
                measures = sharpness_of(obj)
                imv, mean_valley = inverse_mean_valley(obj, self.last_workers)
                measures.update(inverse_mean_valley=imv, mean_valley=mean_valley, sharpness_samples=len(order))
            finally:
                torch.set_num_threads(threads)
        evaluated = [r for r in records if r["test_acc"] is not None]
        summary = {
            "final_test_acc": test_acc,
            "final_test_loss": test_loss,
            "final_train_acc": train_acc,
            "final_train_loss": train_loss,
            "generalization_gap_acc": train_acc - test_acc,
            "generalization_gap_loss": test_loss - train_loss,
            "mean_test_acc_last5": sum(r["test_acc"] for r in evaluated[-5:]) / len(evaluated[-5:]),
            "sent_bytes_per_worker": sum(r["sent_bytes"] for r in records),
            "final_spread": records[-1]["spread"],
            **measures,
            "steps": self.step,
            "workers": self.world,
            "parameters": self.numel,
            "seconds": sum(r["seconds"] for r in records),
            "config": self.cfg.to_dict(),
        }
        (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        torch.save({"w": xbar.cpu(), "spec_names": self.spec.names}, self.out / "final_model.pt")
        plot_dp({f"{self.cfg.method}/{self.cfg.compressor}": records}, self.out)
