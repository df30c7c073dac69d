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

    :func:`route` builds plans. A plan built by hand is checked (ValueError or TypeError naming the field):
    contiguous int64 tensors on one device, ``1 <= k <= MAX_TOP_K``, ``1 <= E <= MAX_EXPERTS``, ``offsets``
    rising from 0 to R, ``permutation`` distinct entries in ``[0, T*k)`` and ``inverse`` its inverse, so
    that ``dispatch`` and ``combine`` never read out of bounds (its tensors must not be changed in place).
    """

    permutation: torch.Tensor
    token_index: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor

    def __post_init__(self):
        _check_plan(self.permutation, self.token_index, self.offsets, self.inverse)

    @classmethod
    def _of_route(cls, permutation, token_index, offsets, inverse) -> RoutingPlan:
        """The plan :func:`route` built, right by construction: not checked again (a read-back saved)."""
        plan = object.__new__(cls)
        for name, value in zip(_FIELDS, (permutation, token_index, offsets, inverse), strict=True):
            object.__setattr__(plan, name, value)
        return plan

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


_FIELDS = ("permutation", "token_index", "offsets", "inverse")


def _check_plan(permutation, token_index, offsets, inverse) -> None:
    """Check the fields of a hand-built :class:`RoutingPlan` (its docstring); one read-back."""
    for name, value in zip(_FIELDS, (permutation, token_index, offsets, inverse), strict=True):
        if not isinstance(value, torch.Tensor) or value.dtype != torch.int64:
            got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
            raise TypeError(f"plan.{name} must be an int64 torch.Tensor, got {got}")
        if not value.is_contiguous():
            raise ValueError(f"plan.{name} must be contiguous")
        if value.device != inverse.device:
            raise ValueError(f"plan.{name} is on {value.device} but plan.inverse is on {inverse.device}")
    if inverse.ndim != 2 or inverse.shape[0] < 1 or not 1 <= inverse.shape[1] <= MAX_TOP_K:
        raise ValueError(f"plan.inverse must be [T, k] with T >= 1 and 1 <= k <= {MAX_TOP_K}, got shape "
                         f"{tuple(inverse.shape)}")
    if offsets.ndim != 1 or not 2 <= offsets.numel() <= MAX_EXPERTS + 1:
        raise ValueError(f"plan.offsets must be [E+1] with 1 <= E <= {MAX_EXPERTS}, got shape "
                         f"{tuple(offsets.shape)}")
    entries, rows = inverse.numel(), permutation.numel()
    if permutation.ndim != 1 or rows > entries:
        raise ValueError(f"plan.permutation must be [R] with R <= T*k = {entries}, got shape "
                         f"{tuple(permutation.shape)}")
    if token_index.shape != permutation.shape:
        raise ValueError(f"plan.token_index must have the shape of plan.permutation {(rows,)}, got "
                         f"{tuple(token_index.shape)}")
    grouped = inverse.view(-1)[permutation.clamp(0, entries - 1)]  # in range whatever permutation holds
    holds = {  # message -> whether it holds, read back together
        f"plan.offsets must rise from 0 to R = {rows}":
            (offsets[0] == 0) & (offsets[-1] == rows) & (offsets.diff() >= 0).all(),
        f"plan.permutation values must be in [0, T*k = {entries})":
            ((permutation >= 0) & (permutation < entries)).all(),
        "plan.token_index must be plan.permutation // k":
            (token_index == permutation // inverse.shape[1]).all(),
        f"plan.inverse values must be in [-1, R = {rows})": ((inverse >= -1) & (inverse < rows)).all(),
        "plan.inverse must map plan.permutation[r] to r and every other entry to -1":
            (grouped == torch.arange(rows, device=inverse.device)).all() & ((inverse >= 0).sum() == rows),
    }
    for message, ok in zip(holds, torch.stack(list(holds.values())).tolist(), strict=True):
        if not ok:
            raise ValueError(message)


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
    return RoutingPlan._of_route(permutation, permutation // k, offsets, inverse.view(t, k))


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
