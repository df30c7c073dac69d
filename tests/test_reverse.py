"""The reverse step on warm prices (csrc/reverse.hpp ``lower_unclaimed``) against numpy.

Like the candidate lists, a wrong step only costs the solver time (the certificate still holds the result
to the optimum), so this checks the step itself: at the warm prices p every client claims its c_r best
experts (ties: lower expert first); an expert above the lowest price theta that is claimed d_j < u_j times
drops by the (u_j - d_j)-th smallest gap v_r - (S_rj - p_j) over the clients that do not claim it (v_r: the
reduced score of r's c_r-th claim), to theta at the lowest, or to theta when fewer clients are left.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_kernels import _assign


def _reference(s: np.ndarray, c: np.ndarray, u: np.ndarray, p: np.ndarray) -> np.ndarray:
    n, e = s.shape
    u = np.minimum(u, n)  # like the solver: an expert has at most one place per client
    if not np.any(u > 0):
        return p.copy()
    theta = p[u > 0].min()
    pt = p.astype(s.dtype)
    claimed = np.zeros(e, np.int64)
    gaps = [[] for _ in range(e)]
    for r in range(n):
        j = np.flatnonzero(s[r] > -np.inf)
        if c[r] == 0 or j.size == 0:
            continue
        v = s[r, j] - pt[j]  # claims in the row's dtype, like the kernel
        order = j[np.lexsort((j, -v))]
        top, rest = order[:c[r]], order[c[r]:]
        claimed[top] += 1
        vr = float(s[r, top[-1]]) - p[top[-1]]
        for jj, g in zip(rest, vr - (s[r, rest].astype(np.float64) - p[rest]), strict=True):
            gaps[jj].append(g)
    out = p.copy()
    for j in range(e):
        lack = u[j] - claimed[j]
        if u[j] == 0 or p[j] <= theta or lack <= 0:
            continue
        g = np.sort(gaps[j])
        out[j] = max(theta, p[j] - (g[lack - 1] if g.size >= lack else np.inf))
    return out


@st.composite
def problems(draw):
    n, e = draw(st.integers(1, 40)), draw(st.integers(1, 60))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    if draw(st.booleans()):  # contested: every client ranks experts alike
        s = rng.random(e) + 0.05 * rng.random((n, e))
    else:
        s = rng.random((n, e))
    s = s.astype(dtype)
    s[rng.random((n, e)) < draw(st.sampled_from([0.0, 0.2, 0.9]))] = -np.inf
    c = rng.integers(0, min(e, 4) + 1, n)
    u = rng.integers(0, max(2, 2 * n // e + 2), e)
    p = np.where(rng.random(e) < 0.3, 0.0, rng.random(e) * draw(st.sampled_from([0.1, 1.0])))
    return s, c.astype(np.int64), u.astype(np.int64), p


@settings(max_examples=200, deadline=None)
@given(problems())
def test_lower_unclaimed_matches_numpy(case):
    s, c, u, p = case
    got = _assign.lower_unclaimed(s, c, u, p, 1)
    ref = _reference(s, c, u, p)
    atol = 1e-5 if s.dtype == np.float32 else 1e-12  # the kernel's prefilter rounds in the row's dtype
    np.testing.assert_allclose(got, ref, rtol=0, atol=atol)
    assert np.all(got <= p)  # only ever lowers
    if np.any(u > 0):
        assert np.all(got[u > 0] >= p[u > 0].min())  # never below the lowest price


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lower_unclaimed_threads_agree(dtype):
    """Rows split over threads: each keeps its own smallest gaps per expert, merged afterwards."""
    rng = np.random.default_rng(3)
    n, e = 1500, 40
    s = (rng.random(e) + 0.1 * rng.random((n, e))).astype(dtype)
    c = rng.integers(1, 4, n).astype(np.int64)
    u = np.full(e, int(1.1 * c.sum() / e) + 1, np.int64)
    p = rng.random(e) * 0.2
    one = _assign.lower_unclaimed(s, c, u, p, 1)
    ref = _reference(s, c, u, p)
    np.testing.assert_allclose(one, ref, rtol=0, atol=1e-5)
    assert np.count_nonzero(one < p) > 5  # the case exercises the step
    for threads in (2, 3):
        np.testing.assert_allclose(_assign.lower_unclaimed(s, c, u, p, threads), one, rtol=0, atol=1e-6)


def test_lower_unclaimed_drops_an_overpriced_expert_to_its_marginal_clients():
    # Each client takes one expert. At prices (0, 0, 0.5) client 0 claims expert 0 (v = 1.0) and client 1
    # expert 1 (v = 1.0); nobody claims expert 2. Their gaps for it: 1.0 - (1.2 - 0.5) = 0.3 and
    # 1.0 - (1.1 - 0.5) = 0.4.
    s = np.array([[1.0, 0.2, 1.2], [0.1, 1.0, 1.1]])
    c, p = np.array([1, 1]), np.array([0.0, 0.0, 0.5])
    lowered = _assign.lower_unclaimed(s, c, np.array([2, 2, 1]), p, 1)
    np.testing.assert_allclose(lowered, [0.0, 0.0, 0.2], atol=1e-12)  # one place: the smaller gap
    lowered = _assign.lower_unclaimed(s, c, np.array([2, 2, 2]), p, 1)
    np.testing.assert_allclose(lowered, [0.0, 0.0, 0.1], atol=1e-12)  # two places: the second gap
    one_client = s.copy()
    one_client[1, 2] = -np.inf  # client 1 may not take expert 2
    lowered = _assign.lower_unclaimed(one_client, c, np.array([2, 2, 2]), p, 1)
    np.testing.assert_array_equal(lowered, [0.0, 0.0, 0.0])  # two places, one client left: to theta
    lowered = _assign.lower_unclaimed(s, c, np.array([2, 2, 2]), np.array([0.2, 0.2, 0.9]), 1)
    np.testing.assert_allclose(lowered, [0.2, 0.2, 0.3], atol=1e-12)  # prices matter up to a common shift


def test_lower_unclaimed_rejects_bad_shapes():
    counts = np.zeros(4, np.int64)
    with pytest.raises(ValueError, match="2-D"):
        _assign.lower_unclaimed(np.zeros(4), counts, counts, np.zeros(4), 1)
    with pytest.raises(ValueError, match="price"):
        _assign.lower_unclaimed(np.zeros((2, 4)), counts[:2], counts, np.zeros(3), 1)
