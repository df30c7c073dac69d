"""route (docs/design.md, Ops): both backends against the loop reference ``route_reference``.

The Triton backend runs under TRITON_INTERPRET=1 on CPU tensors (set in conftest.py when there is no GPU).
"""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest
import torch
from routing_cases import BACKENDS, CASE_IDS, CASES, assert_plan_matches_reference, make_expert_idx

import fedmoe_kernels
from fedmoe_kernels import route


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


def test_exports():
    assert {"route", "dispatch", "combine", "RoutingPlan"} <= set(fedmoe_kernels.__all__)


def test_op_names_are_the_ops_after_their_modules_are_imported():
    """An op's module is named after it; as a package attribute the name stays the op."""
    for name in ("route", "dispatch", "combine", "aggregate", "assign"):
        module = importlib.import_module(f"fedmoe_kernels.{name}")
        assert getattr(fedmoe_kernels, name) is getattr(module, name)
    code = (
        "import sys, fedmoe_kernels.route, fedmoe_kernels.assign\n"
        "from fedmoe_kernels import route, assign\n"
        "assert callable(route) and callable(assign) and route.__module__ == 'fedmoe_kernels.route'\n"
        "assert 'torch' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


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
