"""Client profiles (docs/design.md, Alignment engine): what each client can hold, train and transfer in a
round.

Cost model of a round in which client ``i`` trains ``k`` experts (:class:`ModelCost` gives the sizes)::

    time_i(k) = scale_i · [ 2·latency_i + 2·(base_bytes + k·expert_bytes) / bandwidth_i
                            + epochs·samples_i·(base_flops + k·expert_flops) / compute_i ]

(download and upload of the shared model and the assigned experts, then local training). ``scale_i``
starts at 1 (the self-reported profile) and follows the observed round times (an EMA of
observed / predicted), so ``time_i`` blends self-report and measurement. Experts that fit in memory:
``floor((memory_i / (1 + margin) - base_bytes) / expert_bytes)``, but at least 1 where one fits without
the margin (a margin must not shut a client out); plans use ``(1 + margin)·time_i``.
Reliability starts at the self-reported value and follows the observed reply rate (EMA).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedmoe.alignment import _checks

__all__ = ["DEFAULT_TIERS", "ClientProfile", "ModelCost", "ProfileConfig", "Tier", "generate_profiles"]


@dataclass(frozen=True)
class ModelCost:
    """Sizes of the model a client trains: bytes of the shared part (backbone + gate) and of one expert
    (training footprint = transfer size), training FLOPs per sample of each, local epochs per round."""

    base_bytes: float = 50e6
    expert_bytes: float = 10e6
    base_flops: float = 1e9
    expert_flops: float = 0.5e9
    epochs: float = 1.0

    def __post_init__(self):
        _checks.real("base_bytes", self.base_bytes, 0.0)
        _checks.real("expert_bytes", self.expert_bytes, 0.0, lo_open=True)
        _checks.real("base_flops", self.base_flops, 0.0)
        _checks.real("expert_flops", self.expert_flops, 0.0)
        _checks.real("epochs", self.epochs, 0.0, lo_open=True)


@dataclass(frozen=True)
class ProfileConfig:
    """safety_margin >= 0: plans use time·(1 + margin) and memory/(1 + margin); ema in [0, 1]: weight on
    history when estimating the time scale and reliability from observations (1: never learn, plan with
    the self-reported profiles only)."""

    safety_margin: float = 0.2
    ema: float = 0.7

    def __post_init__(self):
        _checks.real("safety_margin", self.safety_margin, 0.0)
        _checks.real("ema", self.ema, 0.0, 1.0)


_REPORTED = ("compute", "memory", "bandwidth", "latency", "reliability", "samples")
_ESTIMATED = ("time_scale", "reliability_estimate")


class ClientProfile:
    """Per-client arrays (float64 [N]): ``compute`` (FLOP/s), ``memory`` (bytes), ``bandwidth`` (bytes/s),
    ``latency`` (s), ``reliability`` (self-reported probability of replying), ``samples`` (local training
    samples); ``tier`` (int64 [N], -1 if unknown). Estimated state: ``time_scale`` and
    ``reliability_estimate`` (float64 [N])."""

    def __init__(self, compute, memory, bandwidth, latency, reliability, samples, *,
                 model: ModelCost | None = None, config: ProfileConfig | None = None, tier=None):
        n = np.asarray(compute).shape[:1]
        if len(n) != 1:
            raise ValueError(f"compute must be 1-D, got shape {np.asarray(compute).shape}")
        self.compute = _checks.floats("compute", compute, n)
        self.memory = _checks.floats("memory", memory, n, nonnegative=True)
        self.bandwidth = _checks.floats("bandwidth", bandwidth, n)
        self.latency = _checks.floats("latency", latency, n, nonnegative=True)
        self.reliability = _checks.floats("reliability", reliability, n, nonnegative=True)
        self.samples = _checks.floats("samples", samples, n, nonnegative=True)
        for name in ("compute", "bandwidth"):
            if n[0] and getattr(self, name).min() <= 0:
                raise ValueError(f"{name} must be positive")
        if n[0] and self.reliability.max() > 1:
            raise ValueError("reliability must lie in [0, 1]")
        tier = np.full(n, -1, np.int64) if tier is None else np.asarray(tier)
        if tier.shape != n:
            raise ValueError(f"tier must have shape {n}, got {tier.shape}")
        self.tier = _checks.indices("tier", tier + 1, 2**31) - 1  # -1 = unknown
        self.model = ModelCost() if model is None else model
        self.config = ProfileConfig() if config is None else config
        if not isinstance(self.model, ModelCost):
            raise TypeError(f"model must be a ModelCost, got {type(self.model).__name__}")
        if not isinstance(self.config, ProfileConfig):
            raise TypeError(f"config must be a ProfileConfig, got {type(self.config).__name__}")
        self.time_scale = np.ones(n)
        self.reliability_estimate = self.reliability.copy()

    @property
    def num_clients(self) -> int:
        return int(self.compute.shape[0])

    def _clients(self, clients) -> np.ndarray | slice:
        return slice(None) if clients is None else _checks.indices("clients", clients, self.num_clients)

    def _time_terms(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled ``(a, b)`` with ``time(k) = a + b·k`` (seconds)."""
        m = self.model
        work = m.epochs * self.samples[idx] / self.compute[idx]
        a = 2 * self.latency[idx] + 2 * m.base_bytes / self.bandwidth[idx] + work * m.base_flops
        b = 2 * m.expert_bytes / self.bandwidth[idx] + work * m.expert_flops
        return a, b

    def experts_fit(self, clients=None) -> np.ndarray:
        """int64: how many experts fit in memory next to the shared model after the safety margin, but at
        least 1 where one fits without it (the margin never shuts a client out)."""
        idx = self._clients(clients)
        bare = np.floor((self.memory[idx] - self.model.base_bytes) / self.model.expert_bytes)
        margined = np.floor((self.memory[idx] / (1 + self.config.safety_margin) - self.model.base_bytes)
                            / self.model.expert_bytes)
        return np.maximum(margined, np.minimum(bare, 1)).clip(0).astype(np.int64)

    def round_time(self, num_experts, clients=None) -> np.ndarray:
        """float64 seconds: estimated round time with ``num_experts`` (scalar or per client) experts."""
        idx = self._clients(clients)
        a, b = self._time_terms(idx)
        return self.time_scale[idx] * (a + b * np.asarray(num_experts, dtype=np.float64))

    def experts_within(self, deadline: float, clients=None) -> np.ndarray:
        """int64: most experts with ``(1 + margin)·round_time <= deadline`` (0 if even none fit)."""
        deadline = _checks.real("deadline", deadline, 0.0, lo_open=True)
        idx = self._clients(clients)
        a, b = self._time_terms(idx)
        budget = deadline / ((1 + self.config.safety_margin) * self.time_scale[idx])
        return np.clip(np.floor((budget - a) / b), 0, 2**31).astype(np.int64)  # b > 0: experts have a size

    def observe(self, clients, num_experts, seconds) -> None:
        """Record replies of one round: ``clients`` int [K] (distinct), ``num_experts`` int [K] they trained,
        ``seconds`` float [K] measured round time, NaN where the client never replied."""
        clients = _checks.indices("clients", clients, self.num_clients)
        if np.unique(clients).size != clients.size:
            raise ValueError("clients must be distinct")
        k = _checks.floats("num_experts", num_experts, clients.shape, nonnegative=True)
        seconds = np.asarray(seconds, dtype=np.float64)
        if seconds.shape != clients.shape:
            raise ValueError(f"seconds must have shape {clients.shape}, got {seconds.shape}")
        replied = ~np.isnan(seconds)
        if np.any(seconds[replied] <= 0) or not np.all(np.isfinite(seconds[replied])):
            raise ValueError("seconds must be positive and finite, or NaN for no reply")
        lam = self.config.ema
        self.reliability_estimate[clients] = lam * self.reliability_estimate[clients] + (1 - lam) * replied
        c = clients[replied]
        a, b = self._time_terms(c)
        ratio = seconds[replied] / (a + b * k[replied])
        self.time_scale[c] = lam * self.time_scale[c] + (1 - lam) * ratio

    def state_dict(self) -> dict:
        """The reported profiles and the estimates, as plain arrays (model and config are configuration)."""
        return {name: getattr(self, name).copy() for name in (*_REPORTED, "tier", *_ESTIMATED)}

    def load_state_dict(self, state: dict) -> None:
        n = (self.num_clients,)
        for name in (*_REPORTED, "tier", *_ESTIMATED):
            _checks.state_array(state, name, n, np.float64)  # presence and shape
        fresh = ClientProfile(**{name: state[name] for name in _REPORTED}, model=self.model,
                                config=self.config, tier=np.asarray(state["tier"]))
        scale = _checks.floats("state['time_scale']", state["time_scale"], n)
        rel = _checks.floats("state['reliability_estimate']", state["reliability_estimate"], n)
        if not (np.all(scale > 0) and np.all((rel >= 0) & (rel <= 1))):
            raise ValueError("state time_scale must be positive and reliability_estimate in [0, 1]")
        fresh.time_scale, fresh.reliability_estimate = scale.copy(), rel.copy()
        self.__dict__.update(fresh.__dict__)


