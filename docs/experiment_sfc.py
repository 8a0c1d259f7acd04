"""3SFC (and FedSynth) with the new and the former encoder, in the setting of its authors' code.

    python docs/experiment_sfc.py run       # both grids of docs/sfc.toml into runs/sfc, runs/sfc-adam
    python docs/experiment_sfc.py report    # docs/comparison/sfc_results.md, sfc_runs.jsonl, plot

The setting (docs/sfc.toml, issue 29): mnist5k, the 784-128-128-10 MLP, 10 clients on a
Dirichlet(1) partition, every client every round, 100 rounds, about 3.2 kB per client per round.
``run`` is restartable (finished runs are skipped, a stopped one resumes from its checkpoint).
``report`` records every finished run's numbers in ``docs/comparison/sfc_runs.jsonl`` (so the
tables survive without the run folders) and pairs runs by seed: mean difference, 95 % Student-t
interval and how many seeds agree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from experiment_mnist import _table, interval

HERE = Path(__file__).resolve().parent
CONFIG = HERE / "sfc.toml"
RECORDS = HERE / "comparison" / "sfc_runs.jsonl"
SEEDS = [0, 1, 2]
# (label, run folder, compressor): the rows, in table order
FORMER = [
    "--sfc-encoder",
    "adam",
    "--sfc-labels",
    "softmax",
    "--fedsynth-encoder",
    "adam",
    "--fedsynth-labels",
    "softmax",
]
GRIDS = {"sfc": ([], ["none", "topk", "3sfc", "fedsynth"]), "sfc-adam": (FORMER, ["3sfc", "fedsynth"])}
ROWS = [
    ("FedAvg, uncompressed", "sfc", "none"),
    ("top-k 0.33 % + EF", "sfc", "topk"),
    ("3SFC, L-BFGS, raw labels (new default)", "sfc", "3sfc"),
    ("3SFC, Adam, softmax labels (former default)", "sfc-adam", "3sfc"),
    ("FedSynth, L-BFGS, raw labels (new default)", "sfc", "fedsynth"),
    ("FedSynth, Adam, softmax labels (former default)", "sfc-adam", "fedsynth"),
]
# issue 29's measurement of the authors' code (e-3sfc, their 3SFC with error feedback), 3 seeds
AUTHORS = {"last5": 0.892, "mean": 0.786, "at25": 0.795}
PAIRS = [
    ("3SFC: new − former encoder", ("sfc", "3sfc"), ("sfc-adam", "3sfc")),
    ("3SFC (new) − top-k at matched bytes", ("sfc", "3sfc"), ("sfc", "topk")),
    ("FedSynth: new − former encoder", ("sfc", "fedsynth"), ("sfc-adam", "fedsynth")),
]
METRICS = [
    ("last5", "last-5 acc (pp)", 100),
    ("mean", "mean acc, rounds 1–100 (pp)", 100),
    ("at25", "acc at round 25 (pp)", 100),
]


def run(out: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, (extra, compressors) in GRIDS.items():
        cmd = [sys.executable, "-m", "fedsynsam", "compare", "--config", str(CONFIG), "--out", str(out / name)]
        subprocess.run([*cmd, "--compressors", ",".join(compressors), *extra], check=True, env=env)


def _numbers(run_dir: Path) -> dict | None:
    if not (run_dir / "summary.json").is_file():
        return None
    s = json.loads((run_dir / "summary.json").read_text())
    acc = [json.loads(line)["test_acc"] for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {
        "last5": s["mean_test_acc_last5"],
        "mean": statistics.fmean(acc),
        "at25": acc[24],
        "encode_cos": s.get("encode_cos_mean"),
        "seconds": s["seconds"],
        "bytes_per_client_round": s["total_uplink_bytes"] / (s["rounds"] * s["config"]["per_round"]),
        "accuracy": acc,
        "config": s["config"],
    }


def collect(out: Path, records: Path = RECORDS) -> dict:
    """``(grid, compressor, seed) -> numbers`` from the run folders, else from ``records``;
    rewrites ``records`` with everything found."""
    found = {}
    if records.is_file():
        for line in records.read_text().splitlines():
            r = json.loads(line)
            found[r["grid"], r["compressor"], r["seed"]] = r["numbers"]
    for grid, (_, compressors) in GRIDS.items():
        for c in compressors:
            for s in SEEDS:
                numbers = _numbers(out / grid / f"fedavg-{c}-s{s}")
                if numbers is not None:
                    found[grid, c, s] = numbers
    records.parent.mkdir(parents=True, exist_ok=True)
    lines = [
        json.dumps({"grid": g, "compressor": c, "seed": s, "numbers": n}) for (g, c, s), n in sorted(found.items())
    ]
    records.write_text("".join(line + "\n" for line in lines))
    return found


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 3) -> str:
    if not values:
        return "—"
    sd = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{statistics.fmean(values) * scale:.{digits}f} ± {sd:.{digits}f}"


def report(found: dict, dest: Path) -> str:
    rows = []
    for label, grid, c in ROWS:
        runs = [found[grid, c, s] for s in SEEDS if (grid, c, s) in found]
        cos = [r["encode_cos"] for r in runs if r["encode_cos"] is not None]
        rows.append(
            [label, str(len(runs))]
            + [_mean_std([r[k] for r in runs]) for k in ("last5", "mean", "at25")]
            + [_mean_std(cos) if cos else "—"]
            + [f"{statistics.fmean(r['bytes_per_client_round'] for r in runs):,.0f}" if runs else "—"]
            + [f"{statistics.fmean(r['seconds'] for r in runs):.0f}" if runs else "—"]
        )
    rows.append(
        ["authors' 3SFC with EF (issue 29, their code)", "3", *(f"{AUTHORS[k]:.3f}" for k in AUTHORS), "—"]
        + ["≈3.2k", "—"]
    )
    head = [
        "run",
        "seeds",
        "last-5 acc",
        "mean acc (rounds 1–100)",
        "acc at round 25",
        "encode cos",
        "bytes/client/round",
        "s/run",
    ]
    text = "mean ± std over the seeds that finished\n\n" + _table(head, rows)
    pair_rows = []
    for label, a, b in PAIRS:
        cells = [label]
        for key, _, scale in METRICS:
            diffs = [found[(*a, s)][key] - found[(*b, s)][key] for s in SEEDS if (*a, s) in found and (*b, s) in found]
            if len(diffs) < 2:
                cells.append("—")
                continue
            m, lo, hi = interval(diffs, scale)
            cells.append(f"{m:+.2f} [{lo:+.2f}, {hi:+.2f}] {sum(d > 0 for d in diffs)}/{len(diffs)}")
        pair_rows.append(cells)
    text += "\n\nPaired by seed: mean difference [95 % interval], seeds where it is > 0\n\n"
    text += _table(["pair"] + [m[1] for m in METRICS], pair_rows)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "sfc_results.md").write_text(text + "\n")
    _plot(found, dest / "sfc_accuracy_vs_round.png")
    return text


def _plot(found: dict, path: Path) -> None:
    from fedsynsam.plots import _pyplot

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, grid, c in ROWS:
        curves = [found[grid, c, s]["accuracy"] for s in SEEDS if (grid, c, s) in found]
        if curves:
            mean = [statistics.fmean(v) for v in zip(*curves)]
            ax.plot(range(1, len(mean) + 1), mean, label=f"{label} (n={len(curves)})", lw=1.2)
    ax.axhline(AUTHORS["last5"], color="k", ls=":", lw=0.8, label="authors' 3SFC, last-5 (issue 29)")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy (mean over seeds)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=6.5, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["run", "report"])
    parser.add_argument("--out", type=Path, default=Path("runs"), help="folder holding the grids' run folders")
    parser.add_argument("--dest", type=Path, default=HERE / "comparison", help="where report writes")
    parser.add_argument("--records", type=Path, default=RECORDS, help="the recorded numbers (JSON lines)")
    args = parser.parse_args(argv)
    if args.command == "run":
        run(args.out)
    print(report(collect(args.out, args.records), args.dest))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
