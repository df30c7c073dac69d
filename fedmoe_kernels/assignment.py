"""Capacity-constrained client-expert assignment (DESIGN.md §3.1), solved exactly by the C++ extension.

Problem. Scores ``S`` (N clients x E experts), client capacities ``c`` (N,), expert capacities ``u`` (E,).
Choose ``x in {0,1}^{NxE}`` with ``sum_j x_ij <= c_i``, ``sum_i x_ij <= u_j`` and ``x_ij = 0`` where
``S_ij = -inf``, maximising first the number of pairs ``sum x`` and then the total score ``sum S_ij x_ij``
(a max-weight maximum b-matching).

Method (``csrc/assign.cpp``). Per client a candidate set of the best ``c_i + candidates`` experts by
reduced score ``S_ij - p_j`` (prices ``p`` from a warm start or from solving a row sample of the problem);
on that sparse graph a maximum flow (Dinic) then an exact min-cost flow at that flow value (cost-scaling
push-relabel on integer-scaled scores); then a certificate on the full matrix: the LP duals
``(a, p, lambda)`` of the solution are checked against every pair (a reduced-cost scan) and the residual
graph is searched for an augmenting path when a client is left short. Violating pairs join the
candidate graph and the sparse problem is solved again until the certificate holds.

Edge cases. ``N == 0`` or ``E == 0`` gives an empty assignment. A client capacity above ``E`` (an expert
capacity above ``N``) is the same as ``E`` (``N``). All-forbidden rows or columns are simply unused. Ties
are broken deterministically (same input, same output).
"""

from __future__ import annotations

import numbers
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Assignment", "Certificate", "assign"]


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
    can get its full capacity), ``"flow"`` (successive shortest paths, the general case) or ``"empty"``.
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


def _capacity(value, length: int, limit: int, name: str) -> np.ndarray:
    """Validate a scalar-or-vector capacity; return it as int64 [length], clipped to ``limit``."""
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
    client_capacity,
    expert_capacity=None,
    *,
    warm_start=None,
    candidates: int = 8,
    threads: int | None = None,
    dense_limit: int = 1 << 12,
) -> Assignment:
    """Solve the capacity-constrained assignment exactly.

    Args:
        scores: float32 or float64 [N, E]; ``-inf`` forbids a pair; NaN and ``+inf`` are rejected.
            Read in place when C-contiguous (no copy).
        client_capacity: int scalar or [N]: most experts per client.
        expert_capacity: int scalar or [E], or None (unbounded): most clients per expert.
        warm_start: expert prices [E] (or the previous :class:`Assignment` / :class:`Certificate`) of a
            similar problem, e.g. the previous round; only speeds things up, never changes the answer.
        candidates: candidate experts kept per client beyond its capacity (speed knob, >= 1).
        threads: worker threads for the dense scans (default: all cores).
        dense_limit: problems with at most this many entries (N*E) keep every allowed pair as a candidate
            and skip the price sampling (speed knob, >= 0; 0 forces the candidate/certificate path).

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
    c = _capacity(client_capacity, n, e, "client_capacity")
    u = _capacity(n if expert_capacity is None else expert_capacity, e, n, "expert_capacity")
    prices = _warm_prices(warm_start, e)
    if isinstance(candidates, bool) or not isinstance(candidates, numbers.Integral) or candidates < 1:
        raise ValueError(f"candidates must be an integer >= 1, got {candidates!r}")
    if isinstance(dense_limit, bool) or not isinstance(dense_limit, numbers.Integral) or dense_limit < 0:
        raise ValueError(f"dense_limit must be an integer >= 0, got {dense_limit!r}")
    if threads is None:
        threads = os.cpu_count() or 1
    elif isinstance(threads, bool) or not isinstance(threads, numbers.Integral) or threads < 1:
        raise ValueError(f"threads must be an integer >= 1, got {threads!r}")

    if n == 0 or e == 0:
        empty = np.zeros(0, dtype=np.int64)
        cert = Certificate(np.zeros(n), np.zeros(e), 0.0, 0.0, 0.0, True, 0, 0, "empty")
        return Assignment(empty, empty.copy(), 0.0, (n, e), cert)

    from fedmoe_kernels import _assign

    s = np.ascontiguousarray(s)
    out = _assign.solve(s, c, u, prices, int(candidates), int(threads), int(dense_limit))
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
