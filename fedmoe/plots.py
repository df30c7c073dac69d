"""Plots of federated runs (matplotlib, Agg): accuracy per round per strategy with a band over seeds, a
heatmap of where the training went (share of routed training samples per expert per round), and
heatmaps of a sensitivity sweep's metrics over each pair of its axes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import itertools

import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_accuracy", "plot_curves", "plot_load_heatmap", "plot_sweep"]


def plot_accuracy(results: Mapping[str, Sequence[dict]], path, *, target: float | None = None,
                  title: str = "Test accuracy per round") -> Path:
    """One line per strategy (mean over its runs) with a min-max band over the runs (seeds).

    ``results``: strategy -> results JSONs of its runs (their ``rounds[*].accuracy``)."""
    curves = {name: [[rec["accuracy"] for rec in r["rounds"]] for r in runs]
              for name, runs in results.items()}
    return plot_curves(curves, path, ylabel="test accuracy", title=title, hline=target,
                       hline_label=None if target is None else f"target {target:g}")


def plot_curves(curves: Mapping[str, Sequence[Sequence[float]]], path, *, ylabel: str, title: str,
                hline: float | None = None, hline_label: str | None = None, vline: float | None = None,
                vline_label: str | None = None, legend: str = "lower right") -> Path:
    """One line per name: the mean over its runs of a per-round quantity (``curves[name]``: one sequence
    per run, cut to the shortest), with a min-max band over the runs; optional horizontal and vertical
    marker lines."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for name, runs in curves.items():
        length = min(len(r) for r in runs)
        values = np.array([r[:length] for r in runs], dtype=np.float64)
        x = np.arange(1, length + 1)
        (line,) = ax.plot(x, values.mean(0), label=f"{name} (n={len(runs)})")
        ax.fill_between(x, values.min(0), values.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    if hline is not None:
        ax.axhline(hline, color="grey", linestyle=":", linewidth=1, label=hline_label)
    if vline is not None:
        ax.axvline(vline, color="black", linestyle="--", linewidth=1, label=vline_label)
    ax.set(xlabel="round", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend, fontsize=8)
    return _save(fig, path)


def plot_load_heatmap(results: Mapping[str, dict], path, *, title: str = "Expert load") -> Path:
    """Per strategy (one run each), the share of each round's routed training samples that each expert
    received (experts x rounds)."""
    shares = {}
    for name, result in results.items():
        samples = np.array([rec["expert_samples"] for rec in result["rounds"]], dtype=np.float64)
        shares[name] = samples / np.maximum(samples.sum(1, keepdims=True), 1)
    top = max((s.max(initial=0) for s in shares.values()), default=0) or 1
    fig, axes = plt.subplots(len(shares), 1, figsize=(8, 1.2 + 1.6 * len(shares)), squeeze=False,
                             sharex=True, layout="constrained")
    image = None
    for ax, (name, share) in zip(axes[:, 0], shares.items(), strict=True):
        image = ax.imshow(share.T, aspect="auto", origin="lower", cmap="viridis", vmin=0, vmax=top,
                          extent=(0.5, share.shape[0] + 0.5, -0.5, share.shape[1] - 0.5),
                          interpolation="nearest")
        ax.set_ylabel(f"{name}\nexpert")
    axes[-1, 0].set_xlabel("round")
    fig.suptitle(f"{title}: share of routed training samples per expert")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), shrink=0.9, label="share")
    return _save(fig, path)


def plot_sweep(summary: Mapping, metric: str, path, *, label: str | None = None) -> Path:
    """Heatmaps of one metric of a sweep summary (:func:`fedmoe.federated.sweep.run_sweep`): one panel per
    pair of axes (a single row for a one-axis sweep), each cell the mean over seeds and over the other
    axes' values. For ``rounds_to_target`` a seed that never reached the target counts as ``rounds + 1``."""
    axes = summary["axes"]
    shape = tuple(len(a["values"]) for a in axes)
    censored = summary["base"]["federation"]["rounds"] + 1
    means = []
    for point in summary["points"]:
        values = [censored if v is None and metric == "rounds_to_target" else v
                  for v in point[metric]["values"]]
        known = [v for v in values if v is not None]
        means.append(np.mean(known) if known else np.nan)
    grid = np.array(means, dtype=np.float64).reshape(shape)
    pairs = list(itertools.combinations(range(len(axes)), 2)) or [(0,)]
    fig, panels = plt.subplots(1, len(pairs), figsize=(4.2 * len(pairs) + 0.8, 3.8), squeeze=False,
                               layout="constrained")
    finite = grid[np.isfinite(grid)]
    lo, hi = (finite.min(), finite.max()) if finite.size else (0.0, 1.0)
    image = None
    for ax, pair in zip(panels[0], pairs, strict=True):
        other = tuple(i for i in range(len(axes)) if i not in pair)
        cells = np.nanmean(grid, axis=other) if other else grid
        cells = cells[None] if len(pair) == 1 else cells.T  # rows: second axis (or one row), columns: first
        image = ax.imshow(cells, origin="lower", cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
        for (r, c), v in np.ndenumerate(cells):
            ax.text(c, r, f"{v:.3g}", ha="center", va="center", fontsize=8,
                    color="white" if v < (lo + hi) / 2 else "black")
        ax.set_xticks(range(shape[pair[0]]), axes[pair[0]]["values"])
        ax.set_xlabel(axes[pair[0]]["label"])
        if len(pair) == 2:
            ax.set_yticks(range(shape[pair[1]]), axes[pair[1]]["values"])
            ax.set_ylabel(axes[pair[1]]["label"])
        else:
            ax.set_yticks([])
    fig.colorbar(image, ax=panels[0].tolist(), shrink=0.9)
    seeds = len(summary["seeds"])
    fig.suptitle(f"{label or metric}: mean over {seeds} seed{'s' * (seeds > 1)} and the other axes")
    return _save(fig, path)


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
