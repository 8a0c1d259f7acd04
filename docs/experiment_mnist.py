"""Experiment 2 (docs/experiment-mnist.md): mnist5k + CNN, the paper's claims with more seeds,
two degrees of non-IID, a ρ sweep and FedSynSAM ablations.

    python docs/experiment_mnist.py run --jobs 2   # every run not yet finished, then sharpness
    python docs/experiment_mnist.py report         # tables and plots -> docs/experiment-mnist/

``make experiment-mnist`` does both. Runs go to ``runs/mnist/<grid>/<algorithm>-<compressor>-s<seed>``;
a stopped ``run`` restarts where it stopped (finished runs are skipped, unfinished ones resume
from their checkpoint). Each worker uses one torch thread, so every run reproduces bit for bit.
The shared settings are docs/experiment-mnist.toml; the grids are :data:`GRIDS`.

Every finished and measured run's summary is also appended to :data:`RECORDS`
(docs/experiment-mnist/runs.jsonl), which is committed: the analysis, and ``run``'s list of what
is left, survive a checkout without ``runs/`` (the grid spans several sessions). ``run --part sub``
runs only the ρ sweep, the ablations and the main-grid runs they are paired with.

Every comparison pairs runs with the same seed (the seed fixes the partition, the initial model
and the client sampling). A claim's row gives the mean paired difference, its 95 % interval
(Student t over seeds) and how many seeds have the difference of the claimed sign.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from fedsynsam.config import Config, load_toml

HERE = Path(__file__).resolve().parent
BASE = load_toml(HERE / "experiment-mnist.toml")
ALGORITHMS = ["fedavg", "fedsam", "mofedsam", "fedlesam", "fedsynsam"]
SAM = ["fedsam", "mofedsam", "fedlesam", "fedsynsam"]
COMPRESSORS = ["none", "topk", "sign"]
MAIN_SEEDS = [0, 1, 2, 3, 4]
SUB_SEEDS = [0, 1, 2]
SHARPNESS_SAMPLES = 512


@dataclass
class Grid:
    name: str
    overrides: dict
    algorithms: list
    compressors: list
    seeds: list
    label: str = ""
    units: list = field(init=False)

    def __post_init__(self):
        self.units = [(a, c, s) for s in self.seeds for a in self.algorithms for c in self.compressors]


# The first grids ran with trajectory matching, FedSynSAM's first objective: they keep it, so
# their records stay theirs. The estimate grids (issue 23) measure every round's perturbation
# estimate against grad F(w^t) (diagnose = "estimate,oracle"); "estimate" runs today's default
# (gradient matching), "estimate-trajectory" the first objective with the same diagnostic.
# FedAvg is not rerun: it perturbs along nothing, and its training does not depend on the
# synthetic set's settings, so its alpha0.1 runs are the accuracy baseline of the same seeds
# (part "estimate" runs those of the five seeds that the main grid has not reached yet).
FIRST = {"alpha": 0.1, "syn_objective": "trajectory"}
ESTIMATE_ALGORITHMS = ["fedsynsam", "fedlesam", "fedsam"]
GRIDS = [
    Grid("alpha0.1", FIRST, ALGORITHMS, COMPRESSORS, MAIN_SEEDS, "main grid, Dirichlet α = 0.1"),
    Grid("alpha0.5", {**FIRST, "alpha": 0.5}, ALGORITHMS, COMPRESSORS, MAIN_SEEDS, "main grid, Dirichlet α = 0.5"),
    *[Grid(f"rho{r}", {**FIRST, "rho": r}, SAM, ["topk"], SUB_SEEDS, f"ρ = {r}") for r in (0.01, 0.02, 0.1, 0.2)],
    Grid("syn-per-class1", {**FIRST, "syn_per_class": 1}, ["fedsynsam"], ["topk"], SUB_SEEDS, "1 image per class"),
    Grid("syn-per-class30", {**FIRST, "syn_per_class": 30}, ["fedsynsam"], ["topk"], SUB_SEEDS, "30 per class"),
    Grid("syn-period5", {**FIRST, "syn_period": 5}, ["fedsynsam"], ["topk"], SUB_SEEDS, "refresh every 5"),
    Grid("syn-period25", {**FIRST, "syn_period": 25}, ["fedsynsam"], ["topk"], SUB_SEEDS, "refresh every 25"),
    Grid("syn-server", {**FIRST, "perturbation": "server"}, ["fedsynsam"], ["topk"], SUB_SEEDS, "server ε"),
    Grid(
        "estimate",
        {"alpha": 0.1, "diagnose": "estimate,oracle"},
        ESTIMATE_ALGORITHMS,
        COMPRESSORS,
        MAIN_SEEDS,
        "α = 0.1, gradient matching, estimate diagnostic",
    ),
    Grid(
        "estimate-trajectory",
        {**FIRST, "diagnose": "estimate"},
        ["fedsynsam"],
        ["topk", "none"],
        MAIN_SEEDS,
        "α = 0.1, trajectory matching (the first objective), estimate diagnostic",
    ),
]


RECORDS = HERE / "experiment-mnist" / "runs.jsonl"
PARTS = ("all", "main", "sub", "estimate")
ESTIMATE_GRIDS = ("estimate", "estimate-trajectory")


def _grid(name: str) -> Grid:
    return next(g for g in GRIDS if g.name == name)


def selected(part: str = "all") -> list[tuple[str, str, str, int]]:
    """The runs ``(grid, algorithm, compressor, seed)`` of ``part``: ``main`` (the two main grids),
    ``sub`` (the ρ sweep and the ablations, with the α = 0.1 top-k runs on their seeds that they
    are paired with), ``estimate`` (the estimate grids) or ``all``; in the order ``run`` takes
    them: the main grids seed by seed first, so that an early stop still leaves paired results,
    then the rest. The estimate grids go seed by seed through top-k and none (within a seed and
    compressor: FedSynSAM, FedLESAM, FedSAM, then the first objective), then sign, then the
    α = 0.1 grid's FedAvg runs of every seed (the baseline of claim 3's pairs)."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {', '.join(PARTS)}; got {part!r}")
    main = [(g.name, *u) for g in GRIDS[:2] for u in g.units]
    sub = [(g.name, *u) for g in GRIDS[2:] if g.name not in ESTIMATE_GRIDS for u in g.units]
    estimate = [(g.name, *u) for g in GRIDS if g.name in ESTIMATE_GRIDS for u in g.units]
    base = [("alpha0.1", a, "topk", s) for s in SUB_SEEDS for a in ALGORITHMS]
    if part == "estimate":
        rank = {("estimate", a): i for i, a in enumerate(ESTIMATE_ALGORITHMS)}
        rank[("estimate-trajectory", "fedsynsam")] = len(ESTIMATE_ALGORITHMS)
        comp = {"topk": 0, "none": 1, "sign": 2}
        baseline = [("alpha0.1", "fedavg", c, s) for s in MAIN_SEEDS for c in COMPRESSORS]
        return sorted(estimate, key=lambda t: (t[2] == "sign", t[3], comp[t[2]], rank[t[0], t[1]])) + baseline
    units = {"all": main + sub + estimate, "main": main, "sub": base + sub}[part]
    order = {g.name: i for i, g in enumerate(GRIDS)}
    return sorted(units, key=lambda t: (not t[0].startswith("alpha"), t[3], order[t[0]]))


