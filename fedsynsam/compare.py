"""``fedsynsam compare``: a grid of runs, restartable, summarised in results.md / results.csv and plots."""

from __future__ import annotations

import csv
import json
import statistics
import sys
from pathlib import Path

from .checkpoint import CHECKPOINT, PREVIOUS
from .checkpoint import load as load_plain
from .config import EXECUTION_ONLY, Config
from .data import load_dataset
from .plots import plot_runs

__all__ = ["run_grid", "collect", "format_results"]


def _run_dir(out: Path, algorithm: str, compressor: str, seed: int) -> Path:
    return out / f"{algorithm}-{compressor}-s{seed}"


def _configs(base: dict, algorithms, compressors, seeds) -> list[Config]:
    cfgs = []
    for a in algorithms:
        for c in compressors:
            for s in seeds:
                cfgs.append(Config.from_dict({**base, "algorithm": a, "compressor": c, "seed": s}).validate())
    return cfgs


def run_grid(
    base: dict,
    algorithms,
    compressors,
    seeds,
    out: Path,
    *,
    progress: bool = True,
    sharpness: bool = False,
    sharpness_options: dict | None = None,
    runner=None,
) -> list[dict]:
    """Run every (algorithm, compressor, seed) not yet finished in ``out``; write and print the results.

    ``runner(cfg, run_dir)`` runs one configuration into ``run_dir`` (default: the in-process
    trainer, resuming from a checkpoint there; ``fedsynsam flower demo`` runs it on Flower).

    ``sharpness``: also measure every run not yet measured (:func:`fedsynsam.sharpness.measure_run`)
    and add λ_max, the Hessian trace and the valley width to the table, with their plots;
    ``sharpness_options``: keyword arguments for it (``samples``, ``surface``, ...).
    """
    from tqdm.auto import tqdm

    from .trainer import Trainer

    if not algorithms or not compressors or not seeds:
        raise ValueError("algorithms, compressors and seeds must each name at least one entry")
    cfgs = _configs(base, algorithms, compressors, seeds)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfgs[0].dataset, cfgs[0].data_dir)
    bar = tqdm(cfgs, desc="compare", unit="run", disable=not progress)
    for cfg in bar:
        run_dir = _run_dir(out, cfg.algorithm, cfg.compressor, cfg.seed)
        bar.set_postfix_str(run_dir.name)
        summary = run_dir / "summary.json"
        if summary.is_file():
            saved = json.loads(summary.read_text())["config"]
            ignore = EXECUTION_ONLY + cfg.unused()
            diff = sorted(k for k in saved if saved[k] != cfg.to_dict().get(k) and k not in ignore)
            if diff:
                raise ValueError(
                    f"{run_dir} holds a finished run with other settings ({', '.join(diff)}); use another --out"
                )
        elif runner is not None:
            runner(cfg, run_dir)
        else:
            resume = any((run_dir / name).is_file() for name in (CHECKPOINT, PREVIOUS))
            if not resume and (run_dir / "metrics.jsonl").is_file():
                # stopped before its first checkpoint: nothing to resume from, so it starts over
                # (the trainer refuses to write over a run's metrics unless told to resume)
                (run_dir / "metrics.jsonl").unlink()
            # one bar per run only on a terminal: nested bars garble logs and CI output
            Trainer(cfg, run_dir, dataset=data).run(resume=resume, progress=progress and sys.stderr.isatty())
        if sharpness and "lambda_max" not in json.loads(summary.read_text()):
            from .sharpness import measure_run

            measure_run(run_dir, dataset=data, device=cfg.device, **(sharpness_options or {}))
    rows = collect(out, algorithms, compressors, seeds)
    table = format_results(rows, cfgs[0])
    (out / "results.md").write_text(table + "\n")
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))  # every row's columns
        writer.writeheader()
        writer.writerows(rows)
    written = ["results.md", "results.csv"] + _plot_grid(out, algorithms, compressors, seeds)
    print(table)
    print("\nwritten in " + str(out) + ": " + ", ".join(written))
    return rows


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def collect(out: Path, algorithms, compressors, seeds) -> list[dict]:
    """One row per (algorithm, compressor): accuracy mean and std over seeds, bytes, extra summary fields."""
    rows = []
    for a in algorithms:
        for c in compressors:
            summaries = [json.loads((_run_dir(out, a, c, s) / "summary.json").read_text()) for s in seeds]
            acc_m, acc_s = _mean_std([x["final_test_acc"] for x in summaries])
            last5_m, last5_s = _mean_std([x["mean_test_acc_last5"] for x in summaries])
            row = {
                "algorithm": a,
                "compressor": c,
                "seeds": len(seeds),
                "final_acc_mean": acc_m,
                "final_acc_std": acc_s,
                "last5_acc_mean": last5_m,
                "last5_acc_std": last5_s,
                "uplink_MB": statistics.fmean(x["total_uplink_bytes"] for x in summaries) / 1e6,
                "downlink_MB": statistics.fmean(x["total_downlink_bytes"] for x in summaries) / 1e6,
                "seconds": statistics.fmean(x["seconds"] for x in summaries),
            }
            for key in ("lambda_max", "hessian_trace", "valley_width"):
                vals = [x[key] for x in summaries if x.get(key) is not None]
                if len(vals) == len(summaries):
                    row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(vals)
            medians = [x["estimate"]["eps"]["median"] for x in summaries if "eps" in x.get("estimate", {})]
            if medians and len(medians) == len(summaries):  # the estimate diagnostic was on
                row["eps_cosine_mean"], row["eps_cosine_std"] = _mean_std(medians)
            encode = [x["encode_cos_mean"] for x in summaries if "encode_cos_mean" in x]
            if encode and len(encode) == len(summaries):  # 3SFC / FedSynth
                row["encode_cos_mean"], row["encode_cos_std"] = _mean_std(encode)
            rows.append(row)
    return rows


