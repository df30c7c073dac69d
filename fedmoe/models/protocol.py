"""What federated training needs of a model and of its task (docs/design.md, Models).

The federated loop, the node runtime, the server, checkpoints and Flower use a model only through
:class:`FederatedMoE` and its data only through :class:`Task`; any MoE model that has both plugs in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fedmoe.models.moe import MoEStats

__all__ = ["FederatedMoE", "Task", "expert_mask", "units_per_sample"]


@runtime_checkable
class FederatedMoE(Protocol):
    """An ``nn.Module`` whose parameters are the shared ones plus one expert bank.

    - ``expert_bank``: ``nn.Parameter`` float32 [E, P]; expert ``e`` is row ``e`` (a model with MoE layers
      in several blocks packs expert ``e`` of every block into row ``e``).
    - ``num_experts``: E.
    - ``named_shared_parameters()``: (name, parameter) of every parameter but the bank, in a fixed order
      (the order of the flat shared vector).
    - ``set_expert_mask(mask)``: route only to the experts where ``mask`` (bool [E]) is True; None allows
      all.
    - ``model(inputs) -> (outputs, stats)``: ``stats`` is a :class:`~fedmoe.models.MoEStats` whose
      ``expert_idx`` has one row per unit of the task's loss (a sample, or a token), whose ``gate_mass``
      sums the full router's probabilities (every expert, the mask ignored) over those units, and whose
      ``aux_loss`` and ``route_loss`` are the load-balancing and routing losses local training adds.
      ``outputs`` is whatever the task scores (the classifier's logits; the language model's
      :class:`~fedmoe.models.LMOutputs`).
    - ``units_per_sample`` (optional, 1 if absent): the most units of the loss one sample holds (the
      language model: the window length); the server bounds the units a client reports with it.
    """

    expert_bank: nn.Parameter

    @property
    def num_experts(self) -> int: ...

    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]: ...

    def set_expert_mask(self, mask: torch.Tensor | None) -> None: ...

    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, MoEStats]: ...


@runtime_checkable
class Task(Protocol):
    """How a model's outputs are scored against targets, per unit (a sample, or a token).

    - ``loss(outputs, targets, reduction)``: the training loss, ``reduction`` "mean" | "sum" | "none"
      (float32 [U] for "none").
    - ``correct(outputs, targets)``: bool [U], whether each unit's prediction is right.
    """

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor: ...

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


def expert_mask(num_experts: int, experts) -> torch.Tensor:
    """bool [num_experts]: True at ``experts`` (ints), for :meth:`FederatedMoE.set_expert_mask`."""
    mask = torch.zeros(num_experts, dtype=torch.bool)
    mask[torch.as_tensor(experts, dtype=torch.int64)] = True
    return mask


def units_per_sample(model: FederatedMoE) -> int:
    """The most units of the loss one sample of ``model`` holds (its ``units_per_sample``, 1 if absent)."""
    return int(getattr(model, "units_per_sample", 1))
