"""``dispatch`` (docs/design.md, Ops): differentiable, deterministic expert dispatch.

``dispatch(x[T,H], plan) -> [R,H]`` copies each kept (token, slot) row into grouped order (the order of
:func:`fedmoe_kernels.route`'s plan). Its gradient is a ``combine`` with unit weights, so it needs no
atomics. Output dtype = input dtype; the gradient has the input's dtype.

Backends: Triton kernels on CUDA or under ``TRITON_INTERPRET=1``; ``index_select`` as the CPU default (both
in :mod:`fedmoe_kernels._details.rows`). :func:`dispatch_reference` is the loop reference.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from fedmoe_kernels._backend import resolve
from fedmoe_kernels._details import rows
from fedmoe_kernels.route import RoutingPlan

__all__ = ["dispatch", "dispatch_reference"]


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan, backend):
        ctx.plan, ctx.backend = plan, backend
        return rows.gather(x, plan, None, backend)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        return rows.combine_rows(grad, ctx.plan, None, ctx.backend), None, None


def dispatch(x: torch.Tensor, plan: RoutingPlan, *, backend: str = "auto") -> torch.Tensor:
    """Grouped rows ``out[r] = x[plan.token_index[r]]``: x float [T, H] -> [R, H], x.dtype.

    ``backend``: "auto" (Triton on CUDA, torch elsewhere), "triton" or "torch".
    """
    rows.check_rows("x", x, getattr(plan, "num_tokens", -1), "T", plan)
    return _Dispatch.apply(x, plan, resolve(backend, x))


# ---------------------------------------------------------------- reference


def dispatch_reference(x: torch.Tensor, permutation: torch.Tensor, k: int) -> torch.Tensor:
    """Row ``r`` is ``x[permutation[r] // k]``: x [T, H] -> [R, H] (differentiable)."""
    tokens = x.unbind(0)
    return torch.stack([tokens[int(entry) // k] for entry in permutation]) if len(permutation) else x[:0]
