"""Top-c selection per row of a score block: the primitive behind greedy, load-balanced and cold start."""

from __future__ import annotations

import numpy as np

_ARGMAX_PASSES = 8  # up to this many per row: repeated argmax (fast vectorised passes); above: argpartition


def _best(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(cols, values)`` [n, k] of the k largest entries of each row, best first."""
    n = scores.shape[0]
    if k <= _ARGMAX_PASSES:
        rows = np.arange(n)
        cols = np.empty((n, k), dtype=np.int64)
        values = np.empty((n, k), dtype=scores.dtype)
        for j in range(k):
            cols[:, j] = scores.argmax(axis=1)  # the first of equal maxima: deterministic ties
            values[:, j] = scores[rows, cols[:, j]]
            scores[rows, cols[:, j]] = -np.inf
        for j in range(k - 1, -1, -1):  # restore (reverse order: a row of -inf may repeat a column)
            scores[rows, cols[:, j]] = values[:, j]
        return cols, values
    part = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    part_values = np.take_along_axis(scores, part, axis=1)
    order = np.lexsort((part, -part_values), axis=1)  # descending value, ties by column
    return np.take_along_axis(part, order, axis=1), np.take_along_axis(part_values, order, axis=1)


def top_per_row(scores: np.ndarray, capacity: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ``capacity[r]`` best finite entries of every row ``r``.

    Args:
        scores: float32 [n, E], writable (entries are overwritten during the search and then restored);
            ``-inf`` entries are never chosen.
        capacity: int64 [n], >= 0.

    Returns:
        ``(rows, cols, values)``: int64 [K], int64 [K], float32 [K], sorted by row then column.
        Ties go to the lower column (same input, same output).
    """
    n, e = scores.shape
    k = int(min(capacity.max(initial=0), e))
    if n == 0 or k == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    cols, values = _best(scores, k)
    keep = (np.arange(k) < capacity[:, None]) & (values > -np.inf)
    order = np.argsort(np.where(keep, cols, e), axis=1, kind="stable")  # chosen columns first, ascending
    cols = np.take_along_axis(cols, order, axis=1)
    values = np.take_along_axis(values, order, axis=1)
    keep = np.take_along_axis(keep, order, axis=1)
    rows = np.nonzero(keep)[0]
    return rows, cols[keep], values[keep]
