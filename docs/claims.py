"""Paired analysis of the claims experiment (docs/experiment.md).

    python docs/claims.py runs/experiment > docs/claims_table.md

Every comparison pairs runs with the same seed (the seed fixes the Dirichlet partition,
the initial model and the client sampling), and reports the mean paired difference with
its standard error over seeds (std / sqrt(seeds)) and the number of seeds where the
difference has the claimed sign.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path

METRICS = (
    ("acc", "mean_test_acc_last5", "last-5-round test accuracy"),
    ("lam", "lambda_max", "λ_max"),
    ("trace", "hessian_trace", "Hessian trace"),
    ("width", "valley_width", "valley width"),
)


def load(out: Path) -> dict:
    runs = {}
    for summary in out.glob("*/summary.json"):
        s = json.loads(summary.read_text())
        c = s["config"]
        runs[(c["algorithm"], c["compressor"], c["seed"])] = s
    return runs


def paired(runs, a, b, key):
    """a - b per seed, for the seeds where both exist."""
    seeds = sorted({s for (_, _, s) in runs})
    return [runs[(*a, s)][key] - runs[(*b, s)][key] for s in seeds if (*a, s) in runs and (*b, s) in runs]


def fmt(diffs, scale=1.0, digits=2):
    m = statistics.fmean(diffs) * scale
    se = (statistics.stdev(diffs) / math.sqrt(len(diffs)) * scale) if len(diffs) > 1 else float("nan")
    pos = sum(d > 0 for d in diffs)
    return f"{m:+.{digits}f} ± {se:.{digits}f} ({pos}/{len(diffs)} > 0)"


def main(out: str) -> None:
    runs = load(Path(out))
    rows = []

    def row(label, a, b):
        cells = [label]
        for short, key, _ in METRICS:
            diffs = paired(runs, a, b, key)
            scale = 100.0 if short == "acc" else 1.0
            cells.append(fmt(diffs, scale, 2 if short != "width" else 3) if diffs else "n/a")
        rows.append(cells)

    for comp in ("topk", "sign"):
        row(f"claim 1: FedAvg {comp} − FedAvg none", ("fedavg", comp), ("fedavg", "none"))
    for comp in ("none", "topk", "sign"):
        row(f"claim 2: FedLESAM − FedAvg, both {comp}", ("fedlesam", comp), ("fedavg", comp))
    for comp in ("topk", "sign"):
        row(f"claim 3: FedSynSAM − FedAvg, both {comp}", ("fedsynsam", comp), ("fedavg", comp))
        row(f"claim 3: FedSynSAM − FedLESAM, both {comp}", ("fedsynsam", comp), ("fedlesam", comp))
        row(f"claim 3: FedSynSAM {comp} − FedAvg none", ("fedsynsam", comp), ("fedavg", "none"))
    for comp in ("none", "topk", "sign"):
        row(f"reference: FedSAM − FedAvg, both {comp}", ("fedsam", comp), ("fedavg", comp))
    head = ["paired difference (mean ± s.e. over seeds)"] + [
        f"{label}{' (pp)' if s == 'acc' else ''}" for s, _, label in METRICS
    ]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/experiment")
