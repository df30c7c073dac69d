"""Desirability scores (docs/design.md, Alignment engine) of the available clients for every expert::

    D[r, j] = alpha·norm(F)[r, j] - beta·norm(U)[j] + eta·deficit[r] - kappa·pressure[r]

``norm`` is min-max scaling to [0, 1] (0 when constant): of the fitness over the scored rows, and of
the expert load over experts. ``deficit`` (fairness term, weight eta = ``fairness``) is how far a client is
behind its guaranteed participation share; ``pressure`` (deadline term, weight kappa = ``deadline``) is the
share of the round deadline its planned work would use plus its estimated chance of not replying. The
row terms change who wins an expert when expert capacities bind, not a client's own ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmoe.alignment import _checks
from fedmoe.alignment.fitness import FitnessTable

__all__ = ["Desirability", "DesirabilityConfig", "minmax"]


@dataclass(frozen=True)
class DesirabilityConfig:
    """Weights alpha, beta, fairness (eta), deadline (kappa): finite, >= 0, with alpha + beta > 0."""

    alpha: float = 1.0
    beta: float = 0.2
    fairness: float = 0.0
    deadline: float = 0.0

    def __post_init__(self):
        for name in ("alpha", "beta", "fairness", "deadline"):
            _checks.real(name, getattr(self, name), 0.0)
        if self.alpha + self.beta <= 0:
            raise ValueError("alpha and beta must not both be 0")


def minmax(x: np.ndarray) -> np.ndarray:
    """float64: ``(x - min) / (max - min)``, all zeros when ``x`` is constant or empty."""
    x = np.asarray(x, dtype=np.float64)
    if x.size == 0:
        return x.copy()
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


class Desirability:
    """Fills score buffers with ``D`` in place (no [n, E] temporaries)."""

    def __init__(self, config: DesirabilityConfig | None = None):
        config = DesirabilityConfig() if config is None else config
        if not isinstance(config, DesirabilityConfig):
            raise TypeError(f"config must be a DesirabilityConfig, got {type(config).__name__}")
        self.config = config

    def load_term(self, load: np.ndarray) -> np.ndarray:
        """float32 [E]: ``beta·norm(U)``."""
        return (self.config.beta * minmax(load)).astype(np.float32)

    def fill(self, out: np.ndarray, clients: np.ndarray, fitness: FitnessTable,
             load: np.ndarray | None = None, *, deficit: np.ndarray | None = None,
             pressure: np.ndarray | None = None) -> np.ndarray:
        """Write ``D`` for ``clients`` (int64 [n]) into ``out`` (float32 [n, E], C-contiguous) and return it.

        ``load`` (float [E]) None leaves the load term out (greedy; load-balanced applies it as it goes);
        ``deficit`` / ``pressure`` (float [n]) None leave that row term out.
        """
        n = out.shape[0]
        cfg = self.config
        fitness.fill(clients, out)
        if out.size == 0:
            return out
        t = torch.from_numpy(out)  # the passes below run on torch's threads, in place
        lo, hi = (float(x) for x in torch.aminmax(t))
        scale = cfg.alpha / (hi - lo) if hi > lo else 0.0
        row = np.full(n, -scale * lo)
        if deficit is not None:
            row += cfg.fairness * deficit
        if pressure is not None:
            row -= cfg.deadline * pressure
        torch.add(torch.from_numpy(row.astype(np.float32))[:, None], t, alpha=scale, out=t)
        if load is not None:
            t -= torch.from_numpy(self.load_term(load))
        return out
