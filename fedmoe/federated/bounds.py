"""How the server bounds what one client can do to the model (docs/design.md, The federated round).

Every accepted update is a delta from the round's global values: ``d = shared - base`` for the shared
vector and ``d = row - bank[e]`` for each expert row. The server learns a bound from the round's own
replies: ``norm_bound`` times the median over the replies of the L2 norm of the shared delta and,
separately, of each reply's largest expert-row delta (what a reply is checked by; a median over all rows
would be pulled down by the rows that few or no tokens reached, until honest replies fail the bound round
after round). Zero deltas are left out of the medians. A delta above its bound is clipped to it
(``norm_action = "clip"``, by :func:`fedmoe_kernels.aggregate`'s ``max_norm``, row by row) or its whole
reply is left out as invalid (``"reject"``). Fewer than half the replies cannot move a median outside the
range of the others' norms, so a hostile minority can raise the bound at most to ``norm_bound`` times the
largest honest norm (one hostile reply moves the median by one rank); with fewer than 3 replies the bound
is that of the round's median all the same, and bounds little. The merge itself is ``method``: the
weighted mean (FedAvg), or the coordinate-wise ``median`` or ``trimmed-mean`` (``trim`` from each end) of
the (bounded) deltas, unweighted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedmoe.alignment import _checks

__all__ = ["METHODS", "AggregationConfig", "Bounds", "delta_norms"]

METHODS = ("mean", "median", "trimmed-mean")
ACTIONS = ("clip", "reject")


@dataclass(frozen=True)
class AggregationConfig:
    """The ``[aggregation]`` section: ``method`` (mean | median | trimmed-mean, for the shared vector and
    the experts), ``trim`` in [0, 0.5) (trimmed-mean: share of replies dropped from each end, per
    coordinate), ``norm_bound`` >= 1 (a delta's bound as a multiple of the round's median reply delta
    norm, module docstring; 0 = no bound) and ``norm_action`` (clip | reject: what happens to a delta
    above its bound)."""

    method: str = "mean"
    trim: float = 0.1
    norm_bound: float = 10.0
    norm_action: str = "reject"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        _checks.real("trim", self.trim, 0.0, 0.5, hi_open=True)
        _checks.real("norm_bound", self.norm_bound, 0.0)
        if 0 < self.norm_bound < 1:
            raise ValueError(f"norm_bound must be 0 (no bound) or >= 1, got {self.norm_bound}")
        if self.norm_action not in ACTIONS:
            raise ValueError(f"norm_action must be one of {list(ACTIONS)}, got {self.norm_action!r}")


@dataclass(frozen=True)
class Bounds:
    """A round's bounds on delta norms: ``shared`` and ``expert`` (float; None = unbounded)."""

    shared: float | None = None
    expert: float | None = None

    @classmethod
    def learn(cls, config: AggregationConfig, shared: np.ndarray, expert: np.ndarray) -> Bounds:
        """``norm_bound`` times the median of the positive norms among ``shared`` (float64 [n]: each
        reply's shared delta) and ``expert`` (float64 [m]: each reply's largest expert-row delta); unbounded
        where there are none or ``norm_bound`` is 0. Zero deltas (a reply whose experts no token reached)
        say nothing about the scale of an update, and a bound of 0 would refuse every reply that moved."""
        if config.norm_bound == 0:
            return cls()

        def bound(norms: np.ndarray) -> float | None:
            moved = norms[norms > 0]
            return float(config.norm_bound * np.median(moved)) if moved.size else None

        return cls(bound(shared), bound(expert))

    def exceeded(self, shared: float, expert: np.ndarray) -> str | None:
        """Why a reply with these delta norms is above its bounds (None if it is not)."""
        if self.shared is not None and shared > self.shared:
            return f"shared update norm {shared:.3g} > bound {self.shared:.3g}"
        if self.expert is not None and expert.size and expert.max() > self.expert:
            return f"expert update norm {expert.max():.3g} > bound {self.expert:.3g}"
        return None


def delta_norms(values: torch.Tensor, base: torch.Tensor) -> np.ndarray:
    """float64 [n]: the L2 norm of each row of ``values - base`` ([n, P] and [n, P] or [P]), computed in
    float64 so that finite rows of any size give finite norms."""
    return torch.linalg.vector_norm(values.double() - base.double(), dim=-1).numpy()