def format_results(rows: list[dict], cfg: Config) -> str:
    """A Markdown table of :func:`collect`'s rows, with the shared settings above it."""
    sharp = "lambda_max_mean" in rows[0]
    head = ["algorithm", "compressor", "final test acc", "last-5 mean acc", "uplink MB", "downlink MB", "s/run"]
    if sharp:
        head += ["λ_max", "Hessian trace", "valley width"]
    estimate = any("eps_cosine_mean" in r for r in rows)
    if estimate:
        head.append("median cos(ε, ∇F)")
    encode = any("encode_cos_mean" in r for r in rows)
    if encode:
        head.append("encode cos")
    lines = [
        f"Dataset {cfg.dataset}, model {cfg.model}, {cfg.clients} clients ({cfg.per_round}/round), "
        f"Dirichlet α={cfg.alpha}, {cfg.rounds} rounds, K={cfg.local_steps}, lr={cfg.lr}, ρ={cfg.rho}, "
        f"top-k/rand-k ratio {cfg.ratio}, error feedback {'on' if cfg.error_feedback else 'off'}; "
        f"mean ± std over {rows[0]['seeds']} seed(s).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        cells = [
            r["algorithm"],
            r["compressor"],
            f"{r['final_acc_mean']:.4f} ± {r['final_acc_std']:.4f}",
            f"{r['last5_acc_mean']:.4f} ± {r['last5_acc_std']:.4f}",
            f"{r['uplink_MB']:.2f}",
            f"{r['downlink_MB']:.2f}",
            f"{r['seconds']:.1f}",
        ]
        if sharp:
            cells += [
                f"{r['lambda_max_mean']:.3g} ± {r['lambda_max_std']:.2g}",
                f"{r['hessian_trace_mean']:.3g} ± {r['hessian_trace_std']:.2g}",
                f"{r['valley_width_mean']:.3f} ± {r['valley_width_std']:.3f}",
            ]
        if estimate:  # FedAvg perturbs along nothing: no cosine
            cells.append(f"{r['eps_cosine_mean']:+.2f} ± {r['eps_cosine_std']:.2f}" if "eps_cosine_mean" in r else "—")
        if encode:  # what the 3SFC / FedSynth payloads carried of each update (+ residual)
            cells.append(f"{r['encode_cos_mean']:.3f} ± {r['encode_cos_std']:.3f}" if "encode_cos_mean" in r else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_grid(out: Path, algorithms, compressors, seeds) -> list[str]:
    """Accuracy curves averaged over seeds, one line per (algorithm, compressor); with sharpness
    measured, also λ_max bars and the first seed's 1-D landscapes. Returns the file names."""

    from .plots import plot_bars, plot_estimate, plot_landscape_1d

    runs, eigen, curves = {}, {}, {}
    for a in algorithms:
        for c in compressors:
            per_seed = [_records(_run_dir(out, a, c, s)) for s in seeds]
            merged = []
            for rs in zip(*per_seed):
                accs = [r["test_acc"] for r in rs]
                merged.append(
                    {
                        "round": rs[0]["round"],
                        "test_acc": None if None in accs else statistics.fmean(accs),
                        "uplink_bytes": statistics.fmean(r["uplink_bytes"] for r in rs),
                    }
                )
            runs[f"{a}/{c}"] = merged
            summaries = [json.loads((_run_dir(out, a, c, s) / "summary.json").read_text()) for s in seeds]
            if all("lambda_max" in x for x in summaries):
                eigen[f"{a}/{c}"] = _mean_std([x["lambda_max"] for x in summaries])
                land = load_plain(_run_dir(out, a, c, seeds[0]) / "landscape.pt")
                curves[f"{a}/{c}"] = (land["alphas"], land["loss_1d"])
    names = [p.name for p in plot_runs(runs, out)]
    estimate = {f"{a}/{c}": _records(_run_dir(out, a, c, seeds[0])) for a in algorithms for c in compressors}
    if plot_estimate(estimate, out / "estimate_cosine.png") is not None:
        names.append("estimate_cosine.png")
    if eigen and len(eigen) == len(runs):
        plot_bars(eigen, out / "lambda_max.png", "λ_max (mean ± std over seeds)")
        plot_landscape_1d(curves, out / "landscape_1d.png")
        names += ["lambda_max.png", "landscape_1d.png"]
    return names
