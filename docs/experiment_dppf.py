"""Experiment 3 (docs/dppf.md): DPPF in its own setting, data-parallel workers on torch.distributed.

    python docs/experiment_dppf.py run      # every run not yet finished (restartable)
    python docs/experiment_dppf.py report   # tables and plots -> docs/dppf/

mnist5k + CNN, 4 workers (``fedsynsam dp --nproc 4``, gloo on this machine's CPU), IID shards, 800
SGD steps of batch 32 per worker for every method: ``ddp`` (gradients averaged every step),
``localsgd`` and ``dppf`` with tau = 4 and 16 local steps between synchronisations, DPPF with two
(alpha, lambda) pairs at tau = 4 and the first at tau = 16 (what 2 cores finish); each uncompressed
and with top-k 1 % + error feedback on the synchronisation; seeds 0-2. Plus seed 0 on a
Dirichlet(0.1) label skew, to connect with docs/comparison.md.
Runs go to ``runs/dppf/<config>-<compressor>-s<seed>``; a stopped ``run`` resumes unfinished runs
from their checkpoints. Every finished run's summary is appended to
:data:`RECORDS` (docs/dppf/runs.jsonl, committed), so the report survives a checkout without ``runs/``.

Comparisons pair runs by seed (the seed fixes the shards, the initial model and every minibatch);
a row gives the mean paired difference, its 95 % Student-t interval and how many seeds agree.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from experiment_mnist import _table, cell, interval

from fedsynsam.dp import DPConfig
from fedsynsam.dp.config import DP_NOT_IDENTITY

HERE = Path(__file__).resolve().parent
RECORDS = HERE / "dppf" / "runs.jsonl"
WORKERS = 4
BASE = dict(dataset="mnist5k", model="cnn", steps=800, batch_size=32, lr=0.05, eval_every=5, measure_samples=512)
A, B = dict(dppf_alpha=0.1, dppf_lambda=0.02), dict(dppf_alpha=0.1, dppf_lambda=0.1)  # lambda/alpha 0.2 and 1.0
CONFIGS = {
    "ddp": dict(method="ddp", sync_every=4),
    "localsgd-t4": dict(method="localsgd", sync_every=4),
    "dppf-t4-a": dict(method="dppf", sync_every=4, **A),
    "dppf-t4-b": dict(method="dppf", sync_every=4, **B),
    "localsgd-t16": dict(method="localsgd", sync_every=16),
    "dppf-t16-a": dict(method="dppf", sync_every=16, **A),
}
LABELS = {
    "ddp": "DDP (every step)",
    "localsgd-t4": "local SGD, τ=4",
    "dppf-t4-a": "DPPF, τ=4, α=0.1, λ=0.02",
    "dppf-t4-b": "DPPF, τ=4, α=0.1, λ=0.1",
    "localsgd-t16": "local SGD, τ=16",
    "dppf-t16-a": "DPPF, τ=16, α=0.1, λ=0.02",
}
COMPRESSORS = {"none": {}, "topk": dict(compressor="topk", ratio=0.01)}
SEEDS = [0, 1, 2]
SKEW = dict(partition="dirichlet", alpha=0.1)
SKEW_CONFIGS = ["ddp", "localsgd-t4", "dppf-t4-a"]


def units() -> list[tuple[str, str, str, int]]:
    """``(grid, config, compressor, seed)`` of every run, seed by seed (an early stop leaves whole seeds)."""
    main = [("iid", k, c, s) for s in SEEDS for c in COMPRESSORS for k in CONFIGS]
    return main + [("skew", k, "none", 0) for k in SKEW_CONFIGS]


def settings(grid: str, config: str, compressor: str, seed: int) -> dict:
    return {**BASE, **CONFIGS[config], **COMPRESSORS[compressor], **(SKEW if grid == "skew" else {}), "seed": seed}


def folder(out: Path, grid: str, config: str, compressor: str, seed: int) -> Path:
    return out / grid / f"{config}-{compressor}-s{seed}"


class Results:
    """Finished runs' summaries by ``(grid, config, compressor, seed)``: the run's folder, else its
    line in :data:`RECORDS`; a summary made with other settings than the run's is refused."""

    def __init__(self, out: Path, records: Path = RECORDS):
        self.out, self.records, self.saved = out, records, {}
        if records.is_file():
            for n, line in enumerate(records.read_text().splitlines(), 1):
                if line.strip():
                    r = json.loads(line)
                    key = (r["grid"], r["config"], r["compressor"], r["seed"])
                    self._check(key, r["summary"], f"{records}:{n}")
                    self.saved[key] = r["summary"]

    def get(self, *key) -> dict:
        path = folder(self.out, *key) / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else self.saved.get(key, {})

    def record(self, *key) -> None:
        path = folder(self.out, *key) / "summary.json"
        if not path.is_file():
            return
        summary = json.loads(path.read_text())
        if self.saved.get(key) == summary:
            return
        self._check(key, summary, str(path))
        self.records.parent.mkdir(parents=True, exist_ok=True)
        grid, config, compressor, seed = key
        line = {"grid": grid, "config": config, "compressor": compressor, "seed": seed, "summary": summary}
        with self.records.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        self.saved[key] = summary

    @staticmethod
    def _check(key, summary: dict, where: str) -> None:
        want = DPConfig.from_dict(settings(*key)).validate().to_dict()
        diff = sorted(k for k, v in summary["config"].items() if v != want.get(k) and k not in DP_NOT_IDENTITY)
        if diff or summary.get("workers") != WORKERS:
            raise ValueError(f"{where} was run with other settings than {key} ({', '.join(diff) or 'workers'})")


