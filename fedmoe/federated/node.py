"""A client node (docs/design.md, Node runtime): its own data, its own profile, and what it does in a round.

A :class:`Node` holds one client's training samples, its self-reported :class:`NodeProfile` and a model
workspace; it trains on a :class:`ClientPayload` and returns a :class:`ClientUpdate` with per-expert
feedback, and measures the gate's affinity to every expert on its data. The simulator plays many nodes
(sharing one workspace) and adds simulated timing and faults; the Flower ClientApp is one node plus
message packing.

The work is done by pure functions, :func:`train_client` and :func:`gate_affinity`: the ``model`` they get
is a workspace whose parameters are overwritten from the payload before use, so the result depends only
on the payload, the data and the config (experts that are not assigned get no tokens while the gate is
masked, so their stale rows in the workspace never matter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn.utils import parameters_to_vector

from fedmoe.alignment import ClientProfile, ModelCost, ProfileConfig, _checks
from fedmoe.data import Samples
from fedmoe.models import FederatedMoE, Task, expert_mask

__all__ = ["EVAL_BATCH", "OPTIMIZERS", "ClientPayload", "ClientUpdate", "ExpertFeedback", "Node",
           "NodeProfile", "TrainConfig", "gate_affinity", "load_shared", "local_training", "profiles_of",
           "shared_vector", "train_client"]

EVAL_BATCH = 1024  # samples per forward pass of every evaluation
OPTIMIZERS = ("sgd", "adam")
_REPORTED = ("compute", "memory", "bandwidth", "latency", "reliability", "samples")


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` section, local training: ``epochs`` over the client's data in shuffled mini-batches
    of ``batch_size``, at most ``max_steps`` mini-batches a round (0 = no cap), ``optimizer`` "sgd" (with
    ``lr`` and ``momentum``) or "adam" (with ``lr``; what transformers need), its state fresh each round,
    loss = the task's loss + ``aux_loss`` · load-balancing loss + ``route_loss`` · routing loss of the MoE
    layers (:class:`~fedmoe.models.MoEStats`: trains the full router towards the assigned experts, which
    masked routing alone never does); the per-expert feedback
    (and gate affinity) is measured on at most ``feedback_samples`` of the client's samples, a seeded random
    subset (0 = all)."""

    epochs: int = 1
    batch_size: int = 32
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    aux_loss: float = 0.01
    route_loss: float = 0.1
    max_steps: int = 0
    feedback_samples: int = 0

    def __post_init__(self):
        _checks.integer("epochs", self.epochs, 1)
        _checks.integer("batch_size", self.batch_size, 1)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _checks.real("lr", self.lr, 0.0, lo_open=True)
        _checks.real("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _checks.real("aux_loss", self.aux_loss, 0.0)
        _checks.real("route_loss", self.route_loss, 0.0)
        _checks.integer("max_steps", self.max_steps, 0)
        _checks.integer("feedback_samples", self.feedback_samples, 0)


@dataclass(frozen=True)
class ClientPayload:
    """What the server sends one client: ``experts`` int64 [k] (sorted, distinct), ``shared`` float32 [S]
    (all parameters but the expert bank, in :func:`shared_vector` order), ``expert_rows`` float32 [k, P]
    (the assigned rows of the bank), ``seed`` of the local shuffling; ``affinity``: also measure the gate's
    affinity to every expert with the received weights and send it back (``fitness.signal = "affinity"``,
    drift re-scoring)."""

    round: int
    client: int
    experts: np.ndarray
    shared: torch.Tensor
    expert_rows: torch.Tensor
    seed: int
    affinity: bool = False

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shared, self.expert_rows)


@dataclass(frozen=True)
class ExpertFeedback:
    """Per assigned expert (arrays [k], aligned with the payload's ``experts``), measured on the client's
    data with the gate masked to the assigned experts: ``share`` (float64, its share of the gate's kept
    top-k choices), ``loss`` (float64, mean task loss of the units routed to it), ``accuracy``
    (float64, on those units; loss and accuracy are 0 where none were routed), ``samples`` (int64,
    units routed to it)."""

    share: np.ndarray
    loss: np.ndarray
    accuracy: np.ndarray
    samples: np.ndarray

    def fitness(self) -> np.ndarray:
        """float64 [k]: the fitness signal, ``share · accuracy``."""
        return self.share * self.accuracy


@dataclass(frozen=True)
class ClientUpdate:
    """A client's reply: its trained ``shared`` float32 [S] and ``expert_rows`` float32 [k, P] for
    ``experts`` int64 [k], ``num_samples`` (local training samples), ``train_loss`` (mean loss of the
    last epoch), the per-expert ``feedback`` measured after local training and ``feedback_before``, the
    same measured before it with the received weights (how well the global experts fit the client's
    current data: it reacts when that data changes) and, if the payload asked for it, ``affinity`` float32
    [E] (None otherwise): the full router's mean probability of every expert, held or not, on the
    client's current data with the received weights (the tokens routed through its experts)."""

    client: int
    experts: np.ndarray
    shared: torch.Tensor
    expert_rows: torch.Tensor
    num_samples: int
    train_loss: float
    feedback: ExpertFeedback
    feedback_before: ExpertFeedback
    affinity: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shared, self.expert_rows)


