"""The configuration of one federated experiment: a tree of sections, each the config dataclass of the part
it sets (docs/design.md, Configuration).

=================================  =========================================================
section                            dataclass
=================================  =========================================================
``[data]``                         :class:`fedmoe.data.DataConfig`
``[federation]``                   :class:`FederationConfig`
``[model]``                        :class:`fedmoe.models.ModelConfig`
``[train]``                        :class:`fedmoe.federated.TrainConfig`
``[alignment]``                    :class:`fedmoe.alignment.AlignmentConfig`
``[alignment.desirability]``       :class:`fedmoe.alignment.DesirabilityConfig`
``[fitness]``                      :class:`fedmoe.alignment.FitnessConfig`
``[load]``                         :class:`fedmoe.alignment.LoadConfig`
``[profiles]``                     :class:`fedmoe.alignment.ProfileConfig`
``[drift]``                        :class:`fedmoe.alignment.DriftConfig`
``[aggregation]``                  :class:`fedmoe.federated.AggregationConfig`
``[simulation]``                   :class:`fedmoe.federated.SimulationConfig`
``[evaluation]``                   :class:`EvaluationConfig`
=================================  =========================================================

An option's path is its section path and name joined by dots (``alignment.desirability.fairness``). One
tree, three spellings: TOML tables; command-line flags ``--<path>``; flat string keys (Flower's run
config): the path, with ``-`` allowed for ``_`` (:meth:`FederatedConfig.from_flat`). In TOML, JSON and
flat keys an absent value (``federation.deadline``) is the string ``"none"``; in flat keys and on the
command line a tuple (``model.channels``) is comma-separated.
"""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field

from fedmoe.alignment import (
    AlignmentConfig,
    DriftConfig,
    FitnessConfig,
    LoadConfig,
    ProfileConfig,
    _checks,
)
from fedmoe.data import DataConfig
from fedmoe.federated.bounds import AggregationConfig
from fedmoe.federated.node import TrainConfig
from fedmoe.federated.simulation import SimulationConfig
from fedmoe.models import ModelConfig

__all__ = ["EvaluationConfig", "FederatedConfig", "FederationConfig", "Option"]


@dataclass(frozen=True)
class FederationConfig:
    """The ``[federation]`` section: ``num_clients``, ``clients_per_round`` (sampled from the online
    clients; 0 = all), ``rounds``, ``seed`` (below 2**64; same config and seed, same result) and the round
    ``deadline`` in seconds (None = no deadline; replies after it are left out, and ``deadline-aware`` plans
    with it)."""

    num_clients: int = 20
    clients_per_round: int = 10
    rounds: int = 30
    seed: int = 0
    deadline: float | None = 4.0

    def __post_init__(self):
        _checks.integer("num_clients", self.num_clients, 1)
        _checks.integer("clients_per_round", self.clients_per_round, 0)
        _checks.integer("rounds", self.rounds, 0)
        _checks.integer("seed", self.seed, 0)
        if self.seed >= 2**64:
            raise ValueError(f"seed must be < 2**64 (a torch seed), got {self.seed}")
        if self.clients_per_round > self.num_clients:
            raise ValueError(f"clients_per_round ({self.clients_per_round}) must be <= num_clients "
                             f"({self.num_clients})")
        if self.deadline is not None:
            _checks.real("deadline", self.deadline, 0.0, lo_open=True)


@dataclass(frozen=True)
class EvaluationConfig:
    """The ``[evaluation]`` section: ``target_accuracy`` (for rounds-to-target), ``aligned`` (also
    record each round's ``aligned_accuracy``, see :meth:`fedmoe.federated.FederatedRun.aligned_accuracy`;
    one test-set pass per distinct assignment), ``test_samples`` (each round's global evaluation on at most
    this many test samples, a subset fixed by the seed; 0 = all), ``clients`` (after the last round,
    evaluate each client on its own data, with all experts, with its aligned experts and after fine-tuning:
    the results' ``client_evaluation``, :func:`fedmoe.federated.evaluation.client_evaluation`; its own data
    is its test split with natural clients, else the test set with classes weighted by its labels),
    ``client_samples`` (that evaluation on at most this many of each natural client's test samples, a
    subset fixed by the client id; 0 = all), ``max_clients`` (it evaluates at most this many clients, a
    subset fixed by the seed; 0 = all) and ``finetune_steps`` (it also scores each client after this many
    local mini-batches of fine-tuning with its aligned experts: the personalised baseline; 0 = none)."""

    target_accuracy: float = 0.85
    aligned: bool = False
    test_samples: int = 0
    clients: bool = False
    client_samples: int = 0
    max_clients: int = 0
    finetune_steps: int = 0

    def __post_init__(self):
        _checks.real("target_accuracy", self.target_accuracy, 0.0, 1.0)
        _checks.boolean("aligned", self.aligned)
        _checks.integer("test_samples", self.test_samples, 0)
        _checks.boolean("clients", self.clients)
        _checks.integer("client_samples", self.client_samples, 0)
        _checks.integer("max_clients", self.max_clients, 0)
        _checks.integer("finetune_steps", self.finetune_steps, 0)


