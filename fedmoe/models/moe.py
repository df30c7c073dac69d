"""Top-k Mixture-of-Experts layer on :func:`fedmoe_kernels.route` / ``dispatch`` / ``combine``.

All E experts live in one flat parameter ``expert_bank`` [E, P]: expert ``e`` is the row ``expert_bank[e]``
(its ``w1`` [d_model, d_hidden], ``b1`` [d_hidden], ``w2`` [d_hidden, d_model], ``b2`` [d_model], in that
order), so aggregation reads and writes experts in place and a client's share is a set of rows.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from itertools import pairwise

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe_kernels import combine, dispatch, route

__all__ = ["EXPERT_COMPUTE", "MoELayer", "MoEStats", "grouped_mm_available"]

EXPERT_COMPUTE = ("auto", "grouped_mm", "loop")


@dataclass(frozen=True, eq=False)
class MoEStats:
    """What one forward pass routed (T tokens, E experts, k slots).

    - ``aux_loss``: float32 scalar, the load-balancing loss ``E_a * sum_e f_e * P_e`` over the E_a allowed
      experts (f_e: share of the top-k choices, P_e: mean router probability); 1 when balanced.
    - ``expert_idx``: int64 [T, k], expert of each slot after masking and capacity, -1 where dropped.
    - ``weights``: float32 [T, k], combine weights (softmax over the top-k choices).
    - ``counts``: int64 [E], rows each expert processed.
    - ``dropped``: int64 scalar, slots dropped for capacity.
    - ``gate_mass``: float64 [E], the router's probabilities summed over the T tokens (no gradient); with
      no mask, ``gate_mass / T`` is the mean router distribution.
    """

    aux_loss: torch.Tensor
    expert_idx: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    gate_mass: torch.Tensor


@cache
def grouped_mm_available(device_type: str, dtype: torch.dtype) -> bool:
    """Whether ``torch.nn.functional.grouped_mm`` computes forward and backward correctly here.

    Checked once per (device type, dtype) against a loop over groups on a small problem with an empty
    group; False where the build lacks the op or it fails.
    """
    if not hasattr(F, "grouped_mm") or dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False
    device = torch.device(device_type)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn((6, 16), generator=gen).to(device, dtype).requires_grad_()
    b = torch.randn((3, 16, 8), generator=gen).to(device, dtype).requires_grad_()
    grad = torch.randn((6, 8), generator=gen).to(device, dtype)
    bounds = [(0, 2), (2, 2), (2, 6)]
    with torch.enable_grad():  # the first call may come from inside no_grad (evaluation)
        try:
            out = F.grouped_mm(a, b, offs=torch.tensor([2, 2, 6], dtype=torch.int32, device=device))
            got = (out, *torch.autograd.grad(out, (a, b), grad))
        except (RuntimeError, NotImplementedError):
            return False
        ref = torch.cat([a[lo:hi] @ b[e] for e, (lo, hi) in enumerate(bounds)])
        want = (ref, *torch.autograd.grad(ref, (a, b), grad))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    return all(torch.allclose(g, w, rtol=tol, atol=tol) for g, w in zip(got, want, strict=True))


class MoELayer(nn.Module):
    """Router + top-k routing + E two-layer FFN experts: x [..., d_model] -> (y [..., d_model], MoEStats).

    Args:
        d_model, d_hidden: token width and expert hidden width.
        num_experts: E (at most 4,096).
        top_k: experts per token, 1..8 (and at most E).
        capacity_factor: None for no limit; else each expert takes at most
            ``ceil(capacity_factor * T * k / E_a)`` slots (E_a = allowed experts), filled slot 0 of every
            token first, then slot 1, ... (token order within a slot); overflow slots are dropped.
        activation: applied between the two expert matmuls.
        backend: of route / dispatch / combine ("auto", "triton", "torch").
        expert_compute: "grouped_mm" (torch's grouped matmul), "loop" (a matmul per non-empty expert) or
            "auto" (grouped_mm where :func:`grouped_mm_available` and the widths suit it, else loop).

    Routing: softmax router probabilities over the allowed experts, top-k, weights renormalised over the
    k choices. Capacity-dropped slots lose their contribution (their weight is not redistributed).
    ``set_expert_mask`` restricts routing to a subset of experts (a client's assigned experts): masked
    experts get no tokens, no router probability and a zero gradient in their ``expert_bank`` rows.
    """

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        num_experts: int,
        top_k: int = 2,
        *,
        capacity_factor: float | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] = F.gelu,
        backend: str = "auto",
        expert_compute: str = "auto",
    ):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_hidden", d_hidden), ("num_experts", num_experts)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(top_k, int) or not 1 <= top_k <= min(8, num_experts):
            raise ValueError(
                f"top_k must be an int in [1, min(8, num_experts)={min(8, num_experts)}], got {top_k!r}"
            )
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be None or > 0, got {capacity_factor!r}")
        if expert_compute not in EXPERT_COMPUTE:
            raise ValueError(f"expert_compute must be one of {EXPERT_COMPUTE}, got {expert_compute!r}")
        self.d_model, self.d_hidden, self.num_experts, self.top_k = d_model, d_hidden, num_experts, top_k
        self.capacity_factor = capacity_factor
        self.activation = activation
        self.backend = backend
        self.expert_compute = expert_compute
        self.router = nn.Linear(d_model, num_experts, bias=False)
        sizes = (d_model * d_hidden, d_hidden, d_hidden * d_model, d_model)
        self._bounds = [(sum(sizes[:i]), sum(sizes[: i + 1])) for i in range(4)]
        self.expert_bank = nn.Parameter(torch.empty(num_experts, sum(sizes)))
        self.register_buffer("expert_mask", None, persistent=False)
        self.reset_parameters()

    @property
    def expert_size(self) -> int:
        """P: parameters per expert (one row of ``expert_bank``)."""
        return self.expert_bank.shape[1]

    def reset_parameters(self) -> None:
        """Router and experts initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in))."""
        self.router.reset_parameters()
        with torch.no_grad():
            for (lo, hi), fan_in in zip(
                self._bounds, (self.d_model, self.d_model, self.d_hidden, self.d_hidden), strict=True
            ):
                bound = 1 / math.sqrt(fan_in)
                self.expert_bank[:, lo:hi].uniform_(-bound, bound)

    def expert_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views into the bank (gradients flow through them into ``expert_bank``).

        w1 [E, d_model, d_hidden], b1 [E, d_hidden], w2 [E, d_hidden, d_model], b2 [E, d_model].
        """
        e, d, h = self.num_experts, self.d_model, self.d_hidden
        shapes = ((e, d, h), (e, h), (e, h, d), (e, d))
        return tuple(
            self.expert_bank[:, lo:hi].view(shape)
            for (lo, hi), shape in zip(self._bounds, shapes, strict=True)
        )

    def set_expert_mask(self, mask: torch.Tensor | None) -> None:
        """Route only to the experts where ``mask`` (bool [E], at least one True) is True; None allows all.

        With fewer than ``top_k`` allowed experts, each token's extra slots are dropped.
        """
        if mask is not None:
            if (
                not isinstance(mask, torch.Tensor)
                or mask.dtype != torch.bool
                or mask.shape != (self.num_experts,)
            ):
                raise ValueError(f"mask must be a bool tensor of shape [{self.num_experts}] or None")
            if not bool(mask.any()):
                raise ValueError("mask must allow at least one expert")
            mask = mask.to(self.expert_bank.device)
        self.expert_mask = mask

    def _route(self, x: torch.Tensor):
        """(expert_idx [T,k] after mask and capacity, weights [T,k] float32, aux loss, dropped count,
        gate mass [E] float64)."""
        t, k, e = x.shape[0], self.top_k, self.num_experts
        logits = self.router(x).float()
        allowed = self.expert_mask
        if allowed is not None:
            logits = logits.masked_fill(~allowed, float("-inf"))
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        if allowed is not None:  # with fewer than k allowed experts the extra choices are masked ones
            top_i = top_i.masked_fill(~allowed[top_i], -1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        num_allowed = e if allowed is None else int(allowed.sum())
        chosen = top_i.reshape(-1)
        share = torch.bincount(chosen[chosen >= 0], minlength=e).float() / chosen.ge(0).sum()
        aux_loss = num_allowed * (share * probs.mean(0)).sum()
        gate_mass = probs.detach().sum(0, dtype=torch.float64)
        if self.capacity_factor is None:
            return top_i, weights, aux_loss, torch.zeros((), dtype=torch.int64, device=x.device), gate_mass
        capacity = math.ceil(self.capacity_factor * t * min(k, num_allowed) / num_allowed)
        # Rank of each slot within its expert in slot-major order: route the transposed choices.
        slot_major = route(top_i.t().reshape(-1, 1), e, backend=self.backend)
        expert_start = slot_major.offsets[top_i.clamp(min=0)]
        rank = slot_major.inverse.view(k, t).t() - expert_start
        overflow = (rank >= capacity) & (top_i >= 0)
        return top_i.masked_fill(overflow, -1), weights, aux_loss, overflow.sum(), gate_mass

    def _experts(self, rows: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        """The FFN of each row's expert: rows [R, d_model] grouped by ``offsets`` [E+1] -> [R, d_model]."""
        w1, b1, w2, b2 = self.expert_weights()
        counts = offsets.diff()
        if self._use_grouped_mm(rows):
            ends = offsets[1:].to(torch.int32)
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.num_experts, device=rows.device), counts, output_size=rows.shape[0]
            )
            hidden = self.activation(F.grouped_mm(rows, w1, offs=ends) + b1[expert_of_row])
            return F.grouped_mm(hidden, w2, offs=ends) + b2[expert_of_row]
        outs = [
            torch.addmm(b2[e], self.activation(torch.addmm(b1[e], rows[lo:hi], w1[e])), w2[e])
            for e, (lo, hi) in enumerate(pairwise(offsets.tolist()))
            if hi > lo
        ]
        return torch.cat(outs) if outs else rows.new_zeros((0, self.d_model))

    def _use_grouped_mm(self, rows: torch.Tensor) -> bool:
        if self.expert_compute == "loop":
            return False
        # grouped_mm needs 16-byte aligned row strides of its operands
        aligned = all(n * rows.element_size() % 16 == 0 for n in (self.d_model, self.d_hidden))
        ok = aligned and grouped_mm_available(rows.device.type, rows.dtype)
        if self.expert_compute == "grouped_mm" and not ok:
            raise RuntimeError(
                f"expert_compute='grouped_mm' unavailable for {rows.dtype} on {rows.device.type} with "
                f"d_model={self.d_model}, d_hidden={self.d_hidden} (needs widths * itemsize % 16 == 0)"
            )
        return ok

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        tokens = x.reshape(-1, self.d_model)
        expert_idx, weights, aux_loss, dropped, gate_mass = self._route(tokens)
        plan = route(expert_idx, self.num_experts, backend=self.backend)
        rows = self._experts(dispatch(tokens, plan, backend=self.backend), plan.offsets)
        out = combine(rows, plan, weights, backend=self.backend)
        return out.view(x.shape), MoEStats(aux_loss, expert_idx, weights, plan.counts, dropped, gate_mass)
