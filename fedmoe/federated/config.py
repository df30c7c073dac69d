"""The configuration of one federated experiment: one flat, validated dataclass (also the TOML schema)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass

from fedmoe.alignment import (
    STRATEGIES,
    DesirabilityConfig,
    DriftConfig,
    FitnessConfig,
    LoadConfig,
    ProfileConfig,
    StrategyConfig,
    _checks,
)
from fedmoe.data import PARTITIONS
from fedmoe.federated.client import TrainConfig

__all__ = ["CAPACITIES", "FITNESS_SIGNALS", "FederatedConfig"]

CAPACITIES = ("heterogeneous", "uniform")
FITNESS_SIGNALS = ("after", "before")


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a run; same config and seed, same result.

    Data: ``data`` ("digits", a CIFAR-10 python directory or an ``.npz``), ``test_fraction`` (random test
    split where the data has none), ``partition`` (dirichlet | shards | iid) with ``dirichlet_alpha``,
    ``shards_per_client``, ``min_samples`` per client.
    Federation: ``num_clients``, ``clients_per_round`` (sampled from the online clients; 0 = all),
    ``rounds``, ``seed``.
    Model (:class:`fedmoe.models.MoEClassifier`): ``num_experts``, ``top_k``, ``d_model``, ``d_hidden``,
    ``channels``.
    Local training: ``local_epochs``, ``batch_size``, SGD ``lr`` and ``momentum``, ``aux_loss`` (weight of
    the load-balancing loss).
    Alignment: ``strategy`` (a name of :data:`fedmoe.alignment.STRATEGIES`), ``max_experts`` per client,
    desirability weights ``fit_weight`` (alpha) and ``load_weight`` (beta), ``fitness_ema``,
    ``fitness_decay``, ``load_decay``, ``cold_start`` (score all experts with the initial gate first),
    ``fitness_signal`` (the feedback the fitness EMA follows: measured "after" local training, or "before"
    it with the received weights);
    drift handling (:class:`fedmoe.alignment.DriftConfig`, on the feedback measured before training):
    ``drift_threshold`` (0 = off) and
    ``drift_shrink`` (0 = a fired client's fitness row is reset), ``drift_rescore`` (clients send the gate
    affinity to every expert on their current data with each update, and a fired client's row is replaced
    by it instead of shrunk; needs ``drift_threshold > 0``); capacity profiles
    (:class:`fedmoe.alignment.ProfileConfig`): ``safety_margin`` and ``profile_ema`` (1 = plan with the
    self-reported profiles only, never learn from observed round times).
    Simulation: ``capacity`` (heterogeneous tiers | uniform), ``deadline`` (simulated seconds per round, or
    None), ``availability`` (probability a client is online at a round), ``dropout`` (clients drop out
    mid-round with their tier's unreliability), ``dropout_rate`` (a further, independent probability of
    dropping out mid-round, for every client), ``corrupt`` (probability that a reply comes back with
    non-finite values; a fault drill), ``capacity_error`` (each client's true speed and memory are its
    self-reported ones times a factor drawn from [1 - e, 1 + e]; a client given more experts than truly fit
    fails), ``drift_round`` (from this round on, a ``drift_fraction`` of the clients hold data with their
    labels permuted; 0 = no drift). ``target_accuracy``: for rounds-to-target. ``eval_aligned``: also
    record each round's ``aligned_accuracy`` (see :meth:`fedmoe.federated.FederatedRun.aligned_accuracy`;
    one test-set pass per distinct assignment).
    """

    data: str = "digits"
    test_fraction: float = 0.2
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    min_samples: int = 8
    num_clients: int = 20
    clients_per_round: int = 10
    rounds: int = 30
    seed: int = 0
    num_experts: int = 8
    top_k: int = 2
    d_model: int = 32
    d_hidden: int = 64
    channels: tuple[int, ...] = (16, 32)
    local_epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.9
    aux_loss: float = 0.01
    strategy: str = "load-balanced"
    max_experts: int = 4
    fit_weight: float = 1.0
    load_weight: float = 1.0
    fitness_ema: float = 0.7
    fitness_decay: float = 0.95
    load_decay: float = 0.9
    cold_start: bool = True
    fitness_signal: str = "after"
    drift_threshold: float = 0.0
    drift_shrink: float = 0.0
    drift_rescore: bool = False
    safety_margin: float = 0.2
    profile_ema: float = 0.7
    capacity: str = "heterogeneous"
    deadline: float | None = 4.0
    availability: float = 1.0
    dropout: bool = True
    dropout_rate: float = 0.0
    corrupt: float = 0.0
    capacity_error: float = 0.0
    drift_round: int = 0
    drift_fraction: float = 0.5
    target_accuracy: float = 0.85
    eval_aligned: bool = False

    def __post_init__(self):
        if not isinstance(self.data, str) or not self.data:
            raise TypeError(f"data must be a non-empty str, got {self.data!r}")
        _checks.real("test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        _choice("partition", self.partition, PARTITIONS)
        _checks.real("dirichlet_alpha", self.dirichlet_alpha, 0.0, lo_open=True)
        for name, lo in (("shards_per_client", 1), ("min_samples", 0), ("num_clients", 1),
                         ("clients_per_round", 0), ("rounds", 0), ("seed", 0), ("num_experts", 1),
                         ("top_k", 1), ("d_model", 1), ("d_hidden", 1), ("local_epochs", 1),
                         ("batch_size", 1), ("max_experts", 1), ("drift_round", 0)):
            _checks.integer(name, getattr(self, name), lo)
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be <= num_clients "
                             f"({self.num_clients})")
        if self.top_k > min(8, self.num_experts):
            raise ValueError(f"top_k must be <= min(8, num_experts) = {min(8, self.num_experts)}, "
                             f"got {self.top_k}")
        channels = tuple(self.channels) if isinstance(self.channels, list | tuple) else None
        if not channels or not all(type(c) is int and c > 0 for c in channels):
            raise ValueError(f"channels must be a non-empty sequence of positive ints, got {self.channels!r}")
        object.__setattr__(self, "channels", channels)
        _choice("strategy", self.strategy, tuple(STRATEGIES))
        _choice("fitness_signal", self.fitness_signal, FITNESS_SIGNALS)
        _checks.real("availability", self.availability, 0.0, 1.0, lo_open=True)
        _checks.real("corrupt", self.corrupt, 0.0, 1.0)
        _checks.real("dropout_rate", self.dropout_rate, 0.0, 1.0, hi_open=True)
        _checks.real("capacity_error", self.capacity_error, 0.0, 1.0, hi_open=True)
        _checks.real("drift_fraction", self.drift_fraction, 0.0, 1.0)
        _checks.real("target_accuracy", self.target_accuracy, 0.0, 1.0)
        _choice("capacity", self.capacity, CAPACITIES)
        for name in ("cold_start", "dropout", "drift_rescore", "eval_aligned"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.drift_rescore and not self.drift_threshold > 0:
            raise ValueError("drift_rescore needs the drift detector on (drift_threshold > 0)")
        if self.deadline is not None:
            _checks.real("deadline", self.deadline, 0.0, lo_open=True)
        elif self.strategy == "deadline-aware":
            raise ValueError("strategy 'deadline-aware' needs a deadline")
        # the training and alignment configs check their own fields; their errors are prefixed with our
        # option names
        for options, build in ((("lr", "momentum", "aux_loss"), self.train_config),
                               (("max_experts", "fit_weight", "load_weight"), self.strategy_config),
                               (("fitness_ema", "fitness_decay"), self.fitness_config),
                               (("load_decay",), self.load_config),
                               (("safety_margin", "profile_ema"), self.profile_config),
                               (("drift_threshold", "drift_shrink"), self.drift_config)):
            try:
                build()
            except (TypeError, ValueError) as exc:
                raise type(exc)(f"{' / '.join(options)}: {exc}") from None

    # ------------------------------------------------------- parts for the clients and the alignment engine

    def train_config(self) -> TrainConfig:
        return TrainConfig(self.local_epochs, self.batch_size, self.lr, self.momentum, self.aux_loss,
                           affinity=self.drift_rescore)

    def strategy_config(self) -> StrategyConfig:
        return StrategyConfig(name=self.strategy, max_experts=self.max_experts, seed=self.seed,
                              desirability=DesirabilityConfig(alpha=self.fit_weight, beta=self.load_weight))

    def fitness_config(self) -> FitnessConfig:
        return FitnessConfig(ema=self.fitness_ema, decay=self.fitness_decay)

    def load_config(self) -> LoadConfig:
        return LoadConfig(decay=self.load_decay)

    def profile_config(self) -> ProfileConfig:
        return ProfileConfig(safety_margin=self.safety_margin, ema=self.profile_ema)

    def drift_config(self) -> DriftConfig:
        return DriftConfig(threshold=self.drift_threshold, shrink=self.drift_shrink)

    # ------------------------------------------------------------------ (de)serialisation

    def to_dict(self) -> dict:
        """JSON/TOML-ready: tuples as lists, no deadline as the string "none"."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["channels"] = list(self.channels)
        d["deadline"] = "none" if self.deadline is None else self.deadline
        return d

    @classmethod
    def from_dict(cls, d: dict) -> FederatedConfig:
        """From :meth:`to_dict` output or a TOML table (``deadline = "none"`` for no deadline); an unknown
        key raises ValueError naming it."""
        if not isinstance(d, dict):
            raise TypeError(f"config must be a dict, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config options {unknown}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("deadline"), str):
            if d["deadline"].lower() != "none":
                raise ValueError(f"deadline must be a number of seconds or 'none', got {d['deadline']!r}")
            d["deadline"] = None
        return cls(**d)

    def replace(self, **changes) -> FederatedConfig:
        return dataclasses.replace(self, **changes)

    @classmethod
    def option_types(cls) -> dict[str, type]:
        """Option name -> the scalar type of its values (for command-line parsing)."""
        hints = typing.get_type_hints(cls)
        out = {}
        for f in dataclasses.fields(cls):
            hint = hints[f.name]
            if typing.get_origin(hint) in (typing.Union, types.UnionType):
                hint = next(a for a in typing.get_args(hint) if a is not type(None))
            if typing.get_origin(hint) is tuple:
                hint = typing.get_args(hint)[0]
            out[f.name] = hint
        return out


def _choice(name: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")
