"""Top-k Mixture-of-Experts layer on :func:`fedmoe_kernels.route` / ``dispatch`` / ``combine``.

All E experts live in one flat parameter ``expert_bank`` [E, P]: expert ``e`` is the row ``expert_bank[e]``
(its ``w1`` [d_model, d_hidden], ``b1`` [d_hidden], ``w2`` [d_hidden, d_model], ``b2`` [d_model], in that
order), so aggregation reads and writes experts in place and a client's share is a set of rows. A model with
MoE layers in several blocks keeps one bank and gives each layer its columns (``bank_offset``).
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
from torch.autograd.function import once_differentiable

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
    - ``gate_mass``: float64 [E], the full router's probabilities (a softmax over all E experts, the mask
      ignored) summed over the T tokens (no gradient): ``gate_mass / T`` is the mean router distribution.
    - ``route_loss``: float32 scalar, the routing loss under a mask: the mean over the tokens of
      ``logsumexp(all logits) - logsumexp(allowed logits)``, minus the log of the full router's probability
      mass on the allowed experts (0 without a mask). Its gradient reaches the router's weights only (the
      tokens are detached): it trains the full router to send the tokens where they were trained
      (docs/design.md, Routing loss).
    """

    aux_loss: torch.Tensor
    expert_idx: torch.Tensor
    weights: torch.Tensor
    counts: torch.Tensor
    dropped: torch.Tensor
    gate_mass: torch.Tensor
    route_loss: torch.Tensor


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
        bank_offset: None: the experts are the layer's own parameter ``expert_bank`` [E, P]; an int: the
            caller holds them and passes its bank [E, >= bank_offset + P] to every forward, whose columns
            ``bank_offset:bank_offset + P`` are this layer's experts (``expert_bank`` is then None).

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
        bank_offset: int | None = None,
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
        self.expert_size = self.expert_size_of(d_model, d_hidden)  # P: one row of the bank
        if bank_offset is not None and (not isinstance(bank_offset, int) or bank_offset < 0):
            raise ValueError(f"bank_offset must be None or an int >= 0, got {bank_offset!r}")
        self.bank_offset = bank_offset
        own = bank_offset is None
        self.expert_bank = nn.Parameter(torch.empty(num_experts, self.expert_size)) if own else None
        self.register_buffer("expert_mask", None, persistent=False)
        self.reset_parameters()

    @staticmethod
    def expert_size_of(d_model: int, d_hidden: int) -> int:
        """P of an expert of these widths: ``w1``, ``b1``, ``w2``, ``b2``."""
        return 2 * d_model * d_hidden + d_hidden + d_model

    def reset_parameters(self) -> None:
        """Router and (an own bank's) experts initialised like ``nn.Linear`` (uniform in +-1/sqrt(fan_in))."""
        self.router.reset_parameters()
        if self.expert_bank is not None:
            self.reset_experts(self.expert_bank)

    @torch.no_grad()
    def reset_experts(self, bank: torch.Tensor) -> None:
        """Initialise this layer's experts in ``bank`` (see ``bank_offset``), in place, like ``nn.Linear``."""
        columns = self._columns(bank)
        for (lo, hi), fan_in in zip(
            self._bounds, (self.d_model, self.d_model, self.d_hidden, self.d_hidden), strict=True
        ):
            bound = 1 / math.sqrt(fan_in)
            columns[:, lo:hi].uniform_(-bound, bound)

    def _columns(self, bank: torch.Tensor | None) -> torch.Tensor:
        """[E, P]: this layer's experts in ``bank`` (default: ``expert_bank``)."""
        if self.bank_offset is None:
            bank = self.expert_bank if bank is None else bank
            lo = 0
        else:
            lo = self.bank_offset
        hi = lo + self.expert_size
        if bank is None or bank.ndim != 2 or bank.shape[0] != self.num_experts or bank.shape[1] < hi:
            got = "none" if bank is None else tuple(bank.shape)
            raise ValueError(f"bank must be [E={self.num_experts}, >= {hi}], got {got}")
        return bank if bank.shape[1] == self.expert_size else bank[:, lo:hi]

    def _views(self, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1, b1, w2, b2 of the experts ``columns`` [E, P] (see :meth:`expert_weights`)."""
        e, d, h = self.num_experts, self.d_model, self.d_hidden
        shapes = ((e, d, h), (e, h), (e, h, d), (e, d))
        bounds = zip(self._bounds, shapes, strict=True)
        return tuple(columns[:, lo:hi].view(shape) for (lo, hi), shape in bounds)

    def expert_weights(
        self, bank: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views into this layer's experts in ``bank`` (default: ``expert_bank``); gradients flow through
        them into it.

        w1 [E, d_model, d_hidden], b1 [E, d_hidden], w2 [E, d_hidden, d_model], b2 [E, d_model].
        """
        return self._views(self._columns(bank))

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
            mask = mask.to(self.router.weight.device)
        self.expert_mask = mask

    def _route(self, x: torch.Tensor):
        """(expert_idx [T,k] after mask and capacity, weights [T,k] float32, aux loss, dropped count,
        gate mass [E] float64, routing loss)."""
        t, k, e = x.shape[0], self.top_k, self.num_experts
        full = self.router(x).float()
        gate_mass = full.detach().softmax(-1).sum(0, dtype=torch.float64)
        allowed = self.expert_mask
        logits, route_loss = full, full.new_zeros(())
        if allowed is not None:
            logits = full.masked_fill(~allowed, float("-inf"))
            if t:  # the router's weights alone learn from it, not the representation of the tokens
                router = F.linear(x.detach(), self.router.weight).float()
                held = router.masked_fill(~allowed, float("-inf"))
                route_loss = (router.logsumexp(-1) - held.logsumexp(-1)).mean()
        probs = logits.softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        if allowed is not None:  # with fewer than k allowed experts the extra choices are masked ones
            top_i = top_i.masked_fill(~allowed[top_i], -1)
        weights = top_p / top_p.sum(-1, keepdim=True)
        num_allowed = e if allowed is None else int(allowed.sum())
        chosen = top_i.reshape(-1)
        share = torch.bincount(chosen[chosen >= 0], minlength=e).float() / chosen.ge(0).sum()
        aux_loss = num_allowed * (share * probs.mean(0)).sum()
        if self.capacity_factor is None:
            no_drops = torch.zeros((), dtype=torch.int64, device=x.device)
            return top_i, weights, aux_loss, no_drops, gate_mass, route_loss
        capacity = math.ceil(self.capacity_factor * t * min(k, num_allowed) / num_allowed)
        # Rank of each slot within its expert in slot-major order: route the transposed choices.
        slot_major = route(top_i.t().reshape(-1, 1), e, backend=self.backend)
        expert_start = slot_major.offsets[top_i.clamp(min=0)]
        rank = slot_major.inverse.view(k, t).t() - expert_start
        overflow = (rank >= capacity) & (top_i >= 0)
        return top_i.masked_fill(overflow, -1), weights, aux_loss, overflow.sum(), gate_mass, route_loss

    def _experts(self, rows: torch.Tensor, offsets: torch.Tensor, columns: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """The FFN of each row's expert: rows [R, d_model] grouped by ``offsets`` [E+1] -> [R, d_model];
        ``columns`` [E, P]: the experts (default: ``expert_bank``)."""
        if columns is None:
            columns = self._columns(None)
        if self._use_grouped_mm(rows):
            w1, b1, w2, b2 = self._views(columns)
            counts = offsets.diff()
            ends = offsets[1:].to(torch.int32)
            expert_of_row = torch.repeat_interleave(
                torch.arange(self.num_experts, device=rows.device), counts, output_size=rows.shape[0]
            )
            hidden = self.activation(F.grouped_mm(rows, w1, offs=ends) + b1[expert_of_row])
            return F.grouped_mm(hidden, w2, offs=ends) + b2[expert_of_row]
        spans = [(e, lo, hi) for e, (lo, hi) in enumerate(pairwise(offsets.tolist())) if hi > lo]
        return _ExpertLoop.apply(rows, columns, self, spans)

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

    def forward(self, x: torch.Tensor, bank: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """x [..., d_model] -> y [..., d_model]; ``bank``: the experts (see ``bank_offset``)."""
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        columns = self._columns(bank)
        tokens = x.reshape(-1, self.d_model)
        expert_idx, weights, aux_loss, dropped, gate_mass, route_loss = self._route(tokens)
        plan = route(expert_idx, self.num_experts, backend=self.backend)
        rows = self._experts(dispatch(tokens, plan, backend=self.backend), plan.offsets, columns)
        out = combine(rows, plan, weights, backend=self.backend)
        stats = MoEStats(aux_loss, expert_idx, weights, plan.counts, dropped, gate_mass, route_loss)
        return out.view(x.shape), stats


class _ExpertLoop(torch.autograd.Function):
    """``expert_compute="loop"`` as one autograd node: two ``addmm`` per non-empty expert (``spans``: (expert,
    first row, end row)) and the activation once over all rows; the backward writes the experts' gradient
    straight into one bank-shaped tensor (no autograd node per expert, no zero-filled gradient per weight
    view). rows [R, d_model], bank [E, P] -> [R, d_model]."""

    @staticmethod
    def forward(ctx, rows, bank, layer, spans):
        w1, b1, w2, b2 = layer._views(bank)
        hidden = rows.new_empty((rows.shape[0], layer.d_hidden))
        for e, lo, hi in spans:
            torch.addmm(b1[e], rows[lo:hi], w1[e], out=hidden[lo:hi])
        with torch.enable_grad():  # the activation's own backward is reused below
            hidden.requires_grad_()
            act = layer.activation(hidden)
        out = rows.new_empty(rows.shape)
        for e, lo, hi in spans:
            torch.addmm(b2[e], act[lo:hi], w2[e], out=out[lo:hi])
        ctx.save_for_backward(rows, bank)
        ctx.layer, ctx.spans, ctx.hidden, ctx.act = layer, spans, hidden, act
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        rows, bank = ctx.saved_tensors
        layer, spans, act = ctx.layer, ctx.spans, ctx.act.detach()
        w1, _, w2, _ = layer._views(bank)
        grad_bank = torch.zeros_like(bank) if ctx.needs_input_grad[1] else None
        if grad_bank is not None:
            g1, gb1, g2, gb2 = layer._views(grad_bank)
        grad_act = torch.empty_like(act)
        for e, lo, hi in spans:
            if grad_bank is not None:
                torch.mm(act[lo:hi].t(), grad[lo:hi], out=g2[e])
                torch.sum(grad[lo:hi], 0, out=gb2[e])
            torch.mm(grad[lo:hi], w2[e].t(), out=grad_act[lo:hi])
        (grad_hidden,) = torch.autograd.grad(ctx.act, ctx.hidden, grad_act)
        grad_rows = torch.empty_like(rows) if ctx.needs_input_grad[0] else None
        for e, lo, hi in spans:
            if grad_bank is not None:
                torch.mm(rows[lo:hi].t(), grad_hidden[lo:hi], out=g1[e])
                torch.sum(grad_hidden[lo:hi], 0, out=gb1[e])
            if grad_rows is not None:
                torch.mm(grad_hidden[lo:hi], w1[e].t(), out=grad_rows[lo:hi])
        return grad_rows, grad_bank, None, None
