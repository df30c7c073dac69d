"""``dispatch`` and ``combine`` (DESIGN.md §3.2): differentiable, deterministic expert dispatch and combine.

``dispatch(x[T,H], plan) -> [R,H]`` copies each kept (token, slot) row into grouped order;
``combine(y[R,H], plan, weights[T,k]) -> [T,H]`` is, per token, the weighted sum of its kept grouped rows,
taken in slot order with float32 accumulation (float64 for float64). Gradients need no atomics: the
gradient of dispatch is a combine with unit weights, the gradient of combine for ``y`` is a dispatch scaled
by the weights, and its gradient for ``weights`` is a per-(token, slot) dot product. Output dtype = input
dtype; gradients have their input's dtype.

Backends: Triton kernels (:mod:`fedmoe_kernels.backend.dispatch`) on CUDA or under ``TRITON_INTERPRET=1``;
vectorised torch as the CPU default (``index_select``; combine is ``embedding_bag`` in sum mode with one bag
per token, which rounds float16/bfloat16 weights to y's dtype before its float32-accumulated sum; the
weights gradient is, slot by slot, a row-wise dot product of gathered rows with the output gradient).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fedmoe_kernels._backend import resolve
from fedmoe_kernels.routing import RoutingPlan

__all__ = ["combine", "dispatch"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    from fedmoe_kernels.backend import dispatch as kernels

    return kernels


def _gather(x: torch.Tensor, plan: RoutingPlan, scale: torch.Tensor | None, backend: str) -> torch.Tensor:
    """[R,H] of x.dtype: row r is x[token_index[r]], times scale[t, s] of its (token, slot) if given."""
    if backend == "triton":
        return _kernels().gather(
            x.contiguous(), plan.permutation, plan.top_k, None if scale is None else scale.contiguous()
        )
    if scale is None:
        return x.index_select(0, plan.token_index)
    # one-row bags: a scaled gather in one pass (scale rounded to x's dtype, product formed in float32)
    row_scale = scale.reshape(-1).index_select(0, plan.permutation).to(x.dtype)
    starts = torch.arange(plan.num_rows, device=x.device)
    return F.embedding_bag(plan.token_index, x.contiguous(), starts, mode="sum", per_sample_weights=row_scale)


def _combine(y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None, backend: str) -> torch.Tensor:
    """[T,H] of y.dtype: per token, the sum over kept slots, in slot order, of (weight *) grouped row."""
    if backend == "triton":
        return _kernels().combine(
            y.contiguous(), plan.inverse, None if weights is None else weights.contiguous()
        )
    # One bag of grouped rows per token: embedding_bag sums each bag in order, accumulating in float32 for
    # float16/bfloat16; its per-sample weights have y's dtype.
    t, k = plan.inverse.shape
    rows = plan.inverse.reshape(-1)
    if plan.num_rows == rows.numel():
        starts = torch.arange(0, t * k, k, device=y.device)
    else:
        kept = rows >= 0
        per_token = kept.view(t, k).sum(1)
        starts = per_token.cumsum(0) - per_token
        rows = rows[kept]
        weights = None if weights is None else weights.reshape(-1)[kept]
    sample_weights = None if weights is None else weights.reshape(-1).to(y.dtype)
    return F.embedding_bag(rows, y.contiguous(), starts, mode="sum", per_sample_weights=sample_weights)


def _slot_dot(g: torch.Tensor, y: torch.Tensor, plan: RoutingPlan, dtype: torch.dtype, backend: str):
    """[T,k] of ``dtype``: <g[t], y[inverse[t,s]]> per (token, slot), 0 where dropped."""
    if backend == "triton":
        return _kernels().slot_dot(g.contiguous(), y.contiguous(), plan.inverse, dtype)
    t, k = plan.inverse.shape
    if plan.num_rows == 0:
        return torch.zeros((t, k), dtype=dtype, device=g.device)
    acc = _acc_dtype(y.dtype)
    g = g.to(acc)
    rows = plan.inverse.clamp(min=0)  # dropped slots read row 0, zeroed below
    dots = torch.stack([torch.linalg.vecdot(y.index_select(0, rows[:, s]).to(acc), g) for s in range(k)], 1)
    return dots.masked_fill(plan.inverse < 0, 0).to(dtype)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, backend):
        ctx.plan, ctx.backend = plan, backend
        return _gather(x, plan, None, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return _combine(grad, ctx.plan, None, ctx.backend), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, plan, backend):
        ctx.save_for_backward(y, weights)
        ctx.plan, ctx.backend = plan, backend
        return _combine(y, plan, weights, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        grad_y = _gather(grad, ctx.plan, weights, ctx.backend) if ctx.needs_input_grad[0] else None
        grad_w = _slot_dot(grad, y, ctx.plan, weights.dtype, ctx.backend) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


def _check_rows(name: str, tensor, rows: int, rows_name: str, plan) -> None:
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"plan must be a RoutingPlan, got {type(plan).__name__}")
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")
    if tensor.ndim != 2 or tensor.shape[0] != rows:
        raise ValueError(f"{name} must be 2-D [{rows_name}={rows}, H], got shape {tuple(tensor.shape)}")
    if tensor.device != plan.inverse.device:
        raise ValueError(f"{name} is on {tensor.device} but plan is on {plan.inverse.device}")


def dispatch(x: torch.Tensor, plan: RoutingPlan, *, backend: str = "auto") -> torch.Tensor:
    """Grouped rows ``out[r] = x[plan.token_index[r]]``: x float [T, H] -> [R, H], x.dtype."""
    _check_rows("x", x, getattr(plan, "num_tokens", -1), "T", plan)
    return _Dispatch.apply(x, plan, resolve(backend, x))


def combine(
    y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``out[t] = sum_s weights[t, s] * y[plan.inverse[t, s]]`` over kept slots: y float [R, H] -> [T, H].

    ``weights``: float [T, k] (any float dtype; cast to the accumulation dtype). Output dtype = y.dtype.
    """
    _check_rows("y", y, getattr(plan, "num_rows", -1), "R", plan)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weights must be float16, bfloat16, float32 or float64, got {weights.dtype}")
    if tuple(weights.shape) != tuple(plan.inverse.shape):
        raise ValueError(
            f"weights must have shape [T, k]={tuple(plan.inverse.shape)}, got {tuple(weights.shape)}"
        )
    if weights.device != y.device:
        raise ValueError(f"weights is on {weights.device} but y is on {y.device}")
    return _Combine.apply(y, weights, plan, resolve(backend, y))