def run(out: Path, records: Path = RECORDS) -> None:
    """Every run that neither ``out`` nor ``records`` holds, one at a time (each uses 4 processes)."""
    from tqdm.auto import tqdm

    results = Results(out, records)
    for key in units():
        results.record(*key)
    todo = [key for key in units() if not results.get(*key)]
    failed = []
    for key in tqdm(todo, desc="runs", unit="run"):
        path = folder(out, *key)
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in settings(*key).items()]
        resume = ["--resume"] if (path / "checkpoint.pt").is_file() else []
        cmd = [sys.executable, "-m", "fedsynsam", "dp", f"--nproc={WORKERS}", "--quiet", *flags, *resume]
        done = subprocess.run([*cmd, f"--out={path}"], capture_output=True, text=True)
        if done.returncode != 0:
            failed.append(f"{path}: exit {done.returncode}: {done.stderr.strip().splitlines()[-1:]}")
            tqdm.write(f"FAILED {failed[-1]}", file=sys.stderr)
            continue
        results.record(*key)
        if not results.get(*key):  # the command succeeded but left no summary: say so, never skip silently
            failed.append(f"{path}: finished without a summary.json")
            tqdm.write(f"FAILED {failed[-1]}", file=sys.stderr)
            continue
        tqdm.write(done.stdout.strip().splitlines()[-1])
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


# -- the report ------------------------------------------------------------------------------------
COLUMNS = [  # (summary key, header, scale, format)
    ("final_test_acc", "test acc (%)", 100.0, ".2f"),
    ("generalization_gap_acc", "gap: train − test acc (pp)", 100.0, ".2f"),
    ("generalization_gap_loss", "gap: test − train loss", 1.0, ".3f"),
    ("lambda_max", "λ_max", 1.0, ".2f"),
    ("valley_width", "valley width", 1.0, ".3f"),
    ("inverse_mean_valley", "IMV", 1.0, ".2f"),
    ("final_spread", "spread", 1.0, ".3f"),
    ("sent_bytes_per_worker", "MB sent / worker", 1e-6, ".2f"),
    ("seconds", "s / run (training)", 1.0, ".0f"),
]


def _mean_ci(values: list[float], scale: float, fmt: str) -> str:
    if not values:
        return "–"
    m, lo, hi = interval(values, scale)
    return f"{m:{fmt}}" if math.isnan(lo) else f"{m:{fmt}} ± {(hi - lo) / 2:{fmt}}"


def _values(results: Results, grid: str, config: str, compressor: str, key: str, seeds) -> list[float]:
    out = []
    for s in seeds:
        v = results.get(grid, config, compressor, s).get(key)
        if v is not None:
            out.append(v)
    return out


def _paired(results: Results, a: tuple, b: tuple, key: str) -> list[float]:
    diffs = []
    for s in SEEDS:
        x, y = results.get("iid", *a, s), results.get("iid", *b, s)
        if x.get(key) is not None and y.get(key) is not None:
            diffs.append(x[key] - y[key])
    return diffs


def _spearman(xs: list[float], ys: list[float]) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=v.__getitem__)
        r = [0.0] * len(v)
        for i, j in enumerate(order):
            r[j] = float(i)
        return r

    rx, ry = ranks(xs), ranks(ys)
    return statistics.correlation(rx, ry) if len(xs) > 2 else math.nan