class Results:
    """Every finished run's summary, keyed by ``(grid, algorithm, compressor, seed)``: the run's
    folder under ``out`` where it exists, otherwise its line in ``records`` (JSON lines of
    ``{"grid", "algorithm", "compressor", "seed", "summary"}``; a later line for the same run
    replaces an earlier one). A record made with other settings than the grid's is refused."""

    def __init__(self, out: Path, records: Path = RECORDS):
        self.out, self.records = Path(out), Path(records)
        self._saved: dict[tuple, dict] = {}
        if self.records.is_file():
            for n, line in enumerate(self.records.read_text().splitlines(), 1):
                if line.strip():
                    r = json.loads(line)
                    key = (r["grid"], r["algorithm"], r["compressor"], r["seed"])
                    self._check(key, r["summary"], f"{self.records}:{n}")
                    self._saved[key] = r["summary"]

    def folder(self, grid: str, a: str, c: str, s: int) -> dict:
        path = self.out / grid / f"{a}-{c}-s{s}" / "summary.json"
        return json.loads(path.read_text()) if path.is_file() else {}

    def get(self, grid: str, a: str, c: str, s: int) -> dict:
        return self.folder(grid, a, c, s) or self._saved.get((grid, a, c, s), {})

    def measured(self, grid: str, a: str, c: str, s: int) -> bool:
        return "lambda_max" in self.get(grid, a, c, s)

    def record(self, grid: str, a: str, c: str, s: int) -> bool:
        """Append the run's measured summary to ``records`` unless that exact summary is there."""
        summary = self.folder(grid, a, c, s)
        key = (grid, a, c, s)
        if "lambda_max" not in summary or self._saved.get(key) == summary:
            return False
        self._check(key, summary, str(self.out / grid / f"{a}-{c}-s{s}"))
        self.records.parent.mkdir(parents=True, exist_ok=True)
        line = {"grid": grid, "algorithm": a, "compressor": c, "seed": s, "summary": summary}
        with self.records.open("a") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")
        self._saved[key] = summary
        return True

    @staticmethod
    def _check(key: tuple, summary: dict, where: str) -> None:
        from fedsynsam.config import EXECUTION_ONLY

        grid, a, c, s = key
        want = Config.from_dict({**BASE, **_grid(grid).overrides, "algorithm": a, "compressor": c, "seed": s})
        want = want.validate()
        ignore = EXECUTION_ONLY + want.unused()
        diff = sorted(k for k, v in summary.get("config", {}).items() if v != want.to_dict().get(k) and k not in ignore)
        if diff:
            raise ValueError(f"{where} was run with other settings than grid {grid} ({', '.join(diff)})")


