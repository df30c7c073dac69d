"""Client side of a round, as pure functions: (model state + assigned experts + data + config) -> update.

The ``model`` argument of :func:`train_client` and :func:`gate_affinity` is a workspace: a
:class:`~fedmoe.models.MoEClassifier` of the run's architecture whose parameters are overwritten from the
payload before use, so the result depends only on the payload, the data and the config (experts that are
not assigned get no tokens while the gate is masked, so their stale rows in the workspace never matter).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from fedmoe.alignment import _checks
from fedmoe.models import MoEClassifier

__all__ = ["ClientPayload", "ClientUpdate", "ExpertFeedback", "TrainConfig", "gate_affinity",
           "load_shared", "shared_vector", "train_client"]

_EVAL_BATCH = 1024


@dataclass(frozen=True)
class TrainConfig:
    """Local training: ``epochs`` over the client's data in shuffled mini-batches of ``batch_size``, SGD
    with ``lr`` and ``momentum`` (fresh each round), loss = cross-entropy + ``aux_loss`` · load-balancing
    loss of the MoE layer. ``affinity``: also measure the gate's affinity to every expert on the local data
    with the received weights (:func:`gate_affinity`; drift re-scoring) and send it with the update."""

    epochs: int = 1
    batch_size: int = 16
    lr: float = 0.05
    momentum: float = 0.9
    aux_loss: float = 0.01
    affinity: bool = False

    def __post_init__(self):
        _checks.integer("epochs", self.epochs, 1)
        _checks.integer("batch_size", self.batch_size, 1)
        _checks.real("lr", self.lr, 0.0, lo_open=True)
        _checks.real("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        _checks.real("aux_loss", self.aux_loss, 0.0)
        if not isinstance(self.affinity, bool):
            raise TypeError(f"affinity must be a bool, got {self.affinity!r}")


@dataclass(frozen=True)
class ClientPayload:
    """What the server sends one client: ``experts`` int64 [k] (sorted, distinct), ``shared`` float32 [S]
    (all parameters but the expert bank, in :func:`shared_vector` order), ``expert_rows`` float32 [k, P]
    (the assigned rows of the bank), ``seed`` of the local shuffling."""

    round: int
    client: int
    experts: np.ndarray
    shared: torch.Tensor
    expert_rows: torch.Tensor
    seed: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.shared, self.expert_rows)


@dataclass(frozen=True)
class ExpertFeedback:
    """Per assigned expert (arrays [k], aligned with the payload's ``experts``), measured on the client's
    data with the gate masked to the assigned experts: ``share`` (float64, its share of the gate's kept
    top-k choices), ``loss`` (float64, mean cross-entropy of the samples routed to it), ``accuracy``
    (float64, on those samples; loss and accuracy are 0 where none were routed), ``samples`` (int64,
    samples routed to it)."""

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
    current data: it reacts when that data changes) and, if the config asked for it, ``affinity`` float32
    [E] (None otherwise): the gate's mean router probability of every expert, held or not, on the
    client's current data with the received weights (:func:`gate_affinity`)."""

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


def _nbytes(*tensors) -> int:
    """Bytes of the tensors among ``tensors`` (a malformed reply may hold something else)."""
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def shared_vector(model: MoEClassifier) -> torch.Tensor:
    """float32 [S]: a copy of all parameters but the expert bank, flattened in ``named_shared_parameters``
    order."""
    return parameters_to_vector([p for _, p in model.named_shared_parameters()]).detach().clone()


@torch.no_grad()
def load_shared(model: MoEClassifier, shared: torch.Tensor) -> None:
    """Copy the flat ``shared`` [S] into the model's shared parameters (in place: no aliasing, unlike
    ``torch.nn.utils.vector_to_parameters``, which makes the parameters views of ``shared``)."""
    params = [p for _, p in model.named_shared_parameters()]
    for p, chunk in zip(params, shared.split([p.numel() for p in params]), strict=True):
        p.copy_(chunk.view_as(p))


def _load(model: MoEClassifier, shared: torch.Tensor, experts: np.ndarray | None = None,
          rows: torch.Tensor | None = None) -> None:
    load_shared(model, shared)
    if experts is not None:
        with torch.no_grad():
            model.expert_bank[torch.from_numpy(experts)] = rows


@torch.no_grad()
def gate_affinity(model: MoEClassifier, shared: torch.Tensor, x: torch.Tensor) -> np.ndarray:
    """float32 [E]: mean router probability of each expert over the client's samples ``x`` [n, C, H, W],
    with the ``shared`` parameters (cold start: scoring experts without training them)."""
    _load(model, shared)
    model.moe.set_expert_mask(None)
    total = torch.zeros(model.moe.num_experts, dtype=torch.float64)
    for lo in range(0, x.shape[0], _EVAL_BATCH):
        features = model.norm(model.backbone(x[lo:lo + _EVAL_BATCH]))
        total += model.moe.router(features).float().softmax(-1).sum(0, dtype=torch.float64)
    return (total / max(x.shape[0], 1)).numpy().astype(np.float32)


def train_client(model: MoEClassifier, payload: ClientPayload, x: torch.Tensor, y: torch.Tensor,
                 config: TrainConfig) -> ClientUpdate:
    """Train the shared parameters and the assigned experts on ``x`` float32 [n, C, H, W], ``y`` int64 [n]
    with the gate masked to the assigned experts; measure the per-expert feedback before (one forward
    pass with the received weights) and after; with ``config.affinity`` also the gate affinity to every
    expert with the received weights."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    n = x.shape[0]
    if n == 0 or y.shape != (n,):
        raise ValueError(f"x must hold >= 1 sample and y one label per sample, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    experts = payload.experts
    if experts.size == 0:
        raise ValueError("payload.experts must name at least one expert")
    affinity = gate_affinity(model, payload.shared, x) if config.affinity else None
    _load(model, payload.shared, experts, payload.expert_rows)
    mask = torch.zeros(model.moe.num_experts, dtype=torch.bool)
    mask[torch.from_numpy(experts)] = True
    model.moe.set_expert_mask(mask)
    try:
        before = _feedback(model, x, y, experts)
        train_loss = _sgd(model, x, y, config, torch.Generator().manual_seed(payload.seed))
        feedback = _feedback(model, x, y, experts)
    finally:
        model.moe.set_expert_mask(None)
    rows = model.expert_bank[torch.from_numpy(experts)].detach().clone()
    return ClientUpdate(payload.client, experts.copy(), shared_vector(model), rows, n, train_loss, feedback,
                        before, affinity)


def _sgd(model: MoEClassifier, x, y, config: TrainConfig, gen: torch.Generator) -> float:
    """Local epochs; returns the mean loss of the last one."""
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum)
    model.train()
    for _ in range(config.epochs):
        order = torch.randperm(x.shape[0], generator=gen)
        total = 0.0
        for lo in range(0, x.shape[0], config.batch_size):
            batch = order[lo:lo + config.batch_size]
            logits, stats = model(x[batch])
            loss = F.cross_entropy(logits, y[batch]) + config.aux_loss * stats.aux_loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * batch.numel()
    return total / x.shape[0]


@torch.no_grad()
def _feedback(model: MoEClassifier, x, y, experts: np.ndarray) -> ExpertFeedback:
    model.eval()
    losses, correct, chosen = [], [], []
    for lo in range(0, x.shape[0], _EVAL_BATCH):
        logits, stats = model(x[lo:lo + _EVAL_BATCH])
        losses.append(F.cross_entropy(logits, y[lo:lo + _EVAL_BATCH], reduction="none"))
        correct.append(logits.argmax(1) == y[lo:lo + _EVAL_BATCH])
        chosen.append(stats.expert_idx)
    loss, correct, chosen = torch.cat(losses).double(), torch.cat(correct).double(), torch.cat(chosen)
    hits = chosen[:, :, None] == torch.from_numpy(experts)  # [n, k_top, k_assigned]
    routed = hits.any(1)  # [n, k]: sample routed to the expert in some slot
    samples = routed.sum(0).numpy().astype(np.int64)
    denom = torch.from_numpy(np.maximum(samples, 1)).double()
    share = hits.sum((0, 1)).double() / max(int((chosen >= 0).sum()), 1)
    mean_loss = (loss[:, None] * routed).sum(0) / denom
    accuracy = (correct[:, None] * routed).sum(0) / denom
    return ExpertFeedback(share.numpy(), mean_loss.numpy(), accuracy.numpy(), samples)
