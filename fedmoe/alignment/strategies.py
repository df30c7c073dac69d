"""Alignment strategies (docs/design.md, Alignment engine): which available clients train which experts
this round.

One interface: ``make_strategy(config, seed).assign(RoundState(...)) -> AlignmentResult`` (the chosen
pairs and the scores behind them). Strategies by name:

* ``random``: each client's experts uniformly at random (seeded by the strategy's seed and the round).
* ``greedy``: each client's top-c experts by fitness.
* ``load-balanced`` (the paper's): top-c by desirability ``alpha·norm(F) - beta·norm(U)``, the load being
  updated with each client's expected contribution (its sample count) as experts are handed out. Clients
  go in a seeded random order, in batches of ``batch_size`` that share one load snapshot (1 = strictly
  sequential; the default ``E / (2·max_experts)`` hands out at most half a client per expert on average
  per batch, and makes N = 100,000 a few hundred vectorised steps instead of 100,000 Python ones).
* ``optimal``: the exact capacity-constrained assignment (``fedmoe_kernels.assign``) on desirability, with
  expert capacities ``ceil(slack·Σ client capacities / E)``. Capacities count clients while the load counts
  contributions (samples); the default slack 1.1 leaves the load term room to steer contributions
  towards lighter experts (at slack 1 every expert is full and that term cannot move anyone).
* ``deadline-aware``: ``optimal``, with no client given more experts than its profile says it can train
  and transfer before the round deadline (after the safety margin).
* ``fair``: ``deadline-aware`` (``optimal`` without a deadline) plus a participation guarantee: a client
  that would otherwise fall below ``min_share`` of its available rounds over the last ``window`` rounds
  gets at least one expert, deadline notwithstanding (if one fits in its memory and is not forbidden);
  the fairness term of desirability favours such clients when expert capacities bind.

Every strategy caps a client at ``min(max_experts, experts that fit in its memory)`` and never uses a
forbidden pair. Only the available clients are scored, into one float32 buffer reused across rounds.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

import fedmoe_kernels
from fedmoe.alignment import _checks
from fedmoe.alignment._select import top_per_row
from fedmoe.alignment.desirability import Desirability, DesirabilityConfig
from fedmoe.alignment.fitness import FitnessTable
from fedmoe.alignment.load import ExpertLoad
from fedmoe.alignment.profiles import ClientProfile

__all__ = ["STRATEGIES", "AlignmentConfig", "AlignmentResult", "RoundState", "Strategy", "make_strategy"]

STRATEGIES: dict[str, type[Strategy]] = {}


@dataclass(frozen=True)
class AlignmentConfig:
    """The ``[alignment]`` section. strategy: a key of :data:`STRATEGIES`; max_experts (c) >= 0: experts
    per client at most; desirability: :class:`DesirabilityConfig` (or a dict of its fields), the
    ``[alignment.desirability]`` table; expert_slack >= 1 (optimal, fair, deadline-aware); batch_size >= 0
    (load-balanced, 0 = auto); min_share in [0, 1] and window >= 1 (fair); candidates >= 1 (solver speed
    knob)."""

    strategy: str = "load-balanced"
    max_experts: int = 4
    desirability: DesirabilityConfig = field(default_factory=DesirabilityConfig)
    expert_slack: float = 1.1
    batch_size: int = 0
    min_share: float = 0.5
    window: int = 10
    candidates: int = 8

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {self.strategy!r}")
        if isinstance(self.desirability, dict):
            object.__setattr__(self, "desirability", DesirabilityConfig(**self.desirability))
        if not isinstance(self.desirability, DesirabilityConfig):
            kind = type(self.desirability).__name__
            raise TypeError(f"desirability must be a DesirabilityConfig or dict, got {kind}")
        _checks.integer("max_experts", self.max_experts, 0)
        _checks.real("expert_slack", self.expert_slack, 1.0)
        _checks.integer("batch_size", self.batch_size, 0)
        _checks.real("min_share", self.min_share, 0.0, 1.0)
        _checks.integer("window", self.window, 1)
        _checks.integer("candidates", self.candidates, 1)


@dataclass
class RoundState:
    """What a strategy sees: ``round`` (>= 0), ``available`` client ids (distinct; stored sorted, int64),
    the fitness table, expert load and capacity profiles of all N clients, the round ``deadline`` in
    seconds (or None), and ``forbidden`` pairs ``(clients, experts)`` (int arrays of global ids) or None."""

    round: int
    available: np.ndarray
    fitness: FitnessTable
    load: ExpertLoad
    profiles: ClientProfile
    deadline: float | None = None
    forbidden: tuple[np.ndarray, np.ndarray] | None = None

    def __post_init__(self):
        _checks.integer("round", self.round, 0)
        for name, cls in (("fitness", FitnessTable), ("load", ExpertLoad), ("profiles", ClientProfile)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name} must be a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        n, e = self.fitness.num_clients, self.fitness.num_experts
        if self.load.num_experts != e:
            raise ValueError(f"load has {self.load.num_experts} experts, fitness has {e}")
        if self.profiles.num_clients != n:
            raise ValueError(f"profiles has {self.profiles.num_clients} clients, fitness has {n}")
        available = _checks.indices("available", self.available, n)
        self.available = np.unique(available)
        if self.available.size != available.size:
            raise ValueError("available must not repeat a client")
        if self.deadline is not None:
            self.deadline = _checks.real("deadline", self.deadline, 0.0, lo_open=True)
        if self.forbidden is not None:
            if not isinstance(self.forbidden, tuple) or len(self.forbidden) != 2:
                raise TypeError("forbidden must be a (clients, experts) tuple of int arrays")
            clients = _checks.indices("forbidden clients", self.forbidden[0], n)
            experts = _checks.indices("forbidden experts", self.forbidden[1], e)
            if clients.shape != experts.shape:
                raise ValueError("forbidden clients and experts must have the same length")
            self.forbidden = (clients, experts)


@dataclass(frozen=True)
class AlignmentResult:
    """``clients``/``experts``: int64 [K], the chosen pairs (global ids), sorted by client then expert;
    ``pair_scores``: float32 [K], each pair's score when chosen; ``scores``: float32 [n, E], the scores of
    every scored client (row ``r`` is client ``scored_clients[r]``), a view of the strategy's buffer that
    its next :meth:`Strategy.assign` overwrites (copy it to keep it); ``experts_per_client``: int64 [n], the
    cap of each row; ``clients_per_expert``: int64 [E] or None (uncapped)."""

    clients: np.ndarray
    experts: np.ndarray
    pair_scores: np.ndarray
    scored_clients: np.ndarray
    scores: np.ndarray
    experts_per_client: np.ndarray
    clients_per_expert: np.ndarray | None

    def __len__(self) -> int:
        return int(self.clients.size)

    def experts_of(self, client: int) -> np.ndarray:
        """int64: the experts assigned to ``client`` (empty if none)."""
        lo, hi = np.searchsorted(self.clients, [client, client + 1])
        return self.experts[lo:hi]

    def to_dict(self) -> dict[int, list[int]]:
        """``{client: [experts]}`` for clients with at least one expert."""
        ids, starts = np.unique(self.clients, return_index=True)
        return {int(c): e.tolist() for c, e in zip(ids, np.split(self.experts, starts[1:]), strict=True)}


class Strategy(ABC):
    """Base of all strategies. Subclasses set ``name`` and implement :meth:`_select`; ``seed`` (>= 0) keys
    their random draws."""

    name: ClassVar[str]

    def __init__(self, config: AlignmentConfig | None = None, seed: int = 0):
        config = AlignmentConfig(strategy=self.name) if config is None else config
        if not isinstance(config, AlignmentConfig):
            raise TypeError(f"config must be an AlignmentConfig, got {type(config).__name__}")
        if config.strategy != self.name:
            raise ValueError(f"config.strategy is {config.strategy!r}, this strategy is {self.name!r}")
        self.config = config
        self.seed = _checks.integer("seed", seed, 0)
        self.desirability = Desirability(config.desirability)
        self._buffer = np.zeros((0, 0), dtype=np.float32)

    def assign(self, state: RoundState) -> AlignmentResult:
        """Choose this round's pairs for ``state.available``."""
        if not isinstance(state, RoundState):
            raise TypeError(f"state must be a RoundState, got {type(state).__name__}")
        budget = self.experts_per_client(state)
        scores = self._scores(state.available.size, state.fitness.num_experts)
        scored, rows, experts, values, clients_per_expert = self._select(state, scores, budget)
        clients = scored[rows]
        key = clients * scores.shape[1] + experts
        if key.size > 1 and np.any(key[1:] < key[:-1]):
            order = np.argsort(key)
            clients, experts, values = clients[order], experts[order], values[order]
        if scored is not state.available:
            budget = budget[np.searchsorted(state.available, scored)]
        return AlignmentResult(clients, experts, values, scored, scores, budget, clients_per_expert)

    def experts_per_client(self, state: RoundState) -> np.ndarray:
        """int64 [n]: most experts per available client: ``min(max_experts, experts that fit in memory)``."""
        fit = state.profiles.experts_fit(state.available)
        return np.minimum(fit, min(self.config.max_experts, state.fitness.num_experts))

    def state_dict(self) -> dict:
        """Plain arrays and scalars to checkpoint (none for stateless strategies)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"{self.name} keeps no state, got keys {sorted(state)}")

    @abstractmethod
    def _select(self, state: RoundState, scores: np.ndarray, capacity: np.ndarray):
        """Fill ``scores`` and choose pairs. Returns ``(scored_clients [n], rows [K] into scored_clients,
        experts [K], values float32 [K], clients_per_expert int64 [E] or None)``."""

    # ------------------------------------------------------------------ helpers for subclasses

    def _scores(self, n: int, e: int) -> np.ndarray:
        """float32 [n, E] view of the reused buffer (grown by 25% headroom when too small)."""
        if self._buffer.shape[1] != e or self._buffer.shape[0] < n:
            rows = n if self._buffer.shape[1] != e else max(n, int(1.25 * self._buffer.shape[0]))
            self._buffer = np.zeros(0, dtype=np.float32)  # release before allocating the new one
            self._buffer = np.empty((rows, e), dtype=np.float32)
        return self._buffer[:n]

    def _rng(self, state: RoundState) -> np.random.Generator:
        return np.random.default_rng([self.seed, state.round])

    @staticmethod
    def _forbid(state: RoundState, scores: np.ndarray, scored: np.ndarray) -> None:
        """Set ``-inf`` at forbidden pairs of scored clients (rows of ``scores`` follow ``scored``)."""
        if state.forbidden is None or scored.size == 0:
            return
        clients, experts = state.forbidden
        sorter = np.argsort(scored, kind="stable")
        pos = np.minimum(np.searchsorted(scored, clients, sorter=sorter), scored.size - 1)
        rows = sorter[pos]
        hit = scored[rows] == clients
        scores[rows[hit], experts[hit]] = -np.inf


def _register(cls: type[Strategy]) -> type[Strategy]:
    STRATEGIES[cls.name] = cls
    return cls


@_register
class RandomStrategy(Strategy):
    name = "random"

    def _select(self, state, scores, capacity):
        self._rng(state).random(out=scores, dtype=np.float32)
        self._forbid(state, scores, state.available)
        return state.available, *top_per_row(scores, capacity), None


@_register
class GreedyStrategy(Strategy):
    name = "greedy"
    _by_fitness = Desirability(DesirabilityConfig(alpha=1.0, beta=0.0))

    def _select(self, state, scores, capacity):
        self._by_fitness.fill(scores, state.available, state.fitness)
        self._forbid(state, scores, state.available)
        return state.available, *top_per_row(scores, capacity), None


@_register
class LoadBalancedStrategy(Strategy):
    name = "load-balanced"

    def _select(self, state, scores, capacity):
        n, e = scores.shape
        order = self._rng(state).permutation(n)
        scored, capacity = state.available[order], capacity[order]
        self.desirability.fill(scores, scored, state.fitness)
        self._forbid(state, scores, scored)
        contribution = state.profiles.samples[scored]
        running = state.load.config.decay * state.load.load  # the load after this round if all contribute
        batch = self.config.batch_size or max(1, e // (2 * max(self.config.max_experts, 1)))
        picked = []
        for s in range(0, n, batch):
            block = scores[s:s + batch]
            block -= self.desirability.load_term(running)  # the scores this batch is judged by
            rows, experts, values = top_per_row(block, capacity[s:s + batch])
            running += np.bincount(experts, weights=contribution[s + rows], minlength=e)
            picked.append((rows + s, experts, values))
        if not picked:
            return scored, *top_per_row(scores, capacity), None
        rows, experts, values = (np.concatenate(parts) for parts in zip(*picked, strict=True))
        return scored, rows, experts, values, None


@_register
class OptimalStrategy(Strategy):
    name = "optimal"

    def __init__(self, config: AlignmentConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        # Last round's expert prices plus its load term: subtracting this round's load term gives the warm
        # start (a column shift of the scores shifts that column's price by the same amount; a shift of
        # all prices changes nothing, so they are moved to a minimum of 0 rather than clipped there).
        self._prices: np.ndarray | None = None

    def _select(self, state, scores, capacity):
        avail = state.available
        pressure = None
        if state.deadline is not None and self.config.desirability.deadline > 0:
            planned = state.profiles.round_time(capacity, avail) * (1 + state.profiles.config.safety_margin)
            pressure = planned / state.deadline + (1 - state.profiles.reliability_estimate[avail])
        self.desirability.fill(scores, avail, state.fitness, state.load.load,
                               deficit=self._deficit(state), pressure=pressure)
        self._forbid(state, scores, avail)
        e = scores.shape[1]
        clients_per_expert = np.full(e, math.ceil(self.config.expert_slack * int(capacity.sum()) / e),
                                     np.int64)
        column = self.desirability.load_term(state.load.load)
        warm = None
        if self._prices is not None and self._prices.shape == (e,) and e > 0:
            warm = self._prices - column
            warm -= warm.min()
        solution = fedmoe_kernels.assign(scores, capacity, clients_per_expert, warm_start=warm,
                                         candidates=self.config.candidates)
        self._prices = solution.certificate.expert_price + column
        values = scores[solution.clients, solution.experts]
        return avail, solution.clients, solution.experts, values, clients_per_expert

    def _deficit(self, state: RoundState) -> np.ndarray | None:
        return None

    def state_dict(self) -> dict:
        return {} if self._prices is None else {"prices": self._prices.copy()}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"prices"}
        if unknown:
            raise ValueError(f"unexpected state keys {sorted(unknown)}")
        prices = None
        if "prices" in state:
            prices = _checks.state_array(state, "prices", None, np.float64)
            _checks.floats("state['prices']", prices, (prices.size,))
        self._prices = prices


@_register
class DeadlineAwareStrategy(OptimalStrategy):
    name = "deadline-aware"

    def experts_per_client(self, state):
        if state.deadline is None:
            raise ValueError("state.deadline is required by the deadline-aware strategy")
        within = state.profiles.experts_within(state.deadline, state.available)
        return np.minimum(super().experts_per_client(state), within)


@_register
class FairStrategy(OptimalStrategy):
    name = "fair"

    def __init__(self, config: AlignmentConfig | None = None, seed: int = 0):
        super().__init__(config, seed)
        # [window, N] flags per round, in slot round % window
        self._was_available = np.zeros((self.config.window, 0), dtype=bool)
        self._participated = np.zeros((self.config.window, 0), dtype=bool)
        self._last_round = -1
        self._share = np.zeros(0)  # this round: participation share of each available client

    def assign(self, state):
        if not isinstance(state, RoundState):
            raise TypeError(f"state must be a RoundState, got {type(state).__name__}")
        self._open_round(state)
        result = super().assign(state)
        slot = state.round % self.config.window
        self._was_available[slot, state.available] = True
        self._participated[slot, result.clients] = True
        self._last_round = max(self._last_round, state.round)
        return result

    def _open_round(self, state: RoundState) -> None:
        """Clear the slots of the rounds since the last one and compute the share of the available clients
        over the previous ``window - 1`` rounds, counting this round as available and not yet served."""
        w, n = self.config.window, state.fitness.num_clients
        if self._was_available.shape[1] != n:
            self._was_available = np.zeros((w, n), dtype=bool)
            self._participated = np.zeros((w, n), dtype=bool)
        for r in range(max(self._last_round + 1, state.round - w + 1), state.round + 1):
            self._was_available[r % w] = False
            self._participated[r % w] = False
        slot = state.round % w
        self._was_available[slot] = False
        self._participated[slot] = False
        avail = state.available
        self._share = self._participated[:, avail].sum(0) / (self._was_available[:, avail].sum(0) + 1.0)

    def experts_per_client(self, state):
        base = super().experts_per_client(state)
        if state.deadline is not None:
            base = np.minimum(base, state.profiles.experts_within(state.deadline, state.available))
        due = self._share < self.config.min_share
        fits = np.minimum(state.profiles.experts_fit(state.available), self.config.max_experts) >= 1
        return np.where(due & fits, np.maximum(base, 1), base)

    def _deficit(self, state):
        if self.config.min_share == 0:
            return None
        return np.maximum(self.config.min_share - self._share, 0) / self.config.min_share

    def state_dict(self) -> dict:
        return {**super().state_dict(), "was_available": self._was_available.copy(),
                "participated": self._participated.copy(), "last_round": self._last_round}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        was = _checks.state_array(state, "was_available", None, bool)
        if was.ndim != 2 or was.shape[0] != self.config.window:
            raise ValueError(f"state['was_available'] must have shape ({self.config.window}, N), "
                             f"got {was.shape}")
        participated = _checks.state_array(state, "participated", was.shape, bool)
        last_round = _checks.integer("state['last_round']", state.pop("last_round", -1), -1)
        for key in ("was_available", "participated"):
            state.pop(key)
        super().load_state_dict(state)  # checks the rest before anything here is replaced
        self._was_available, self._participated, self._last_round = was, participated, last_round


def make_strategy(config: AlignmentConfig | dict | str, seed: int = 0) -> Strategy:
    """A strategy from its config, a dict of config fields, or just its name; ``seed`` keys its random
    draws."""
    if isinstance(config, str):
        config = AlignmentConfig(strategy=config)
    elif isinstance(config, dict):
        config = AlignmentConfig(**config)
    elif not isinstance(config, AlignmentConfig):
        raise TypeError(f"config must be an AlignmentConfig, dict or str, got {type(config).__name__}")
    return STRATEGIES[config.strategy](config, seed)
