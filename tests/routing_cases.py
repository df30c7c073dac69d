"""Cases and checks shared by the tests of route, dispatch and combine (test_route.py, test_dispatch.py,
test_combine.py)."""

from __future__ import annotations

import torch

from fedmoe_kernels.combine import combine_reference
from fedmoe_kernels.route import RoutingPlan, route_reference

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
    exact = combine_reference(y.double(), inverse, weights.double())
    bound = combine_reference(y.double().abs(), inverse, weights.double().abs())
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
    ref = route_reference(expert_idx, num_experts)
    assert torch.equal(plan.permutation, ref.permutation)
    assert torch.equal(plan.offsets, ref.offsets)
    assert torch.equal(plan.inverse, ref.inverse)
    assert torch.equal(plan.token_index, ref.permutation // expert_idx.shape[1])
    assert plan.num_rows == int((expert_idx >= 0).sum())
    assert torch.equal(plan.counts, torch.bincount(expert_idx[expert_idx >= 0], minlength=num_experts))


# Every case in float32; the other dtypes on the one-token, all-dropped, one-expert, E > T and largest cases.
DTYPE_CASES = [(torch.float32, c) for c in CASES] + [
    (d, CASES[i]) for d in (torch.float16, torch.bfloat16, torch.float64) for i in (1, 3, 4, 7, 10)
]
DTYPE_IDS = [f"{d}-{CASE_IDS[CASES.index(c)]}".removeprefix("torch.") for d, c in DTYPE_CASES]
