"""combine (docs/design.md, Ops): both backends against the loop reference ``combine_reference``, and the
gradients of dispatch and combine (each is the other's backward) against the references' autograd.

The Triton backend runs under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from routing_cases import (
    BACKENDS,
    CASES,
    DTYPE_CASES,
    DTYPE_IDS,
    TOL,
    assert_combine_accurate,
    assert_plan_matches_reference,
    make_expert_idx,
)

from fedmoe_kernels import combine, dispatch, route
from fedmoe_kernels.combine import combine_reference
from fedmoe_kernels.dispatch import dispatch_reference
from fedmoe_kernels.route import route_reference


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "case"),
    DTYPE_CASES,
    ids=DTYPE_IDS,
)
def test_combine_matches_reference(backend, dtype, case):
    t, h, k, e, pattern = case
    idx = make_expert_idx(t, k, e, pattern, seed=1)
    gen = torch.Generator().manual_seed(2)
    torch.randn((t, h), generator=gen)  # the x of test_dispatch_matches_reference: the same draws follow
    weights = torch.rand((t, k), generator=gen)
    plan = route(idx, e, backend=backend)
    ref = route_reference(idx, e)
    y = torch.randn((plan.num_rows, h), generator=gen).to(dtype)
    out = combine(y, plan, weights, backend=backend)
    assert out.dtype == dtype and out.shape == (t, h)
    assert_combine_accurate(out, y, ref.inverse, weights)
    assert_combine_accurate(combine_reference(y, ref.inverse, weights), y, ref.inverse, weights)


GRAD_CASES = [c for c in CASES if c[0] * c[1] * c[2] <= 128 * 257 * 8]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("t", "h", "k", "e", "pattern"), GRAD_CASES, ids=[f"T{c[0]}-E{c[3]}-{c[4]}" for c in GRAD_CASES]
)
def test_gradients_match_reference_float64(backend, t, h, k, e, pattern):
    idx = make_expert_idx(t, k, e, pattern, seed=3)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn((t, h), generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand((t, k), generator=gen, dtype=torch.float64, requires_grad=True)
    mix = torch.randn((h, h), generator=gen, dtype=torch.float64)  # so that y depends on x non-trivially
    grad_out = torch.randn((t, h), generator=gen, dtype=torch.float64)

    plan = route(idx, e, backend=backend)
    out = combine(torch.tanh(dispatch(x, plan, backend=backend) @ mix), plan, weights, backend=backend)
    got = torch.autograd.grad(out, (x, weights), grad_out)

    ref = route_reference(idx, e)
    out_ref = combine_reference(
        torch.tanh(dispatch_reference(x, ref.permutation, k) @ mix), ref.inverse, weights
    )
    if out_ref.requires_grad:
        want = torch.autograd.grad(out_ref, (x, weights), grad_out, allow_unused=True, materialize_grads=True)
    else:  # every slot dropped: the reference output is constant
        want = (torch.zeros_like(x), torch.zeros_like(weights))
    torch.testing.assert_close(out, out_ref)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gradients(backend, dtype):
    """Gradients keep their input's dtype and agree with float64 gradients to the dtype's precision."""
    t, h, k, e = 64, 100, 4, 8
    idx = make_expert_idx(t, k, e, "random", seed=5)
    gen = torch.Generator().manual_seed(6)
    x64 = torch.randn((t, h), generator=gen, dtype=torch.float64)
    y64 = torch.randn((int((idx >= 0).sum()), h), generator=gen, dtype=torch.float64)
    w32 = torch.rand((t, k), generator=gen)
    g64 = torch.randn((t, h), generator=gen, dtype=torch.float64)
    plan = route(idx, e, backend=backend)

    def grads(x, y, w, g):
        x, y, w = (v.detach().requires_grad_() for v in (x, y, w))
        out = dispatch(x, plan, backend=backend).sum() + (combine(y, plan, w, backend=backend) * g).sum()
        return torch.autograd.grad(out, (x, y, w))

    low = grads(x64.to(dtype), y64.to(dtype), w32, g64.to(dtype))
    high = grads(x64, y64, w32.double(), g64)
    assert [v.dtype for v in low] == [dtype, dtype, torch.float32]
    rtol = TOL[dtype][0]
    for lo, hi in zip(low, high, strict=True):
        torch.testing.assert_close(lo.double(), hi, rtol=4 * rtol, atol=4 * rtol * hi.abs().max().item())


@settings(max_examples=8, deadline=None)
@given(
    t=st.integers(1, 20),
    h=st.integers(1, 20),
    k=st.integers(1, 8),
    e=st.integers(1, 40),
    seed=st.integers(0, 999),
)
def test_triton_backend_property(t, h, k, e, seed):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(-1, e, (t, k), generator=gen)
    plan = route(idx, e, backend="triton")
    assert_plan_matches_reference(plan, idx, e)
    y = torch.randn((plan.num_rows, h), generator=gen, dtype=torch.float64)
    w = torch.randn((t, k), generator=gen, dtype=torch.float64)
    torch.testing.assert_close(
        combine(y, plan, w, backend="triton"), combine_reference(y, plan.inverse, w)
    )


def test_dropped_slots_do_not_leak_non_finite_rows():
    """A dropped slot contributes nothing, even where the row it would have read holds inf/nan."""
    idx = torch.tensor([[0, 1], [1, -1]])  # rows: (0,0) -> 0, (0,1) -> 1, (1,0) -> 2; (1,1) dropped
    y = torch.tensor([[float("inf")], [2.0], [3.0]])
    for backend in BACKENDS:
        out = combine(y, route(idx, 2, backend=backend), torch.ones(2, 2), backend=backend)
        assert out[:, 0].tolist() == [float("inf"), 3.0]


@pytest.mark.parametrize("backend", BACKENDS)
def test_combine_of_empty_rows_is_empty_with_zero_gradients(backend):
    # H = 0: embedding_bag (the torch path) raised, the Triton weight gradient divided by zero
    plan = route(torch.tensor([[0, 1], [1, -1]]), 2, backend=backend)
    y, w = torch.zeros(3, 0, requires_grad=True), torch.rand(2, 2, requires_grad=True)
    out = combine(y, plan, w, backend=backend)
    assert out.shape == (2, 0)
    out.sum().backward()
    assert y.grad.shape == (3, 0) and w.grad.eq(0).all()


def test_combine_rejects_bad_input():
    plan = route(torch.tensor([[0, 1], [1, -1]]), 2)
    y, w = torch.randn(3, 4), torch.rand(2, 2)
    with pytest.raises(ValueError, match="y"):
        combine(torch.randn(4, 4), plan, w)
    with pytest.raises(ValueError, match="weights"):
        combine(y, plan, torch.rand(2, 3))
    with pytest.raises(TypeError, match="weights"):
        combine(y, plan, w.long())
    with pytest.raises(ValueError, match="backend"):
        combine(y, plan, w, backend="cuda")