def _one(out: str, grid: str, a: str, c: str, s: int) -> str:
    import torch

    from fedsynsam.compare import run_grid

    torch.set_num_threads(1)
    g = _grid(grid)
    # 512 of the 4,000 training points define the measured loss; the 2-D landscape (441 loss
    # evaluations, the largest cost on the CNN) only for seed 0
    options = {"samples": SHARPNESS_SAMPLES, "surface": s == 0 and grid not in ESTIMATE_GRIDS}
    run_grid(
        {**BASE, **g.overrides}, [a], [c], [s], Path(out) / grid, progress=False, sharpness=True,
        sharpness_options=options,
    )  # fmt: skip
    return f"{grid}/{a}-{c}-s{s}"


def run(out: Path, jobs: int, part: str = "all", records: Path = RECORDS) -> None:
    """Run (and measure) every run of ``part`` that neither ``out`` nor ``records`` holds measured,
    ``jobs`` at a time; record each one as it finishes."""
    from tqdm.auto import tqdm

    results = Results(out, records)
    units = selected(part)
    for t in units:  # runs finished by an earlier driver that stopped before recording them
        results.record(*t)
    todo = [t for t in units if not results.measured(*t)]
    failed = []
    with ProcessPoolExecutor(max_workers=jobs) as pool, tqdm(total=len(todo), desc="runs", unit="run") as bar:
        futures = {pool.submit(_one, str(out), *t): t for t in todo}
        for f in as_completed(futures):
            grid, a, c, s = futures[f]
            try:
                bar.set_postfix_str(f.result())
                results.record(grid, a, c, s)
            except Exception as e:  # one run's failure must not hide (or stop) the others
                failed.append(f"{grid}/{a}-{c}-s{s}: {type(e).__name__}: {e}")
                tqdm.write(f"FAILED {failed[-1]}", file=sys.stderr)
            bar.update()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed:\n" + "\n".join(failed))


