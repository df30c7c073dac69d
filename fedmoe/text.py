"""Text as token windows: token streams cut into fixed-length windows on the fly.

A stream of T tokens gives ``max(T - L, 0)`` samples, as LEAF's Shakespeare does: sample i is the window
``stream[i : i + L]`` with the target ``stream[i + L]``, so the first window starts at the stream's first
token and a stream of at most L tokens gives none. :class:`TokenWindows` holds the windows of many
streams lazily (the tokens once, plus one int64 start per window), so that millions of windows never sit
in memory as an [N, L] array.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["TokenWindows", "stream_windows"]


class TokenWindows:
    """Lazy int64 [N, L] windows: row i is ``tokens[starts[i] : starts[i] + length]``.

    Indexing (an int, a slice, or an integer or boolean array, numpy or torch) returns the rows as a new
    int64 numpy array, as indexing an [N, L] array would; with ``as_tensors`` it returns an int64 tensor
    instead, which is a zero-copy strided view of the tokens where the rows are consecutive windows (use
    ``reshape``, not ``view``, on it; never write to it).
    """

    def __init__(self, tokens: np.ndarray, starts: np.ndarray, length: int, *, as_tensors: bool = False):
        self.tokens = np.ascontiguousarray(tokens, dtype=np.int64)
        self.starts = np.asarray(starts, dtype=np.int64)
        self.length = int(length)
        self.as_tensors = as_tensors
        self._offsets = np.arange(self.length)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.starts.size, self.length)

    ndim = 2
    dtype = np.dtype(np.int64)

    def __len__(self) -> int:
        return self.starts.size

    def __repr__(self) -> str:
        return f"TokenWindows({self.starts.size} windows of {self.length} over {self.tokens.size} tokens)"

    def select(self, idx) -> TokenWindows:
        """The windows at ``idx`` (an index as for ``[]``), still lazy."""
        starts = self.starts[_numpy_index(idx)]
        return TokenWindows(self.tokens, starts, self.length, as_tensors=self.as_tensors)

    def tensors(self) -> TokenWindows:
        """These windows, indexed into tensors."""
        return TokenWindows(self.tokens, self.starts, self.length, as_tensors=True)

    def consecutive(self) -> bool:
        """Whether row i + 1 starts one token after row i, for every i (the windows of one stream)."""
        return bool((np.diff(self.starts) == 1).all())

    def __getitem__(self, idx):
        starts = self.starts[_numpy_index(idx)]
        if not self.as_tensors:
            return self.tokens[starts[..., None] + self._offsets]
        if starts.ndim == 1 and starts.size > 1 and (np.diff(starts) == 1).all():
            tokens = torch.from_numpy(self.tokens)
            return tokens.as_strided((starts.size, self.length), (1, 1), int(starts[0]))
        return torch.from_numpy(self.tokens[starts[..., None] + self._offsets])


def _numpy_index(idx):
    return idx.numpy() if isinstance(idx, torch.Tensor) else idx


def stream_windows(tokens: np.ndarray, offsets: np.ndarray, length: int
                   ) -> tuple[TokenWindows, np.ndarray, np.ndarray]:
    """The windows of the streams ``tokens[offsets[c] : offsets[c + 1]]``, stream by stream.

    Args:
        tokens: int [T] token ids.
        offsets: int [C + 1], non-decreasing from 0 to T.
        length: the window length L >= 1.

    Returns:
        ``(windows, targets, stream)``: :class:`TokenWindows` [N, L], int64 targets [N] (the token after
        each window) and the int64 stream (client) of each window [N], with ``N = sum(max(T_c - L, 0))``.
    """
    tokens, offsets = np.asarray(tokens, dtype=np.int64), np.asarray(offsets, dtype=np.int64)
    counts = np.maximum(np.diff(offsets) - length, 0)
    stream = np.repeat(np.arange(counts.size), counts)
    first = np.cumsum(counts) - counts  # index of each stream's first window
    starts = offsets[:-1][stream] + np.arange(stream.size) - first[stream]
    return TokenWindows(tokens, starts, length), tokens[starts + length], stream