@dataclass(frozen=True)
class NodeProfile:
    """What a node reports of itself: ``compute`` (FLOP/s), ``memory`` (bytes), ``bandwidth`` (bytes/s),
    ``latency`` (s), ``reliability`` (probability of replying), ``samples`` (local training samples) and
    ``tier`` (its device tier, -1 if unknown). Checked as :class:`~fedmoe.alignment.ClientProfile` checks
    them."""

    compute: float
    memory: float
    bandwidth: float
    latency: float
    reliability: float
    samples: float
    tier: int = -1

    def __post_init__(self):
        profiles_of([self])

    @classmethod
    def of(cls, profiles: ClientProfile, client: int) -> NodeProfile:
        """Client ``client``'s row of ``profiles`` (its reported values)."""
        return cls(*(float(getattr(profiles, f)[client]) for f in _REPORTED), tier=int(profiles.tier[client]))


def profiles_of(profiles: list[NodeProfile], cost: ModelCost | None = None,
                config: ProfileConfig | None = None) -> ClientProfile:
    """The :class:`~fedmoe.alignment.ClientProfile` of clients 0..n-1 that reported ``profiles``."""
    columns = {f: np.array([getattr(p, f) for p in profiles], dtype=np.float64) for f in _REPORTED}
    return ClientProfile(**columns, model=cost, config=config,
                         tier=np.array([p.tier for p in profiles], dtype=np.int64))


def _nbytes(*tensors) -> int:
    """Bytes of the tensors among ``tensors`` (a malformed reply may hold something else)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def shared_vector(model: FederatedMoE) -> torch.Tensor:
    """float32 [S]: a copy of all parameters but the expert bank, flattened in ``named_shared_parameters``
    order."""
    return parameters_to_vector([p for _, p in model.named_shared_parameters()]).detach().clone()


@torch.no_grad()
def load_shared(model: FederatedMoE, shared: torch.Tensor) -> None:
    """Copy the flat ``shared`` [S] into the model's shared parameters (in place: no aliasing, unlike
    ``torch.nn.utils.vector_to_parameters``, which makes the parameters views of ``shared``)."""
    params = [p for _, p in model.named_shared_parameters()]
    for p, chunk in zip(params, shared.split([p.numel() for p in params]), strict=True):
        p.copy_(chunk.view_as(p))


def _load(model: FederatedMoE, shared: torch.Tensor, experts: np.ndarray | None = None,
          rows: torch.Tensor | None = None) -> None:
    load_shared(model, shared)
    if experts is not None:
        with torch.no_grad():
            model.expert_bank[torch.from_numpy(experts)] = rows


@torch.no_grad()
def gate_affinity(model: FederatedMoE, shared: torch.Tensor, data: Samples) -> np.ndarray:
    """float32 [E]: the router's mean probability of each expert over the units of ``data``, with the
    ``shared`` parameters and no expert masked (cold start: scoring experts without training them)."""
    _load(model, shared)
    model.set_expert_mask(None)
    total = torch.zeros(model.num_experts, dtype=torch.float64)
    units = 0
    for lo in range(0, len(data), EVAL_BATCH):
        _, stats = model(data[lo:lo + EVAL_BATCH][0])
        total += stats.gate_mass
        units += stats.expert_idx.shape[0]
    return (total / max(units, 1)).numpy().astype(np.float32)


def probe_samples(data: Samples, limit: int, gen: torch.Generator) -> Samples:
    """At most ``limit`` of ``data`` (0 = all), a random subset drawn with ``gen``, in their order: what
    feedback and gate affinity are measured on (``train.feedback_samples``)."""
    if not 0 < limit < len(data):
        return data
    return Samples(*data[torch.randperm(len(data), generator=gen)[:limit].sort().values])


def train_client(model: FederatedMoE, task: Task, payload: ClientPayload, data: Samples,
                 config: TrainConfig) -> ClientUpdate:
    """Train the shared parameters and the assigned experts on ``data`` with the gate masked to the
    assigned experts; measure the per-expert feedback before (one forward pass with the received weights)
    and after; with ``payload.affinity`` also the gate affinity to every expert with the received weights
    (from the pass before: the full router's distribution, the tokens routed through the assigned
    experts)."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    n = len(data)
    if n == 0:
        raise ValueError("data must hold >= 1 sample")
    experts = payload.experts
    if experts.size == 0:
        raise ValueError("payload.experts must name at least one expert")
    gen = torch.Generator().manual_seed(payload.seed)
    probe = probe_samples(data, config.feedback_samples, gen)
    _load(model, payload.shared, experts, payload.expert_rows)
    model.set_expert_mask(expert_mask(model.num_experts, experts))
    try:
        before, affinity = _feedback(model, task, probe, experts)
        train_loss = local_training(model, task, data, config, gen)
        feedback, _ = _feedback(model, task, probe, experts)
    finally:
        model.set_expert_mask(None)
    rows = model.expert_bank[torch.from_numpy(experts)].detach().clone()
    return ClientUpdate(payload.client, experts.copy(), shared_vector(model), rows, n, train_loss, feedback,
                        before, affinity if payload.affinity else None)


