"""dispatch (docs/design.md, Ops): both backends against the loop reference ``dispatch_reference``, and
route / dispatch / combine run together (determinism, GPU tile sizes, a property test of the torch path).

The Triton backend runs under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_cases import (
    BACKENDS,
    DTYPE_CASES,
    DTYPE_IDS,
    assert_plan_matches_reference,
    make_expert_idx,
)

from fedmoe_kernels import combine, dispatch, route
from fedmoe_kernels._details import route_triton, rows_triton
from fedmoe_kernels.combine import combine_reference
from fedmoe_kernels.dispatch import dispatch_reference
from fedmoe_kernels.route import route_reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "case"),
    DTYPE_CASES,
    ids=DTYPE_IDS,
)
def test_dispatch_matches_reference(backend, dtype, case):
    t, h, k, e, pattern = case
    idx = make_expert_idx(t, k, e, pattern, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((t, h), generator=gen).to(dtype)
    plan = route(idx, e, backend=backend)
    ref = route_reference(idx, e)
    rows = dispatch(x, plan, backend=backend)
    assert rows.dtype == dtype
    assert torch.equal(rows, dispatch_reference(x, ref.permutation, k))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    t, h, k, e = 300, 257, 8, 16
    idx = make_expert_idx(t, k, e, "random", seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn((t, h), generator=gen, dtype=torch.bfloat16)
    weights = torch.rand((t, k), generator=gen)
    grad_out = torch.randn((t, h), generator=gen, dtype=torch.bfloat16)

    def run():
        xs, ws = x.clone().requires_grad_(), weights.clone().requires_grad_()
        plan = route(idx, e, backend=backend)
        rows = dispatch(xs, plan, backend=backend)
        out = combine(rows * 1.5, plan, ws, backend=backend)
        out.backward(grad_out)
        return [plan.permutation, plan.inverse, out, xs.grad, ws.grad]

    first, second = run(), run()
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_backends_agree_with_gpu_tile_sizes(monkeypatch):
    """The Triton kernels with the block sizes used on a GPU (many blocks, multi-tile rows) match torch."""
    monkeypatch.setattr(rows_triton, "TILE", 4096)
    monkeypatch.setattr(route_triton, "BLOCK_N", 128)
    monkeypatch.setattr(route_triton, "SCAN_BLOCK_E", 32)
    t, h, k, e = 150, 1100, 2, 100
    idx = make_expert_idx(t, k, e, "random", seed=9)
    gen = torch.Generator().manual_seed(10)
    x = torch.randn((t, h), generator=gen, requires_grad=True)
    weights = torch.rand((t, k), generator=gen, requires_grad=True)
    results = []
    for backend in BACKENDS:
        plan = route(idx, e, backend=backend)
        out = combine(dispatch(x, plan, backend=backend).sin(), plan, weights, backend=backend)
        results.append(
            [plan.permutation, plan.inverse, out, *torch.autograd.grad(out.square().sum(), (x, weights))]
        )
    assert_plan_matches_reference(route(idx, e, backend="triton"), idx, e)
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@settings(max_examples=60, deadline=None)
@given(
    t=st.integers(1, 40),
    h=st.integers(1, 40),
    k=st.integers(1, 8),
    e=st.integers(1, 70),
    drop=st.floats(0, 1),
    seed=st.integers(0, 2**31 - 1),
)
def test_torch_backend_property(t, h, k, e, drop, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, e, (t, k), generator=gen).masked_fill(torch.rand((t, k), generator=gen) < drop, -1)
    plan = route(idx, e, backend="torch")
    assert_plan_matches_reference(plan, idx, e)
    x = torch.randn((t, h), generator=gen, dtype=torch.float64)
    y = torch.randn((plan.num_rows, h), generator=gen, dtype=torch.float64)
    w = torch.randn((t, k), generator=gen, dtype=torch.float64)
    assert torch.equal(
        dispatch(x, plan, backend="torch"), dispatch_reference(x, plan.permutation, k)
    )
    torch.testing.assert_close(
        combine(y, plan, w, backend="torch"), combine_reference(y, plan.inverse, w)
    )


def test_dispatch_rejects_bad_input():
    plan = route(torch.tensor([[0, 1], [1, -1]]), 2)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="x"):
        dispatch(torch.randn(3, 4), plan)
    with pytest.raises(TypeError, match="x"):
        dispatch(x.long(), plan)
    with pytest.raises(TypeError, match="plan"):
        dispatch(x, plan.inverse)
