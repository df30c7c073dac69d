"""``assign``: the capacity-constrained client-expert assignment (docs/design.md, Ops), solved exactly.

Problem. Scores ``S`` (N clients x E experts), experts per client ``c`` (N,), clients per expert ``u``
(E,). Choose ``x in {0,1}^{NxE}`` with ``sum_j x_ij <= c_i``, ``sum_i x_ij <= u_j`` and ``x_ij = 0`` where
``S_ij = -inf``, maximising first the number of pairs ``sum x`` and then the total score ``sum S_ij x_ij``
(a max-weight maximum b-matching; the LP is totally unimodular).

Method (the C++ extension ``fedmoe_kernels._assign``, ``csrc/``). Every allowed pair is a candidate on
small problems (``dense_limit``); otherwise each client keeps a candidate list of its best experts by
reduced score ``S_ij - p_j`` at estimated expert prices ``p``, selected in one pass over ``S``.

* Saturating case (every client can get its ``c_i`` experts; nearly every federated round): a dummy client
  takes the spare expert places, and the balanced transportation problem is solved by an epsilon-scaling
  auction (Bertsekas) on the candidate lists, rescanning a row where its list may be stale. It starts
  from the ``warm_start`` prices after one reverse-auction step that lowers the overpriced experts, else
  from zero prices, else from the prices of a row sample of the problem (solved the same way). Its
  prices and client values are the LP duals; ``certificate.method == "auction"``.
* General case (clients left short, or the auction stalls): a forward auction moves the prices near
  equilibrium and picks the candidates, then successive shortest paths (Dijkstra on reduced costs, a
  min-cost flow with a costly "short" arc per client, so that the most pairs come first and then the
  best score) solve the candidate graph exactly; node potentials give the duals;
  ``certificate.method == "flow"``.

Either way a certificate on the full matrix follows: the duals ``(a, p, lambda)`` are checked against
every pair (a reduced-cost scan) and the residual graph is searched for an augmenting path from a client
left short. Violating pairs join the candidate graph and the flow solver runs again, until the
certificate holds (``certificate.rounds`` counts the solves).

Edge cases. ``N == 0`` or ``E == 0`` gives an empty assignment. ``c_i`` above ``E`` (``u_j`` above ``N``)
is the same as ``E`` (``N``). All-forbidden rows or columns are simply unused. Ties are broken
deterministically (same input, same output, whatever the number of threads).

References (beside the op, the executable specification): :func:`assign_linprog` (the LP by HiGHS, any
capacities) and :func:`assign_lsa` (``linear_sum_assignment``, one side of unit capacity).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = ["MAX_THREADS", "AssignResult", "Assignment", "Certificate", "assign", "assign_linprog",
           "assign_lsa"]

MAX_THREADS = 1024  # assign's ``threads`` (each thread keeps scratch buffers of its own)


@dataclass(frozen=True)
class Certificate:
    """LP duals proving optimality of an :class:`Assignment` on the full score matrix.

    For the LP ``max sum S x`` s.t. ``sum_j x_ij <= c_i`` (dual ``client_dual[i] >= 0``),
    ``sum_i x_ij <= u_j`` (dual ``expert_price[j] >= 0``), ``sum x = K`` (dual ``flow_dual``, free) and
    ``0 <= x <= 1`` (dual ``max(0, S_ij - a_i - p_j - lambda)``), ``dual_objective`` is the dual value
    and ``gap = dual_objective - objective`` (>= 0 up to rounding; 0 proves the score optimal among
    assignments with ``K`` pairs). ``certified`` is True when the reduced-cost scan found no violating
    pair and no augmenting path (so ``K`` is maximal). ``expert_price`` warm-starts the next call.
    ``method`` names what found the assignment: ``"auction"`` (epsilon-scaling auction, when every client
    can get its ``c_i`` experts), ``"flow"`` (successive shortest paths, the general case) or ``"empty"``.
    ``rounds`` counts the solves the certificate asked for; ``pairs_added`` the pairs it added.
    """

    client_dual: np.ndarray
    expert_price: np.ndarray
    flow_dual: float
    dual_objective: float
    gap: float
    certified: bool
    rounds: int
    pairs_added: int
    method: str


@dataclass(frozen=True)
class Assignment:
    """The chosen pairs, sorted by client then expert (``clients``, ``experts``: int64 [K])."""

    clients: np.ndarray
    experts: np.ndarray
    objective: float
    shape: tuple[int, int]
    certificate: Certificate

    def __len__(self) -> int:
        return int(self.clients.shape[0])

    def to_dense(self) -> np.ndarray:
        """bool [N, E] with True at the chosen pairs."""
        dense = np.zeros(self.shape, dtype=bool)
        dense[self.clients, self.experts] = True
        return dense

    def experts_of(self, client: int) -> np.ndarray:
        """int64 [c]: the experts assigned to ``client``."""
        lo, hi = np.searchsorted(self.clients, [client, client + 1])
        return self.experts[lo:hi]


def _bound(value, length: int, limit: int, name: str) -> np.ndarray:
    """Validate a scalar-or-vector bound (``c`` or ``u``); return it as int64 [length], clipped to
    ``limit``."""
    arr = np.asarray(value)
    numeric = np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    if arr.dtype == np.bool_ or not numeric:
        raise ValueError(f"{name} must be integer-valued numbers, got dtype {arr.dtype}")
    if arr.ndim == 0:
        arr = np.full(length, arr)
    elif arr.shape != (length,):
        raise ValueError(f"{name} must be a scalar or have shape ({length},), got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} must be finite")
        if np.any(arr != np.round(arr)):
            raise ValueError(f"{name} must be whole numbers, got fractional values")
    if np.any(arr < 0):
        raise ValueError(f"{name} must be non-negative")
    return np.ascontiguousarray(np.minimum(arr, limit), dtype=np.int64)


def _warm_prices(warm_start, num_experts: int) -> np.ndarray | None:
    if warm_start is None:
        return None
    if isinstance(warm_start, Assignment):
        warm_start = warm_start.certificate
    if isinstance(warm_start, Certificate):
        warm_start = warm_start.expert_price
    try:
        prices = np.asarray(warm_start, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"warm_start must be numeric expert prices: {exc}") from None
    if prices.shape != (num_experts,):
        raise ValueError(f"warm_start must give {num_experts} expert prices, got shape {prices.shape}")
    if not np.all(np.isfinite(prices)) or np.any(prices < 0):
        raise ValueError("warm_start prices must be finite and non-negative")
    return np.ascontiguousarray(prices)


def assign(
    scores,
    experts_per_client,
    clients_per_expert=None,
    *,
    warm_start=None,
    candidates: int = 8,
    threads: int | None = None,
    dense_limit: int = 1 << 12,
) -> Assignment:
    """Solve the capacity-constrained assignment exactly (method: module docstring).

    Args:
        scores: float32 or float64 [N, E]; ``-inf`` forbids a pair; NaN and ``+inf`` are rejected.
            Read in place when C-contiguous (no copy).
        experts_per_client: ``c``, int scalar or [N]: the most experts a client gets.
        clients_per_expert: ``u``, int scalar or [E], or None (unbounded): the most clients an expert gets.
        warm_start: expert prices [E] (or the previous :class:`Assignment` / :class:`Certificate`) of a
            similar problem, e.g. the previous round; only speeds things up, never changes the answer.
        candidates: candidate experts kept per client beyond its ``c_i`` (speed knob, >= 1; above E the
            same as E).
        threads: worker threads for the dense scans, 1 to :data:`MAX_THREADS` (default: all cores, at
            most :data:`MAX_THREADS`).
        dense_limit: problems with at most this many entries (N*E) keep every allowed pair as a candidate
            and skip the price sampling (speed knob, >= 0; 0 forces the candidate/certificate path; above
            N*E the same as N*E).

    Returns:
        :class:`Assignment` with the pairs, ``objective = sum S_ij`` over them (float64) and its
        :class:`Certificate`.
    """
    if isinstance(scores, np.ndarray):
        s = scores
    else:
        s = np.asarray(scores)
    if s.dtype not in (np.float32, np.float64):
        raise ValueError(f"scores must be float32 or float64, got dtype {s.dtype}")
    if s.ndim != 2:
        raise ValueError(f"scores must be 2-D [clients, experts], got {s.ndim}-D shape {s.shape}")
    n, e = s.shape
    c = _bound(experts_per_client, n, e, "experts_per_client")
    u = _bound(n if clients_per_expert is None else clients_per_expert, e, n, "clients_per_expert")
    prices = _warm_prices(warm_start, e)
    if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    if isinstance(dense_limit, bool) or not isinstance(dense_limit, numbers.Integral) or dense_limit < 0:
        raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit!r}")
    if threads is None:
        threads = min(os.cpu_count() or 1, MAX_THREADS)
    elif isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or \
            not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads must be an integer in [1, {MAX_THREADS}], got {threads!r}")

    if n == 0 or e == 0:
        empty = np.zeros(0, dtype=np.int64)
        cert = Certificate(np.zeros(n), np.zeros(e), 0.0, 0.0, 0.0, True, 0, 0, "empty")
        return Assignment(empty, empty.copy(), 0.0, (n, e), cert)

    from fedmoe_kernels import _assign

    s = np.ascontiguousarray(s)
    # candidates and dense_limit clipped where they stop mattering (E, N*E), so that no size overflows in C++
    out = _assign.solve(s, c, u, prices, min(int(candidates), e), int(threads), min(int(dense_limit), n * e))
    cert = Certificate(
        client_dual=out["client_dual"],
        expert_price=out["expert_price"],
        flow_dual=float(out["flow_dual"]),
        dual_objective=float(out["dual_objective"]),
        gap=float(out["dual_objective"] - out["objective"]),
        certified=bool(out["certified"]),
        rounds=int(out["rounds"]),
        pairs_added=int(out["pairs_added"]),
        method=str(out["method"]),
    )
    return Assignment(out["clients"], out["experts"], float(out["objective"]), (n, e), cert)


# ---------------------------------------------------------------- references


class AssignResult(NamedTuple):
    """Reference answer of ``assign``: pairs sorted by client then expert, and their total score."""

    clients: np.ndarray
    experts: np.ndarray
    objective: float


def _assign_problem(scores, experts_per_client, clients_per_expert):
    """float64 scores, ``c`` clipped to E and ``u`` to N (None: N), as int64."""
    s = np.asarray(scores, dtype=np.float64)
    n, e = s.shape
    c = np.broadcast_to(np.asarray(experts_per_client, dtype=np.int64), (n,))
    u = n if clients_per_expert is None else clients_per_expert
    u = np.broadcast_to(np.asarray(u, dtype=np.int64), (e,))
    return s, np.minimum(c, e), np.minimum(u, n)


def _assign_result(s, clients, experts) -> AssignResult:
    order = np.lexsort((experts, clients))
    clients, experts = clients[order].astype(np.int64), experts[order].astype(np.int64)
    return AssignResult(clients, experts, float(s[clients, experts].sum()))


def _lsa_unit_rows(s, c, u):
    """(rows, cols) of the lexicographic optimum when every ``c`` is 0 or 1."""
    from scipy.optimize import linear_sum_assignment

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


def assign_lsa(scores, experts_per_client, clients_per_expert=None) -> AssignResult:
    """``assign`` via ``scipy.optimize.linear_sum_assignment``, where one side has unit capacity.

    The other side is expanded into one slot per unit of capacity (exact only because the unit side
    cannot take two slots of the same expert/client). Raises ValueError when neither side is unit.
    """
    s, c, u = _assign_problem(scores, experts_per_client, clients_per_expert)
    if np.all(c <= 1):
        clients, experts = _lsa_unit_rows(s, c, u)
    elif np.all(u <= 1):
        experts, clients = _lsa_unit_rows(s.T, u, c)
    else:
        raise ValueError(
            "assign_lsa needs unit capacities: every experts_per_client <= 1 or every clients_per_expert <= 1"
        )
    return _assign_result(s, clients, experts)


def _highs(cost, **lp):
    """linprog by HiGHS interior point with crossover (a vertex, and 10-100x faster than simplex on these
    LPs) or, where it stops short of optimal, dual simplex."""
    from scipy.optimize import linprog

    tol = {"primal_feasibility_tolerance": 1e-9, "dual_feasibility_tolerance": 1e-9}
    for method in ("highs-ipm", "highs-ds"):
        res = linprog(cost, bounds=(0, 1), method=method, options=tol, **lp)
        if res.status == 0:
            return res
    raise RuntimeError(f"linprog failed: {res.message}")


def assign_linprog(scores, experts_per_client, clients_per_expert=None) -> AssignResult:
    """``assign`` for any capacities: the totally unimodular LP over the allowed pairs, HiGHS, two phases.

    Phase 1 maximises the pair count ``K*``; phase 2 maximises ``sum S x`` subject to ``sum x = K*`` (a
    min-cost flow of fixed value, so its vertices are still integral; checked). The referee for every
    other implementation.
    """
    from scipy import sparse

    s, c, u = _assign_problem(scores, experts_per_client, clients_per_expert)
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
