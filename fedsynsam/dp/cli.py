"""``fedsynsam dp``: one command for a data-parallel run.

Without torchrun's environment it validates the settings and starts ``--nproc`` local workers
through ``torch.distributed.run --standalone`` (a free port on this machine); under torchrun
(``RANK`` and ``WORLD_SIZE`` set, e.g. ``torchrun --nnodes 2 --nproc-per-node 4
--rdzv-endpoint HOST:PORT -m fedsynsam dp ...`` on every node) it is one worker.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from .config import DPConfig

__all__ = ["add_parser"]

DP_HELP = {
    "method": "ddp (gradients averaged every step) | localsgd (models averaged every tau steps) | dppf "
    "(pull toward the average and push away from it every tau steps)",
    "compressor": "none | topk | sign | qsgd | powersgd: what a synchronisation sends (ddp: through fedcomp's "
    "DDP hook)",
    "powersgd_rank": "PowerSGD: rank of each weight matrix's factors",
    "ratio": "fraction of entries kept by topk, in (0, 1]",
    "error_feedback": "localsgd / ddp: keep an error-feedback residual per worker (true/false; unset: on but "
    "for qsgd); dppf carries what a payload left out in its published position either way",
    "sign_majority": "sign: average by majority vote (true/false)",
    "partition": "iid (equal random shards) | dirichlet (label skew of concentration --alpha)",
    "steps": "SGD steps of every worker (a multiple of --sync-every)",
    "sync_every": "tau: local steps between synchronisations (ddp: between records)",
    "batch_size": "minibatch per worker and step",
    "dppf_alpha": "DPPF pull strength in (0, 1]",
    "dppf_lambda": "DPPF push; the workers settle about lambda/alpha from the average",
    "measure": "at the end, measure lambda_max, Hessian trace, valley width and IMV of the average (true/false)",
    "measure_samples": "training samples (a fixed subset) those measures use",
    "eval_every": "synchronisations between test evaluations",
    "checkpoint_every": "synchronisations between checkpoints",
    "timeout": "seconds a collective waits for a peer before the run stops with an error",
    "device": "auto | cpu | cuda (each rank on cuda:LOCAL_RANK, NCCL); CPU uses gloo",
    "dataset": "digits | mnist5k (embedded) | mnist | fashion-mnist | cifar10 (from --data-dir)",
    "model": "mlp | cnn | resnet",
}


def _under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _settings(args, resolve) -> DPConfig:
    out = Path(args.out)
    values = {}
    if args.resume and not args.config and (out / "config.json").is_file():
        values = json.loads((out / "config.json").read_text())  # resume: the saved settings, flags on top
    values.update(resolve(args, cls=DPConfig))
    return DPConfig.from_dict(values, source=args.config or "flags").validate()


def _worker_argv(args) -> list[str]:
    """The flags that reproduce ``args`` in each worker (everything but ``--nproc``)."""
    argv = ["--out", args.out]
    for flag in ("config",):
        if getattr(args, flag):
            argv += [f"--{flag}", getattr(args, flag)]
    for flag in ("resume", "quiet"):
        if getattr(args, flag):
            argv.append(f"--{flag}")
    if args.stop_after is not None:
        argv += ["--stop-after", str(args.stop_after)]
    for f in dataclasses.fields(DPConfig):
        value = getattr(args, f.name, None)
        if value is not None:
            argv += ["--" + f.name.replace("_", "-"), str(value)]
    return argv


def _launch(args, resolve) -> int:
    from ..data import load_dataset
    from .trainer import shards_for

    if args.nproc < 1:
        raise ValueError(f"--nproc must be an integer >= 1; got {args.nproc}")
    cfg = _settings(args, resolve)  # bad settings fail here, before any process starts
    shards_for(cfg, load_dataset(cfg.dataset, cfg.data_dir).y_train, args.nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    cmd += ["-m", "fedsynsam", "dp", *_worker_argv(args)]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        code = 130
    finally:
        if proc.poll() is None:  # interrupted: end torchrun and every worker it started
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if code != 0 and code != 130:
        print(f"fedsynsam dp: error: the workers failed (torchrun exit status {code}; see above)", file=sys.stderr)
    return code


def _worker(args, resolve) -> int:
    import torch.distributed as dist

    from .trainer import DataParallelTrainer, init_process_group

    rank = os.environ.get("RANK", "?")
    try:
        cfg = _settings(args, resolve)
        device = init_process_group(cfg)
        trainer = DataParallelTrainer(cfg, args.out, device=device)
        records = trainer.run(resume=args.resume, progress=not args.quiet, stop_after=args.stop_after)
        if records and trainer.rank == 0:
            evaluated = [r for r in records if r["test_acc"] is not None]
            acc = f"test accuracy {evaluated[-1]['test_acc']:.4f} at step {evaluated[-1]['step']}" if evaluated else ""
            print(
                f"{cfg.method}/{cfg.compressor} on {trainer.world} workers: step {records[-1]['step']}, "
                f"{acc or 'not evaluated yet'}, spread {records[-1]['spread']:.4g}, "
                f"{sum(r['sent_bytes'] for r in records) / 1e6:.2f} MB sent per worker -> {args.out}"
            )
        dist.barrier()  # every rank past its last collective before any closes its connections
        return 0
    except (ValueError, OSError) as e:
        print(f"fedsynsam dp: rank {rank}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # gloo / NCCL: a peer died or the timeout passed
        first = (str(e).strip().splitlines() or [""])[0]
        print(
            f"fedsynsam dp: rank {rank}: error: a collective failed, so another worker stopped or is unreachable "
            f"({type(e).__name__}: {first[:300]})",
            file=sys.stderr,
        )
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def add_parser(sub, add_config_flags, resolve) -> None:
    p = sub.add_parser(
        "dp",
        help="data-parallel training on torch.distributed: ddp, local SGD or DPPF (with fedcomp compression)",
        description="Data-parallel training on torch.distributed: ddp, local SGD or DPPF, one process per "
        "worker. Without torchrun's environment, starts --nproc local workers itself.",
    )
    p.add_argument("--config", help="TOML file of settings (flags override it)")
    p.add_argument("--out", required=True, help="output folder (rank 0 writes it)")
    p.add_argument("--nproc", type=int, default=1, help="workers to start on this machine (ignored under torchrun)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--stop-after", type=int, help="stop after this step (a multiple of --sync-every); resumable")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_config_flags(p, cls=DPConfig, help_text=DP_HELP)
    p.set_defaults(func=lambda args: _worker(args, resolve) if _under_torchrun() else _launch(args, resolve))