# -- analysis ---------------------------------------------------------------------------------
METRICS = [
    ("mean_test_acc_last5", "accuracy (pp)", 100.0),
    ("lambda_max", "λ_max", 1.0),
    ("hessian_trace", "Hessian trace", 1.0),
    ("valley_width", "valley width", 1.0),
]
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def paired(
    results: Results, grid_a: str, run_a: tuple, grid_b: str, run_b: tuple, key: str, seeds=MAIN_SEEDS
) -> list[float]:
    """``a - b`` for every seed of ``seeds`` where both runs are finished and measured (a run
    whose sharpness is still being measured is left out of its accuracy pairs too, so that every
    column of a row describes the same runs)."""
    diffs = []
    for s in seeds:
        x, y = results.get(grid_a, *run_a, s), results.get(grid_b, *run_b, s)
        if "lambda_max" in x and "lambda_max" in y and x.get(key) is not None and y.get(key) is not None:
            diffs.append(x[key] - y[key])
    return diffs


def interval(diffs: list[float], scale: float) -> tuple[float, float, float]:
    """Mean and 95 % Student-t interval of ``diffs * scale``."""
    m = statistics.fmean(diffs) * scale
    if len(diffs) < 2:
        return m, math.nan, math.nan
    half = T975[len(diffs) - 1] * statistics.stdev(diffs) * scale / math.sqrt(len(diffs))
    return m, m - half, m + half


def cell(diffs: list[float], scale: float, sign: int) -> str:
    """``mean [lo, hi] k/n``: k seeds with the claimed sign (``sign`` = +1, -1, or 0: none claimed)."""
    if not diffs:
        return "n/a"
    m, lo, hi = interval(diffs, scale)
    digits = 3 if abs(m) < 0.1 else 2
    agree = f" {sum(d * sign > 0 for d in diffs)}/{len(diffs)}" if sign else f" n={len(diffs)}"
    if math.isnan(lo):  # one seed: no interval
        return f"{m:+.{digits}f}{agree}"
    return f"{m:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]{agree}"


# (label, (a, c), (b, c'), claimed sign of a - b for accuracy; sharpness is claimed the other way)
def claim_rows() -> list[tuple[str, tuple, tuple, int]]:
    rows = []
    for c in ("topk", "sign"):
        rows.append((f"1: FedAvg {c} − FedAvg none", ("fedavg", c), ("fedavg", "none"), -1))
    for c in ("none", "topk", "sign"):
        rows.append((f"2: FedLESAM − FedAvg, both {c}", ("fedlesam", c), ("fedavg", c), 0))
    for c in ("topk", "sign"):
        rows.append((f"3: FedSynSAM − FedAvg, both {c}", ("fedsynsam", c), ("fedavg", c), +1))
        rows.append((f"3: FedSynSAM − FedLESAM, both {c}", ("fedsynsam", c), ("fedlesam", c), +1))
        rows.append((f"3: FedSynSAM − MoFedSAM, both {c}", ("fedsynsam", c), ("mofedsam", c), +1))
    for c in ("topk", "sign"):  # "recovers": compressed FedSynSAM against uncompressed FedAvg
        rows.append((f"3: FedSynSAM {c} − FedAvg none", ("fedsynsam", c), ("fedavg", "none"), +1))
    for c in COMPRESSORS:
        rows.append((f"ref: FedSAM − FedAvg, both {c}", ("fedsam", c), ("fedavg", c), 0))
    return rows


FOREST = METRICS[:2]  # the claims plot: accuracy and λ_max


