"""assign (docs/design.md, Ops): the C++ fast path against the references, property-based.

The referee is ``assign_linprog`` (HiGHS on the totally unimodular LP); it is itself checked against
``assign_lsa`` on unit-capacity instances and against brute force on tiny ones. Test instances are
small, so ``dense_limit=0`` is passed wherever the candidate/certificate path must be exercised.
"""

from __future__ import annotations

import functools
import itertools
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedmoe_kernels import Assignment, assign
from fedmoe_kernels.assign import assign_linprog, assign_lsa

SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}
SCORE_KINDS = ("ties", "uniform", "negative", "wide", "contested")
SPARSE = 0  # dense_limit that forces the candidate / certificate path
DENSE_LIMITS = st.sampled_from([SPARSE, 1 << 21])


# ---------------------------------------------------------------- instances


def _scores(rng, kind: str, n: int, e: int) -> np.ndarray:
    if kind == "ties":  # three values: many optima
        return rng.integers(-1, 2, (n, e)).astype(np.float64)
    if kind == "uniform":
        return rng.random((n, e))
    if kind == "negative":  # every pair costs: only the cardinality rule makes the solver take any
        return -1.0 - 100.0 * rng.random((n, e))
    if kind == "wide":
        return rng.integers(-1000, 1001, (n, e)).astype(np.float64)
    # contested: every client wants the same few experts
    return np.linspace(1.0, 0.0, e)[rng.permutation(e)] + 0.01 * rng.random((n, e))


@st.composite
def instances(draw, max_size: int = 60, unit: bool = False, kinds=SCORE_KINDS, rows=None, cols=None):
    """(scores, experts_per_client, clients_per_expert); ``unit``: one side has all capacities <= 1; ``rows``,
    ``cols``: (lo, hi) ranges of N and E (default 1..max_size)."""
    n = draw(st.integers(*(rows or (1, max_size))))
    e = draw(st.integers(*(cols or (1, max_size))))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = _scores(rng, draw(st.sampled_from(kinds)), n, e)
    forbidden = rng.random((n, e)) < draw(st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]))
    if draw(st.booleans()):
        forbidden[rng.random(n) < 0.25] = True  # all-forbidden rows
    if draw(st.booleans()):
        forbidden[:, rng.random(e) < 0.25] = True  # all-forbidden columns
    if draw(st.booleans()):  # per row, one forbidden run of columns (whole blocks of a long row)
        start = rng.integers(0, e, n)
        length = rng.integers(0, e + 1, n)
        cols_ = np.arange(e)
        forbidden |= (cols_ >= start[:, None]) & (cols_ < (start + length)[:, None])
    s[forbidden] = -np.inf
    s = s.astype(draw(st.sampled_from([np.float32, np.float64])))

    modes = ["scalar", "small_scalar", "over_scalar", "vector", "small", "over"]  # over: beyond E (N)
    client_modes, expert_modes = modes, [*modes, "none"]
    unit_side = draw(st.sampled_from(["clients", "experts"])) if unit else None
    if unit_side == "clients":
        client_modes = ["unit", "unit_scalar"]
    elif unit_side == "experts":
        expert_modes = ["unit", "unit_scalar"]
    caps = {
        "scalar": lambda length, top: draw(st.integers(0, top)),
        "small_scalar": lambda length, top: draw(st.integers(0, 2)),
        "over_scalar": lambda length, top: top + draw(st.integers(1, 3)),
        "vector": lambda length, top: rng.integers(0, top + 1, length),
        "small": lambda length, top: rng.integers(0, 3, length),
        "over": lambda length, top: rng.integers(0, top + 4, length),
        "unit": lambda length, top: rng.integers(0, 2, length),
        "unit_scalar": lambda length, top: 1,
        "none": lambda length, top: None,
    }
    c = caps[draw(st.sampled_from(client_modes))](n, e)
    u = caps[draw(st.sampled_from(expert_modes))](e, n)
    return s, c, u


