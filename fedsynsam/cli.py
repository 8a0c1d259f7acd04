"""``fedsynsam`` command line: ``train`` one run, ``compare`` a grid of runs, ``sharpness``, ``flower``,
``dp`` (data-parallel training on torch.distributed).

Settings come from, in increasing priority: the defaults of :class:`~fedsynsam.config.Config`,
``--config FILE.toml``, and explicit flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import Config, load_toml
from .flower.deploy import FlowerRunError

__all__ = ["main"]

_FLAG_HELP = {
    "algorithm": "fedavg | fedsam | mofedsam | fedlesam | fedsynsam | dppf",
    "compressor": "none | topk | randk | sign | qsgd | powersgd | 3sfc | fedsynth (client uploads)",
    "powersgd_rank": "PowerSGD: rank of each weight matrix's factors",
    "ratio": "fraction of entries kept by topk / randk, in (0, 1]",
    "syn_objective": "FedSynSAM: gradient (match the trajectory's displacements) | sam-gradient (matched at "
    "w + eps) | trajectory (the first method)",
    "syn_points": "FedSynSAM gradient matching: trajectory points per Adam iteration",
    "syn_iters": "FedSynSAM: Adam iterations of the first set (unset: 100 gradient, 60 trajectory)",
    "syn_refresh_iters": "FedSynSAM: Adam iterations of a refresh (unset: 20 gradient, 8 trajectory)",
    "diagnose": "estimate | estimate,oracle: record each round's cos(estimate, grad F) (simulation only)",
    "error_feedback": "keep an error-feedback residual per client (true/false; unset: on for every "
    "compressor but qsgd)",
    "rounds": "communication rounds T",
    "clients": "number of clients N",
    "per_round": "clients sampled per round M",
    "alpha": "Dirichlet concentration of the label partition (small: non-IID)",
    "dataset": "digits | mnist5k (embedded) | mnist | fashion-mnist | cifar10 (from --data-dir)",
    "model": "mlp | cnn | resnet",
    "seed": "seed of everything random in the run",
    "local_steps": "local SGD steps K per round",
    "lr": "local learning rate",
    "server_lr": "server learning rate",
    "rho": "SAM radius",
    "perturbation": "FedSynSAM: client (send D_syn) | server (send eps)",
    "sfc_samples": "3SFC: synthetic samples per upload",
    "sfc_encoder": "3SFC: lbfgs | adam (how the samples are fitted to the update)",
    "sfc_labels": "3SFC: raw (label targets as they are) | softmax",
    "sfc_iters": "3SFC: objective evaluations (lbfgs) or steps (adam) per encode (unset: 30)",
    "sfc_lr": "3SFC: the encoder's (first) step size (unset: 1.0 lbfgs, 0.1 adam)",
    "fedsynth_encoder": "FedSynth: lbfgs | adam",
    "fedsynth_labels": "FedSynth: raw | softmax",
    "sfc_double_way": "3SFC: the server also compresses its broadcast (true/false)",
    "fedsynth_batches": "FedSynth: replayed synthetic batches",
    "dppf_alpha": "DPPF pull strength in (0, 1]",
    "dppf_lambda": "DPPF push; workers settle about lambda/alpha from the mean",
    "device": "auto | cpu | cuda | cuda:N: where the model, updates, EF residuals and aggregation live",
}


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false; got {text!r}")


# shorter flags some settings also answer to
FLAG_ALIASES = {"powersgd_rank": ("--rank",)}


def _add_config_flags(p: argparse.ArgumentParser, skip=(), cls=Config, help_text=None) -> None:
    help_text = _FLAG_HELP if help_text is None else help_text
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        kinds = {
            "int": int,
            "int | None": int,
            "float": float,
            "float | None": float,
            "bool": _bool,
            "bool | None": _bool,
        }
        kind = {**kinds, "str": str, "str | None": str}[f.type]
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            *FLAG_ALIASES.get(f.name, ()),
            dest=f.name,
            type=kind,
            default=None,
            metavar=f.name.upper(),
            help=f"{help_text.get(f.name, f.name.replace('_', ' '))} (default: {f.default})",
        )


def _resolve(args: argparse.Namespace, skip=(), cls=Config) -> dict:
    values = load_toml(args.config) if args.config else {}
    for f in dataclasses.fields(cls):
        if f.name not in skip and getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return values


def _train(args) -> int:
    from .trainer import Trainer

    out = Path(args.out)
    values = {}
    if args.resume and not args.config and (out / "config.json").is_file():
        values = json.loads((out / "config.json").read_text())  # resume: the saved settings, flags on top
    values.update(_resolve(args))
    cfg = Config.from_dict(values, source=args.config or "flags").validate()
    records = Trainer(cfg, out).run(resume=args.resume, progress=not args.quiet)
    last = [r for r in records if r["test_acc"] is not None][-1]
    up = sum(r["uplink_bytes"] for r in records)
    print(
        f"{cfg.algorithm}/{cfg.compressor}: round {last['round']}, test accuracy {last['test_acc']:.4f}, "
        f"test loss {last['test_loss']:.4f}, uplink {up / 1e6:.2f} MB -> {out}"
    )
    return 0


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _seed_list(text: str) -> list[int]:
    try:
        return [int(s) for s in _csv_list(text)]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers; got {text!r}") from None


def _compare(args) -> int:
    from .compare import run_grid

    base = _resolve(args, skip=("algorithm", "compressor", "seed"))
    grid = {}
    if args.config:
        grid = {k: base.pop(k) for k in ("algorithms", "compressors", "seeds") if k in base}
    algorithms = (
        _csv_list(args.algorithms) if args.algorithms else grid.get("algorithms", ["fedavg", "fedlesam", "fedsynsam"])
    )
    compressors = _csv_list(args.compressors) if args.compressors else grid.get("compressors", ["none", "topk"])
    seeds = _seed_list(args.seeds) if args.seeds else grid.get("seeds", [0])
    run_grid(base, algorithms, compressors, seeds, Path(args.out), progress=not args.quiet, sharpness=args.sharpness)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedsynsam", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="run one federated training run")
    train.add_argument("--config", help="TOML file of settings (flags override it)")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_config_flags(train)
    train.set_defaults(func=_train)

    compare = sub.add_parser("compare", help="run a grid of algorithms x compressors x seeds and tabulate it")
    compare.add_argument("--config", help="TOML file: settings plus optional algorithms/compressors/seeds lists")
    compare.add_argument("--out", required=True, help="output folder (finished runs in it are skipped)")
    compare.add_argument("--algorithms", help="comma-separated, e.g. fedavg,fedlesam,fedsynsam")
    compare.add_argument("--compressors", help="comma-separated, e.g. none,topk,sign")
    compare.add_argument("--seeds", help="comma-separated integers, e.g. 0,1,2")
    compare.add_argument("--sharpness", action="store_true", help="also measure λ_max, Hessian trace, valley width")
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_flags(compare, skip=("algorithm", "compressor", "seed"))
    compare.set_defaults(func=_compare)

    sharp = sub.add_parser("sharpness", help="measure λ_max, Hessian trace, valley width and landscapes of runs")
    sharp.add_argument("runs", nargs="+", metavar="RUN_DIR", help="finished run folders (written by train)")
    sharp.add_argument("--samples", type=int, default=1024, help="training points in the evaluation subset")
    sharp.add_argument("--max-iters", type=int, default=100, help="power-iteration cap")
    sharp.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of the power iteration")
    sharp.add_argument("--trace-samples", type=int, default=50, help="Rademacher vectors for the trace")
    sharp.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    sharp.set_defaults(func=_sharpness)

    from .flower.cli import add_parser as add_flower

    add_flower(sub, _add_config_flags, _resolve, _csv_list, _seed_list)

    from .dp.cli import add_parser as add_dp

    add_dp(sub, _add_config_flags, _resolve)
    return parser


def _sharpness(args) -> int:
    from .sharpness import measure_run

    for name, value, lo in (
        ("samples", args.samples, 1),
        ("max-iters", args.max_iters, 1),
        ("trace-samples", args.trace_samples, 1),
    ):
        if value < lo:
            raise ValueError(f"--{name} must be >= {lo}; got {value}")
    if not 0 < args.tol < 1:
        raise ValueError(f"--tol must be in (0, 1); got {args.tol}")
    for run in args.runs:
        r = measure_run(
            run,
            samples=args.samples,
            max_iters=args.max_iters,
            tol=args.tol,
            trace_samples=args.trace_samples,
            device=args.device,
        )
        conv = "" if r["lambda_max_converged"] else " (not converged)"
        print(
            f"{run}: λ_max {r['lambda_max']:.4g}{conv} after {r['lambda_max_iterations']} iterations, "
            f"trace {r['hessian_trace']:.4g} ± {r['hessian_trace_stderr']:.2g}, "
            f"valley width {r['valley_width']:.3f} ± {r['valley_width_std']:.3f}"
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # bad settings, files, folders: one line, exit 2
        print(f"fedsynsam {args.command}: error: {e}", file=sys.stderr)
        return 2
    except FlowerRunError as e:  # a Flower process or run failed: what it said, exit 1
        print(f"fedsynsam {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
