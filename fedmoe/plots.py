"""Plots of federated runs (matplotlib, Agg): accuracy per round per strategy with a band over seeds, and
a heatmap of where the training went (share of routed training samples per expert per round)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

__all__ = ["plot_accuracy", "plot_load_heatmap"]


def plot_accuracy(results: Mapping[str, Sequence[dict]], path, *, target: float | None = None,
                  title: str = "Test accuracy per round") -> Path:
    """One line per strategy (mean over its runs) with a min-max band over the runs (seeds).

    ``results``: strategy -> results JSONs of its runs (their ``rounds[*].accuracy``)."""
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for name, runs in results.items():
        length = min(len(r["rounds"]) for r in runs)
        acc = np.array([[rec["accuracy"] for rec in r["rounds"][:length]] for r in runs])
        x = np.arange(1, length + 1)
        (line,) = ax.plot(x, acc.mean(0), label=f"{name} (n={len(runs)})")
        ax.fill_between(x, acc.min(0), acc.max(0), color=line.get_color(), alpha=0.2, linewidth=0)
    if target is not None:
        ax.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    ax.set(xlabel="round", ylabel="test accuracy", title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
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


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