@dataclass(frozen=True)
class Tier:
    """A class of devices for simulation: share of the population and median profile values; each value
    is drawn log-normally around its median with log-std ``spread`` (reliability is fixed per tier)."""

    name: str
    fraction: float
    compute: float
    memory: float
    bandwidth: float
    latency: float
    reliability: float
    samples: float
    spread: float = 0.3

    def __post_init__(self):
        _checks.real("fraction", self.fraction, 0.0, 1.0)
        for name in ("compute", "memory", "bandwidth", "latency", "samples"):
            _checks.real(name, getattr(self, name), 0.0, lo_open=True)
        _checks.real("reliability", self.reliability, 0.0, 1.0)
        _checks.real("spread", self.spread, 0.0)


DEFAULT_TIERS = (
    Tier("high", 0.2, compute=2e12, memory=8e9, bandwidth=50e6, latency=0.02, reliability=0.98, samples=600),
    Tier("mid", 0.5, compute=5e11, memory=2e9, bandwidth=10e6, latency=0.05, reliability=0.95, samples=400),
    Tier("low", 0.3, compute=1e11, memory=1e8, bandwidth=1.5e6, latency=0.2, reliability=0.85, samples=200),
)


def generate_profiles(num_clients: int, tiers=DEFAULT_TIERS, *, seed: int = 0,
                      model: ModelCost | None = None, config: ProfileConfig | None = None) -> ClientProfile:
    """Heterogeneous profiles: ``round(fraction·N)`` clients per tier (fractions must sum to 1), shuffled;
    ``tier`` holds each client's index into ``tiers``. Same seed, same profiles."""
    num_clients = _checks.integer("num_clients", num_clients, 0)
    tiers = tuple(tiers)
    if not tiers or not all(isinstance(t, Tier) for t in tiers):
        raise TypeError("tiers must be a non-empty sequence of Tier")
    fractions = np.array([t.fraction for t in tiers])
    if abs(fractions.sum() - 1) > 1e-9:
        raise ValueError(f"tiers fractions must sum to 1, got {fractions.sum()}")
    rng = np.random.default_rng(seed)
    counts = np.diff(np.round(np.cumsum(np.concatenate([[0], fractions])) * num_clients).astype(np.int64))
    tier = rng.permutation(np.repeat(np.arange(len(tiers)), counts))
    fields = ("compute", "memory", "bandwidth", "latency", "samples")
    median = {f: np.array([getattr(t, f) for t in tiers])[tier] for f in fields}
    spread = np.array([t.spread for t in tiers])[tier]
    values = {f: median[f] * np.exp(spread * rng.standard_normal(num_clients)) for f in fields}
    values["samples"] = np.maximum(np.round(values["samples"]), 1)
    reliability = np.array([t.reliability for t in tiers])[tier]
    return ClientProfile(reliability=reliability, model=model, config=config, tier=tier, **values)
