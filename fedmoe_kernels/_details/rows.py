"""The grouped-row primitives that ``dispatch`` and ``combine`` are made of, and of which each is the
other's gradient: ``gather`` (dispatch; combine's gradient for ``y``), ``combine_rows`` (combine;
dispatch's gradient) and ``slot_dot`` (combine's gradient for the weights).

Each runs the Triton kernels of :mod:`fedmoe_kernels._details.rows_triton` (``backend="triton"``) or
vectorised torch: ``index_select``; combine is ``embedding_bag`` in sum mode with one bag per token, which
rounds float16/bfloat16 weights to y's dtype before its float32-accumulated sum; the weights gradient is,
slot by slot, a row-wise dot product of gathered rows with the output gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fedmoe_kernels.route import RoutingPlan

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernels():
    from fedmoe_kernels._details import rows_triton

    return rows_triton


def gather(x: torch.Tensor, plan: RoutingPlan, scale: torch.Tensor | None, backend: str) -> torch.Tensor:
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


def combine_rows(
    y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor | None, backend: str
) -> torch.Tensor:
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


def slot_dot(g: torch.Tensor, y: torch.Tensor, plan: RoutingPlan, dtype: torch.dtype, backend: str):
    """[T,k] of ``dtype``: <g[t], y[inverse[t,s]]> per (token, slot), 0 where dropped."""
    if backend == "triton":
        return _kernels().slot_dot(g.contiguous(), y.contiguous(), plan.inverse, dtype)
    t, k = plan.inverse.shape
    if plan.num_rows == 0:
        return torch.zeros((t, k), dtype=dtype, device=g.device)
    acc = acc_dtype(y.dtype)
    g = g.to(acc)
    rows = plan.inverse.clamp(min=0)  # dropped slots read row 0, zeroed below
    dots = torch.stack([torch.linalg.vecdot(y.index_select(0, rows[:, s]).to(acc), g) for s in range(k)], 1)
    return dots.masked_fill(plan.inverse < 0, 0).to(dtype)


def check_rows(name: str, tensor, rows: int, rows_name: str, plan) -> None:
    """Validate a float [rows, H] operand of dispatch or combine and its plan."""
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
