"""PNG plots (matplotlib, Agg backend): accuracy vs round and vs cumulative uplink bytes."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_runs"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_runs(runs: dict[str, list[dict]], out_dir: str | Path, prefix: str = "") -> list[Path]:
    """One line per run on each chart. ``runs``: label -> the run's per-round records.

    Writes ``{prefix}accuracy_vs_round.png`` and ``{prefix}accuracy_vs_bytes.png``; returns their paths.
    """
    plt = _pyplot()
    out_dir = Path(out_dir)
    paths = []
    for xkey, fname, xlabel in (
        ("round", "accuracy_vs_round.png", "round"),
        ("bytes", "accuracy_vs_bytes.png", "cumulative uplink bytes (all clients)"),
    ):
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for label, records in runs.items():
            xs, ys, cum = [], [], 0
            for r in records:
                cum += r["uplink_bytes"]
                if r.get("test_acc") is None:
                    continue
                xs.append(r["round"] if xkey == "round" else cum)
                ys.append(r["test_acc"])
            ax.plot(xs, ys, label=label, linewidth=1.4)
        if xkey == "bytes":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"{prefix}{fname}"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths
