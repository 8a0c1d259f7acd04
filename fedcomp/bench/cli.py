"""``fedcomp-bench`` (also ``python -m fedcomp.bench``): time fedcomp's ops at your sizes, dtypes
and backends, with achieved GB/s against this machine's measured bandwidth (the roofline).

Examples::

    fedcomp-bench                                     # every op, 1e4..1e7, fp32, auto vs composite
    fedcomp-bench topk_ef,sign_ef --sizes 1e6,1e8 --backends auto,reference,composite --json out.json
    fedcomp-bench --device cuda --backends cuda,triton,composite --plot roofline.png

Exit codes: 0 done; 2 bad arguments (an unknown op, backend or dtype, a backend that cannot
serve the device), with one line naming the choice and what is available.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys

import torch

from .cases import BACKENDS, CASES, DTYPES, Params
from .harness import Unavailable, run

SCHEMA_VERSION = 1


def format_table(header: list[str], rows: list[list[object]]) -> str:
    """A Markdown table (what docs/performance.md shows)."""
    cells = [header] + [[f"{c:.2f}" if isinstance(c, float) else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def _fmt(value, spec: str, missing: str = "–") -> str:
    return missing if value is None else format(value, spec)


def table(rows) -> str:
    """The rows as a Markdown table: times, GB/s and the fractions of the roofline."""
    header = [
        "op",
        "n",
        "dtype",
        "backend",
        "median ms",
        "min ms",
        "max ms",
        "Gelem/s",
        "GB/s",
        "of measured",
        "of nominal",
        "vs composite",
    ]
    body = [
        [
            r.op,
            f"{r.n:.0e}",
            r.dtype,
            r.backend,
            _fmt(r.median_ms, ".4g"),
            _fmt(r.min_ms, ".4g"),
            _fmt(r.max_ms, ".4g"),
            _fmt(r.elements_per_s / 1e9, ".3g"),
            _fmt(r.gbs, ".3g"),
            _fmt(r.fraction_of_measured, ".0%"),
            _fmt(r.fraction_of_nominal, ".0%"),
            "" if r.speedup_vs_composite is None else f"{r.speedup_vs_composite:.1f}x",
        ]
        for r in rows
    ]
    return format_table(header, body)


def to_json(header, rows, roofs, params: Params, fresh: bool) -> dict[str, object]:
    """The JSON document ``--json`` writes (``schema`` 1)."""
    return {
        "schema": SCHEMA_VERSION,
        "tool": "fedcomp-bench",
        "environment": header,
        "settings": {**params.__dict__, "fresh_inputs": fresh},
        "bandwidth": {str(n): roof for n, roof in roofs.items()},
        "rows": [r.as_dict() for r in rows],
    }


def write_csv(path: str, rows) -> None:
    fields = list(rows[0].as_dict()) if rows else []
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow(r.as_dict())


def plot(path: str, rows, roofs, header) -> None:
    """GB/s against size per backend, one panel per op, log-log, with the measured copy and add
    bandwidth of each size as the roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = [op for op in dict.fromkeys(r.op for r in rows) if any(r.gbs for r in rows if r.op == op)]
    if not ops:
        raise ValueError("no row has a traffic model to plot (pipelines only?)")
    cols = min(4, len(ops))
    nrows = -(-len(ops) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    sizes = sorted(roofs)
    for ax, op in zip(axes.flat, ops):
        ax.plot(sizes, [roofs[n]["add_gbs"] for n in sizes], "k--", lw=1, label="add (roofline)")
        ax.plot(sizes, [roofs[n]["copy_gbs"] for n in sizes], "k:", lw=1, label="copy")
        for backend, dtype in dict.fromkeys((r.backend, r.dtype) for r in rows if r.op == op):
            pts = sorted((r.n, r.gbs) for r in rows if r.op == op and r.backend == backend and r.dtype == dtype)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"{backend} {dtype}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_title(op, fontsize=9)
        ax.set_xlabel("entries n")
        ax.set_ylabel("GB/s (minimal traffic)")
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(ops) :]:
        ax.axis("off")
    where = header.get("gpu") or header.get("cpu")
    fig.suptitle(f"fedcomp-bench on {where}, {header.get('threads')} threads", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _choices(value: str, allowed, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError(f"{what} must name at least one of: {', '.join(allowed)}")
    for item in items:
        if item not in allowed:
            raise ValueError(
                f"unknown {what[:-1] if what.endswith('s') else what} {item!r}; available: {', '.join(allowed)}"
            )
    return items


def _sizes(value: str) -> list[int]:
    out = []
    for item in value.split(","):
        try:
            f = float(item)
        except ValueError:
            raise ValueError(f"--sizes takes numbers such as 1e4,1e6; got {item!r}") from None
        if f != int(f) or f < 1:
            raise ValueError(f"--sizes must be whole numbers >= 1; got {item!r}")
        out.append(int(f))
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="fedcomp-bench",
        description="Time fedcomp's ops and pipelines; report GB/s against the measured memory bandwidth.",
        epilog="ops: " + ", ".join(CASES),
    )
    ap.add_argument("ops", nargs="?", default="all", help="comma-separated ops (default: all)")
    ap.add_argument("--sizes", default="1e4,1e5,1e6,1e7", help="entries per tensor (per row), comma-separated")
    ap.add_argument("--dtypes", default="fp32", help=f"input dtypes: {', '.join(DTYPES)}")
    ap.add_argument("--backends", default="auto,composite", help=f"comma-separated: {', '.join(BACKENDS)}")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    ap.add_argument("--ratio", type=float, default=0.01, help="top-k / rand-k share of entries")
    ap.add_argument("--block", type=int, default=4096, help="sign block size")
    ap.add_argument("--levels", type=int, default=4, help="QSGD levels")
    ap.add_argument("--bucket", type=int, default=512, help="QSGD bucket size")
    ap.add_argument("--rows", type=int, default=10, help="clients / payloads of the batched and many-payload ops")
    ap.add_argument("--repeat", type=int, default=20, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed calls first")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--fresh-inputs", action="store_true", help="restore residuals / accumulators before each call")
    ap.add_argument("--json", help="write the rows and environment as JSON")
    ap.add_argument("--csv", help="write the rows as CSV")
    ap.add_argument("--plot", help="write a log-log GB/s plot with the roofline (PNG)")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")
    return ap


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        ops = list(CASES) if args.ops == "all" else _choices(args.ops, list(CASES), "ops")
        dtypes = _choices(args.dtypes, list(DTYPES), "dtypes")
        backends = _choices(args.backends, list(BACKENDS), "backends")
        sizes = _sizes(args.sizes)
        try:
            device = torch.device(args.device)
        except RuntimeError:
            raise ValueError(f"--device must be cpu or cuda[:N]; got {args.device!r}") from None
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"--device must be cpu or cuda[:N]; got {args.device!r}")
        for name, value, low in (("ratio", args.ratio, None), ("block", args.block, 1), ("levels", args.levels, 1),
                                 ("bucket", args.bucket, 1), ("rows", args.rows, 1), ("repeat", args.repeat, 1),
                                 ("warmup", args.warmup, 0), ("threads", args.threads, 1)):  # fmt: skip
            if name == "ratio" and not 0 < value <= 1:
                raise ValueError(f"--ratio must be in (0, 1]; got {value}")
            if low is not None and value is not None and value < low:
                raise ValueError(f"--{name} must be >= {low}; got {value}")
        if args.plot:
            if all(CASES[op].schema is None for op in ops):
                raise ValueError("--plot draws GB/s, which the pipelines do not have: add an op such as topk_ef")
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                raise ValueError("--plot needs matplotlib (pip install matplotlib)") from None
        if args.threads:
            torch.set_num_threads(args.threads)
        params = Params(ratio=args.ratio, block=args.block, levels=args.levels, bucket=args.bucket, rows=args.rows)
        progress = None if args.quiet else (lambda s: print(f"  {s}", file=sys.stderr, flush=True))
        header, rows, roofs = run(
            ops, sizes, dtypes, backends, device, params, repeat=args.repeat, warmup=args.warmup,
            fresh=args.fresh_inputs, progress=progress,
        )  # fmt: skip
    except (ValueError, Unavailable) as exc:
        print(f"fedcomp-bench: error: {exc}", file=sys.stderr)
        return 2
    where = header["gpu"] or header["cpu"]
    print(f"# fedcomp-bench: {where}, {header['threads']} threads, torch {header['torch']}, triton {header['triton']}")
    bw = ", ".join(f"{n:.0e}: copy {r['copy_gbs']:.3g} / add {r['add_gbs']:.3g} GB/s" for n, r in roofs.items())
    print(
        f"# measured bandwidth: {bw}"
        + (f"; nominal {header['gpu_nominal_gbs']:.0f} GB/s" if header["gpu_nominal_gbs"] else "")
    )
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(header, rows, roofs, params, args.fresh_inputs), f, indent=1)
    if args.csv:
        write_csv(args.csv, rows)
    if args.plot:
        plot(args.plot, rows, roofs, header)
    return 0