def plot_claims(effects: dict, path: Path) -> Path:
    """Forest plot of the claims: per claim row, the paired difference's mean and 95 % interval,
    one panel per metric of :data:`FOREST`, one colour per grid.

    ``effects``: grid label -> metric key -> ``[(row label, diffs)]`` (rows in the same order
    for every grid and metric)."""
    from fedsynsam.plots import _pyplot

    plt = _pyplot()
    labels = [row for row, _ in next(iter(effects.values()))[FOREST[0][0]]]
    fig, axes = plt.subplots(1, len(FOREST), figsize=(11, 0.4 * len(labels) + 1.4), dpi=120, sharey=True)
    for ax, (key, name, scale) in zip(axes, FOREST):
        for j, (grid, by_key) in enumerate(effects.items()):
            first = True
            for i, (_, diffs) in enumerate(by_key[key]):
                if not diffs:
                    continue
                m, lo, hi = interval(diffs, scale)
                err = None if math.isnan(lo) else [[m - lo], [hi - m]]
                y = i + (j - (len(effects) - 1) / 2) * 0.3
                ax.errorbar(m, y, xerr=err, fmt="o", color=f"C{j}", ms=4, capsize=2, label=grid if first else None)
                first = False
        ax.axvline(0, color="0.5", linewidth=0.8)
        ax.set_xlabel(f"paired difference, {name} (mean, 95 % interval)")
        ax.grid(alpha=0.3, axis="x")
    axes[0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_sweep(points: dict, baseline: tuple | None, path: Path) -> Path:
    """The ρ sweep: accuracy and λ_max against ρ, one line per algorithm.

    ``points``: algorithm -> ``[(ρ, accuracy %, λ_max)]``; ``baseline``: FedAvg top-k's
    ``(accuracy %, λ_max)`` on the same seeds (a dashed line), or ``None``."""
    from fedsynsam.plots import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), dpi=120)
    for col, (ax, name) in enumerate(zip(axes, ("last-5 accuracy (%)", "λ_max"))):
        for a, pts in points.items():
            pts = sorted(pts)
            ax.plot([p[0] for p in pts], [p[1 + col] for p in pts], "o-", label=a, linewidth=1.4, ms=4)
        if baseline is not None:
            ax.axhline(baseline[col], color="0.4", linestyle="--", linewidth=1, label="fedavg (ρ = 0)")
        ax.set_xscale("log")
        ax.set_xlabel("ρ")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def _main_grid_claims(results: Results, dest: Path) -> str | None:
    """``claims.md`` and ``claims.png``: every claim row for each main grid, over the seeds finished
    in the whole grid; with the run folders of those seeds at hand, also each grid's own results
    table and plots. ``None`` (nothing written) when no main grid has a finished seed."""
    from fedsynsam.compare import run_grid

    parts, effects = [], {}
    for g in GRIDS[:2]:
        done = [
            s for s in g.seeds if all(results.measured(g.name, a, c, s) for a in g.algorithms for c in g.compressors)
        ]
        folders = all(results.folder(g.name, *u).get("lambda_max") is not None for u in g.units if u[2] in done)
        if done and folders:  # the grid's own table and plots, over the seeds finished everywhere
            run_grid(
                {**BASE, **g.overrides}, g.algorithms, g.compressors, done, results.out / g.name,
                progress=False, sharpness=True,
            )  # fmt: skip
            for name in ("results.md", "accuracy_vs_round.png", "accuracy_vs_bytes.png", "lambda_max.png",
                         "landscape_1d.png"):  # fmt: skip
                if (results.out / g.name / name).is_file():
                    shutil.copy(results.out / g.name / name, dest / f"{g.name}-{name}")
        elif done:
            print(f"{g.name}: run folders absent under {results.out}; its results table and plots are kept")
        rows, by_key = [], effects.setdefault(g.label, {key: [] for key, _, _ in FOREST})
        for label, a, b, sign in claim_rows():
            row = [label]
            for key, _, scale in METRICS:
                s = sign if key == "mean_test_acc_last5" else (-sign if key != "valley_width" else sign)
                diffs = paired(results, g.name, a, g.name, b, key, done)
                row.append(cell(diffs, scale, s))
                if key in by_key:
                    by_key[key].append((label, diffs))
            rows.append(row)
        parts.append(
            f"### {g.label} (seeds finished: {len(done)})\n\n"
            + _table(["paired difference: mean [95 % CI] seeds agreeing"] + [m[1] for m in METRICS], rows)
        )
    if not any(d for by_key in effects.values() for _, d in by_key[FOREST[0][0]]):
        return None
    plot_claims(effects, dest / "claims.png")
    text = "\n\n".join(parts) + "\n"
    (dest / "claims.md").write_text(text)
    return text