def _contested(n: int, e: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Everyone prefers the same experts, expert capacities tight: thin candidate sets cannot suffice."""
    rng = np.random.default_rng(seed)
    s = _scores(rng, "contested", n, e)
    c = rng.integers(1, 4, n)
    return s, c, np.full(e, -(-int(c.sum()) // e))


# ---------------------------------------------------------------- checks


def _problem(s, c, u):
    """float64 scores and capacities clipped to E (clients) and N (experts; None = N)."""
    s = np.asarray(s, dtype=np.float64)
    n, e = s.shape
    c = np.minimum(np.broadcast_to(np.asarray(c, dtype=np.int64), (n,)), e)
    u = np.full(e, n) if u is None else np.minimum(np.broadcast_to(np.asarray(u, dtype=np.int64), (e,)), n)
    return s, c, u


def _score_scale(s: np.ndarray) -> float:
    finite = s[np.isfinite(s)]
    return 1.0 + (float(np.abs(finite).max()) if finite.size else 0.0)


def check_feasible(s, c, u, clients, experts, objective) -> None:
    """Sorted unique pairs, no forbidden pair, capacities respected, objective = their score sum."""
    s, c, u = _problem(s, c, u)
    n, e = s.shape
    assert clients.dtype == np.int64 and experts.dtype == np.int64
    assert clients.ndim == 1 and clients.shape == experts.shape
    if clients.size:
        assert 0 <= clients.min() and clients.max() < n and 0 <= experts.min() and experts.max() < e
    assert np.all(np.diff(clients * e + experts) > 0), "pairs unsorted or duplicated"
    chosen = s[clients, experts]
    assert np.all(np.isfinite(chosen)), "forbidden pair chosen"
    assert np.all(np.bincount(clients, minlength=n) <= c), "client capacity exceeded"
    assert np.all(np.bincount(experts, minlength=e) <= u), "expert capacity exceeded"
    assert isinstance(objective, float)
    tol = 1e-12 * _score_scale(s) * max(1, chosen.size)
    assert objective == pytest.approx(chosen.sum(), rel=1e-12, abs=tol)


def check_matches(s, result, ref) -> None:
    """Same cardinality as the reference, and the same objective up to float rounding."""
    assert len(result.clients) == len(ref.clients), "not a maximum-cardinality assignment"
    tol = 1e-9 * abs(ref.objective) + 1e-6 * _score_scale(np.asarray(s, dtype=np.float64))
    assert abs(result.objective - ref.objective) <= tol, (result.objective, ref.objective)


def check_certificate(s, c, u, result: Assignment) -> None:
    """Duals non-negative, and the dual objective recomputed on the full matrix equals the primal one."""
    s, c, u = _problem(s, c, u)
    n, e = s.shape
    cert = result.certificate
    assert cert.certified
    a, p, lam = cert.client_dual, cert.expert_price, cert.flow_dual
    assert a.shape == (n,) and p.shape == (e,)
    assert np.all(np.isfinite(a)) and np.all(np.isfinite(p)) and np.isfinite(lam)
    assert np.all(a >= 0) and np.all(p >= 0)
    xi = np.maximum(s - a[:, None] - p[None, :] - lam, 0.0)  # forbidden (-inf) pairs give 0
    dual = float(c @ a + u @ p + len(result) * lam + xi.sum())
    tol = 1e-6 * (1.0 + abs(result.objective) + _score_scale(s))
    assert abs(dual - cert.dual_objective) <= tol, (dual, cert.dual_objective)
    assert abs(dual - result.objective) <= tol, (dual, result.objective)
    assert cert.gap == pytest.approx(cert.dual_objective - result.objective, abs=1e-9 * (1 + abs(dual)))
    assert -tol <= cert.gap <= tol
    assert cert.rounds >= 0 and cert.pairs_added >= 0
    assert cert.method in ("auction", "flow")


def check_assign(s, c, u, result: Assignment, ref=None) -> None:
    ref = assign_linprog(s, c, u) if ref is None else ref
    assert result.shape == s.shape
    check_feasible(s, c, u, result.clients, result.experts, result.objective)
    check_matches(s, result, ref)
    check_certificate(s, c, u, result)
    dense = np.zeros(s.shape, dtype=bool)
    dense[result.clients, result.experts] = True
    np.testing.assert_array_equal(result.to_dense(), dense)
    if len(result):
        i = int(result.clients[-1])
        np.testing.assert_array_equal(result.experts_of(i), result.experts[result.clients == i])


# ---------------------------------------------------------------- the references check each other


@settings(max_examples=150, **SETTINGS)
@given(instances(unit=True))
def test_lsa_reference_agrees_with_linprog_reference(inst):
    s, c, u = inst
    lsa, lp = assign_lsa(s, c, u), assign_linprog(s, c, u)
    for ref in (lsa, lp):
        check_feasible(s, c, u, ref.clients, ref.experts, ref.objective)
    check_matches(s, lsa, lp)


@st.composite
def tiny_instances(draw):
    n, e = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = _scores(rng, draw(st.sampled_from(SCORE_KINDS)), n, e)
    s[rng.random((n, e)) < draw(st.sampled_from([0.0, 0.3]))] = -np.inf
    return s, rng.integers(0, e + 1, n), draw(st.one_of(st.none(), st.just(rng.integers(0, n + 1, e))))


@settings(max_examples=150, **SETTINGS)
@given(tiny_instances())
def test_references_agree_with_brute_force(inst):
    s, c, u = inst
    s64, cc, uu = _problem(s, c, u)
    rows, cols = np.nonzero(np.isfinite(s64))
    masks = np.array(list(itertools.product((0, 1), repeat=len(rows))), dtype=np.int64)  # [2^m, m]
    per_client = np.stack([masks[:, rows == i].sum(1) for i in range(s64.shape[0])], axis=1)
    per_expert = np.stack([masks[:, cols == j].sum(1) for j in range(s64.shape[1])], axis=1)
    ok = np.all(per_client <= cc, axis=1) & np.all(per_expert <= uu, axis=1)
    count, total = masks.sum(1)[ok], (masks @ s64[rows, cols])[ok]
    best = total[count == count.max()].max()
    for ref in [assign_linprog(s, c, u)] + ([assign_lsa(s, c, u)] if cc.max() <= 1 or uu.max() <= 1 else []):
        check_feasible(s, c, u, ref.clients, ref.experts, ref.objective)
        assert len(ref.clients) == count.max()
        assert ref.objective == pytest.approx(best, rel=1e-12, abs=1e-9)


def test_lsa_reference_rejects_non_unit_capacities():
    with pytest.raises(ValueError, match="capacities"):
        assign_lsa(np.zeros((3, 3)), 2, 2)


# ---------------------------------------------------------------- fast path against the referee


@settings(max_examples=250, **SETTINGS)
@given(instances(), DENSE_LIMITS)
def test_assign_matches_linprog_reference(inst, dense_limit):
    s, c, u = inst
    before = s.copy()
    check_assign(s, c, u, assign(s, c, u, dense_limit=dense_limit))
    np.testing.assert_array_equal(s, before)  # read, never written


@settings(max_examples=60, **SETTINGS)
@given(instances(unit=True), DENSE_LIMITS)
def test_assign_matches_lsa_reference_on_unit_capacities(inst, dense_limit):
    s, c, u = inst
    check_assign(s, c, u, assign(s, c, u, dense_limit=dense_limit), ref=assign_lsa(s, c, u))


@settings(max_examples=40, **SETTINGS)
@given(instances(rows=(1, 24), cols=(70, 260)))
def test_assign_on_rows_much_longer_than_the_lists(inst):
    """E far above the candidate lists (c_i + 16): the blocked two-pass row selection and the auction's
    rescans; E not a multiple of the 16-wide blocks, forbidden runs covering whole blocks."""
    s, c, u = inst
    check_assign(s, c, u, assign(s, c, u, dense_limit=SPARSE))


@functools.cache
def _medium_contested(dtype):
    s, c, u = _contested(600, 48, seed=1)
    s = s.astype(dtype)
    return s, c, u, assign_linprog(s, c, u)


@pytest.mark.parametrize("dense_limit", [SPARSE, 1 << 21])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_assign_medium_contested_instance(dtype, dense_limit):
    s, c, u, ref = _medium_contested(dtype)
    result = assign(s, c, u, dense_limit=dense_limit)
    check_assign(s, c, u, result, ref=ref)
    # Every client can get its capacity: the auction solves it, unless the problem is small enough for
    # the dense flow solver.
    assert result.certificate.method == ("auction" if dense_limit == SPARSE else "flow")


@st.composite
def saturating_instances(draw):
    """Finite scores with enough expert capacity for every client's full capacity."""
    n, e = draw(st.integers(1, 60)), draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = _scores(rng, draw(st.sampled_from(SCORE_KINDS)), n, e)
    c = rng.integers(0, e + 1, n)
    slack = draw(st.sampled_from([0.0, 0.1, 1.0]))  # 0: no spare capacity at all
    u = np.full(e, max(1, math.ceil((1.0 + slack) * int(c.sum()) / e)))
    return s, c, u


@settings(max_examples=150, **SETTINGS)
@given(saturating_instances())
def test_saturating_instances_are_solved_by_the_auction(inst):
    s, c, u = inst
    result = assign(s, c, u, dense_limit=SPARSE)
    check_assign(s, c, u, result)
    assert result.certificate.method == "auction"
    assert result.certificate.rounds == 1 and result.certificate.pairs_added == 0


@pytest.mark.parametrize(
    "case",
    ["short of expert capacity", "a client with fewer allowed experts than its capacity"],
)
def test_non_saturating_instances_fall_back_to_the_flow_solver(case):
    rng = np.random.default_rng(3)
    s = rng.random((40, 12))
    c, u = np.full(40, 3), np.full(12, 10)  # 120 wanted, 120 available
    if case == "short of expert capacity":
        u[0] = 9
    else:
        s[7, 2:] = -np.inf  # client 7 may use 2 experts but wants 3
    result = assign(s, c, u, dense_limit=SPARSE)
    check_assign(s, c, u, result)
    assert result.certificate.method == "flow"


@settings(max_examples=40, **SETTINGS)
@given(instances(kinds=("contested", "ties", "uniform")), st.sampled_from([1, 2, 50]))
def test_candidates_never_change_the_objective(inst, candidates):
    s, c, u = inst
    check_assign(s, c, u, assign(s, c, u, candidates=candidates, dense_limit=SPARSE))


@pytest.mark.parametrize("candidates", [1, 2, 50])
def test_candidates_on_contested_instance(candidates):
    s, c, u = _contested(300, 40, seed=2)
    check_assign(s, c, u, assign(s, c, u, candidates=candidates, dense_limit=SPARSE))


def test_candidates_above_e_and_dense_limit_above_n_times_e_are_clipped():
    # candidates=2**31-1 overflowed the solver's list sizes (segfault); dense_limit=2**64 reached it as a
    # TypeError from the extension
    s, c, u = _contested(60, 8, seed=3)
    check_matches(s, assign(s, c, u, candidates=2**31 - 1, dense_limit=SPARSE), assign(s, c, u, candidates=8,
                                                                                    dense_limit=SPARSE))
    check_matches(s, assign(s, c, u, dense_limit=2**64), assign(s, c, u, dense_limit=60 * 8))


@settings(max_examples=40, **SETTINGS)
@given(instances(), st.integers(0, 2**32 - 1))
def test_warm_start_gives_the_same_objective(inst, seed):
    s, c, u = inst
    first = assign(s, c, u, dense_limit=SPARSE)
    for warm in (first, first.certificate, first.certificate.expert_price, np.zeros(s.shape[1])):
        check_matches(s, assign(s, c, u, warm_start=warm, dense_limit=SPARSE), first)
    rng = np.random.default_rng(seed)
    perturbed = (s + 0.05 * _score_scale(s) * rng.random(s.shape)).astype(s.dtype)
    check_assign(perturbed, c, u, assign(perturbed, c, u, warm_start=first, dense_limit=SPARSE))


@pytest.mark.parametrize("too_high", [1, 3])
def test_warm_start_priced_too_high_on_a_large_problem(too_high):
    """A warm start with a few experts priced far too high (which a forward auction cannot lower) on a
    problem large enough for the row-sample fallback (4,096 rows): the reverse step lowers them and the
    result is still the optimum."""
    s, c, u = _contested(4500, 24, seed=5)
    u = (u * 1.1).astype(np.int64)  # spare capacity: the saturating case
    cold = assign(s, c, u)
    warm = cold.certificate.expert_price.copy()
    warm[:too_high] += 10 * _score_scale(s)
    result = assign(s, c, u, warm_start=warm)
    check_feasible(s, c, u, result.clients, result.experts, result.objective)
    check_matches(s, result, cold)
    check_certificate(s, c, u, result)
    assert cold.certificate.method == result.certificate.method == "auction"


@settings(max_examples=40, **SETTINGS)
@given(instances(), DENSE_LIMITS)
def test_deterministic(inst, dense_limit):
    s, c, u = inst
    first, second = assign(s, c, u, dense_limit=dense_limit), assign(s.copy(), c, u, dense_limit=dense_limit)
    np.testing.assert_array_equal(first.clients, second.clients)
    np.testing.assert_array_equal(first.experts, second.experts)
    np.testing.assert_array_equal(first.certificate.expert_price, second.certificate.expert_price)
    assert first.objective == second.objective
    check_matches(s, assign(s, c, u, threads=1, dense_limit=dense_limit), first)


@settings(max_examples=40, **SETTINGS)
@given(instances(), st.integers(0, 5), st.integers(0, 5))
def test_scalar_and_vector_capacities_are_the_same(inst, c, u):
    s, _, _ = inst
    n, e = s.shape
    scalar = assign(s, c, u)
    vector = assign(s, np.full(n, c), np.full(e, float(u)))
    np.testing.assert_array_equal(scalar.clients, vector.clients)
    np.testing.assert_array_equal(scalar.experts, vector.experts)
    assert scalar.objective == vector.objective


@settings(max_examples=40, **SETTINGS)
@given(instances())
def test_capacities_beyond_the_other_side_are_clipped(inst):
    s, _, _ = inst
    n, e = s.shape
    clipped = assign(s, e, n)
    for c, u in [(e + 5, None), (10 * e, n + 1), (np.full(n, e + 1), np.full(e, 2**40)), (1e20, 1e20)]:
        check_matches(s, assign(s, c, u), clipped)


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (5, 0)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty(shape, dtype):
    result = assign(np.zeros(shape, dtype=dtype), 3, 2)
    assert len(result) == 0 and result.shape == shape and result.objective == 0.0
    assert result.clients.dtype == np.int64 and result.experts.dtype == np.int64
    assert result.to_dense().shape == shape
    assert result.certificate.certified


def test_all_forbidden():
    s = np.full((7, 5), -np.inf)
    result = assign(s, 2, None)
    assert len(result) == 0 and result.objective == 0.0
    check_certificate(s, 2, None, result)


@pytest.mark.parametrize(
    "view",
    [
        lambda a: np.ascontiguousarray(a.T).T,  # transposed
        np.asfortranarray,
        lambda a: np.repeat(a, 2, axis=1)[:, ::2],  # strided columns
        lambda a: np.repeat(a, 3, axis=0)[::3],  # strided rows
        lambda a: np.pad(a, ((1, 1), (2, 2)))[1:-1, 2:-2],  # offset view with padded rows
        lambda a: np.ascontiguousarray(a[::-1])[::-1],  # negative strides
    ],
)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_any_memory_layout(view, dtype):
    rng = np.random.default_rng(3)
    s = rng.integers(-3, 4, (23, 17)).astype(dtype)
    s[rng.random(s.shape) < 0.2] = -np.inf
    c, u = rng.integers(0, 4, 23), rng.integers(0, 5, 17)
    v = view(s)
    np.testing.assert_array_equal(v, s)
    expected, result = assign(s, c, u), assign(v, c, u)
    np.testing.assert_array_equal(result.clients, expected.clients)
    np.testing.assert_array_equal(result.experts, expected.experts)
    check_assign(s, c, u, result)


def test_list_input():
    s = [[1.0, 2.0], [3.0, -np.inf]]
    check_assign(np.array(s), 1, 1, assign(s, 1, 1))


# ---------------------------------------------------------------- bad input

S = np.zeros((4, 3))
BAD_INPUTS = [
    ("scores", {"scores": np.array([[0.0, np.nan, 1.0]] * 4)}),
    ("scores", {"scores": np.array([[0.0, np.inf, 1.0]] * 4)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=np.float32) + np.float32(np.nan)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=np.int64)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=np.int32)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=bool)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=np.complex128)}),
    ("scores", {"scores": np.zeros((4, 3), dtype=np.float16)}),
    ("scores", {"scores": np.zeros(3)}),
    ("scores", {"scores": np.zeros((2, 2, 3))}),
    ("experts_per_client", {"experts_per_client": -1}),
    ("experts_per_client", {"experts_per_client": np.array([1, 1, -1, 1])}),
    ("experts_per_client", {"experts_per_client": 1.5}),
    ("experts_per_client", {"experts_per_client": np.array([1.0, 2.0, 0.5, 1.0])}),
    ("experts_per_client", {"experts_per_client": np.inf}),
    ("experts_per_client", {"experts_per_client": np.ones(3, dtype=np.int64)}),
    ("experts_per_client", {"experts_per_client": np.ones((4, 1), dtype=np.int64)}),
    ("experts_per_client", {"experts_per_client": True}),
    ("experts_per_client", {"experts_per_client": 1 + 0j}),
    ("experts_per_client", {"experts_per_client": "2"}),
    ("clients_per_expert", {"clients_per_expert": -2}),
    ("clients_per_expert", {"clients_per_expert": 2.5}),
    ("clients_per_expert", {"clients_per_expert": np.ones(4, dtype=np.int64)}),
    ("clients_per_expert", {"clients_per_expert": np.array([True, False, True])}),
    ("candidates", {"candidates": 0}),
    ("candidates", {"candidates": -3}),
    ("candidates", {"candidates": 2.0}),
    ("candidates", {"candidates": True}),
    ("threads", {"threads": 0}),
    ("threads", {"threads": 1.5}),
    ("threads", {"threads": False}),
    ("threads", {"threads": 10**8}),  # allocated 3.2 GB of per-thread scratch
    ("threads", {"threads": 2**31 - 1}),  # never returned
    ("dense_limit", {"dense_limit": -1}),
    ("dense_limit", {"dense_limit": 1.5}),
    ("dense_limit", {"dense_limit": True}),
    ("warm_start", {"warm_start": np.zeros(4)}),
    ("warm_start", {"warm_start": np.array([0.0, np.nan, 0.0])}),
    ("warm_start", {"warm_start": np.array([0.0, np.inf, 0.0])}),
    ("warm_start", {"warm_start": np.zeros((1, 3))}),
    ("warm_start", {"warm_start": ["a", "b", "c"]}),
]


@pytest.mark.parametrize(("name", "bad"), BAD_INPUTS, ids=[f"{n}-{i}" for i, (n, _) in enumerate(BAD_INPUTS)])
def test_bad_input_raises_value_error_naming_the_argument(name, bad):
    kwargs = {"scores": S, "experts_per_client": 1, "clients_per_expert": None} | bad
    with pytest.raises(ValueError, match=name):
        assign(**kwargs)


def test_warm_start_from_a_different_problem_is_rejected():
    other = assign(np.zeros((2, 5)), 1)
    with pytest.raises(ValueError, match="warm_start"):
        assign(S, 1, warm_start=other)


def test_assign_does_not_import_torch():
    code = "import sys\nfrom fedmoe_kernels import assign\nassert 'torch' not in sys.modules\n"
    subprocess.run([sys.executable, "-c", code], check=True)