@dataclass(frozen=True)
class Option:
    """One leaf of the tree: its dotted ``path``, the scalar ``kind`` of its values (bool, int, float,
    str), whether it may be None (``optional``) or is a tuple of ``kind`` (``sequence``), its ``default``
    and the ``doc`` of its section."""

    path: str
    kind: type
    optional: bool
    sequence: bool
    default: typing.Any
    doc: str

    def parse(self, text: str):
        """The value of a command-line or flat-key string."""
        if self.optional and text.strip().lower() == "none":
            return None
        if self.sequence:  # "" is the empty sequence
            return tuple(self._scalar(t.strip()) for t in text.split(",")) if text.strip() else ()
        return self._scalar(text)

    def _scalar(self, text: str):
        if self.kind is bool:
            low = text.strip().lower()
            if low not in ("true", "false"):
                raise ValueError(f"{self.path} must be true or false, got {text!r}")
            return low == "true"
        try:
            return self.kind(text)
        except ValueError:
            raise ValueError(f"{self.path} must be {'an' if self.kind is int else 'a'} "
                             f"{self.kind.__name__}, got {text!r}") from None


@dataclass(frozen=True)
class FederatedConfig:
    """Everything that defines a run, as a tree of sections (module docstring); same config and seed, same
    result. Build it with keyword sections (``FederatedConfig(alignment=AlignmentConfig(...))``), from a
    nested dict (:meth:`from_dict`, TOML), from flat dotted keys (:meth:`from_flat`), or change options by
    path (:meth:`replace`)."""

    data: DataConfig = field(default_factory=DataConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    profiles: ProfileConfig = field(default_factory=ProfileConfig)
    drift: DriftConfig = field(default_factory=DriftConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self):
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            kind = hints[f.name]
            if not isinstance(getattr(self, f.name), kind):
                got = type(getattr(self, f.name)).__name__
                raise TypeError(f"{f.name} must be a {kind.__name__}, got {got}")
        if self.alignment.strategy == "deadline-aware" and self.federation.deadline is None:
            raise ValueError("alignment.strategy 'deadline-aware' needs a federation.deadline")
        self._check_evaluation()

    def _check_evaluation(self) -> None:
        """ValueError naming the ``[evaluation]`` option that cannot score this model on this data, or that
        has no effect."""
        evaluation = self.evaluation
        tokens = self.model.kind == "transformer"  # a unit of its loss is a token
        if evaluation.aligned and tokens:
            raise ValueError("evaluation.aligned scores one unit per sample (model.kind 'classifier'); use "
                             "evaluation.clients for a model with several units per sample")
        if evaluation.clients and tokens and self.data.partition != "natural":
            raise ValueError("evaluation.clients weights classes by each client's labels without natural "
                             "clients, which needs one unit per sample; use data with natural clients "
                             "([data] partition = natural)")
        for name in ("max_clients", "finetune_steps"):
            if getattr(evaluation, name) and not evaluation.clients:
                raise ValueError(f"evaluation.{name} needs evaluation.clients")

    # ------------------------------------------------------------------ the tree

    @classmethod
    def options(cls) -> dict[str, Option]:
        """Every option by its dotted path, in section order."""
        return dict(_tree_options(cls))

    def get(self, path: str):
        """The value at ``path`` (an option or a section)."""
        node = self
        for part in _known(path).split("."):
            node = getattr(node, part)
        return node

    def to_dict(self) -> dict:
        """The nested dict of sections (TOML / JSON-ready: tuples as lists, None as "none")."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, tree: Mapping) -> FederatedConfig:
        """From :meth:`to_dict` output or a TOML document; absent options keep their defaults. An unknown
        section or option raises ValueError naming it and listing the known ones; a bad value raises
        ValueError or TypeError naming its path."""
        if not isinstance(tree, Mapping):
            raise TypeError(f"config must be a mapping of sections, got {type(tree).__name__}")
        return _build(cls, tree, "")

    @classmethod
    def from_flat(cls, flat: Mapping, base: FederatedConfig | None = None) -> FederatedConfig:
        """From flat keys (Flower's run config): each key an option's path, ``-`` allowed for ``_``;
        string values are parsed as on the command line (``"16,32"``, ``"none"``), others taken as they
        are. Options not given keep their value in ``base`` (default: the defaults)."""
        if not isinstance(flat, Mapping):
            raise TypeError(f"flat config must be a mapping, got {type(flat).__name__}")
        options = _tree_options(cls)
        changes = {}
        for key, value in flat.items():
            path = _known(str(key).replace("-", "_"))
            if isinstance(value, str) and options[path].kind is not str:
                value = options[path].parse(value)
            changes[path] = value
        return (cls() if base is None else base).replace(changes)

    def replace(self, changes: Mapping[str, typing.Any]) -> FederatedConfig:
        """A copy with the options at the dotted paths of ``changes`` set (values as in :meth:`from_dict`:
        a list for a tuple, "none" for None)."""
        tree = self.to_dict()
        for path, value in changes.items():
            *sections, name = _known(path).split(".")
            node = tree
            for part in sections:
                node = node[part]
            node[name] = _plain(value)
        return type(self).from_dict(tree)

    def flat(self) -> dict[str, typing.Any]:
        """Option path -> value (None and tuples as in :meth:`to_dict`)."""
        return {path: _plain(self.get(path)) for path in _tree_options(type(self))}


# ---------------------------------------------------------------------- tree walking


_hints = functools.cache(typing.get_type_hints)


@functools.cache
def _tree_options(cls) -> dict[str, Option]:
    """:meth:`FederatedConfig.options` (computed once; callers must not change it)."""
    return _options(cls, "")


@functools.cache
def _section_paths(cls) -> frozenset[str]:
    """The dotted path of every section of the tree (``alignment``, ``alignment.desirability``, ...)."""
    parts = [path.split(".") for path in _tree_options(cls)]
    return frozenset(".".join(p[:i]) for p in parts for i in range(1, len(p)))


def _plain(value):
    """An option's value as TOML / JSON hold it: None as "none", a tuple as a list."""
    return "none" if value is None else list(value) if isinstance(value, tuple) else value


def _sections(cls) -> dict[str, type]:
    """Field name -> section dataclass, for the fields of ``cls`` that are sections."""
    hints = _hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def _options(cls, prefix: str) -> dict[str, Option]:
    hints = _hints(cls)
    sections = _sections(cls)
    out = {}
    for f in dataclasses.fields(cls):
        path = prefix + f.name
        if f.name in sections:
            out.update(_options(sections[f.name], path + "."))
            continue
        kind, optional, sequence = hints[f.name], False, False
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            optional = type(None) in typing.get_args(kind)
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if typing.get_origin(kind) is tuple:
            kind, sequence = typing.get_args(kind)[0], True
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out[path] = Option(path, kind, optional, sequence, default, (cls.__doc__ or "").strip())
    return out


def _known(path: str) -> str:
    """``path`` if it names an option or a section, else ValueError listing the known ones nearby."""
    options, sections = _tree_options(FederatedConfig), _section_paths(FederatedConfig)
    if path in options or path in sections:
        return path
    parent = path.rsplit(".", 1)[0] if "." in path else ""
    if parent in sections:
        known = sorted(p[len(parent) + 1:] for p in options if p.startswith(parent + "."))
        raise ValueError(f"unknown option {path!r}; the options of [{parent}] are {known}")
    raise ValueError(f"unknown option or section {path!r}; the sections are {sorted(sections)}")


def _to_dict(obj) -> dict:
    out = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out[f.name] = _to_dict(value) if dataclasses.is_dataclass(value) else _plain(value)
    return out


def _build(cls, tree: Mapping, prefix: str):
    """``cls`` from the nested mapping ``tree`` whose path is ``prefix``."""
    names = {f.name for f in dataclasses.fields(cls)}
    sections = _sections(cls)
    where = f"[{prefix[:-1]}]" if prefix else "the config"
    unknown = sorted(set(tree) - names)
    if unknown:
        kind = "option" if prefix else "section"
        raise ValueError(f"unknown {kind}{'s' if len(unknown) > 1 else ''} {unknown} in {where}; known: "
                         f"{sorted(names)}")
    kwargs = {}
    for name, value in tree.items():
        if name in sections:
            if not isinstance(value, Mapping):
                raise TypeError(f"[{prefix}{name}] must be a table of options, got {type(value).__name__}")
            kwargs[name] = _build(sections[name], value, f"{prefix}{name}.")
            continue
        if _tree_options(FederatedConfig)[prefix + name].optional and isinstance(value, str):
            if value.lower() != "none":
                raise ValueError(f"{prefix}{name} must be a value or 'none', got {value!r}")
            value = None
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        if not prefix:
            raise
        raise type(exc)(f"{prefix[:-1]}: {exc}") from None
