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
from fedmoe_kernels import combine, dispatch, route
from fedmoe_kernels.route import RoutingPlan


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


def _fields(plan) -> dict:
    return {name: getattr(plan, name).clone() for name in ("permutation", "token_index", "offsets",
                                                            "inverse")}


def _corrupt(field: str, index, value):
    def change(fields):
        fields[field][index] = value
        return fields
    return change


# plan of [[1, 1], [1, -1], [0, 0]] over 2 experts: permutation [4, 5, 0, 1, 2], offsets [0, 2, 5],
# inverse [[2, 3], [4, -1], [0, 1]]
BAD_PLANS = [
    ("permutation", lambda f: {**f, "permutation": f["permutation"].int()}),
    ("token_index", lambda f: {**f, "token_index": [2, 2, 0, 0, 1]}),
    ("inverse", lambda f: {**f, "inverse": f["inverse"].T}),
    ("inverse", lambda f: {**f, "inverse": f["inverse"].reshape(-1)}),
    ("offsets", lambda f: {**f, "offsets": f["offsets"][:1]}),
    ("permutation", lambda f: {**f, "permutation": f["permutation"][None]}),
    ("token_index", lambda f: {**f, "token_index": f["token_index"][:4]}),
    ("offsets", _corrupt("offsets", 1, 6)),
    ("offsets", _corrupt("offsets", 2, 4)),
    ("permutation", _corrupt("permutation", 0, 1_000_000)),
    ("permutation", _corrupt("permutation", 0, -7)),
    ("token_index", _corrupt("token_index", 0, 1_000_000)),
    ("inverse", _corrupt("inverse", (0, 0), 1_000_000)),
    ("inverse", _corrupt("inverse", (1, 1), 0)),
    ("inverse", _corrupt("inverse", (0, 0), 3)),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(("field", "change"), BAD_PLANS, ids=[f"{f}-{i}" for i, (f, _) in
                                                              enumerate(BAD_PLANS)])
def test_a_hand_built_plan_is_checked_before_any_backend_reads_it(backend, field, change):
    # the Triton kernels read out of bounds where the torch path raised
    plan = route(torch.tensor([[1, 1], [1, -1], [0, 0]]), 2, backend=backend)
    assert dispatch(torch.ones(3, 4), RoutingPlan(**_fields(plan)), backend=backend).shape == (5, 4)
    with pytest.raises((TypeError, ValueError), match=f"plan.{field}"):
        bad = RoutingPlan(**change(_fields(plan)))
        dispatch(torch.ones(3, 4), bad, backend=backend)
        combine(torch.ones(5, 4), bad, torch.ones(3, 2), backend=backend)
