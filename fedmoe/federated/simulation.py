"""Simulated heterogeneous clients: device tiers, true round times, availability, drop-outs and faults, on
top of one :class:`~fedmoe.federated.Node` per client.

Each client belongs to a tier (``tiers`` "heterogeneous": 20% high, 50% mid, 30% low; "uniform": one mid
tier; "unlimited": one tier in which every expert fits and every client replies) that sets the median of how
many experts fit in its memory next to the shared model, its compute (FLOP/s), bandwidth (bytes/s), latency
and reliability; values are drawn log-normally around the medians
(:func:`fedmoe.alignment.generate_profiles`), with at least one expert's memory for every client. Sizes and
FLOPs are the real ones of the model (:func:`model_cost`), so simulated times follow the bytes sent.

The server sees the self-reported profile. The true round time of a client training ``k`` experts is
that profile's prediction times a hidden per-client factor (log-normal, sigma 0.25: the self-report is
off) times a per-round jitter (log-normal, sigma 0.1). With ``profile_error = e`` the true time and the
true memory are further off by per-client factors drawn uniformly from [1 - e, 1 + e]; a client given more
experts than its true memory holds fails ("out of memory"). Each round a client is online with
probability ``availability``; an online client that was given work drops out mid-round (no reply) with
probability ``1 - reliability`` when ``dropout`` is on, and independently with probability
``dropout_rate``; its reply is corrupted (non-finite values) with probability ``corrupt``, and poisoned
with probability ``poison`` (a hostile client: finite values built to do harm, :data:`POISON_MODES`).

Drift: from round ``drift_round`` on (0 = never), a ``drift_fraction`` of the clients hold different data
of the same size: every label ``y`` of their partition becomes ``(y + shift) mod classes`` and the sample
is replaced by a random training sample of that class, so each such client's label distribution moves
while the population's stays about the same. The per-client shift is drawn among those that leave the
fewest samples on classes the client held before: the new label set is disjoint from the old one
wherever a shift allows it.

Every random draw comes from a generator keyed by (seed, round, client), so the simulation keeps no
state and a resumed run sees the same events.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from fedmoe.alignment import ClientProfile, ModelCost, ProfileConfig, Tier, _checks, generate_profiles
from fedmoe.data import Dataset, Samples
from fedmoe.federated.node import ClientPayload, ClientUpdate, Node
from fedmoe.models import FederatedMoE

__all__ = ["TIERS", "ClientReply", "Simulation", "SimulationConfig", "make_profiles", "model_cost"]

# name, share of clients, experts that fit in memory, compute FLOP/s, bandwidth bytes/s, latency s, P(reply)
TIERS = {
    "heterogeneous": (("high", 0.2, 8, 2e9, 2e6, 0.02, 0.98),
                      ("mid", 0.5, 4, 5e8, 5e5, 0.05, 0.95),
                      ("low", 0.3, 2, 1e8, 1e5, 0.2, 0.90)),
    "uniform": (("uniform", 1.0, 4, 5e8, 5e5, 0.05, 0.95),),
    "unlimited": (("unlimited", 1.0, 4096, 5e8, 5e5, 0.05, 1.0),),  # every expert fits, no client fails
}
_SPREAD = {"heterogeneous": 0.3, "uniform": 0.0, "unlimited": 0.0}
_HIDDEN_SIGMA, _JITTER_SIGMA = 0.25, 0.1
_ONLINE, _CLIENT, _HIDDEN, _ERROR, _DRIFT = 1, 2, 3, 4, 5  # random streams

POISON_MODES = {
    "scale": "every value x1e30, clamped to the dtype's finite range",
    "sign-flip": "the update's delta from the received values x-100",
    "inflate-samples": "the sample counts (local and per expert) x1e12",
}


@dataclass(frozen=True)
class SimulationConfig:
    """The ``[simulation]`` section (module docstring): ``tiers`` (heterogeneous | uniform | unlimited),
    ``availability`` (probability a client is online at a round), ``dropout`` (clients drop out mid-round
    with their tier's unreliability), ``dropout_rate`` (a further, independent probability of dropping
    out mid-round, for every client), ``corrupt`` (probability that a reply comes back with non-finite
    values; a fault drill), ``poison`` (probability that a reply comes back poisoned, as ``poison_mode``
    says: one of :data:`POISON_MODES`; an attack drill), ``profile_error`` (true speed and memory are the
    self-reported ones times a factor drawn from [1 - e, 1 + e]), ``drift_round`` (from this round on, a
    ``drift_fraction`` of the clients hold data with their labels shifted; 0 = no drift)."""

    tiers: str = "heterogeneous"
    availability: float = 1.0
    dropout: bool = True
    dropout_rate: float = 0.0
    corrupt: float = 0.0
    poison: float = 0.0
    poison_mode: str = "scale"
    profile_error: float = 0.0
    drift_round: int = 0
    drift_fraction: float = 0.5

    def __post_init__(self):
        if self.tiers not in TIERS:
            raise ValueError(f"tiers must be one of {list(TIERS)}, got {self.tiers!r}")
        _checks.real("availability", self.availability, 0.0, 1.0, lo_open=True)
        _checks.boolean("dropout", self.dropout)
        _checks.real("dropout_rate", self.dropout_rate, 0.0, 1.0, hi_open=True)
        _checks.real("corrupt", self.corrupt, 0.0, 1.0)
        _checks.real("poison", self.poison, 0.0, 1.0)
        if self.poison_mode not in POISON_MODES:
            raise ValueError(f"poison_mode must be one of {list(POISON_MODES)}, got {self.poison_mode!r}")
        _checks.real("profile_error", self.profile_error, 0.0, 1.0, hi_open=True)
        _checks.integer("drift_round", self.drift_round, 0)
        _checks.real("drift_fraction", self.drift_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class ClientReply:
    """What came back from one client: ``update`` (None if it never replied, or if its reply could not be
    parsed: ``malformed``), ``seconds`` after the round started when it arrived (NaN if never), ``error``
    (why there is no update, if known)."""

    client: int
    update: ClientUpdate | None
    seconds: float
    error: str | None = None
    malformed: bool = False


def model_cost(model: FederatedMoE, example: torch.Tensor, epochs: int) -> ModelCost:
    """Real sizes of ``model``: bytes of the shared part and of one expert; training FLOPs per sample (3x
    the forward FLOPs on zeros shaped like ``example`` [1, ...], one sample of the inputs, counted by
    torch) all on the shared part, since with top-k routing a sample costs the same however many experts
    a client holds."""
    shared = sum(p.numel() * p.element_size() for _, p in model.named_shared_parameters())
    expert = model.expert_bank.shape[1] * model.expert_bank.element_size()
    sample = torch.zeros_like(example)
    with torch.no_grad():
        model(sample)  # one-time capability checks (grouped_mm) run here, outside the count
        with FlopCounterMode(display=False) as counter:
            model(sample)
    return ModelCost(base_bytes=float(shared), expert_bytes=float(expert),
                     base_flops=3.0 * counter.get_total_flops(), expert_flops=0.0, epochs=float(epochs))


def make_profiles(samples: np.ndarray, cost: ModelCost, tiers: str, seed: int,
                  config: ProfileConfig | None = None) -> ClientProfile:
    """Self-reported profiles of ``len(samples)`` clients holding ``samples`` training samples each, drawn
    from the ``tiers`` preset; ``config`` is how the holder plans with them (memories are sized for the
    default safety margin)."""
    if tiers not in TIERS:
        raise ValueError(f"tiers must be one of {sorted(TIERS)}, got {tiers!r}")
    samples = np.asarray(samples, dtype=np.float64)
    margin = 1 + ProfileConfig().safety_margin

    def memory(experts: float) -> float:
        return (cost.base_bytes + (experts + 0.5) * cost.expert_bytes) * margin

    preset = [Tier(name, share, compute=compute, memory=memory(fit), bandwidth=bandwidth, latency=latency,
                   reliability=reliability, samples=max(float(samples.mean()), 1.0), spread=_SPREAD[tiers])
              for name, share, fit, compute, bandwidth, latency, reliability in TIERS[tiers]]
    drawn = generate_profiles(samples.size, preset, seed=seed, model=cost)
    return ClientProfile(drawn.compute, np.maximum(drawn.memory, memory(1)), drawn.bandwidth, drawn.latency,
                           drawn.reliability, samples, model=cost, config=config, tier=drawn.tier)


def poisoned(update: ClientUpdate, payload: ClientPayload, mode: str) -> ClientUpdate:
    """``update`` as a hostile client would send it instead (``mode``: a key of :data:`POISON_MODES`)."""
    if mode == "inflate-samples":
        fb = {f: dataclasses.replace(getattr(update, f), samples=getattr(update, f).samples * 1e12)
              for f in ("feedback", "feedback_before")}
        return dataclasses.replace(update, num_samples=update.num_samples * 10**12, **fb)
    if mode == "scale":
        big = torch.finfo(update.shared.dtype).max

        def harm(values, _):
            return (values * 1e30).clamp(-big, big)
    else:
        def harm(values, received):
            return received - 100 * (values - received)
    return dataclasses.replace(update, shared=harm(update.shared, payload.shared),
                               expert_rows=harm(update.expert_rows, payload.expert_rows))


class Simulation:
    """The clients of one run: their :class:`~fedmoe.federated.Node` runtimes (``nodes[c]`` trains client
    ``c``'s partition of ``dataset``), their true profiles (``truth``) and faults.

    ``run(payload, train)`` plays one client's round: drop-out, memory, true time,
    ``train(payload, data)`` with the client's data at that round (an exception there counts as the client
    dropping out), corruption.
    """

    def __init__(self, dataset: Dataset, parts: list[np.ndarray], nodes: list[Node], truth: ClientProfile,
                 config: SimulationConfig, seed: int):
        if not len(parts) == len(nodes) == truth.num_clients:
            raise ValueError(f"parts ({len(parts)}), nodes ({len(nodes)}) and truth ({truth.num_clients}) "
                             f"must count the same clients")
        self.config, self.seed = config, seed
        self.nodes, self.truth = nodes, truth
        n = truth.num_clients
        time_error, memory_error = 1 + config.profile_error * self._rng(_ERROR).uniform(-1, 1, (2, n))
        self.hidden = np.exp(_HIDDEN_SIGMA * self._rng(_HIDDEN).standard_normal(n)) * time_error
        cost = truth.model  # true memory holds this many experts next to the shared model (no margin)
        usable = truth.memory * memory_error - cost.base_bytes
        self.experts_fit = np.floor(usable / cost.expert_bytes).astype(np.int64)
        self.drifted = self._drift(dataset, parts) if config.drift_round else {}

    @property
    def num_clients(self) -> int:
        return len(self.nodes)

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _drift(self, dataset: Dataset, parts: list[np.ndarray]) -> dict[int, Samples]:
        """Client -> its data after the drift (see module docstring)."""
        rng = self._rng(_DRIFT)
        n, classes = len(parts), dataset.num_classes
        by_class = [np.flatnonzero(dataset.y_train == k) for k in range(classes)]
        drifted = {}
        for c in np.sort(rng.choice(n, size=round(self.config.drift_fraction * n), replace=False)):
            y = dataset.y_train[parts[c]]
            held = np.bincount(y, minlength=classes) > 0
            overlap = np.array([held[(y + s) % classes].sum() for s in range(1, classes)])
            labels = (y + 1 + rng.choice(np.flatnonzero(overlap == overlap.min()))) % classes
            idx = np.array([rng.choice(by_class[k]) for k in labels], dtype=np.int64)
            drifted[int(c)] = dataset.train_samples(idx)
        return drifted

    def data(self, client: int, round_: int) -> Samples:
        """The samples ``client`` trains on at round ``round_``."""
        if self.config.drift_round and round_ >= self.config.drift_round and client in self.drifted:
            return self.drifted[client]
        return self.nodes[client].data

    def expected_seconds(self, num_experts: int) -> np.ndarray:
        """float64 [N]: every client's true round time with ``num_experts`` experts, without the jitter."""
        return self.truth.round_time(num_experts) * self.hidden

    def online(self, round_: int) -> np.ndarray:
        """int64: the clients online at the start of round ``round_``, ascending."""
        up = self._rng(_ONLINE, round_).random(self.num_clients) < self.config.availability
        return np.flatnonzero(up)

    def true_seconds(self, round_: int, client: int, num_experts: int) -> float:
        """The time client ``client`` needs for round ``round_`` with ``num_experts`` experts."""
        jitter = np.exp(_JITTER_SIGMA * self._rng(_CLIENT, round_, client, 0).standard_normal())
        predicted = self.truth.round_time(num_experts, np.array([client]))[0]
        return float(predicted * self.hidden[client] * jitter)

    def run(self, payload: ClientPayload,
            train: Callable[[ClientPayload, Samples], ClientUpdate]) -> ClientReply:
        """Play one client's round (see class docstring)."""
        c = payload.client
        drop, corrupt, extra_drop, poison = self._rng(_CLIENT, payload.round, c, 1).random(4)
        cfg = self.config
        if (cfg.dropout and drop >= self.truth.reliability[c]) or extra_drop < cfg.dropout_rate:
            return ClientReply(c, None, float("nan"), "dropped out")
        if payload.experts.size > self.experts_fit[c]:
            return ClientReply(c, None, float("nan"), "out of memory")
        try:
            update = train(payload, self.data(c, payload.round))
        except Exception as exc:  # a failing client must not stop the run: it counts as dropped out
            return ClientReply(c, None, float("nan"), f"{type(exc).__name__}: {exc}")
        if corrupt < cfg.corrupt:
            update = dataclasses.replace(update, shared=torch.full_like(update.shared, float("nan")))
        if poison < cfg.poison:
            update = poisoned(update, payload, cfg.poison_mode)
        return ClientReply(c, update, self.true_seconds(payload.round, c, payload.experts.size))
