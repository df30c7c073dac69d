"""Atomic checkpoints of plain data: dicts, lists, strings, numbers and tensors, saved with ``torch.save``
and loaded with ``torch.load(weights_only=True)`` (no arbitrary objects are unpickled). numpy arrays are
stored as tensors (:func:`to_tensors`) and read back with :func:`to_numpy`."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["load_checkpoint", "save_checkpoint", "to_numpy", "to_tensors"]


def to_tensors(tree):
    """A copy of ``tree`` with numpy arrays as tensors and numpy scalars as Python numbers."""
    if isinstance(tree, dict):
        return {k: to_tensors(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [to_tensors(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return torch.from_numpy(np.array(tree, order="C"))
    if isinstance(tree, np.generic):
        return tree.item()
    return tree


def to_numpy(tree):
    """A copy of ``tree`` with tensors as numpy arrays."""
    if isinstance(tree, dict):
        return {k: to_numpy(v) for k, v in tree.items()}
    if isinstance(tree, list | tuple):
        return [to_numpy(v) for v in tree]
    if isinstance(tree, torch.Tensor):
        return tree.numpy().copy()
    return tree


def save_checkpoint(path, state: dict) -> None:
    """Write ``state`` (plain data, see module docstring) to ``path`` atomically: a temporary file in the
    same directory, flushed to disk, then renamed over ``path``. A crash leaves the old file or the new."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(to_tensors(state), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path) -> dict:
    """The state saved at ``path`` (tensors stay tensors; see :func:`to_numpy`)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    return state