def report(results: Results, dest: Path) -> str:
    """``dest/results.md`` (tables) and the plots; returns the markdown."""
    from fedsynsam.plots import plot_dp

    dest.mkdir(parents=True, exist_ok=True)
    parts = [
        f"4 workers, mnist5k + CNN, {BASE['steps']} SGD steps of batch {BASE['batch_size']} per worker, "
        f"lr {BASE['lr']}; mean ± half the 95 % interval over the seeds that finished (n per row); "
        f"measures on {BASE['measure_samples']} fixed training samples of the final averaged model.\n"
    ]
    for compressor in COMPRESSORS:
        rows = []
        for config in CONFIGS:
            n = len(_values(results, "iid", config, compressor, "final_test_acc", SEEDS))
            if n:
                cells = [
                    _mean_ci(_values(results, "iid", config, compressor, k, SEEDS), sc, f) for k, _, sc, f in COLUMNS
                ]
                rows.append([LABELS[config], str(n), *cells])
        if rows:
            title = "uncompressed" if compressor == "none" else "top-k 1 % + error feedback on the synchronisation"
            parts.append(f"### IID shards, {title}\n\n" + _table(["method", "n", *[h for _, h, _, _ in COLUMNS]], rows))
    claims = []
    for compressor in COMPRESSORS:
        for tau in ("t4", "t16"):
            for pair in ("a", "b"):
                dppf, local = (f"dppf-{tau}-{pair}", compressor), (f"localsgd-{tau}", compressor)
                for other, name in ((local, "local SGD"), (("ddp", compressor), "DDP")):
                    acc = _paired(results, dppf, other, "final_test_acc")
                    if not acc:
                        continue
                    claims.append([
                        f"{LABELS[dppf[0]]} − {name}" + (" (top-k)" if compressor == "topk" else ""),
                        cell(acc, 100.0, +1),
                        cell(_paired(results, dppf, other, "generalization_gap_acc"), 100.0, -1),
                        cell(_paired(results, dppf, other, "lambda_max"), 1.0, -1),
                        cell(_paired(results, dppf, other, "valley_width"), 1.0, +1),
                    ])  # fmt: skip
    if claims:
        parts.append(
            "### Paired by seed: DPPF against local SGD (same τ) and DDP\n\nmean difference [95 % interval] and "
            "the seeds whose difference has the sign DPPF's claim predicts\n\n"
            + _table(["comparison", "test acc (pp)", "gap (pp)", "λ_max", "valley width"], claims)
        )
    every = [results.get(*key) for key in units() if key[0] == "iid" and results.get(*key)]
    with_imv = [s for s in every if s.get("inverse_mean_valley") is not None]
    if len(with_imv) > 2:
        gap = [s["generalization_gap_loss"] for s in with_imv]
        rows = [
            [name, f"{_spearman([s[key] for s in with_imv], gap):+.2f}"]
            for key, name in (
                ("inverse_mean_valley", "IMV"),
                ("lambda_max", "λ_max"),
                ("hessian_trace", "Hessian trace"),
            )
        ]
        rows.append(["1 / valley width", f"{_spearman([1 / s['valley_width'] for s in with_imv], gap):+.2f}"])
        parts.append(
            f"### Does a sharpness measure track the generalisation gap?\n\nSpearman rank correlation with the "
            f"loss gap (test − train) over the {len(with_imv)} IID runs whose workers are apart at the end "
            "(every run but DDP's)\n\n" + _table(["measure", "ρ (Spearman)"], rows)
        )
    skew = [[LABELS[k], *[_mean_ci(_values(results, "skew", k, "none", c, [0]), sc, f) for c, _, sc, f in COLUMNS[:6]]]
            for k in SKEW_CONFIGS if results.get("skew", k, "none", 0)]  # fmt: skip
    if skew:
        parts.append(
            "### Dirichlet(0.1) label skew, seed 0, uncompressed\n\n"
            + _table(["method", *[h for _, h, _, _ in COLUMNS[:6]]], skew)
        )
    curves = {}
    for compressor in COMPRESSORS:
        for config in ("ddp", "localsgd-t4", "dppf-t4-a", "dppf-t4-b", "localsgd-t16", "dppf-t16-a"):
            metrics = folder(results.out, "iid", config, compressor, 0) / "metrics.jsonl"
            if metrics.is_file():
                curves[f"{config}/{compressor}"] = [json.loads(x) for x in metrics.read_text().splitlines()]
    if curves:
        plot_dp(curves, dest, prefix="seed0_")
        parts.append("![curves of seed 0](seed0_dp_curves.png)\n")
    text = "\n\n".join(part.rstrip("\n") for part in parts) + "\n"
    (dest / "results.md").write_text(text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--out", default="runs/dppf", help="folder of the runs")
    parser.add_argument("--records", default=str(RECORDS), help="the recorded summaries (JSON lines)")
    parser.add_argument("--dest", default=str(HERE / "dppf"), help="where report writes")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(Path(args.out), Path(args.records))
    else:
        print(report(Results(Path(args.out), Path(args.records)), Path(args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
