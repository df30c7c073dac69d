"""Expert load ``U[E]`` (docs/design.md, Alignment engine): decayed training contributions and
participating clients per expert.

Each :meth:`ExpertLoad.update` (one per round) does ``U <- gamma·U + Σ contributions`` and
``clients <- gamma·clients + #pairs`` per expert, and stamps the experts that were trained.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from fedmoe.alignment import _checks

__all__ = ["ExpertLoad", "LoadConfig", "LoadStats", "gini"]


@dataclass(frozen=True)
class LoadConfig:
    """decay (gamma) in (0, 1]: per-round factor on past load; starved_after (W) >= 1: an expert not trained
    for more than W rounds counts as starved."""

    decay: float = 0.9
    starved_after: int = 10

    def __post_init__(self):
        _checks.real("decay (gamma)", self.decay, 0.0, 1.0, lo_open=True)
        _checks.integer("starved_after (W)", self.starved_after, 1)


@dataclass(frozen=True)
class LoadStats:
    """Balance of the decayed load: coefficient of variation (std/mean), max/mean, Gini coefficient (all 0
    while no load has been recorded), experts never trained, experts not trained for more than W rounds."""

    cv: float
    max_over_mean: float
    gini: float
    never_trained: int
    starved: int

    def as_dict(self) -> dict:
        return asdict(self)


def gini(x: np.ndarray) -> float:
    """Gini coefficient of non-negative values (0: all equal; 0 for an all-zero vector)."""
    x = np.sort(np.asarray(x, dtype=np.float64))
    total = x.sum()
    if x.size == 0 or total <= 0:
        return 0.0
    ranks = np.arange(1, x.size + 1)
    return float(np.sum((2 * ranks - x.size - 1) * x) / (x.size * total))


class ExpertLoad:
    """``load`` (float64 [E], decayed contributions), ``clients`` (float64 [E], decayed pair counts),
    ``last_trained`` (int64 [E], round of the last update that trained the expert, -1 never);
    ``round`` counts updates."""

    def __init__(self, num_experts: int, config: LoadConfig | None = None):
        self.num_experts = _checks.integer("num_experts", num_experts, 1)
        config = LoadConfig() if config is None else config
        if not isinstance(config, LoadConfig):
            raise TypeError(f"config must be a LoadConfig, got {type(config).__name__}")
        self.config = config
        self.load = np.zeros(self.num_experts)
        self.clients = np.zeros(self.num_experts)
        self.last_trained = np.full(self.num_experts, -1, dtype=np.int64)
        self.round = 0

    def update(self, experts, contributions) -> None:
        """Record one round: ``experts`` int [K] (one entry per trained client-expert pair) with
        ``contributions`` float [K] >= 0 (e.g. samples trained)."""
        experts = _checks.indices("experts", experts, self.num_experts)
        contributions = _checks.floats("contributions", contributions, experts.shape, nonnegative=True)
        gamma = self.config.decay
        self.load *= gamma
        self.load += np.bincount(experts, weights=contributions, minlength=self.num_experts)
        self.clients *= gamma
        self.clients += np.bincount(experts, minlength=self.num_experts)
        self.last_trained[experts] = self.round
        self.round += 1

    def stats(self) -> LoadStats:
        mean = self.load.mean()
        never = int(np.count_nonzero(self.last_trained < 0))
        starved = int(np.count_nonzero(self.round - 1 - self.last_trained > self.config.starved_after))
        if mean <= 0:
            return LoadStats(0.0, 0.0, 0.0, never, starved)
        cv, peak = float(self.load.std() / mean), float(self.load.max() / mean)
        return LoadStats(cv, peak, gini(self.load), never, starved)

    def state_dict(self) -> dict:
        return {"round": self.round, "load": self.load.copy(), "clients": self.clients.copy(),
                "last_trained": self.last_trained.copy()}

    def load_state_dict(self, state: dict) -> None:
        e = (self.num_experts,)
        round_ = _checks.integer("state['round']", int(state.get("round", -1)), 0)
        load = _checks.state_array(state, "load", e, np.float64)
        clients = _checks.state_array(state, "clients", e, np.float64)
        last_trained = _checks.state_array(state, "last_trained", e, np.int64)
        self.round, self.load, self.clients, self.last_trained = round_, load, clients, last_trained
