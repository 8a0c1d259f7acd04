"""PNG plots (matplotlib, Agg backend): accuracy vs round and vs cumulative uplink bytes."""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_runs", "plot_dp", "plot_landscape_1d", "plot_landscape_2d", "plot_bars", "plot_estimate"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)
    return Path(path)


def _finish_lines(fig, ax, path: str | Path) -> Path:
    """A line chart's grid and legend, then :func:`_save`."""
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


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
        paths.append(_finish_lines(fig, ax, out_dir / f"{prefix}{fname}"))
    return paths


def plot_estimate(runs: dict[str, list[dict]], path: str | Path, keys=("eps",)) -> Path | None:
    """Cosine with grad F(w^t) of each estimate in ``keys`` (:data:`fedsynsam.estimate.ESTIMATES`)
    against the round, one line per run and key (records of runs with ``diagnose = "estimate"``;
    ``runs``: label -> records). Writes ``path``; ``None`` (nothing written) if none measured it."""
    points = {
        f"{label} {key}".strip() if len(keys) > 1 else label: [
            (r["round"], r["estimate"][key]) for r in records if (r.get("estimate") or {}).get(key) is not None
        ]
        for label, records in runs.items()
        for key in keys
    }
    points = {label: p for label, p in points.items() if p}
    if not points:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, p in points.items():
        ax.plot([x for x, _ in p], [y for _, y in p], label=label, linewidth=1.2)
    ax.axhline(0, color="0.5", linewidth=0.8)
    ax.set_ylim(-1, 1)
    ax.set_xlabel("round")
    ax.set_ylabel("cosine with ∇F(w^t)" if len(keys) > 1 else "cos(ε direction, ∇F(w^t))")
    return _finish_lines(fig, ax, path)


def plot_dp(runs: dict[str, list[dict]], out_dir: str | Path, prefix: str = "") -> Path:
    """Data-parallel runs (``fedsynsam dp`` records), one line per run on each of three panels:
    test accuracy, training loss and the workers' spread against the SGD step. Writes
    ``{prefix}dp_curves.png``; returns its path."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("test_acc", "test accuracy of the average"), ("train_loss", "training loss"), ("spread", "spread"))
    # labels "method/compressor": a colour per method, a line style per compressor
    heads = list(dict.fromkeys(name.split("/")[0] for name in runs))
    tails = list(dict.fromkeys(name.split("/", 1)[-1] for name in runs))
    styles = ("-", "--", ":", "-.")
    for ax, (key, label) in zip(axes, panels):
        for name, records in runs.items():
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points:
                color = f"C{heads.index(name.split('/')[0]) % 10}"
                style = styles[tails.index(name.split("/", 1)[-1]) % len(styles)]
                ax.plot(*zip(*points), label=name, color=color, linestyle=style)
        ax.set_xlabel("SGD step (per worker)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[2].set_ylabel("mean ||x_i - x̄|| before a synchronisation")
    axes[0].legend(fontsize=8)
    return _save(fig, Path(out_dir) / f"{prefix}dp_curves.png")


def plot_landscape_1d(curves: dict, path: str | Path) -> Path:
    """Loss along a filter-normalised direction, one curve per label: ``{label: (alphas, losses)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, (alphas, losses) in curves.items():
        ax.plot(alphas.tolist(), losses.tolist(), label=label, linewidth=1.4)
    ax.set_xlabel("step along a filter-normalised random direction")
    ax.set_ylabel("training loss")
    return _finish_lines(fig, ax, path)


def plot_landscape_2d(alphas, grid, path: str | Path, title: str = "") -> Path:
    """Contour plot of the loss over two filter-normalised directions."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 4.4), dpi=120)
    a = alphas.tolist()
    levels = sorted(set(float(v) for v in _contour_levels(grid)))
    cs = ax.contour(a, a, grid.T.tolist(), levels=levels if len(levels) > 1 else 10, cmap="viridis")
    ax.clabel(cs, fontsize=6, fmt="%.2f")
    ax.plot([0], [0], "r+", markersize=10)
    ax.set_xlabel("direction 1")
    ax.set_ylabel("direction 2")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def _contour_levels(grid, count: int = 12):
    """Contour levels spread over the loss values (so sharp and flat runs both show rings)."""
    import torch

    flat = grid.flatten().float()
    return torch.quantile(flat, torch.linspace(0.02, 0.98, count)).tolist()


def plot_bars(values: dict[str, tuple[float, float]], path: str | Path, ylabel: str) -> Path:
    """Bar chart with error bars: ``{label: (mean, std)}``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.55 * len(values)), 4.2), dpi=120)
    labels = list(values)
    ax.bar(range(len(labels)), [values[k][0] for k in labels], yerr=[values[k][1] for k in labels], capsize=3)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)