def _sweep_and_ablations(results: Results, dest: Path) -> str | None:
    """``sweep.md`` and ``rho_sweep.png``: the ρ sweep against FedAvg top-k and each FedSynSAM
    ablation against the default, over the sub-grid seeds. ``None`` when no sub-grid run is done."""
    # ρ sweep: each SAM variant with top-k, α = 0.1; ρ = 0.05 is the main grid
    sweep = [(0.05, "alpha0.1")] + [(float(g.name[3:]), g.name) for g in GRIDS if g.name.startswith("rho")]
    rows, points, found = [], {}, False
    for a in SAM:
        for rho, grid in sorted(sweep):
            runs = [results.get(grid, a, "topk", s) for s in SUB_SEEDS]
            runs = [r for r in runs if "lambda_max" in r]
            if runs:
                found |= grid != "alpha0.1"
                acc = statistics.fmean(100 * r["mean_test_acc_last5"] for r in runs)
                lam = statistics.fmean(r["lambda_max"] for r in runs)
                vs = cell(  # over the sweep's seeds, also for the main grid's ρ = 0.05
                    paired(
                        results, grid, (a, "topk"), "alpha0.1", ("fedavg", "topk"), "mean_test_acc_last5", SUB_SEEDS
                    ),
                    100.0,
                    0,
                )
                rows.append([a, f"{rho:g}", str(len(runs)), f"{acc:.2f}", f"{lam:.2f}", vs])
                points.setdefault(a, []).append((rho, acc, lam))
    parts = [
        "### ρ sweep (top-k 1 % + EF, α = 0.1, seeds 0–2)\n\n"
        + _table(["algorithm", "ρ", "seeds", "accuracy %", "λ_max", "accuracy − FedAvg top-k (pp)"], rows)
    ]
    rows = []
    for g in GRIDS:
        if g.name.startswith("syn-"):
            row = [g.label]
            for key, _, scale in METRICS:
                diffs = paired(results, g.name, ("fedsynsam", "topk"), "alpha0.1", ("fedsynsam", "topk"), key, g.seeds)
                found |= bool(diffs)
                row.append(cell(diffs, scale, 0))
            rows.append(row)
    parts.append(
        "### FedSynSAM ablations (top-k 1 % + EF, α = 0.1, seeds 0–2): variant − default\n\n"
        + _table(["variant (default: 10 per class, refresh every 10, client ε)"] + [m[1] for m in METRICS], rows)
    )
    if not found:
        return None
    base = [results.get("alpha0.1", "fedavg", "topk", s) for s in SUB_SEEDS]
    base = [r for r in base if "lambda_max" in r]
    baseline = None
    if base:
        baseline = (
            statistics.fmean(100 * r["mean_test_acc_last5"] for r in base),
            statistics.fmean(r["lambda_max"] for r in base),
        )
    plot_sweep(points, baseline, dest / "rho_sweep.png")
    text = "\n\n".join(parts) + "\n"
    (dest / "sweep.md").write_text(text)
    return text


# The estimate table's rows: (label, grid, algorithm, the estimate's key in the run's summary)
ESTIMATE_ROWS = [
    ("FedLESAM: −u^{t−1}", "estimate", "fedlesam", "eps"),
    ("FedSAM: a client's minibatch gradient", "estimate", "fedsam", "eps"),
    ("FedSynSAM, trajectory matching (first objective): ĝ", "estimate-trajectory", "fedsynsam", "synthetic"),
    ("FedSynSAM, gradient matching (default): ĝ", "estimate", "fedsynsam", "synthetic"),
    ("oracle: gradient matching to ∇F (diagnostic, not used)", "estimate", "fedsynsam", "oracle"),
]


def _median_cosines(results: Results, grid: str, a: str, c: str, key: str) -> dict[int, float]:
    """Seed -> the run's median cosine of estimate ``key`` over the rounds that measured it."""
    out = {}
    for s in MAIN_SEEDS:
        est = results.get(grid, a, c, s).get("estimate", {})
        if key in est:
            out[s] = est[key]["median"]
    return out


def _mean_interval(values: list[float]) -> str:
    if not values:
        return "not run"
    m, lo, hi = interval(values, 1.0)
    if math.isnan(lo):
        return f"{m:+.2f} (1 seed)"
    return f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] n={len(values)}"


