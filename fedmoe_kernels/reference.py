"""Plain references for every op of fedmoe_kernels: the executable specification.

Obviously correct, not fast: loops are fine here. Every fast path is tested against these.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from scipy import sparse
from scipy.optimize import linear_sum_assignment, linprog

# ---------------------------------------------------------------- assign (DESIGN.md §3.1)


class AssignResult(NamedTuple):
    """Reference answer of ``assign``: pairs sorted by client then expert, and their total score."""

    clients: np.ndarray
    experts: np.ndarray
    objective: float


def _assign_problem(scores, client_capacity, expert_capacity):
    """float64 scores and int64 capacities clipped to E (clients) and N (experts; None = N)."""
    s = np.asarray(scores, dtype=np.float64)
    n, e = s.shape
    c = np.broadcast_to(np.asarray(client_capacity, dtype=np.int64), (n,))
    u = np.broadcast_to(np.asarray(n if expert_capacity is None else expert_capacity, dtype=np.int64), (e,))
    return s, np.minimum(c, e), np.minimum(u, n)


def _assign_result(s, clients, experts) -> AssignResult:
    order = np.lexsort((experts, clients))
    clients, experts = clients[order].astype(np.int64), experts[order].astype(np.int64)
    return AssignResult(clients, experts, float(s[clients, experts].sum()))


def _lsa_unit_rows(s, c, u):
    """(rows, cols) of the lexicographic optimum when every row capacity ``c`` is 0 or 1."""
    rows = np.flatnonzero(c > 0)
    slots = np.repeat(np.arange(s.shape[1]), u)  # one column per unit of column capacity
    w = s[np.ix_(rows, slots)]
    allowed = np.isfinite(w)
    if not allowed.any():
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = w[allowed].min(), w[allowed].max()
    # Each pair earns big > (largest possible pair count) * (score range): one more pair beats any score gain.
    big = (min(len(rows), len(slots)) + 1) * (hi - lo) + 1.0
    w = np.where(allowed, w - lo + big, 0.0)
    # One zero-weight dummy column per row, so that any row may stay unassigned.
    r, k = linear_sum_assignment(np.hstack([w, np.zeros((len(rows), len(rows)))]), maximize=True)
    keep = k < len(slots)
    r, k = r[keep], k[keep]
    keep = allowed[r, k]  # forbidden pairs scored 0, like a dummy: dropped
    return rows[r[keep]], slots[k[keep]]


def assign_lsa(scores, client_capacity, expert_capacity=None) -> AssignResult:
    """``assign`` via ``scipy.optimize.linear_sum_assignment``, where one side has unit capacity.

    The other side is expanded into one slot per unit of capacity (exact only because the unit side
    cannot take two slots of the same expert/client). Raises ValueError when neither side is unit.
    """
    s, c, u = _assign_problem(scores, client_capacity, expert_capacity)
    if np.all(c <= 1):
        clients, experts = _lsa_unit_rows(s, c, u)
    elif np.all(u <= 1):
        experts, clients = _lsa_unit_rows(s.T, u, c)
    else:
        raise ValueError("assign_lsa needs all client capacities <= 1 or all expert capacities <= 1")
    return _assign_result(s, clients, experts)


def _highs(cost, **lp):
    """linprog by HiGHS interior point with crossover (a vertex, and 10-100x faster than simplex on these
    LPs) or, where it stops short of optimal, dual simplex."""
    tol = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9}
    for method in ("highs-ipm", "highs-ds"):
        res = linprog(cost, bounds=(0, 1), method=method, options=tol, **lp)
        if res.status == 0:
            return res
    raise RuntimeError(f"linprog failed: {res.message}")


def assign_linprog(scores, client_capacity, expert_capacity=None) -> AssignResult:
    """``assign`` for any capacities: the totally unimodular LP over the allowed pairs, HiGHS, two phases.

    Phase 1 maximises the pair count ``K*``; phase 2 maximises ``sum S x`` subject to ``sum x = K*`` (a
    min-cost flow of fixed value, so its vertices are still integral; checked). The referee for every
    other implementation.
    """
    s, c, u = _assign_problem(scores, client_capacity, expert_capacity)
    n, e = s.shape
    rows, cols = np.nonzero(np.isfinite(s))
    m = len(rows)
    if m == 0:
        return _assign_result(s, rows, cols)
    pair = np.arange(m)
    a_ub = sparse.csr_array(
        (np.ones(2 * m), (np.concatenate([rows, n + cols]), np.concatenate([pair, pair]))), shape=(n + e, m)
    )
    b_ub = np.concatenate([c, u])
    k = round(-_highs(-np.ones(m), A_ub=a_ub, b_ub=b_ub).fun)
    phase2 = _highs(-s[rows, cols], A_ub=a_ub, b_ub=b_ub, A_eq=sparse.csr_array(np.ones((1, m))), b_eq=[k])
    x = np.round(phase2.x)
    if np.abs(phase2.x - x).max() > 1e-6 or x.sum() != k:
        raise RuntimeError("linprog returned a fractional solution")
    keep = x == 1
    return _assign_result(s, rows[keep], cols[keep])


# ---------------------------------------------------------------- route / dispatch / combine (§3.2)


class RoutePlanRef(NamedTuple):
    """Reference routing plan: ``permutation`` int64 [R], ``offsets`` int64 [E+1], ``inverse`` [T, k]."""

    permutation: torch.Tensor
    offsets: torch.Tensor
    inverse: torch.Tensor


def route_reference(expert_idx, num_experts: int) -> RoutePlanRef:
    """Group the flat entries ``t * k + s`` of ``expert_idx`` [T, k] by expert, ascending within an expert;
    entries with expert -1 are dropped."""
    t, k = expert_idx.shape
    buckets = [[] for _ in range(num_experts)]
    for token in range(t):
        for slot in range(k):
            expert = int(expert_idx[token, slot])
            if expert >= 0:
                buckets[expert].append(token * k + slot)
    permutation = [entry for bucket in buckets for entry in bucket]
    offsets = [0]
    for bucket in buckets:
        offsets.append(offsets[-1] + len(bucket))
    inverse = [-1] * (t * k)
    for row, entry in enumerate(permutation):
        inverse[entry] = row
    return RoutePlanRef(
        torch.tensor(permutation, dtype=torch.int64),
        torch.tensor(offsets, dtype=torch.int64),
        torch.tensor(inverse, dtype=torch.int64).view(t, k),
    )


def dispatch_reference(x: torch.Tensor, permutation: torch.Tensor, k: int) -> torch.Tensor:
    """Row ``r`` is ``x[permutation[r] // k]``: x [T, H] -> [R, H] (differentiable)."""
    tokens = x.unbind(0)
    return torch.stack([tokens[int(entry) // k] for entry in permutation]) if len(permutation) else x[:0]


def combine_reference(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per token, ``sum_s weights[t, s] * y[inverse[t, s]]`` over slots with ``inverse >= 0``, summed in slot
    order in float32 (float64 for float64 ``y``), cast to ``y.dtype``: y [R, H] -> [T, H] (differentiable)."""
    acc = torch.float64 if y.dtype == torch.float64 else torch.float32
    rows = y.unbind(0)
    out = []
    for token, token_weights in enumerate(weights.unbind(0)):
        total = torch.zeros(y.shape[1], dtype=acc)
        for slot, weight in enumerate(token_weights.unbind(0)):
            row = int(inverse[token, slot])
            if row >= 0:
                total = total + weight.to(acc) * rows[row].to(acc)
        out.append(total)
    return torch.stack(out).to(y.dtype)


# ---------------------------------------------------------------- aggregate (§3.3)


class AggregateRef(NamedTuple):
    """Reference answer of ``aggregate``: the bank in float64 [E, P] and the per-expert counters."""

    bank: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    weight_sum: torch.Tensor


def aggregate_reference(rows, experts, weights, num_experts: int, base, *, max_norm=None, lr=1.0):
    """Per expert ``e``, over its rows whose values are all finite once converted to the accumulation dtype
    (float64 for a float64 ``base``, else float32): ``base[e] + lr * sum_m (w_m / W) * s_m * d_m`` with
    ``d_m = row_m - base[e]``, ``W = sum_m w_m``, ``s_m = min(1, max_norm / ||d_m||)`` (1 without
    ``max_norm``); ``base[e]`` where there is no such row or ``W == 0``. Computed in float64; returns
    :class:`AggregateRef`."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    bank = base.to(torch.float64).clone()
    accepted = torch.zeros(num_experts, dtype=torch.int64)
    rejected = torch.zeros(num_experts, dtype=torch.int64)
    weight_sum = torch.zeros(num_experts, dtype=torch.float64)
    ids = [int(e) for e in experts]
    w = [float(x) for x in weights]
    for e in range(num_experts):
        kept = []
        for m, expert in enumerate(ids):
            if expert != e:
                continue
            x = rows[m].to(acc).to(torch.float64)
            if not bool(torch.isfinite(x).all()):
                rejected[e] += 1
                continue
            d = x - bank[e]
            if max_norm is not None:
                norm = float(torch.linalg.vector_norm(d))
                if norm > max_norm:
                    d = d * (max_norm / norm)
            kept.append((w[m], d))
        accepted[e] = len(kept)
        total = sum(wm for wm, _ in kept)
        weight_sum[e] = total
        if total > 0:
            bank[e] = bank[e] + lr * sum(((wm / total) * d for wm, d in kept), torch.zeros_like(bank[e]))
    return AggregateRef(bank, accepted, rejected, weight_sum)
