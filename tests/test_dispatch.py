"""route / dispatch / combine (DESIGN.md §3.2): both backends against the plain references.

The Triton backend runs under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py when there is no GPU).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import fedmoe_kernels
from fedmoe_kernels import RoutingPlan, combine, dispatch, reference, route
from fedmoe_kernels.backend import dispatch as dispatch_kernels
from fedmoe_kernels.backend import routing as routing_kernels

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
TOL = {  # (rtol, atol) of gradients in low precision against float64 gradients, before scaling
    torch.float16: (2e-3, 1e-4),
    torch.bfloat16: (1.6e-2, 1e-3),
}


def assert_combine_accurate(out, y, inverse, weights):
    """``out`` is within the error bound of a float32-accumulated (float64 for float64) combine in out.dtype.

    With exact = the float64 combine and bound = the combine of |y| and |weights|:
    |out - exact| <= eps * (|exact| + tiny) (output rounding, subnormals included)
    + (eps / 2 + k * eps_acc) * bound (weights rounded to the dtype, accumulation).
    """
    exact = reference.combine_reference(y.double(), inverse, weights.double())
    bound = reference.combine_reference(y.double().abs(), inverse, weights.double().abs())
    eps, tiny = torch.finfo(out.dtype).eps, torch.finfo(out.dtype).tiny
    eps_acc = torch.finfo(torch.float64 if out.dtype == torch.float64 else torch.float32).eps
    allowed = eps * (exact.abs() + tiny) + (eps / 2 + inverse.shape[1] * eps_acc) * bound
    excess = (out.double() - exact).abs() - allowed
    assert excess.max().item() <= 0, f"error above bound by {excess.max().item()}"


def make_expert_idx(t: int, k: int, e: int, pattern: str, seed: int = 0) -> torch.Tensor:
    """int64 [t, k] expert choices; ``pattern`` names the awkward case (repeats within a token allowed)."""
    gen = torch.Generator().manual_seed(seed)
    if pattern == "one_expert":  # every slot of every token to the last expert
        return torch.full((t, k), e - 1, dtype=torch.int64)
    if pattern == "all_dropped":
        return torch.full((t, k), -1, dtype=torch.int64)
    if pattern == "few_experts":  # most experts empty
        few = torch.randperm(e, generator=gen)[: min(2, e)]
        return few[torch.randint(0, few.numel(), (t, k), generator=gen)]
    idx = torch.randint(0, e, (t, k), generator=gen)
    drop = {"random": 0.1, "dropped": 0.6}[pattern]
    return idx.masked_fill(torch.rand((t, k), generator=gen) < drop, -1)


# (T, H, k, E, pattern): the listed sizes, mixed so that each appears with the awkward patterns.
CASES = [
    (1, 1, 1, 1, "random"),
    (1, 3, 8, 4096, "random"),  # one token, E > T
    (7, 3, 2, 3, "random"),
    (7, 100, 8, 3, "all_dropped"),  # R = 0
    (7, 257, 4, 64, "one_expert"),
    (128, 100, 2, 64, "few_experts"),  # empty experts
    (128, 1024, 4, 1, "random"),
    (128, 257, 8, 4096, "dropped"),  # E > T, many dropped slots
    (1000, 1, 1, 3, "random"),
    (1000, 3, 2, 4096, "few_experts"),
    (1000, 1024, 8, 64, "random"),
]
CASE_IDS = [f"T{t}-H{h}-k{k}-E{e}-{p}" for t, h, k, e, p in CASES]


def assert_plan_matches_reference(plan: RoutingPlan, expert_idx: torch.Tensor, num_experts: int) -> None:
    ref = reference.route_reference(expert_idx, num_experts)
    assert torch.equal(plan.permutation, ref.permutation)
    assert torch.equal(plan.offsets, ref.offsets)
    assert torch.equal(plan.inverse, ref.inverse)
    assert torch.equal(plan.token_index, ref.permutation // expert_idx.shape[1])
    assert plan.num_rows == int((expert_idx >= 0).sum())
    assert torch.equal(plan.counts, torch.bincount(expert_idx[expert_idx >= 0], minlength=num_experts))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("t", "h", "k", "e", "pattern"), CASES, ids=CASE_IDS)
def test_route_matches_reference(backend, t, h, k, e, pattern):
    idx = make_expert_idx(t, k, e, pattern)
    plan = route(idx, e, backend=backend)
    assert_plan_matches_reference(plan, idx, e)
    assert (plan.num_tokens, plan.top_k, plan.num_experts) == (t, k, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_route_is_stable_by_token_then_slot(backend):
    # Token 0 sends both slots to expert 1; token 1 sends slot 0 to expert 1: rows are (0,0), (0,1), (1,0).
    idx = torch.tensor([[1, 1], [1, -1], [0, 0]], dtype=torch.int32)
    plan = route(idx, 2, backend=backend)
    assert plan.permutation.tolist() == [4, 5, 0, 1, 2]
    assert plan.offsets.tolist() == [0, 2, 5]
    assert plan.inverse.tolist() == [[2, 3], [4, -1], [0, 1]]


# Every case in float32; the other dtypes on the one-token, all-dropped, one-expert, E > T and largest cases.
DTYPE_CASES = [(torch.float32, c) for c in CASES] + [
    (d, CASES[i]) for d in (torch.float16, torch.bfloat16, torch.float64) for i in (1, 3, 4, 7, 10)
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("dtype", "case"),
    DTYPE_CASES,
    ids=[f"{d}-{CASE_IDS[CASES.index(c)]}".removeprefix("torch.") for d, c in DTYPE_CASES],
)
def test_forward_matches_reference(backend, dtype, case):
    t, h, k, e, pattern = case
    idx = make_expert_idx(t, k, e, pattern, seed=1)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn((t, h), generator=gen).to(dtype)
    weights = torch.rand((t, k), generator=gen)
    plan = route(idx, e, backend=backend)
    ref = reference.route_reference(idx, e)
    rows = dispatch(x, plan, backend=backend)
    assert rows.dtype == dtype
    assert torch.equal(rows, reference.dispatch_reference(x, ref.permutation, k))
    y = torch.randn((plan.num_rows, h), generator=gen).to(dtype)
    out = combine(y, plan, weights, backend=backend)
    assert out.dtype == dtype and out.shape == (t, h)
    assert_combine_accurate(out, y, ref.inverse, weights)
    assert_combine_accurate(reference.combine_reference(y, ref.inverse, weights), y, ref.inverse, weights)


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

    ref = reference.route_reference(idx, e)
    out_ref = reference.combine_reference(
        torch.tanh(reference.dispatch_reference(x, ref.permutation, k) @ mix), ref.inverse, weights
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
    monkeypatch.setattr(dispatch_kernels, "TILE", 4096)
    monkeypatch.setattr(routing_kernels, "BLOCK_N", 128)
    monkeypatch.setattr(routing_kernels, "SCAN_BLOCK_E", 32)
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
        dispatch(x, plan, backend="torch"), reference.dispatch_reference(x, plan.permutation, k)
    )
    torch.testing.assert_close(
        combine(y, plan, w, backend="torch"), reference.combine_reference(y, plan.inverse, w)
    )


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
        combine(y, plan, w, backend="triton"), reference.combine_reference(y, plan.inverse, w)
    )


def test_dropped_slots_do_not_leak_non_finite_rows():
    """A dropped slot contributes nothing, even where the row it would have read holds inf/nan."""
    idx = torch.tensor([[0, 1], [1, -1]])  # rows: (0,0) -> 0, (0,1) -> 1, (1,0) -> 2; (1,1) dropped
    y = torch.tensor([[float("inf")], [2.0], [3.0]])
    for backend in BACKENDS:
        out = combine(y, route(idx, 2, backend=backend), torch.ones(2, 2), backend=backend)
        assert out[:, 0].tolist() == [float("inf"), 3.0]


def test_exports():
    assert {"route", "dispatch", "combine", "RoutingPlan"} <= set(fedmoe_kernels.__all__)


@pytest.mark.parametrize(
    ("expert_idx", "num_experts", "error", "match"),
    [
        ([[0, 1]], 2, TypeError, "expert_idx"),
        (torch.tensor([[0.0, 1.0]]), 2, TypeError, "expert_idx"),
        (torch.tensor([0, 1]), 2, ValueError, "expert_idx"),
        (torch.zeros((0, 2), dtype=torch.int64), 2, ValueError, "expert_idx"),
        (torch.zeros((2, 9), dtype=torch.int64), 2, ValueError, "expert_idx"),
        (torch.tensor([[0, 2]]), 2, ValueError, "expert_idx"),
        (torch.tensor([[0, -2]]), 2, ValueError, "expert_idx"),
        (torch.tensor([[0, 1]]), 0, ValueError, "num_experts"),
        (torch.tensor([[0, 1]]), 4097, ValueError, "num_experts"),
        (torch.tensor([[0, 1]]), 2.0, TypeError, "num_experts"),
    ],
)
def test_route_rejects_bad_input(expert_idx, num_experts, error, match):
    with pytest.raises(error, match=match):
        route(expert_idx, num_experts)


def test_dispatch_and_combine_reject_bad_input():
    plan = route(torch.tensor([[0, 1], [1, -1]]), 2)
    x, y, w = torch.randn(2, 4), torch.randn(3, 4), torch.rand(2, 2)
    with pytest.raises(ValueError, match="x"):
        dispatch(torch.randn(3, 4), plan)
    with pytest.raises(TypeError, match="x"):
        dispatch(x.long(), plan)
    with pytest.raises(TypeError, match="plan"):
        dispatch(x, plan.inverse)
    with pytest.raises(ValueError, match="y"):
        combine(torch.randn(4, 4), plan, w)
    with pytest.raises(ValueError, match="weights"):
        combine(y, plan, torch.rand(2, 3))
    with pytest.raises(TypeError, match="weights"):
        combine(y, plan, w.long())
    with pytest.raises(ValueError, match="backend"):
        combine(y, plan, w, backend="cuda")
