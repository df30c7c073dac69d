"""Argument checks for the alignment modules: each failure is a ValueError/TypeError naming the argument."""

from __future__ import annotations

import math
import numbers

import numpy as np


def real(name: str, value, lo: float = -math.inf, hi: float = math.inf, *,
         lo_open: bool = False, hi_open: bool = False) -> float:
    """``value`` as a finite float in the interval [lo, hi] (ends open where asked)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = value <= lo if lo_open else value < lo
    above = value >= hi if hi_open else value > hi
    if not math.isfinite(value) or below or above:
        interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
        raise ValueError(f"{name} must be finite and in {interval}, got {value}")
    return value


def integer(name: str, value, lo: int = 0) -> int:
    """``value`` as an int >= lo (bools rejected)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def boolean(name: str, value) -> bool:
    """``value`` if it is a bool (ints rejected)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")
    return value


def indices(name: str, value, upper: int) -> np.ndarray:
    """1-D int64 array with every entry in [0, upper)."""
    arr = np.asarray(value)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {arr.dtype}")
    if arr.min() < 0 or arr.max() >= upper:
        raise ValueError(f"{name} must lie in [0, {upper}), got range [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64, copy=False)


def floats(name: str, value, shape: tuple[int, ...], *, nonnegative=False, dtype=np.float64) -> np.ndarray:
    """Finite float array of exactly ``shape`` (optionally >= 0)."""
    arr = np.asarray(value)
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    arr = arr.astype(dtype, copy=False)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite")
    if nonnegative and arr.size and arr.min() < 0:
        raise ValueError(f"{name} must be non-negative")
    return arr


def state_array(state: dict, key: str, shape: tuple[int, ...] | None, dtype) -> np.ndarray:
    """``state[key]`` as an array of ``dtype`` (and ``shape`` when given); for load_state_dict."""
    if key not in state:
        raise ValueError(f"state is missing {key!r}")
    arr = np.asarray(state[key])
    if shape is not None and arr.shape != shape:
        raise ValueError(f"state[{key!r}] must have shape {shape}, got {arr.shape}")
    return np.array(arr, dtype=dtype)  # a private copy: the caller's dict may be reused
