"""Spread across seeds, as the experiment scripts beside it report it."""

from __future__ import annotations

import statistics


def mean_std(values) -> list:
    """[mean, sample std] of the values that are not None ([None, None] if there are none; std 0 for one)."""
    values = [v for v in values if v is not None]
    if not values:
        return [None, None]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]
