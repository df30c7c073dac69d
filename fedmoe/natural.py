"""The natural format: an ``.npz`` whose samples come with their clients (federated data as LEAF ships it).

Dense samples, images or text:

- ``x`` [N, ...], ``y`` int [N], ``client`` int [N] (the client of each sample), and ``x_test`` [M, ...],
  ``y_test`` int [M], ``client_test`` int [M];
- images: ``x`` of real numbers, read as :func:`fedmoe.data.load_npz` reads images (standardised per
  channel with the training statistics), ``y`` class labels;
- text: ``x`` int [N, L] token ids with ``vocab`` (unicode [V], the symbol of each id), ``y`` the next
  token; ids in ``[0, V)``.

Token streams, text only (a window per position, cut on the fly: :mod:`fedmoe.text`):

- ``tokens`` int [T] and ``client_offsets`` int [C + 1] (from 0, non-decreasing, to T): client c's stream is
  ``tokens[client_offsets[c] : client_offsets[c + 1]]``; ``tokens_test`` and ``client_offsets_test`` [C + 1]
  the same for the test split; ``vocab`` as above; ``window`` (int, L >= 1);
- sample i of a client is ``stream[i : i + L]`` with the target ``stream[i + L]``: a stream of T_c tokens
  gives ``max(T_c - L, 0)`` samples, the first window starting at its first token; samples are ordered by
  client, then position.

Clients are ``0..C-1`` (C is ``max(client) + 1``, or ``len(client_offsets) - 1``); every client must have a
training sample; a client may have no test sample (a short test stream), but the test split as a whole
may not be empty. Other arrays are ignored. A bad file is a ValueError (TypeError for a wrong dtype) naming
the file and the array.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from fedmoe.data import MAX_CLASSES, Dataset, _build, _naming
from fedmoe.text import stream_windows

__all__ = ["DENSE", "STREAMS", "load_natural"]

DENSE = ("x", "y", "client", "x_test", "y_test", "client_test")
STREAMS = ("tokens", "client_offsets", "tokens_test", "client_offsets_test", "vocab", "window")


def load_natural(path, arrays: dict[str, np.ndarray]) -> Dataset:
    """The :class:`~fedmoe.data.Dataset` of the natural-format ``arrays`` read from ``path``, with its
    clients (``client_train``, ``client_test``) and, for text, its ``vocab``."""
    path = Path(path)
    with _naming(path):
        if "tokens" in arrays and "x" in arrays:
            raise ValueError("holds both 'x' and 'tokens': a natural file stores samples one way")
        form = STREAMS if "tokens" in arrays else DENSE
        missing = [name for name in form if name not in arrays]
        if missing:
            raise ValueError(f"the natural format needs arrays {list(form)}; missing {missing}")
        if form is STREAMS:
            return _streams(path.stem, arrays)
        return _dense(path.stem, arrays)


def _dense(name: str, a: dict[str, np.ndarray]) -> Dataset:
    if "vocab" not in a:
        images = _build(name, a["x"], a["y"], a["x_test"], a["y_test"])
        train, test = _clients(a["client"], a["client_test"], images.y_train.size, images.y_test.size)
        return dataclasses.replace(images, client_train=train, client_test=test)
    vocab = _vocab(a["vocab"])
    x, x_test = _token_matrix(a["x"], "x", vocab), _token_matrix(a["x_test"], "x_test", vocab)
    if x_test.shape[1] != x.shape[1]:
        raise ValueError(f"x_test windows have length {x_test.shape[1]}, x has {x.shape[1]}")
    y = _tokens(a["y"], "y", vocab, x.shape[0])
    y_test = _tokens(a["y_test"], "y_test", vocab, x_test.shape[0])
    if y_test.size == 0:
        raise ValueError("x_test holds no test samples")
    train, test = _clients(a["client"], a["client_test"], y.size, y_test.size)
    return Dataset(name, x, y, x_test, y_test, len(vocab), train, test, vocab)


def _streams(name: str, a: dict[str, np.ndarray]) -> Dataset:
    vocab = _vocab(a["vocab"])
    window = a["window"]
    if window.size != 1 or not np.issubdtype(window.dtype, np.integer) or int(window.reshape(-1)[0]) < 1:
        raise ValueError(f"window must be one integer >= 1 (the window length L), got {window!r}")
    window = int(window.reshape(-1)[0])
    tokens = _tokens(a["tokens"], "tokens", vocab)
    tokens_test = _tokens(a["tokens_test"], "tokens_test", vocab)
    offsets = _offsets(a["client_offsets"], "client_offsets", tokens.size)
    offsets_test = _offsets(a["client_offsets_test"], "client_offsets_test", tokens_test.size)
    if offsets_test.size != offsets.size:
        raise ValueError(f"client_offsets_test has {offsets_test.size} entries and client_offsets "
                         f"{offsets.size}: both need one per client plus one")
    x, y, train = stream_windows(tokens, offsets, window)
    x_test, y_test, test = stream_windows(tokens_test, offsets_test, window)
    empty = np.flatnonzero(np.diff(offsets) <= window)
    if empty.size:
        c = int(empty[0])
        raise ValueError(f"client {c} has no training samples: its stream in tokens has "
                         f"{offsets[c + 1] - offsets[c]} tokens, a window of {window} needs {window + 1} "
                         f"({empty.size} such clients)")
    if y_test.size == 0:
        raise ValueError(f"tokens_test gives no test samples: no client's test stream is longer than the "
                         f"window of {window}")
    return Dataset(name, x, y, x_test, y_test, len(vocab), train, test, vocab)


def _vocab(vocab: np.ndarray) -> tuple[str, ...]:
    if vocab.dtype.kind != "U" or vocab.ndim != 1:
        raise TypeError(f"vocab must be a 1-D unicode array (the symbol of each token id), got {vocab.dtype} "
                        f"{vocab.shape}")
    symbols = tuple(str(v) for v in vocab)
    if not 2 <= len(symbols) <= MAX_CLASSES:
        raise ValueError(f"vocab must hold 2 to {MAX_CLASSES} symbols, got {len(symbols)}")
    if len(set(symbols)) != len(symbols):
        raise ValueError("vocab symbols must be distinct")
    return symbols


def _ints(a: np.ndarray, name: str, ndim: int) -> np.ndarray:
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"{name} must hold integers, got dtype {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    return a


def _tokens(a: np.ndarray, name: str, vocab: tuple[str, ...], n: int | None = None) -> np.ndarray:
    """int64 token ids [n], each in ``[0, len(vocab))``."""
    a = _ints(a, name, 1)
    if n is not None and a.size != n:
        raise ValueError(f"{name} must have {n} entries (one per sample), got {a.size}")
    _in_vocab(a, name, vocab)
    return a.astype(np.int64)


def _token_matrix(a: np.ndarray, name: str, vocab: tuple[str, ...]) -> np.ndarray:
    """int64 token windows [N, L], each id in ``[0, len(vocab))``."""
    a = _ints(a, name, 2)
    if a.shape[1] == 0:
        raise ValueError(f"{name} windows must not be empty, got shape {a.shape}")
    _in_vocab(a, name, vocab)
    return a.astype(np.int64)


def _in_vocab(a: np.ndarray, name: str, vocab: tuple[str, ...]) -> None:
    flat = a.reshape(-1)
    bad = np.flatnonzero((flat < 0) | (flat >= len(vocab)))
    if bad.size:
        raise ValueError(f"{name} holds token id {flat[bad[0]]} (at flat index {bad[0]}) outside the "
                         f"vocabulary of {len(vocab)} symbols ({bad.size} such ids)")


def _offsets(a: np.ndarray, name: str, total: int) -> np.ndarray:
    """int64 [C + 1] offsets of C >= 1 streams in ``total`` tokens."""
    a = _ints(a, name, 1).astype(np.int64)
    if a.size < 2 or a[0] != 0 or a[-1] != total or (np.diff(a) < 0).any():
        raise ValueError(f"{name} must run from 0 to the {total} tokens, non-decreasing, with one entry per "
                         f"client plus one, got {a.size} entries from {a[:1].tolist()} to {a[-1:].tolist()}")
    return a


def _clients(client: np.ndarray, client_test: np.ndarray, n: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """int64 ``client`` [n] and ``client_test`` [m], checked: ids in ``[0, C)`` with C = max(client) + 1,
    every client with a training sample."""
    client, client_test = _ints(client, "client", 1), _ints(client_test, "client_test", 1)
    for name, ids, size in (("client", client, n), ("client_test", client_test, m)):
        if ids.size != size:
            raise ValueError(f"{name} must have {size} entries (one per sample), got {ids.size}")
    if n == 0:
        raise ValueError("x holds no training samples")
    if client.min() < 0 or client.max() >= n:
        bad = client.min() if client.min() < 0 else client.max()
        raise ValueError(f"client holds client id {bad}, out of range: ids run from 0 to C - 1, each client "
                         f"with a training sample, so below the {n} samples")
    clients = int(client.max()) + 1
    if client_test.size and (client_test.min() < 0 or client_test.max() >= clients):
        bad = client_test.min() if client_test.min() < 0 else client_test.max()
        raise ValueError(f"client_test holds client id {bad}, out of range: the training clients are "
                         f"0..{clients - 1}")
    counts = np.bincount(client, minlength=clients)
    if (counts == 0).any():
        raise ValueError(f"client {int(np.argmax(counts == 0))} has no training samples: ids in client "
                         f"must be 0..{clients - 1}, each with a sample ({int((counts == 0).sum())} without)")
    return client.astype(np.int64), client_test.astype(np.int64)
