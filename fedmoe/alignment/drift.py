"""Concept-drift handling for the fitness table: detect a jump in a client's feedback and let its fitness
row forget faster.

When a client's data changes (its label distribution shifts), its fitness row describes the old data: the
row goes stale and only fades at the normal decay. The detector watches each client's *surprise*: the
mean absolute difference between the feedback it reports for its trained pairs and the fitness those
pairs had just before (``|v - F|``; the federated server passes the feedback measured before local
training, with the received weights, since only that reacts to a change in the client's data). It keeps,
per client, EMAs of that surprise (``level``) and of its absolute deviation from the level (``spread``),
and fires when a report exceeds ``level + threshold·spread``, once the client has reported ``warmup``
times since it last fired (a one-sided test in the spirit of an EWMA control chart). A fired client's row
is pulled towards its prior: ``F <- prior + shrink·(F - prior)`` (``shrink = 0`` resets it;
``0 < shrink < 1`` is one step of much faster decay), before the round's EMA update adds the new
feedback. Or, where the caller passes a fresh gate affinity of the fired client (``rescore``: the mean
router probability of every expert on its current data, as for a cold start), the row is *re-scored*:
replaced by that affinity (:meth:`FitnessTable.cold_start`, which also resets the row's prior to the
affinity's mean), so that it describes the new data for every expert, including the ones the client does
not hold, whose fitness the feedback never touches. Its level and count restart, so it cannot fire again
until it has rebuilt its baseline. Works on any :class:`~fedmoe.alignment.fitness.FitnessTable` (dense or
lean).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedmoe.alignment import _checks
from fedmoe.alignment.fitness import FitnessTable

__all__ = ["DriftConfig", "DriftDetector"]


@dataclass(frozen=True)
class DriftConfig:
    """The ``[drift]`` section. threshold >= 0: fire when surprise > level + threshold·spread (0 = detector
    off); shrink in [0, 1): what is left of a fired row's deviation from its prior (0 = reset); warmup >= 2:
    reports needed before a client can fire; ema in [0, 1): weight on history of the level and spread;
    rescore: clients send the gate affinity to every expert with each update, and a fired client's row is
    replaced by it instead of shrunk (needs threshold > 0)."""

    threshold: float = 0.0
    shrink: float = 0.0
    warmup: int = 3
    ema: float = 0.7
    rescore: bool = False

    def __post_init__(self):
        _checks.real("threshold", self.threshold, 0.0)
        _checks.real("shrink", self.shrink, 0.0, 1.0, hi_open=True)
        _checks.integer("warmup", self.warmup, 2)
        _checks.real("ema", self.ema, 0.0, 1.0, hi_open=True)
        if _checks.boolean("rescore", self.rescore) and not self.threshold > 0:
            raise ValueError("rescore needs the drift detector on (threshold > 0)")

    @property
    def enabled(self) -> bool:
        return self.threshold > 0


class DriftDetector:
    """Per-client surprise ``level`` and ``spread`` (float64 [N]) and ``count`` (int64 [N], reports since
    the client last fired); call :meth:`step` once per round, before ``fitness.update``."""

    def __init__(self, num_clients: int, config: DriftConfig | None = None):
        self.num_clients = _checks.integer("num_clients", num_clients, 0)
        config = DriftConfig() if config is None else config
        if not isinstance(config, DriftConfig):
            raise TypeError(f"config must be a DriftConfig, got {type(config).__name__}")
        self.config = config
        self.level = np.zeros(self.num_clients)
        self.spread = np.zeros(self.num_clients)
        self.count = np.zeros(self.num_clients, dtype=np.int64)

    def observe(self, clients, surprise) -> np.ndarray:
        """Record one round's surprise of ``clients`` (int [n], distinct; float [n] >= 0); returns the
        clients that fired (int64, ascending; always empty while the detector is off)."""
        clients = _checks.indices("clients", clients, self.num_clients)
        if np.unique(clients).size != clients.size:
            raise ValueError("clients must be distinct")
        surprise = _checks.floats("surprise", surprise, clients.shape, nonnegative=True)
        cfg = self.config
        if not cfg.enabled:
            return np.zeros(0, dtype=np.int64)
        level, spread, count = self.level[clients], self.spread[clients], self.count[clients]
        fired = (count >= cfg.warmup) & (surprise > level + cfg.threshold * spread)
        # the first report sets the level, the second the spread; later ones blend in
        lam = cfg.ema
        deviation = np.abs(surprise - level)
        self.spread[clients] = np.select([count == 0, count == 1], [0.0, deviation],
                                         lam * spread + (1 - lam) * deviation)
        # written as a step towards the report, so that a constant series keeps its level exactly
        self.level[clients] = np.where(count == 0, surprise, level + (1 - lam) * (surprise - level))
        self.count[clients] = count + 1
        out = np.sort(clients[fired])
        self.level[out], self.spread[out], self.count[out] = 0.0, 0.0, 0
        return out

    def step(self, fitness: FitnessTable, clients, experts, values,
             rescore: Mapping[int, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Before ``fitness.update(clients, experts, values)``: compare the feedback with the current
        fitness, let the clients whose surprise jumped forget (see module docstring): a fired client found
        in ``rescore`` (client -> float [E] gate affinity on its current data) gets its row replaced by
        that affinity, any other fired client is shrunk towards its prior. Returns ``(fired clients,
        |values - fitness|)`` per pair (float64 [K])."""
        if not isinstance(fitness, FitnessTable):
            raise TypeError(f"fitness must be a FitnessTable, got {type(fitness).__name__}")
        if fitness.num_clients != self.num_clients:
            raise ValueError(f"fitness has {fitness.num_clients} clients, the detector {self.num_clients}")
        clients = _checks.indices("clients", clients, self.num_clients)
        values = _checks.floats("values", values, clients.shape)
        error = np.abs(values - fitness.get(clients, experts).astype(np.float64))
        reporting, inverse = np.unique(clients, return_inverse=True)
        surprise = np.bincount(inverse, weights=error) / np.bincount(inverse) if clients.size else error
        fired = self.observe(reporting, surprise)
        fresh = np.array([c for c in fired.tolist() if rescore is not None and c in rescore], dtype=np.int64)
        stale = np.setdiff1d(fired, fresh)
        if stale.size:
            fitness.shrink_rows(stale, self.config.shrink)
        if fresh.size:
            fitness.cold_start(fresh, np.stack([np.asarray(rescore[c], dtype=np.float64) for c in fresh]))
        return fired, error

    def state_dict(self) -> dict:
        return {"level": self.level.copy(), "spread": self.spread.copy(), "count": self.count.copy()}

    def load_state_dict(self, state: dict) -> None:
        n = (self.num_clients,)
        level = _checks.state_array(state, "level", n, np.float64)
        spread = _checks.state_array(state, "spread", n, np.float64)
        count = _checks.state_array(state, "count", n, np.int64)
        if not (np.all(np.isfinite(level)) and np.all(np.isfinite(spread)) and np.all(level >= 0)
                and np.all(spread >= 0) and np.all(count >= 0)):
            raise ValueError("state level and spread must be finite and >= 0, count >= 0")
        self.level, self.spread, self.count = level, spread, count
