"""Atomic, checksummed checkpoints of plain data: dicts, lists, strings, numbers and tensors, saved with
``torch.save`` and loaded with ``torch.load(weights_only=True)`` (no arbitrary objects are unpickled).
numpy arrays are stored as tensors (:func:`to_tensors`) and read back with :func:`to_numpy`.

File format: one header line ``fedmoe-checkpoint sha256=<64 hex digits>``, then the ``torch.save`` bytes.
:func:`load_checkpoint` checks the SHA-256 of those bytes before it unpickles anything, so a flipped bit
anywhere in the data is refused with an error naming the file; so are non-finite floating-point values
(:func:`check_finite`)."""

from __future__ import annotations

import hashlib
import io
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

__all__ = ["check_finite", "load_checkpoint", "save_checkpoint", "to_numpy", "to_tensors"]

_HEADER = re.compile(rb"fedmoe-checkpoint sha256=([0-9a-f]{64})\n")


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
    data = io.BytesIO()
    torch.save(to_tensors(state), data)
    data = data.getbuffer()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(b"fedmoe-checkpoint sha256=%s\n" % hashlib.sha256(data).hexdigest().encode())
            f.write(data)
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


def check_finite(tree, where: str = "") -> str | None:
    """The path of the first non-finite float (tensor, array or number) in ``tree``; None if all are."""
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, list | tuple):
        items = enumerate(tree)
    else:
        if isinstance(tree, torch.Tensor) and tree.is_floating_point():
            finite = bool(torch.isfinite(tree).all())
        elif isinstance(tree, np.ndarray) and np.issubdtype(tree.dtype, np.floating):
            finite = bool(np.isfinite(tree).all())
        else:
            finite = not isinstance(tree, float) or math.isfinite(tree)
        return None if finite else where or "value"
    for key, value in items:
        if (bad := check_finite(value, f"{where}.{key}" if where else str(key))) is not None:
            return bad
    return None


def load_checkpoint(path) -> dict:
    """The state saved at ``path`` (tensors stay tensors; see :func:`to_numpy`), after checking its
    checksum; ``ValueError`` naming the file if it is not an intact fedmoe checkpoint."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    header = _HEADER.match(raw)
    if header is None:
        raise ValueError(f"{path} is not a fedmoe checkpoint (no checksum header)")
    data = memoryview(raw)[header.end():]
    if hashlib.sha256(data).hexdigest().encode() != header.group(1):
        raise ValueError(f"checkpoint {path} is corrupt: its SHA-256 differs from the one saved with it")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # any unpickling failure: an unusable file
        raise ValueError(f"checkpoint {path} cannot be read: {type(exc).__name__}: {exc}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a checkpoint dict")
    return state
