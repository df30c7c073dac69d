"""``route``: the routing plan (docs/design.md, Ops), which grouped row each (token, slot) of a top-k
choice goes to.

``route(expert_idx[T,k], num_experts)`` groups the T*k (token, slot) entries by expert, stably: within an
expert by ascending token, then ascending slot (the flat entry ``token * k + slot``). Entries with expert
``-1`` (masked experts, capacity overflow) are dropped. On CUDA (or with ``backend="triton"``) a Triton
counting sort builds the plan (:mod:`fedmoe_kernels._details.route_triton`); the CPU default is a stable
torch sort. Both give the plan of :func:`route_reference`, the loop reference. Building a plan reads
back to the host the range of ``expert_idx`` (validation) and the number of kept rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedmoe_kernels._backend import resolve

__all__ = ["MAX_EXPERTS", "MAX_TOP_K", "RoutePlanRef", "RoutingPlan", "route", "route_reference"]

MAX_EXPERTS = 4096
MAX_TOP_K = 8


@dataclass(frozen=True, eq=False)
class RoutingPlan:
    """Grouping of the T*k (token, slot) entries by expert; R = number of kept entries (grouped rows).

    - ``permutation``: int64 [R], the flat entry ``token * k + slot`` of each grouped row.
    - ``token_index``: int64 [R], the token of each grouped row (``permutation // k``).
    - ``offsets``: int64 [E+1], expert ``e`` owns grouped rows ``offsets[e]:offsets[e+1]``.
    - ``inverse``: int64 [T, k], the grouped row of each (token, slot), or -1 where dropped.
    """

    permutation: torch.Tensor
    token_index: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.inverse.shape[0]

    @property
    def top_k(self) -> int:
        return self.inverse.shape[1]

    @property
    def num_experts(self) -> int:
        return self.offsets.numel() - 1

    @property
    def num_rows(self) -> int:
        return self.permutation.numel()

    @property
    def counts(self) -> torch.Tensor:
        """int64 [E]: grouped rows per expert."""
        return self.offsets.diff()


def _validate(expert_idx, num_experts) -> bool:
    """Check the arguments of :func:`route`; return whether any slot is dropped (expert -1)."""
    if not isinstance(expert_idx, torch.Tensor):
        raise TypeError(f"expert_idx must be a torch.Tensor, got {type(expert_idx).__name__}")
    if expert_idx.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"expert_idx must be int32 or int64, got {expert_idx.dtype}")
    if expert_idx.ndim != 2:
        raise ValueError(f"expert_idx must be 2-D [T, k], got shape {tuple(expert_idx.shape)}")
    t, k = expert_idx.shape
    if t < 1 or not 1 <= k <= MAX_TOP_K:
        raise ValueError(f"expert_idx must be [T, k] with T >= 1 and 1 <= k <= {MAX_TOP_K}, got {(t, k)}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts must be in [1, {MAX_EXPERTS}], got {num_experts}")
    lo, hi = (int(v) for v in torch.aminmax(expert_idx))
    if lo < -1 or hi >= num_experts:
        raise ValueError(
            f"expert_idx values must be in [-1, num_experts={num_experts}), found {lo if lo < -1 else hi}"
        )
    return lo < 0


def _route_torch(flat: torch.Tensor, num_experts: int, any_dropped: bool):
    key = torch.where(flat >= 0, flat, num_experts) if any_dropped else flat  # dropped entries sort last
    order = torch.sort(key, stable=True).indices
    counts = torch.bincount(key, minlength=num_experts + 1)[:num_experts]
    offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
    rows = int(offsets[-1])
    inverse = torch.full_like(order, -1)
    inverse[order[:rows]] = torch.arange(rows, device=flat.device)
    return order, offsets, inverse


def route(expert_idx: torch.Tensor, num_experts: int, *, backend: str = "auto") -> RoutingPlan:
    """Plan for ``expert_idx`` (int32/int64 [T, k], values in [-1, num_experts)); see the module doc.

    ``backend``: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    any_dropped = _validate(expert_idx, num_experts)
    t, k = expert_idx.shape
    flat = expert_idx.contiguous().view(-1)
    if resolve(backend, expert_idx) == "triton":
        from fedmoe_kernels._details import route_triton

        permutation, offsets, inverse = route_triton.route(flat, num_experts)
    else:
        permutation, offsets, inverse = _route_torch(flat.long(), num_experts, any_dropped)
    permutation = permutation[: int(offsets[-1])]
    return RoutingPlan(permutation, permutation // k, offsets, inverse.view(t, k))


# ---------------------------------------------------------------- reference


class RoutePlanRef(NamedTuple):
    """Reference routing plan: ``permutation`` int64 [R], ``offsets`` int64 [E+1], ``inverse`` [T, k]."""

    permutation: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor


def route_reference(expert_idx, num_experts: int) -> RoutePlanRef:
    """Group the flat entries ``t * k + s`` of ``expert_idx`` [T, k] by expert, ascending within an expert;
    entries with expert -1 are dropped."""
    t, k = expert_idx.shape
    buckets = [[] for _ in range(num_experts)]
    for token in range(t):
        for slot in range(k):
            expert = int(expert_idx[token, slot])
            if expert >= 0:
                buckets[expert].append(token * k + slot)
    permutation = [entry for bucket in buckets for entry in bucket]
    offsets = [0]
    for bucket in buckets:
        offsets.append(offsets[-1] + len(bucket))
    inverse = [-1] * (t * k)
    for row, entry in enumerate(permutation):
        inverse[entry] = row
    return RoutePlanRef(
        torch.tensor(permutation, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(inverse, dtype=torch.int64).view(t, k),
    )