def plot_estimate_rounds(out: Path, seed: int, compressor: str, path: Path) -> Path | None:
    """cos(estimate, ∇F(w^t)) against the round for one seed: each method's ε and the oracle's,
    from the runs' metrics under ``out`` (``None`` where those folders are absent)."""
    from fedsynsam.plots import plot_estimate

    runs = {}
    for label, grid, a, key in ESTIMATE_ROWS:
        metrics = out / grid / f"{a}-{compressor}-s{seed}" / "metrics.jsonl"
        if metrics.is_file():
            records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
            runs[label] = [
                {"round": r["round"], "estimate": {"eps": (r.get("estimate") or {}).get(key)}} for r in records
            ]
    return plot_estimate(runs, path) if runs else None


def _estimate_part(results: Results, dest: Path) -> str | None:
    """The estimate grids: how well each method's ε points along ∇F(w^t), and what the new
    default changes in accuracy and flatness (paired by seed with the alpha0.1 grid's runs)."""
    comps = ["topk", "none", "sign"]
    rows, found = [], False
    for label, grid, a, key in ESTIMATE_ROWS:
        cells = []
        for c in comps:
            values = list(_median_cosines(results, grid, a, c, key).values())
            found |= bool(values)
            cells.append(_mean_interval(values))
        rows.append([label] + cells)
    if not found:
        return None
    parts = [
        "### Estimate quality: median over rounds of cos(ε, ∇F(w^t)), mean over seeds [95 % interval]\n\n"
        + _table(["estimate (how ε's direction is formed)", "top-k 1 % + EF", "none", "sign + EF"], rows)
    ]
    rows = []
    for c in comps:
        syn = _median_cosines(results, "estimate", "fedsynsam", c, "synthetic")
        lesam = _median_cosines(results, "estimate", "fedlesam", c, "eps")
        sam = _median_cosines(results, "estimate", "fedsam", c, "eps")
        seeds = sorted(set(syn) & set(lesam) & set(sam))
        above = sum(syn[s] > max(lesam[s], sam[s]) for s in seeds)
        gap = [syn[s] - max(lesam[s], sam[s]) for s in seeds]
        lesam_none = _median_cosines(results, "estimate", "fedlesam", "none", "eps")
        claim2 = [lesam[s] - lesam_none[s] for s in sorted(set(lesam) & set(lesam_none))] if c != "none" else []
        rows.append(
            [
                c,
                f"{above}/{len(seeds)}" if seeds else "n/a",
                _mean_interval(gap),
                _mean_interval(claim2) if c != "none" else "—",
            ]
        )
    parts.append(
        "### Per seed\n\n"
        + _table(
            [
                "compressor",
                "seeds where FedSynSAM's ĝ beats FedLESAM's and FedSAM's ε",
                "ĝ − the better of the two",
                "claim 2: FedLESAM's cosine, compressed − none",
            ],
            rows,
        )
    )
    rows = []
    for c in comps:
        # the first objective's own runs with the diagnostic where they exist (5 seeds), else the main grid's
        trajectory = "estimate-trajectory" if c in _grid("estimate-trajectory").compressors else "alpha0.1"
        against = [
            (f"FedSynSAM (gradient) − FedAvg, both {c}", "alpha0.1", ("fedavg", c)),
            (f"FedSynSAM (gradient) − FedSynSAM (trajectory), both {c}", trajectory, ("fedsynsam", c)),
            (f"FedSynSAM (gradient) − FedLESAM, both {c}", "estimate", ("fedlesam", c)),
        ]
        if c != "none":  # "recovers": compressed FedSynSAM against uncompressed FedAvg
            against.append((f"FedSynSAM (gradient) {c} − FedAvg none", "alpha0.1", ("fedavg", "none")))
        for label, grid_b, run_b in against:
            row = [label]
            for key, _, scale in METRICS:
                diffs = paired(results, "estimate", ("fedsynsam", c), grid_b, run_b, key)
                row.append(cell(diffs, scale, +1 if key in ("mean_test_acc_last5", "valley_width") else -1))
            rows.append(row)
    parts.append(
        "### Claim 3 with the new default (paired by seed; FedAvg from the α = 0.1 main grid, trajectory "
        "matching from its estimate runs for top-k and none and from the main grid for sign; seeds "
        "agreeing: higher accuracy, flatter)\n\n"
        + _table(["paired difference: mean [95 % CI] seeds agreeing"] + [m[1] for m in METRICS], rows)
    )
    rows = []
    for label, grid in (("gradient matching (default)", "estimate"), ("trajectory matching", "estimate-trajectory")):
        for c in comps:
            timed = [r for r in (results.get(grid, "fedsynsam", c, s) for s in MAIN_SEEDS) if "timings" in r]
            if timed:  # shares within the process that finished each run (a resumed run's last part)
                t = [r["timings"] for r in timed]
                shares = [100 * x["distill"] / sum(v for k, v in x.items() if k != "diagnose") for x in t]
                down = [r["total_downlink_bytes"] / 1e6 for r in timed]
                rows.append(
                    [
                        label,
                        c,
                        str(len(timed)),
                        f"{min(shares):.0f}–{max(shares):.0f} %",
                        f"{statistics.fmean(down):.1f}",
                    ]
                )
    if rows:
        head = ["objective", "compressor", "runs", "distillation share of the run's time", "downlink MB per run"]
        parts.append("### FedSynSAM's server cost (diagnostic time excluded)\n\n" + _table(head, rows))
    candidates = HERE / "experiment-mnist" / "candidates.jsonl"  # estimate_candidates.py try, one per line
    if candidates.is_file():
        rows = []
        for line in candidates.read_text().splitlines():
            r = json.loads(line)
            floats = r["per_class"] * 10 * (28 * 28 + 10) + 1  # D_syn: images, label logits, log step
            rows.append(
                [r["objective"], r["compressor"], str(r["span"]), str(r["period"]), f"{r['first']}/{r['refresh']}",
                 str(r["per_class"]), f"{r['median']:+.3f} [{r['q1']:+.2f}, {r['q3']:+.2f}]",
                 f"{r['distill_seconds']:.0f}", f"{52 + 4 * floats:,}"]
            )  # fmt: skip
        head = ["objective", "compressor", "span M", "period", "iterations (first/refresh)", "per class",
                "median cos(ĝ, ∇F) [quartiles]", "distillation s (schedule)", "downlink B per refresh"]  # fmt: skip
        parts.append(
            "### Candidates, replayed offline on FedLESAM's seed-0 trajectory "
            "([`estimate_candidates.py`](../estimate_candidates.py))\n\n" + _table(head, sorted(rows))
        )
    for c in ("topk", "none"):
        plot_estimate_rounds(results.out, 0, c, dest / f"estimate_cosine_{c}.png")
    text = "\n\n".join(parts) + "\n"
    (dest / "estimate.md").write_text(text)
    return text


def report(results: Results, dest: Path) -> str:
    """Write what the finished runs support into ``dest``: ``claims.md`` / ``claims.png`` (the main
    grids), ``sweep.md`` / ``rho_sweep.png`` (the ρ sweep and the ablations) and ``estimate.md`` /
    ``estimate_cosine_*.png`` (the estimate grids; the plots need the runs' folders). A part with no
    finished run leaves its files as they are (say, after a fresh checkout whose records lack it)."""
    dest.mkdir(parents=True, exist_ok=True)
    texts = []
    for name, part in (
        ("claims.md", _main_grid_claims),
        ("sweep.md", _sweep_and_ablations),
        ("estimate.md", _estimate_part),
    ):
        text = part(results, dest)
        texts.append(text if text is not None else f"{name}: no finished run for it; {dest / name} is kept\n")
    return "\n".join(texts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--out", default="runs/mnist", help="folder of the runs")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one torch thread each)")
    parser.add_argument("--part", choices=PARTS, default="all", help="run: which runs (sub: the ρ sweep and ablations)")
    parser.add_argument("--records", default=str(RECORDS), help="the recorded summaries (JSON lines)")
    parser.add_argument("--dest", default=str(HERE / "experiment-mnist"), help="where report writes")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(Path(args.out), args.jobs, args.part, Path(args.records))
    else:
        print(report(Results(Path(args.out), Path(args.records)), Path(args.dest)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
