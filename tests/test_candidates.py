"""The row selection behind the candidate lists (csrc/candidates.hpp ``select_row``) against numpy.

A wrong list or bound only costs the solver time (the full-matrix certificate still holds it to the
optimum), so assign's own tests cannot see it: this checks the selection itself. The best ``L`` finite
entries of a row by reduced score ``S - p`` (ties: lower expert first), and the bound = the (L+1)-th best.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe_kernels import _assign


def _reference(s: np.ndarray, p: np.ndarray, L: int):
    n = s.shape[0]
    ids = np.full((n, L), -1, np.int32)
    count = np.zeros(n, np.int64)
    bound = np.full(n, -np.inf, s.dtype)
    for r in range(n):
        j = np.flatnonzero(s[r] > -np.inf)
        v = s[r, j] - p[j]  # in the row's dtype, like the kernel
        order = j[np.lexsort((j, -v))]
        count[r] = min(L, order.size)
        ids[r, :count[r]] = order[:count[r]]
        if order.size > L:
            bound[r] = s[r, order[L]] - p[order[L]]
    return ids, count, bound


@st.composite
def rows(draw):
    n, e = draw(st.integers(1, 6)), draw(st.integers(1, 300))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    kind = draw(st.sampled_from(["uniform", "ties", "contested"]))
    if kind == "ties":
        s = rng.integers(-2, 3, (n, e)).astype(dtype)
    elif kind == "contested":  # near equilibrium: reduced scores all close
        pop = rng.random(e)
        s = (pop + 0.01 * rng.random((n, e))).astype(dtype)
    else:
        s = rng.random((n, e)).astype(dtype)
    forbid = rng.random((n, e)) < draw(st.sampled_from([0.0, 0.3, 0.95]))
    if draw(st.booleans()):  # a forbidden run per row, covering whole 16-wide blocks
        start, length = rng.integers(0, e, n), rng.integers(0, e + 1, n)
        forbid |= (np.arange(e) >= start[:, None]) & (np.arange(e) < (start + length)[:, None])
    s[forbid] = -np.inf
    if draw(st.booleans()):
        p = np.zeros(e, dtype)
    elif kind == "contested":
        p = (pop - 0.005 * rng.random(e)).astype(dtype)
    else:
        p = rng.integers(0, 3, e).astype(dtype) if kind == "ties" else rng.random(e).astype(dtype)
    L = draw(st.sampled_from([1, 2, 5, 17, 24, 31, 32, 72, e, e + 3]))  # 31 | 32: either side of kInsertTop
    return s, p, L


@settings(max_examples=300, deadline=None)
@given(rows())
def test_select_rows_matches_numpy(case):
    s, p, L = case
    ids, count, bound = _assign.select_rows(s, p, L)
    ref_ids, ref_count, ref_bound = _reference(s, p, L)
    np.testing.assert_array_equal(count, ref_count)
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_array_equal(bound, ref_bound)


def test_select_rows_rejects_bad_shapes():
    with pytest.raises(ValueError, match="2-D"):
        _assign.select_rows(np.zeros(4, np.float32), np.zeros(4, np.float32), 1)
    with pytest.raises(ValueError, match="E entries"):
        _assign.select_rows(np.zeros((2, 4)), np.zeros(3), 1)


@pytest.mark.parametrize("shape, candidates",
                         [((500, 80), 33), ((500, 80), 40), ((600, 512), 33), ((300, 256), 200)])
def test_long_candidate_lists_fit_the_auction(shape, candidates):
    """The saturating auction starts from lists of c + 2*candidates experts; with candidates > 32 they used
    to overrun the room reserved for them (c + max(candidates, 64)) and corrupt the heap."""
    from fedmoe_kernels import assign

    scores = np.random.default_rng(shape[0]).random(shape, dtype=np.float32)
    a = assign(scores, 2, None, candidates=candidates)
    b = assign(scores, 2, None)
    assert a.certificate.certified and a.certificate.method == "auction"
    assert a.objective == pytest.approx(b.objective, abs=1e-9 * shape[0])
