"""``combine`` (docs/design.md, Ops): differentiable, deterministic expert combine.

``combine(y[R,H], plan, weights[T,k]) -> [T,H]`` is, per token, the weighted sum of its kept grouped rows,
taken in slot order with float32 accumulation (float64 for float64). Gradients need no atomics: the
gradient for ``y`` is a ``dispatch`` scaled by the weights, and the gradient for ``weights`` is a
per-(token, slot) dot product. Output dtype = y's dtype; gradients have their input's dtype.

Backends: Triton kernels on CUDA or under ``TRITON_INTERPRET=1``; vectorised torch as the CPU default
(``embedding_bag`` in sum mode, one bag per token; both in :mod:`fedmoe_kernels._details.rows`).
:func:`combine_reference` is the loop reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fedmoe_kernels._backend import resolve
from fedmoe_kernels._details import rows
from fedmoe_kernels.route import RoutingPlan

__all__ = ["combine", "combine_reference"]


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weights, plan, backend):
        ctx.save_for_backward(y, weights)
        ctx.plan, ctx.backend = plan, backend
        if y.shape[1] == 0:  # H = 0: nothing to sum (the torch path's embedding_bag rejects empty rows)
            return y.new_zeros((plan.num_tokens, 0))
        return rows.combine_rows(y, plan, weights, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        y, weights = ctx.saved_tensors
        plan, backend = ctx.plan, ctx.backend
        if y.shape[1] == 0:  # empty rows: no gradient flows
            return torch.zeros_like(y), torch.zeros_like(weights), None, None
        grad_y = rows.gather(grad, plan, weights, backend) if ctx.needs_input_grad[0] else None
        grad_w = rows.slot_dot(grad, y, plan, weights.dtype, backend) if ctx.needs_input_grad[1] else None
        return grad_y, grad_w, None, None


def combine(
    y: torch.Tensor, plan: RoutingPlan, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """``out[t] = sum_s weights[t, s] * y[plan.inverse[t, s]]`` over kept slots: y float [R, H] -> [T, H]
    (H may be 0).

    ``weights``: float [T, k] (any float dtype; cast to the accumulation dtype). Output dtype = y.dtype.
    ``backend``: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    rows.check_rows("y", y, getattr(plan, "num_rows", -1), "R", plan)
    if not isinstance(weights, torch.Tensor):
        raise TypeError(f"weights must be a torch.Tensor, got {type(weights).__name__}")
    if weights.dtype not in rows.FLOAT_DTYPES:
        raise TypeError(f"weights must be float16, bfloat16, float32 or float64, got {weights.dtype}")
    if tuple(weights.shape) != tuple(plan.inverse.shape):
        raise ValueError(
            f"weights must have shape [T, k]={tuple(plan.inverse.shape)}, got {tuple(weights.shape)}"
        )
    if weights.device != y.device:
        raise ValueError(f"weights is on {weights.device} but y is on {y.device}")
    return _Combine.apply(y, weights, plan, resolve(backend, y))


# ---------------------------------------------------------------- reference


def combine_reference(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per token, ``sum_s weights[t, s] * y[inverse[t, s]]`` over slots with ``inverse >= 0``, summed in slot
    order in float32 (float64 for float64 ``y``), cast to ``y.dtype``: y [R, H] -> [T, H] (differentiable)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    rows = y.unbind(0)
    out = []
    for token, token_weights in enumerate(weights.unbind(0)):
        total = torch.zeros(y.shape[1], dtype=acc)
        for slot, weight in enumerate(token_weights.unbind(0)):
            row = int(inverse[token, slot])
            if row >= 0:
                total = total + weight.to(acc) * rows[row].to(acc)
        out.append(total)
    return torch.stack(out).to(y.dtype)