def local_training(model: FederatedMoE, task: Task, data: Samples, config: TrainConfig,
                    gen: torch.Generator) -> float:
    """Local epochs (at most ``max_steps`` mini-batches in all); returns the mean loss of the last epoch."""
    optimizer = (torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
                 if config.optimizer == "sgd" else torch.optim.Adam(model.parameters(), lr=config.lr))
    model.train()
    n, steps = len(data), config.max_steps or math.inf
    for _ in range(config.epochs):
        order = torch.randperm(n, generator=gen)
        total, seen = 0.0, 0
        for lo in range(0, n, config.batch_size):
            if steps <= 0:
                break
            steps -= 1
            batch = order[lo:lo + config.batch_size]
            inputs, targets = data[batch]
            outputs, stats = model(inputs)
            loss = (task.loss(outputs, targets) + config.aux_loss * stats.aux_loss
                    + config.route_loss * stats.route_loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
            seen += batch.numel()
        if steps <= 0:
            break
    return total / max(seen, 1)


@torch.no_grad()
def _feedback(model: FederatedMoE, task: Task, data: Samples,
              experts: np.ndarray) -> tuple[ExpertFeedback, np.ndarray]:
    """The per-expert feedback of the masked model on ``data`` and, from the same pass, its gate affinity
    (float32 [E]: the full router's mean probability of each expert, tokens routed through ``experts``)."""
    model.eval()
    losses, correct, chosen = [], [], []
    mass = torch.zeros(model.num_experts, dtype=torch.float64)
    for lo in range(0, len(data), EVAL_BATCH):
        inputs, targets = data[lo:lo + EVAL_BATCH]
        outputs, stats = model(inputs)
        losses.append(task.loss(outputs, targets, reduction="none"))
        correct.append(task.correct(outputs, targets))
        chosen.append(stats.expert_idx)
        mass += stats.gate_mass
    loss, correct, chosen = torch.cat(losses).double(), torch.cat(correct).double(), torch.cat(chosen)
    affinity = (mass / max(chosen.shape[0], 1)).numpy().astype(np.float32)
    hits = chosen[:, :, None] == torch.from_numpy(experts)  # [U, slots, k_assigned]
    routed = hits.any(1)  # [U, k]: unit routed to the expert in some slot
    samples = routed.sum(0).numpy().astype(np.int64)
    denom = torch.from_numpy(np.maximum(samples, 1)).double()
    share = hits.sum((0, 1)).double() / max(int((chosen >= 0).sum()), 1)
    mean_loss = (loss[:, None] * routed).sum(0) / denom
    accuracy = (correct[:, None] * routed).sum(0) / denom
    return ExpertFeedback(share.numpy(), mean_loss.numpy(), accuracy.numpy(), samples), affinity


class Node:
    """One client node: ``client`` id, its training ``data``, its self-reported ``profile`` (None if it
    reports none), the ``model`` workspace (may be shared by nodes that never train at the same time), the
    ``task`` and the ``config`` of local training."""

    def __init__(self, client: int, data: Samples, model: FederatedMoE, task: Task, config: TrainConfig,
                 profile: NodeProfile | None = None):
        self.client = _checks.integer("client", client, 0)
        if not isinstance(data, Samples):
            raise TypeError(f"data must be Samples, got {type(data).__name__}")
        if not isinstance(model, FederatedMoE):
            raise TypeError(f"model must follow fedmoe.models.FederatedMoE, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        if profile is not None and not isinstance(profile, NodeProfile):
            raise TypeError(f"profile must be a NodeProfile or None, got {type(profile).__name__}")
        self.data, self.model, self.task, self.config, self.profile = data, model, task, config, profile

    def train(self, payload: ClientPayload, data: Samples | None = None) -> ClientUpdate:
        """:func:`train_client` on ``data`` (default: the node's own)."""
        if payload.client != self.client:
            raise ValueError(f"payload is for client {payload.client}, this node is client {self.client}")
        return train_client(self.model, self.task, payload, self.data if data is None else data, self.config)

    def affinity(self, shared: torch.Tensor) -> np.ndarray:
        """:func:`gate_affinity` on the node's data (at most ``train.feedback_samples`` of it, a subset
        fixed by the client id)."""
        gen = torch.Generator().manual_seed(self.client)
        return gate_affinity(self.model, shared, probe_samples(self.data, self.config.feedback_samples, gen))
