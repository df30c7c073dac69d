"""``aggregate``: fused per-expert aggregation (docs/design.md, Ops) by weighted mean, coordinate-wise
median or trimmed mean, in one batch, or (the mean) streamed as replies arrive. :func:`aggregate_reference`
is the loop reference.

Each of the M received rows is one updated copy of one expert, flattened to P values. For every expert
``e`` the new value is computed over its *accepted* rows ``m`` (those whose values are all finite once
converted to the accumulation dtype; the others are rejected and counted, never averaged in)::

    d_m  = row_m - base[e]                                   # the row's delta
    s_m  = min(1, max_norm / ||d_m||_2)                      # clipping (1 without max_norm)
    W_e  = sum_m w_m
    new  = base[e] + lr * sum_m w_m * s_m * d_m / W_e        # "mean", if W_e > 0, else base[e]
    new  = base[e] + lr * robust_m(s_m * d_m)                # "median", "trimmed-mean"

With ``lr = 1`` and no clipping the mean is the weighted mean ``sum w row / sum w``; with clipping it is the
weighted mean of the clipped rows ``base + s * d``; ``lr`` is a server step on ``mean - base``. An expert
with no accepted rows, or whose accepted weights sum to zero, keeps ``base``. Weights must be finite and
``>= 0`` (integer sample counts are fine). The robust statistics are unweighted, column by column, over
the accepted rows of positive weight (a weight of 0 leaves a row out; it still counts as accepted): the
median (numpy's: the mean of the two middle values of an even count) or the trimmed mean (sorted, ``int(trim
* n)`` of the ``n`` values cut at each end and the rest averaged, as ``scipy.stats.trim_mean``). Either is
the mean of the values of a window of ranks ``[lo, hi)``, taken as ``sum_r v_r * (1 / k)`` (``k = hi -
lo``, ``1 / k`` rounded to the accumulation dtype; exact for the median), which cannot overflow. With
``lr = 1`` and no clipping, ``base + median(row - base)`` is the median of the rows up to rounding.

Overflow. An expert whose new value is not finite in the dtype of ``base`` although its accepted rows are
(for instance ``lr * (mean - base)`` beyond the range of the bank, or deltas ``row - base`` beyond that of
the accumulation dtype) keeps ``base``, and all its rows count as rejected (``accepted`` 0, ``weight_sum``
0): no infinity or NaN is ever written, in place or not. Each path decides before it writes: torch
computes a block of experts' new values in a buffer and checks them (a reduction or two), Triton writes the
experts that a bound shows safe (``_surely_finite``, from each row's largest ``|value|`` found in the
verdict pass, and ``lr``) straight into the bank, and the others (values near the top of the range) into a
scratch first, copied into the bank where finite. The reference computes in float64 and checks only
the final value, so where a delta overflows the accumulation dtype it may keep an expert that the fast
paths drop.

Dtypes. Rows may be float16, bfloat16, float32 or float64, independently of the bank ``base`` (same
choice). Sums are accumulated in float64 when the bank is float64, else in float32; the result is written
in the bank's dtype (rounded to nearest). A float64 value beyond float32 range in a row aggregated into a
float32 bank is not finite in the accumulation dtype: the row is rejected. ``base`` must be finite.
Weight sums are float64. Each weight is scaled by a power of two per expert (so that the accepted weights
sum to ``[1/2, 1)``) before it multiplies a delta: any finite weights work, the weighted sums stay within
the largest ``|delta|`` (no overflow on the way), and the result is the same as without the scaling
(powers of two commute with rounding) unless values underflow. Where ``lr / W`` itself overflows (``lr``
near the top of the range), ``lr / (2 W)`` multiplies twice the sum, with the same bits.

Determinism. Per element, the rows of an expert are summed sequentially in ascending row order (a
stable grouping; no atomics), so the same call gives the same bits. The streaming :class:`Accumulator`
adds rows in the order they arrive; fed the rows of a batch in that order (in any number of ``add``
calls) it gives bitwise the batch result of the same backend, unless a power-of-two rescale pushes values
into subnormals; fed in another order, it agrees to float32 rounding. The two backends agree to float32
rounding (and may differ on which experts overflow, at the top of the range): Triton sums ``c * (row -
base)``, torch sums ``c * row`` and subtracts ``(sum c) * base`` at the end (``c = w * s``), which spares
it a gather of ``base`` per row. On torch each term is rounded (``c * row`` in the accumulation dtype) and
then added, in either of its two ways of summing (below), so the way taken does not change the bits: it
is chosen for speed alone. The robust statistics sum their window in rank order on torch (whatever the
number of threads), in a tree on Triton.

Passes. Neither backend converts or copies the rows whole.
torch (the CPU default): a block of experts at a time (as many as keep their ``[n, P]`` sums within 4 MiB,
1 MiB for rows of 128 KiB or more), their accepted rows summed into the block, then their new values
written; a few torch calls per block or tile, whatever the number of experts and rows. Rows of 128 KiB or
more, on the CPU and already in the accumulation dtype, are summed with one sparse-dense product per block:
``torch.mm`` of a CSR matrix ``[n, M]`` holding the coefficients times the rows where they lie (no gather,
no copy; MKL's on Linux), taken only if a bitwise check at first use finds that it sums as the tiles do
(else tiles). Other rows are summed a tile of rows (about 1 MiB in the accumulation dtype; slices of the
rows when the block has every row, else gathered) at a time: scaled into a reused buffer and added with one
``index_add_`` (which the product beats on long rows, and loses to on short ones). Without clipping, and
unless float64 rows meet a float32 bank, that reads the rows once: every row is taken as accepted, and as a
sum with a value that is not finite in it is not finite, only the experts whose new values are not finite
(a bad row, or an overflow) are left unwritten, given per-row verdicts, their weights scaled again over
their accepted rows, and summed again over those rows. Clipping (the deltas' norms) and float64 rows for a
float32 bank (values beyond float32 range) need the verdicts first: a pass over whole rows about 1 MiB at a
time (converted; deltas and norms), then the sums, so two reads. The robust statistics need the verdicts
first too; then the experts with the same number of rows go together (a Python loop over the distinct
counts, not the experts), a block of them at a time (results within 4 MiB), gathered as scaled deltas
``[experts, columns, rows]`` about 2 MiB at a time, sorted along the rows and averaged over the window.
Triton (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): a verdict launch (finiteness, clipping
norms, largest values), then one launch over (column block, expert): the mean sums in registers and reads
and writes the bank once; the robust statistics sort a tile of up to ``ROBUST_MAX_M`` (256) rows in
registers (experts with more rows take the torch path); see :mod:`fedmoe_kernels._details.aggregate_triton`.
The streaming form (the mean only: the robust statistics need every row at once) gives each added batch its
verdicts first (on torch a second read, of rows likely still in cache), keeps ``[E, P]`` sums (that is its
O(E*P) memory; on torch each batch is added to them in tiles, where they lie) and writes the bank in
:meth:`Accumulator.result`.

In place. ``out=base`` (or ``out`` the same view of the same memory) updates the bank where it lies, so
parameters that are views of the flat ``[E, P]`` bank see the new values; no copy of the bank is made.
Out of place, ``out`` (a new tensor by default) receives ``base`` for the experts left as they are.
"""

from __future__ import annotations

import functools
import itertools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from fedmoe_kernels._backend import resolve

__all__ = ["METHODS", "Accumulator", "AggregateRef", "AggregateResult", "aggregate", "aggregate_reference"]

METHODS = ("mean", "median", "trimmed-mean")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 20  # torch path: bytes of rows per tile, and per step of the verdict pass over rows
_BLOCK_BYTES = 1 << 22  # torch path: bytes of the sums of the experts summed side by side (a block)
_LONG_BLOCK_BYTES = 1 << 20  # the same for rows of _PRODUCT_BYTES or more
_PRODUCT_BYTES = 1 << 17  # torch path: rows this long or longer (accumulation dtype) are summed by a product
_SORT_BYTES = 1 << 21  # torch robust path: bytes of scaled deltas (accumulation dtype) sorted at a time
_K_NONE = -1100  # weight exponent of an expert that has seen no positive weight (below any float64's)


@dataclass(frozen=True)
class AggregateResult:
    """What :func:`aggregate` and :meth:`Accumulator.result` return (E = number of experts).

    - ``bank``: [E, P] in the dtype of ``base``; the ``out`` tensor (``base`` itself when in place).
    - ``accepted``: int64 [E], rows averaged in per expert (zero-weight rows included).
    - ``rejected``: int64 [E], rows with a non-finite value per expert, and every row of an expert whose
      new value overflowed.
    - ``weight_sum``: float64 [E], the sum of the accepted rows' weights.
    """

    bank: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    weight_sum: torch.Tensor


# ---------------------------------------------------------------- validation


def _check_base(base) -> None:
    if not isinstance(base, torch.Tensor):
        raise TypeError(f"base must be a torch.Tensor, got {type(base).__name__}")
    if base.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"base must be float16, bfloat16, float32 or float64, got {base.dtype}")
    if base.ndim != 2 or base.shape[0] < 1 or base.shape[1] < 1:
        raise ValueError(f"base must be [E, P] with E >= 1 and P >= 1, got shape {tuple(base.shape)}")
    if base.shape[0] > 65535:
        raise ValueError(f"base may have at most 65535 experts (rows), got {base.shape[0]}")
    total = base.sum(dtype=_acc_dtype(base))  # not finite if a value is not (or if finite values overflow)
    if not (bool(torch.isfinite(total)) or bool(torch.isfinite(base).all())):
        raise ValueError("base must be finite, found a NaN or an infinity")


def _check_method(method, trim) -> float:
    """``trim`` as a float, checked with ``method``."""
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    trim = _check_real(trim, "trim", positive=False)
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim}")
    if trim and method != "trimmed-mean":
        raise ValueError(f"trim applies to method='trimmed-mean' only, got trim={trim} with {method!r}")
    return trim


def _check_real(value, name: str, *, positive: bool) -> float:
    """``value`` as a float, finite and ``> 0`` (``positive``) or ``>= 0``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be finite and {'> 0' if positive else '>= 0'}, got {value}")
    return value


def _check_batch(rows, experts, weights, base: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate one batch against the bank; return (experts as int64 [M], weights as float64 [M])."""
    num_experts, p = base.shape
    for name, value in (("rows", rows), ("experts", experts), ("weights", weights)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.device != base.device:
            raise ValueError(f"{name} must be on the device of base ({base.device}), got {value.device}")
    if rows.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"rows must be float16, bfloat16, float32 or float64, got {rows.dtype}")
    if rows.ndim != 2 or rows.shape[1] != p:
        raise ValueError(f"rows must be [M, {p}] (P of base), got shape {tuple(rows.shape)}")
    m = rows.shape[0]
    if experts.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"experts must be int32 or int64, got {experts.dtype}")
    if tuple(experts.shape) != (m,):
        raise ValueError(f"experts must be [{m}] (one per row), got shape {tuple(experts.shape)}")
    if weights.dtype == torch.bool or weights.is_complex():
        raise TypeError(f"weights must be a real floating or integer tensor, got {weights.dtype}")
    if tuple(weights.shape) != (m,):
        raise ValueError(f"weights must be [{m}] (one per row), got shape {tuple(weights.shape)}")
    w = weights.to(torch.float64)
    if m:
        lo, hi = torch.aminmax(experts)
        bad_w = ~torch.isfinite(w) | (w < 0)
        lo, hi, n_bad = torch.stack([lo.long(), hi.long(), bad_w.sum()]).tolist()  # one sync
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"experts must be in [0, {num_experts}), found {lo if lo < 0 else hi}")
        if n_bad:
            raise ValueError(f"weights must be finite and >= 0, found {n_bad} that are not")
    return experts.long(), w


def _span(t: torch.Tensor) -> tuple[int, int]:
    """Byte range [start, end) that ``t`` touches."""
    last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride(), strict=True))
    return t.data_ptr(), t.data_ptr() + (last + 1) * t.element_size()


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.numel() == 0 or b.numel() == 0:
        return False
    (a0, a1), (b0, b1) = _span(a), _span(b)
    return a0 < b1 and b0 < a1


def _check_out(out, base: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """``out`` (None: a new tensor like ``base``) checked to be ``base`` itself or disjoint from it."""
    if out is None:
        return torch.empty_like(base)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != base.shape or out.dtype != base.dtype or out.device != base.device:
        raise ValueError(
            f"out must match base in shape, dtype and device ({tuple(base.shape)}, {base.dtype}, "
            f"{base.device}), got ({tuple(out.shape)}, {out.dtype}, {out.device})"
        )
    same = out.data_ptr() == base.data_ptr() and out.stride() == base.stride()
    if not same and _overlap(out, base):
        raise ValueError("out must be base itself (in place) or not overlap it")
    if rows is not None and _overlap(out, rows):
        raise ValueError("out must not overlap rows")
    return out


def _acc_dtype(base: torch.Tensor) -> torch.dtype:
    return torch.float64 if base.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- shared steps


def _pow2(n: torch.Tensor) -> torch.Tensor:
    """Exact float64 ``2**n`` for integer ``n`` in [-1022, 1023]."""
    return ((n.long() + 1023) << 52).view(torch.float64)


def _ldexp(x: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """``x * 2**n`` (float64; integer ``n`` in [-2044, 2046]) in two exact steps."""
    half = torch.div(n, 2, rounding_mode="floor")
    return x * _pow2(half) * _pow2(n - half)


def _scale_weights(
    k_old: torch.Tensor, wsum_old: torch.Tensor, experts: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert power-of-two weight scales, raised to cover a new batch.

    ``k_old`` (int64 [E]) holds each expert's exponent so far (``_K_NONE``: no positive weight yet) and
    ``wsum_old`` (float64 [E]) its weight sum so far divided by ``2**k_old``; ``w`` (float64 [M]) the batch's
    weights (0 for rejected rows). Returns the new exponents ``k`` (each expert's weight sum, old and new,
    divided by ``2**k`` lies in ``[1/2, 1)``, up to rounding), the factors by which sums taken at the old
    exponents must be multiplied (float64 [E], powers of two <= 1) and the batch's weights divided by
    ``2**k`` of their experts (float64 [M]).
    """
    wmax = torch.zeros(k_old.shape, dtype=torch.float64, device=w.device)
    wmax.scatter_reduce_(0, experts, w, "amax")
    k_top = torch.maximum(k_old, torch.where(wmax > 0, torch.frexp(wmax).exponent.long(), _K_NONE))
    seen = k_old != _K_NONE
    total = torch.where(seen, _ldexp(wsum_old, (k_old - k_top).clamp(min=-2044)), 0.0)  # at scale 2**k_top:
    total.index_add_(0, experts, _ldexp(w, -k_top[experts]))  # each term below 1, the total at least 1/2
    k = torch.where(wmax > 0, k_top + torch.frexp(total).exponent.long(), k_old)  # no new weight: as it was
    rescale = torch.where(seen, _ldexp(torch.ones_like(wmax), (k_old - k).clamp(min=-2044)), 1.0)
    return k, rescale, _ldexp(w, -k[experts])


def _scale_batch(
    experts: torch.Tensor, w: torch.Tensor, ok: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``_scale_weights`` of a batch on its own, over its accepted rows (``ok``, bool [M]): the exponents
    (int64 [E]) and the scaled weights (float64 [M], 0 for rejected rows)."""
    k_none = torch.full((num_experts,), _K_NONE, dtype=torch.int64, device=w.device)
    no_sums = torch.zeros(num_experts, dtype=torch.float64, device=w.device)
    k, _, wscaled = _scale_weights(k_none, no_sums, experts, torch.where(ok, w, 0.0))
    return k, wscaled


def _finite_rows(x: torch.Tensor) -> torch.Tensor:
    """bool [n]: rows of ``x`` ([n, P]) whose values are all finite; one reduction and no copy of ``x``.

    A sum with a NaN or an infinity in it is not finite; only rows whose sum is not finite (a bad row, or
    finite values that overflow) are tested value by value.
    """
    ok = torch.isfinite(x.sum(dim=1))
    suspect = torch.nonzero(~ok).squeeze(1)
    if suspect.numel():
        ok[suspect] = torch.isfinite(x.index_select(0, suspect)).all(dim=1)
    return ok


def _clip_factors(deltas: torch.Tensor, max_norm: float) -> torch.Tensor:
    """float64 [n]: ``min(1, max_norm / ||d||)`` per row of ``deltas`` ([n, P]).

    Row by row, so that a row's norm (hence its bits) does not depend on the rows batched with it.
    """
    norms = torch.stack([torch.linalg.vector_norm(d, dtype=torch.float64) for d in deltas])
    return max_norm / norms.clamp(min=max_norm)


def _converts(rows: torch.Tensor, acc: torch.dtype) -> bool:
    """float64 rows summed in float32: values beyond float32 range are not finite once converted."""
    return rows.dtype == torch.float64 and acc == torch.float32


def _torch_verdicts(
    rows: torch.Tensor, experts: torch.Tensor, base: torch.Tensor, acc: torch.dtype, max_norm: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A pass over the rows: ``ok`` (bool [M]) and the clipping factors ``s`` (float64 [M]; None without
    clipping; meaningless for rejected rows). One reduction over all rows, or whole rows a few at a time
    (about 1 MiB) where they must be converted (float64 rows, float32 sums) or clipped (the norms)."""
    m, p = rows.shape
    if max_norm is None and not _converts(rows, acc):
        return _finite_rows(rows), None
    ok = torch.empty(m, dtype=torch.bool, device=rows.device)
    clip = None if max_norm is None else torch.empty(m, dtype=torch.float64, device=rows.device)
    step = max(1, _CHUNK_BYTES // (8 * p))
    for lo in range(0, m, step):
        x = rows[lo : lo + step].to(acc)
        ok[lo : lo + step] = _finite_rows(x)
        if clip is not None:
            b = base.index_select(0, experts[lo : lo + step]).to(acc)
            clip[lo : lo + step] = _clip_factors(x - b, max_norm)
    return ok, clip


def _coefficients(ok: torch.Tensor, wscaled: torch.Tensor, clip: torch.Tensor | None, acc: torch.dtype):
    """``c = w' * s`` ([M] in ``acc``; 0 for rejected rows)."""
    return torch.where(ok, wscaled if clip is None else wscaled * clip, 0.0).to(acc)


def _blocks(
    experts: torch.Tensor, keep: torch.Tensor, num_experts: int, p: int, acc: torch.dtype
) -> list[list[int]]:
    """The experts with rows that ``keep`` (bool [M]) holds, ascending, ``_experts_per_block`` at a time."""
    touched = torch.nonzero(torch.bincount(experts[keep], minlength=num_experts)).squeeze(1).tolist()
    step = _experts_per_block(p, acc)
    return [touched[lo : lo + step] for lo in range(0, len(touched), step)]


def _block_rows(
    experts: torch.Tensor, keep: torch.Tensor, blocks: list[list[int]], num_experts: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per block of ``blocks``: the rows that ``keep`` holds of its experts, ascending (int64 [n]), and the
    place of each one's expert in the block (int64 [n]); one stable sort for all blocks."""
    device = experts.device
    flat = torch.tensor([e for group in blocks for e in group], dtype=torch.int64, device=device)
    sizes = torch.tensor([len(group) for group in blocks], dtype=torch.int64, device=device)
    block_of = torch.full((num_experts,), -1, dtype=torch.int64, device=device)
    block_of[flat] = torch.repeat_interleave(torch.arange(len(blocks), device=device), sizes)
    slot = torch.zeros(num_experts, dtype=torch.int64, device=device)
    starts = torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    slot[flat] = torch.arange(flat.numel(), device=device) - starts
    of = torch.where(keep, block_of[experts], -1)
    ids = torch.nonzero(of >= 0).squeeze(1)
    ids = ids[torch.sort(of[ids], stable=True).indices]  # by block, ascending within
    counts = torch.bincount(of[ids], minlength=len(blocks)).tolist()
    return list(zip(ids.split(counts), slot[experts[ids]].split(counts), strict=True))


def _experts_per_block(p: int, acc: torch.dtype) -> int:
    """Experts summed side by side: as many as keep their ``[n, P]`` sums within ``_BLOCK_BYTES`` (many
    experts of short rows: a block with every row takes its tiles as slices of the rows, not gathered), or
    ``_LONG_BLOCK_BYTES`` for rows of ``_PRODUCT_BYTES`` or more (a few experts hold enough data per call)."""
    row = p * acc.itemsize
    return max(1, (_LONG_BLOCK_BYTES if row >= _PRODUCT_BYTES else _BLOCK_BYTES) // row)


def _index(ids: list[int], device: torch.device) -> slice | torch.Tensor:
    """Index of the (non-empty, ascending) ``ids``: a slice (a view, no gather) where they are consecutive,
    else a tensor."""
    if ids[-1] - ids[0] + 1 == len(ids):
        return slice(ids[0], ids[-1] + 1)
    return torch.tensor(ids, device=device)


def _take(t: torch.Tensor, at: slice | torch.Tensor) -> torch.Tensor:
    """``t[at]`` along dim 0: a view for a slice, ``index_select`` (a gather) for a tensor."""
    return t[at] if isinstance(at, slice) else t.index_select(0, at)


def _sum_tiles(
    sums: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor
) -> None:
    """``sums[slots[i]] += coef[ids[i]] * rows[ids[i]]`` (``coef``: [M, 1]) in ascending ``ids``, each term
    rounded (``c * row`` in the dtype of ``sums``) then added: a tile of rows (about ``_CHUNK_BYTES``) at
    a time is scaled into a reused buffer and added with one ``index_add_`` (sequential in row order).
    Tiles are slices of ``rows`` when ``ids`` are every row, else gathered into a reused buffer."""
    m, p = rows.shape
    count = ids.numel()
    if not count:
        return
    whole = count == m  # every row, ascending
    c = coef.index_select(0, ids)
    step = max(1, _CHUNK_BYTES // (p * sums.element_size()))
    tile = torch.empty((min(step, count), p), dtype=sums.dtype, device=rows.device)
    gather = None if whole else torch.empty((min(step, count), p), dtype=rows.dtype, device=rows.device)
    for lo in range(0, count, step):
        hi = min(count, lo + step)
        x = rows[lo:hi] if whole else torch.index_select(rows, 0, ids[lo:hi], out=gather[: hi - lo])
        sums.index_add_(0, slots[lo:hi], torch.mul(x, c[lo:hi], out=tile[: hi - lo]))


def _sum_product(
    sums: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor
) -> None:
    """``sums`` ([n, P]) set to the sums of ``_sum_tiles`` (from zero) with one sparse-dense product: a CSR
    matrix [n, M] (row ``slots[i]`` holds ``coef[ids[i]]`` at column ``ids[i]``) times ``rows``, which are
    read where they lie (no gather, no copy: ``_by_product``), written into ``sums``."""
    order = torch.sort(slots, stable=True).indices  # by slot, ascending rows within
    crow = torch.zeros(sums.shape[0] + 1, dtype=torch.int32, device=rows.device)
    torch.cumsum(torch.bincount(slots, minlength=sums.shape[0]), 0, out=crow[1:])
    at = ids[order]
    with warnings.catch_warnings():  # "Sparse CSR tensor support is in beta state"
        warnings.simplefilter("ignore", UserWarning)
        matrix = torch.sparse_csr_tensor(
            crow, at.int(), coef[at, 0], (sums.shape[0], rows.shape[0]), check_invariants=False
        )
    torch.mm(matrix, rows, out=sums)


@functools.cache
def _product_is_sequential(dtype: torch.dtype) -> bool:
    """Whether torch's CPU sparse-dense product (MKL's on Linux) sums as ``_sum_tiles`` does (each term
    rounded then added, in column order: no fused multiply-add, no reordering), checked bitwise once per
    dtype on a small case with tails; False where the product is not implemented."""
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(48, 67, generator=g, dtype=dtype)
    ids = torch.arange(1, 48)
    slots = torch.randint(0, 5, (47,), generator=g)
    coef = torch.rand(48, 1, generator=g, dtype=dtype)
    want = torch.zeros(5, 67, dtype=dtype)
    _sum_tiles(want, rows, ids, slots, coef)
    got = torch.full_like(want, math.nan)
    try:
        _sum_product(got, rows, ids, slots, coef)
    except (RuntimeError, NotImplementedError):
        return False
    return torch.equal(got, want)


def _by_product(rows: torch.Tensor, acc: torch.dtype) -> bool:
    """Whether a block's sums are taken with ``_sum_product`` (faster than tiles for long rows, slower for
    short ones): rows of at least ``_PRODUCT_BYTES``, on the CPU, already in the accumulation dtype and in
    BLAS row-major order (else torch would copy them), 32-bit sizes, and a sequential product."""
    m, p = rows.shape
    return (
        p * acc.itemsize >= _PRODUCT_BYTES and rows.device.type == "cpu" and rows.dtype == acc
        and rows.stride(1) == 1 and p <= rows.stride(0) < 2**31 and m < 2**31 and _product_is_sequential(acc)
    )


def _block_sums(
    sums: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, slots: torch.Tensor, coef: torch.Tensor
) -> None:
    """``sums`` ([n, P]) set to ``sum_i coef[ids[i]] * rows[ids[i]]`` per slot: ``_sum_product`` where
    ``_by_product``, else ``_sum_tiles`` into zeros. The same bits either way."""
    if _by_product(rows, sums.dtype):
        _sum_product(sums, rows, ids, slots, coef)
    else:
        _sum_tiles(sums.zero_(), rows, ids, slots, coef)


def _finish_factors(
    wsum: torch.Tensor, csum: torch.Tensor, lr: float, acc: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``lr / W`` (0 where ``W == 0``) and ``-C`` per expert ([E, 1] in ``acc``), and the experts (bool [E];
    None if there are none) whose ``lr / W`` overflows ``acc`` (``lr`` near the top of the range): their
    factor is ``lr / (2 W)`` instead, and ``_finish`` doubles their ``S - C * b`` (exactly)."""
    w = torch.where(wsum > 0, wsum, 1.0)
    factor = torch.where(wsum > 0, lr / w, 0.0).to(acc)
    doubled = torch.isinf(factor)
    if not bool(doubled.any()):
        return factor[:, None], (-csum).to(acc)[:, None], None
    factor = torch.where(doubled, (lr / 2 / w).to(acc), factor)
    return factor[:, None], (-csum).to(acc)[:, None], doubled


def _fits(vals: torch.Tensor, dtype: torch.dtype) -> list[bool]:
    """Per row of ``vals``: whether all its values are finite once rounded to ``dtype``: ``_finite_rows``
    in the dtype of ``vals``, else below the bound halfway past ``dtype``'s largest finite value in
    magnitude (a NaN fails; two reductions). No copy."""
    if dtype == vals.dtype:
        return _finite_rows(vals).tolist()
    info = torch.finfo(dtype)
    limit = info.max + info.eps * 2.0 ** (math.frexp(info.max)[1] - 2)
    return ((vals.amin(dim=1) > -limit) & (vals.amax(dim=1) < limit)).tolist()


def _finish(
    vals: torch.Tensor, group: list[int], factor: torch.Tensor, base: torch.Tensor, out: torch.Tensor,
    neg_c: torch.Tensor | None = None, doubled: torch.Tensor | None = None,
    positive: list[bool] | None = None,
) -> list[int]:
    """The new values ``b + factor[e] * (S - C * b)`` (``b = base[e]``) of the experts ``group`` (ascending),
    whose ``S`` ([n, P] in the accumulation dtype; overwritten) ``vals`` holds: sums (the mean; ``factor``,
    ``neg_c``, ``doubled`` from ``_finish_factors``; only the experts that ``positive`` holds, if given,
    are written) or robust statistics (``factor = lr``, no ``C``). Written to ``out`` where they fit its
    dtype (``_fits``); returns the other experts, left as they are."""
    at = _index(group, base.device)
    b = _take(base, at)
    if neg_c is not None:
        vals.addcmul_(b, _take(neg_c, at))
    if doubled is not None:
        vals.mul_(_take(doubled, at).to(vals.dtype)[:, None] + 1)
    torch.addcmul(b, vals, _take(factor, at), out=vals)
    fits = _fits(vals, out.dtype)
    write = [j for j, e in enumerate(group) if fits[j] and (positive is None or positive[e])]
    if len(write) == len(group) and isinstance(at, slice):
        out[at] = vals  # a view of out: written where it lies
    elif write:
        new = vals if len(write) == len(group) else vals[write]
        out.index_copy_(0, torch.tensor([group[j] for j in write], device=base.device), new.to(out.dtype))
    return [e for e, fit in zip(group, fits, strict=True) if not fit]


def _keep_base(out: torch.Tensor, base: torch.Tensor, mask: torch.Tensor) -> None:
    """``out[e] = base[e]`` for the experts of ``mask`` (bool [E]); nothing to do in place."""
    if out.data_ptr() != base.data_ptr() and bool(mask.any()):
        out[mask] = base[mask]


def _weight_sums(
    experts: torch.Tensor, ok: torch.Tensor, wscaled: torch.Tensor, coef: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """W and C per expert (float64 [E]): the sums of the accepted rows' scaled weights and coefficients."""
    zeros = torch.zeros(num_experts, dtype=torch.float64, device=experts.device)
    return (
        zeros.clone().index_add_(0, experts, torch.where(ok, wscaled, 0.0)),
        zeros.index_add_(0, experts, torch.where(ok, coef, 0.0).to(torch.float64)),
    )


def _torch_experts(
    experts: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor, coef: torch.Tensor, wsum: torch.Tensor,
    csum: torch.Tensor, lr: float, base: torch.Tensor, out: torch.Tensor,
) -> list[int]:
    """A block of the experts of the rows that ``keep`` holds at a time: their sums of ``coef * row``
    over those rows (``_block_sums``), then the new values of those whose weight sum is positive
    (``_finish``). Returns the experts left as they are because a value is not finite (a non-finite row
    among those summed, or an overflow)."""
    factor, neg_c, doubled = _finish_factors(wsum, csum, lr, coef.dtype)
    positive = (wsum > 0).tolist()
    num_experts, p = base.shape
    blocks = _blocks(experts, keep, num_experts, p, coef.dtype)
    block = torch.empty((len(blocks[0]) if blocks else 0, p), dtype=coef.dtype, device=base.device)
    failed = []
    for group, (ids, slots) in zip(blocks, _block_rows(experts, keep, blocks, num_experts), strict=True):
        sums = block[: len(group)]
        _block_sums(sums, rows, ids, slots, coef[:, None])
        failed += _finish(sums, group, factor, base, out, neg_c, doubled, positive)
    return failed


def _torch_aggregate(
    rows: torch.Tensor, experts: torch.Tensor, w: torch.Tensor, base: torch.Tensor, max_norm: float | None,
    lr: float, out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Batch torch path (``_torch_experts``); returns ``ok``, the scaled weight sums, their exponents and
    the experts left as they are because their new values overflow.

    Without clipping or conversion every row is first taken as accepted and summed: a sum with a value
    that is not finite in it is not finite, so only the experts whose new values are not finite (a bad
    row, or an overflow) get per-row verdicts, their weights scaled again over their accepted rows, and
    are summed again over those rows. Otherwise the verdicts come first (``_torch_verdicts``). Either way
    the accepted rows are summed, zero weights included (as the streaming form does), so that both add
    the same terms."""
    acc = _acc_dtype(base)
    num_experts = base.shape[0]
    optimistic = max_norm is None and not _converts(rows, acc)
    if optimistic:
        ok, clip = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device), None
    else:
        ok, clip = _torch_verdicts(rows, experts, base, acc, max_norm)

    def summed(keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        k, wscaled = _scale_batch(experts, w, ok, num_experts)
        coef = _coefficients(ok, wscaled, clip, acc)
        wsum, csum = _weight_sums(experts, ok, wscaled, coef, num_experts)
        return wsum, k, _torch_experts(experts, keep, rows, coef, wsum, csum, lr, base, out)

    wsum, k, failed = summed(ok)
    if failed and optimistic:
        again = torch.zeros(num_experts, dtype=torch.bool, device=rows.device)
        again[failed] = True
        again = again[experts]  # the rows of the failed experts (all taken as accepted so far)
        suspect = torch.nonzero(again).squeeze(1).tolist()
        ok[suspect] = torch.stack([torch.isfinite(rows[r]).all() for r in suspect])
        wsum, k, failed = summed(ok & again)
    _keep_base(out, base, wsum == 0)  # no rows, zero weights, or every row rejected
    return ok, wsum, k, failed


# ---------------------------------------------------------------- robust statistics


def _window(counts: torch.Tensor, method: str, trim: float) -> torch.Tensor:
    """int64 [E, 2]: the ranks ``[lo, hi)`` (ascending order) averaged for an expert of ``counts`` rows:
    the middle one or two (median), or all but ``int(trim * n)`` at each end (trimmed mean, as
    ``scipy.stats.trim_mean``)."""
    if method == "median":
        lo, hi = torch.div(counts - 1, 2, rounding_mode="floor"), counts // 2 + 1
    else:
        lo = (trim * counts.double()).long()  # float64 product, truncated: scipy's int(trim * n)
        hi = counts - lo
    return torch.stack([lo, hi], dim=1)


def _used_rows(
    experts: torch.Tensor, use: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows that ``use`` holds, grouped by expert (ascending rows within): ``perm``, CSR ``offsets``
    (int64 [E+1]) and ``counts`` (int64 [E])."""
    perm, offsets = _group(torch.where(use, experts, num_experts), num_experts + 1)  # unused rows last
    return perm, offsets[: num_experts + 1], offsets[1:-1] - offsets[:-2]


def _torch_robust(
    rows: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, counts: torch.Tensor, experts: list[int],
    clip: torch.Tensor | None, window: torch.Tensor, base: torch.Tensor, lr: float, out: torch.Tensor,
) -> list[int]:
    """The robust statistics and new values of ``experts`` (ascending; rows ``perm[offsets[e]:][:counts[e]]``,
    at least one each), those with the same count together: a block of them (``_experts_per_block``) at
    a time, their scaled deltas ``s * (row - b)`` gathered as [experts, columns, rows] (``_SORT_BYTES`` at
    a time), sorted along the rows, each rank of the window scaled by ``1 / k`` and summed in rank order
    (a NaN delta makes the column NaN); then ``_finish``. Returns the experts left as they are."""
    acc = _acc_dtype(base)
    num_experts, p = base.shape
    device = base.device
    factor = torch.full((num_experts, 1), lr, dtype=torch.float64, device=device).to(acc)
    sizes, ranks = counts.tolist(), window.tolist()
    step = _experts_per_block(p, acc)
    block = torch.empty((min(step, len(experts)), p), dtype=acc, device=device)
    failed = []
    for n, same in itertools.groupby(sorted(experts, key=sizes.__getitem__), key=sizes.__getitem__):
        group = list(same)  # ascending
        lo, hi = ranks[group[0]]
        for g in range(0, len(group), step):
            part = group[g : g + step]
            at = torch.tensor(part, device=device)
            members = perm[offsets[at, None] + torch.arange(n, device=device)]  # [k, n] rows
            scale = None if clip is None else clip[members].to(acc)[:, None, :]
            b = base.index_select(0, at)
            stats = block[: len(part)]
            width = max(1, _SORT_BYTES // (members.numel() * acc.itemsize))
            for c0 in range(0, p, width):
                cols = slice(c0, min(p, c0 + width))
                x = rows[:, cols].index_select(0, members.reshape(-1)).view(len(part), n, -1)
                y = torch.empty((len(part), x.shape[2], n), dtype=acc, device=device)
                y.copy_(x.transpose(1, 2)).sub_(b[:, cols, None])
                if scale is not None:
                    y.mul_(scale)
                v = torch.sort(y, dim=2).values if n > 1 else y  # a NaN sorts last
                nan = v[:, :, n - 1].isnan()
                if hi - lo > 1:  # 1 / k rounded to acc; summed in rank order, whatever the threads
                    v[:, :, lo:hi].mul_(1.0 / (hi - lo)).cumsum_(dim=2)
                stats[:, cols] = v[:, :, hi - 1].masked_fill_(nan, math.nan)
            failed += _finish(stats, part, factor, base, out)
    return failed


def _robust_aggregate(
    rows: torch.Tensor, experts: torch.Tensor, w: torch.Tensor, base: torch.Tensor, max_norm: float | None,
    lr: float, method: str, trim: float, out: torch.Tensor, backend: str,
) -> tuple[torch.Tensor, list[int]]:
    """Batch median or trimmed mean: verdicts first, then the statistics of the experts with accepted rows
    of positive weight, on Triton for those of at most ``ROBUST_MAX_M`` rows, else on torch. Returns
    ``ok`` and the experts left as they are because their new values overflow."""
    acc = _acc_dtype(base)
    num_experts = base.shape[0]
    if backend == "torch":
        ok, clip = _torch_verdicts(rows, experts, base, acc, max_norm)
    else:
        stats, clip, big = _triton_stats(rows, experts, base, acc, max_norm)
        ok = stats.bool()
    use = ok & (w > 0)
    perm, offsets, counts = _used_rows(experts, use, num_experts)
    window = _window(counts, method, trim)
    failed = []
    on_torch = counts > 0
    if backend == "triton":
        from fedmoe_kernels._details.aggregate_triton import ROBUST_MAX_M, robust_rows

        small = torch.nonzero(on_torch & (counts <= ROBUST_MAX_M)).squeeze(1)
        on_torch &= counts > ROBUST_MAX_M
        if small.numel():
            params = _params(lr, base.device)
            max_m = int(counts[small].max())

            def launch(ids: torch.Tensor, target: torch.Tensor, slots: torch.Tensor) -> None:
                robust_rows(rows, perm, offsets, clip, window, base, params, acc_dtype=acc, max_m=max_m,
                            ids=ids, out=target, slots=slots)

            bound = _surely_finite(_expert_max(big, experts, use, num_experts), base, counts, lr, acc)
            failed += _triton_write(launch, small, bound[small], out)
    wide = torch.nonzero(on_torch).squeeze(1).tolist()
    if wide:
        failed += _torch_robust(rows, perm, offsets, counts, wide, clip, window, base, lr, out)
    _keep_base(out, base, counts == 0)
    return ok, failed


# ---------------------------------------------------------------- Triton path


def _triton_stats(rows, experts, base, acc_dtype, max_norm):
    """``row_stats``: ``ok`` (int8 [M]), the clipping factors (float64 [M]; None without clipping), each
    row's largest ``|value|`` (float64 [M])."""
    from fedmoe_kernels._details.aggregate_triton import row_stats

    if rows.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.float64, device=rows.device)
        return torch.ones(0, dtype=torch.int8, device=rows.device), None, empty
    return row_stats(rows, experts, base, acc_dtype, max_norm)


def _expert_max(big: torch.Tensor, experts: torch.Tensor, use: torch.Tensor, num_experts: int):
    """float64 [E]: the largest of ``big`` (float64 [M]) over each expert's rows that ``use`` holds (0 if
    none)."""
    top = torch.zeros(num_experts, dtype=torch.float64, device=big.device)
    return top.scatter_reduce_(0, experts, torch.where(use, big, 0.0), "amax")


def _surely_finite(
    xmax: torch.Tensor, base: torch.Tensor, count: torch.Tensor, lr: float, acc: torch.dtype
) -> torch.Tensor:
    """bool [E]: the experts whose new values surely fit the dtype of ``base``, a sufficient test.

    A new value is ``b + f * t``: for the mean ``t = sum c * (row - b)`` with coefficients that sum to at
    most ``W < 1`` and ``f = lr / W <= 2 lr`` (``W`` scaled into ``[1/2, 1)``; doubled ``t``, halved ``f``
    where ``f`` overflows), robust ``f = lr`` and ``t`` a mean of terms ``s * (row - b)``; either way
    every term is at most ``X + B`` in magnitude (``X``: ``xmax``, the largest ``|value|`` of the expert's
    ``count`` rows; ``B``: that of ``b``). Each of the ``count + 8`` roundings on the way grows a bound by
    at most ``1 + u``; a factor 2 spares the rest."""
    bmax = torch.maximum(-base.amin(dim=1), base.amax(dim=1)).double()
    growth = torch.exp((count + 8).double() * torch.finfo(acc).eps)  # (1 + u)**n <= exp(2 u n), u = eps / 2
    spans = torch.clamp(xmax + bmax, min=1.0)  # at least 1: f itself is bounded
    bound = 2 * growth * torch.maximum(2 * spans, bmax + 2 * lr * spans)
    return bound < torch.finfo(base.dtype).max


def _triton_write(launch, ids: torch.Tensor, safe: torch.Tensor, out: torch.Tensor) -> list[int]:
    """The new values of the experts ``ids`` (int64 [n]) by ``launch(ids, target, slots)``, which writes
    expert ``ids[j]`` into row ``slots[j]`` of ``target``: the ``safe`` ones (bool [n]) straight into
    ``out``, the others into a scratch first, copied into ``out`` where every value is finite. Returns
    the experts left as they are."""
    sure, doubt = ids[safe], ids[~safe]
    if sure.numel():
        launch(sure, out, sure)
    if not doubt.numel():
        return []
    scratch = torch.empty((doubt.numel(), out.shape[1]), dtype=out.dtype, device=out.device)
    launch(doubt, scratch, torch.arange(doubt.numel(), device=out.device))
    fine = torch.isfinite(scratch).all(dim=1)
    out[doubt[fine]] = scratch[fine]
    return doubt[~fine].tolist()


def _group(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stable grouping of the rows by expert: ``perm`` (int64 [M]) and CSR ``offsets`` (int64 [E+1])."""
    perm = torch.sort(experts, stable=True).indices
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=experts.device)
    torch.cumsum(torch.bincount(experts, minlength=num_experts), 0, out=offsets[1:])
    return perm, offsets


def _counts(experts: torch.Tensor, ok: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(accepted, rejected) rows per expert, int64 [E]."""
    accepted = torch.zeros(num_experts, dtype=torch.int64, device=experts.device)
    accepted.index_add_(0, experts, ok.long())
    return accepted, torch.bincount(experts, minlength=num_experts) - accepted


def _outcome(
    out: torch.Tensor, base: torch.Tensor, accepted: torch.Tensor, rejected: torch.Tensor,
    weight_sum: torch.Tensor, failed: list[int],
) -> AggregateResult:
    """The result, where the experts ``failed`` (their new values overflow; left unwritten) keep ``base``
    and count every row as rejected, with weight sum 0."""
    dropped = torch.zeros(base.shape[0], dtype=torch.bool, device=base.device)
    dropped[failed] = True
    _keep_base(out, base, dropped)
    kept = accepted.masked_fill(dropped, 0)
    return AggregateResult(out, kept, rejected + accepted - kept, weight_sum.masked_fill(dropped, 0.0))


def _params(lr: float, device) -> torch.Tensor:
    """float64 [1]: ``lr``, read by the kernels from memory (a float argument would reach them as float32)."""
    return torch.tensor([lr], dtype=torch.float64, device=device)


# ---------------------------------------------------------------- ops


def aggregate(
    rows: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    base: torch.Tensor,
    *,
    method: str = "mean",
    trim: float = 0.0,
    max_norm: float | None = None,
    lr: float = 1.0,
    out: torch.Tensor | None = None,
    backend: str = "auto",
) -> AggregateResult:
    """Aggregate M received expert copies into the bank (semantics: module docstring).

    Args:
        rows: [M, P] float16/bfloat16/float32/float64, one expert copy per row (any strides; not copied).
        experts: int32/int64 [M], the expert of each row, in [0, num_experts), in any order.
        weights: real [M], finite and >= 0 (e.g. sample counts).
        num_experts: E, the number of rows of ``base``.
        base: [E, P] the current bank, float16/bfloat16/float32/float64, finite.
        method: "mean" (weighted), "median" or "trimmed-mean" (unweighted, over the accepted rows of
            positive weight, coordinate by coordinate).
        trim: for "trimmed-mean", the fraction in [0, 0.5) cut at each end (``int(trim * n)`` rows).
        max_norm: clip each row's delta ``row - base`` to this L2 norm (> 0); None: no clipping.
        lr: server step size on ``statistic - base`` (finite, >= 0; 1 = plain statistic).
        out: [E, P] like ``base`` to write into; ``base`` itself for in place; None: a new tensor.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        :class:`AggregateResult` (bank, accepted, rejected, weight_sum).
    """
    trim = _check_method(method, trim)
    _check_base(base)
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts != base.shape[0]:
        raise ValueError(f"num_experts must equal base.shape[0] ({base.shape[0]}), got {num_experts}")
    experts, w = _check_batch(rows, experts, weights, base)
    max_norm = None if max_norm is None else _check_real(max_norm, "max_norm", positive=True)
    lr = _check_real(lr, "lr", positive=False)
    out = _check_out(out, base, rows)
    backend = resolve(backend, base)
    acc_dtype = _acc_dtype(base)
    wsum = torch.zeros(num_experts, dtype=torch.float64, device=base.device)
    if method != "mean":
        ok, failed = _robust_aggregate(rows, experts, w, base, max_norm, lr, method, trim, out, backend)
        k, wscaled = _scale_batch(experts, w, ok, num_experts)
        wsum.index_add_(0, experts, wscaled)
    elif backend == "torch":
        ok, wsum, k, failed = _torch_aggregate(rows, experts, w, base, max_norm, lr, out)
    else:
        from fedmoe_kernels._details.aggregate_triton import aggregate_rows

        stats, clip, big = _triton_stats(rows, experts, base, acc_dtype, max_norm)
        ok = stats.bool()
        k, wscaled = _scale_batch(experts, w, ok, num_experts)
        perm, offsets = _group(experts, num_experts)
        params = _params(lr, base.device)

        def launch(ids: torch.Tensor, target: torch.Tensor, slots: torch.Tensor) -> None:
            aggregate_rows(rows, perm, offsets, stats, wscaled, clip, base, params, wsum, acc_dtype=acc_dtype,
                           ids=ids, out=target, slots=slots)

        use = ok & (w > 0)
        count = torch.bincount(experts[use], minlength=num_experts)
        safe = _surely_finite(_expert_max(big, experts, use, num_experts), base, count, lr, acc_dtype)
        failed = _triton_write(launch, torch.arange(num_experts, device=base.device), safe, out)
    accepted, rejected = _counts(experts, ok, num_experts)
    return _outcome(out, base, accepted, rejected, _ldexp(wsum, k), failed)


class Accumulator:
    """Streaming form of :func:`aggregate`: :meth:`add` replies as they arrive, :meth:`result` at the end.

    Holds ``base`` ([E, P], by reference: it must not change until :meth:`result`) and running sums:
    ``[E, P]`` in the accumulation dtype (float32, float64 for a float64 bank) plus O(E) counters, whatever
    the number of rows added. Rows of any expert may come in any order and in any number of calls; fed
    the rows of a batch in order it reproduces :func:`aggregate` bitwise (module docstring).

    Args:
        base: the bank the deltas are taken against (and clipped against).
        method: "mean" only: a median or a trimmed mean needs every row at once (use :func:`aggregate`).
        max_norm: as in :func:`aggregate`; fixed here because clipping happens as rows are added.
        backend: as in :func:`aggregate`, chosen once from ``base``.
    """

    def __init__(
        self, base: torch.Tensor, *, method: str = "mean", max_norm: float | None = None,
        backend: str = "auto",
    ):
        _check_method(method, 0.0)
        if method != "mean":
            raise ValueError(f"method must be 'mean' for an Accumulator (the {method} needs every row at "
                             f"once: call aggregate), got {method!r}")
        _check_base(base)
        self._base = base
        self._max_norm = None if max_norm is None else _check_real(max_norm, "max_norm", positive=True)
        self._backend = resolve(backend, base)
        num_experts, p = base.shape
        device = base.device
        self._sums = torch.zeros((num_experts, p), dtype=_acc_dtype(base), device=device)
        self._wsum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self._csum = torch.zeros(num_experts, dtype=torch.float64, device=device)  # torch path only
        self._xmax = torch.zeros(num_experts, dtype=torch.float64, device=device)  # Triton path only
        self._k = torch.full((num_experts,), _K_NONE, dtype=torch.int64, device=device)
        self._accepted = torch.zeros(num_experts, dtype=torch.int64, device=device)
        self._rejected = torch.zeros(num_experts, dtype=torch.int64, device=device)

    @property
    def num_experts(self) -> int:
        return self._base.shape[0]

    def add(self, rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> None:
        """Add rows ([M, P]), their experts (int [M]) and weights ([M]), as in :func:`aggregate`."""
        experts, w = _check_batch(rows, experts, weights, self._base)
        self._add(rows, experts, w)

    def _add(self, rows: torch.Tensor, experts: torch.Tensor, w: torch.Tensor) -> None:
        sums = self._sums
        if self._backend == "torch":
            ok, clip = _torch_verdicts(rows, experts, self._base, sums.dtype, self._max_norm)
        else:
            stats, clip, big = _triton_stats(rows, experts, self._base, sums.dtype, self._max_norm)
            ok = stats.bool()
            use = ok & (w > 0)
            self._xmax = torch.maximum(self._xmax, _expert_max(big, experts, use, self.num_experts))
        self._k, rescale, wscaled = _scale_weights(self._k, self._wsum, experts, torch.where(ok, w, 0.0))
        if self._backend == "torch":
            rescaled = torch.nonzero(rescale != 1.0).squeeze(1)
            sums[rescaled] = (sums[rescaled].double() * rescale[rescaled, None]).to(sums.dtype)
            self._wsum.mul_(rescale)
            self._csum.mul_(rescale)
            coef = _coefficients(ok, wscaled, clip, sums.dtype)
            self._wsum.index_add_(0, experts, wscaled)
            self._csum.index_add_(0, experts, coef.to(torch.float64))
            ids = torch.nonzero(ok).squeeze(1)
            _sum_tiles(sums, rows, ids, experts[ids], coef[:, None])  # added where the sums lie
        else:
            from fedmoe_kernels._details.aggregate_triton import aggregate_rows

            perm, offsets = _group(experts, self.num_experts)
            aggregate_rows(
                rows, perm, offsets, stats, wscaled, clip, self._base,
                _params(1.0, rows.device), self._wsum, acc_dtype=sums.dtype,
                ids=torch.arange(self.num_experts, device=rows.device), sums=sums, rescale=rescale,
            )
        accepted, rejected = _counts(experts, ok, self.num_experts)
        self._accepted += accepted
        self._rejected += rejected

    def result(self, *, lr: float = 1.0, out: torch.Tensor | None = None) -> AggregateResult:
        """The aggregated bank so far (``out=base``: in place); the accumulator is left unchanged."""
        return self._result(_check_real(lr, "lr", positive=False), _check_out(out, self._base, None))

    def _result(self, lr: float, out: torch.Tensor) -> AggregateResult:
        base, acc = self._base, self._sums.dtype
        if self._backend == "torch":
            touched = torch.nonzero(self._wsum > 0).squeeze(1).tolist()
            factor, neg_c, doubled = _finish_factors(self._wsum, self._csum, lr, acc)
            step = _experts_per_block(self._sums.shape[1], acc)
            failed = []
            for lo in range(0, len(touched), step):
                group = touched[lo : lo + step]
                sums = _take(self._sums, _index(group, base.device)).clone()
                failed += _finish(sums, group, factor, base, out, neg_c, doubled)
            wsum = self._wsum
            _keep_base(out, base, wsum == 0)
        else:
            from fedmoe_kernels._details.aggregate_triton import aggregate_rows

            device = base.device
            no_rows = self._sums[:0]
            no_ids = torch.empty(0, dtype=torch.int64, device=device)
            no_offsets = torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device)
            params = _params(lr, device)
            wsum = self._wsum.clone()

            def launch(ids: torch.Tensor, target: torch.Tensor, slots: torch.Tensor) -> None:
                aggregate_rows(
                    no_rows, no_ids, no_offsets, no_ids, self._wsum[:0], None, base, params, wsum,
                    acc_dtype=acc, ids=ids, out=target, slots=slots, sums=self._sums,
                    rescale=torch.ones_like(wsum),
                )

            safe = _surely_finite(self._xmax, base, self._accepted, lr, acc)
            failed = _triton_write(launch, torch.arange(self.num_experts, device=device), safe, out)
        weight_sum = _ldexp(wsum, self._k)
        return _outcome(out, base, self._accepted.clone(), self._rejected.clone(), weight_sum, failed)


# ---------------------------------------------------------------- reference


class AggregateRef(NamedTuple):
    """Reference answer of ``aggregate``: the bank in float64 [E, P] and the per-expert counters."""

    bank: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    weight_sum: torch.Tensor


def aggregate_reference(
    rows, experts, weights, num_experts: int, base, *, method="mean", trim=0.0, max_norm=None, lr=1.0
):
    """Per expert ``e``, over its rows whose values are all finite once converted to the accumulation dtype
    (float64 for a float64 ``base``, else float32), with ``d_m = s_m * (row_m - base[e])`` and ``s_m = min(1,
    max_norm / ||row_m - base[e]||)`` (1 without ``max_norm``): ``base[e] + lr * t``, where ``t`` is
    ``sum_m (w_m / W) * d_m`` (``W = sum_m w_m``; "mean"), or over the rows of positive weight column by
    column ``numpy.median`` of the ``d_m`` ("median") or their mean once ``int(trim * n)`` of the ``n``
    are cut at each end ("trimmed-mean", ``scipy.stats.trim_mean``); ``base[e]`` where there is no such
    row or ``W == 0``, and where the new value is not finite in the dtype of ``base`` (its rows then
    count as rejected, with weight sum 0). Computed in float64; returns :class:`AggregateRef`."""
    trim = _check_method(method, trim)
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    bank = base.to(torch.float64).clone()
    accepted = torch.zeros(num_experts, dtype=torch.int64)
    rejected = torch.zeros(num_experts, dtype=torch.int64)
    weight_sum = torch.zeros(num_experts, dtype=torch.float64)
    ids = [int(e) for e in experts]
    w = [float(x) for x in weights]
    for e in range(num_experts):
        kept = []
        for m, expert in enumerate(ids):
            if expert != e:
                continue
            x = rows[m].to(acc).to(torch.float64)
            if not bool(torch.isfinite(x).all()):
                rejected[e] += 1
                continue
            d = x - bank[e]
            if max_norm is not None:
                norm = float(torch.linalg.vector_norm(d))
                if norm > max_norm:
                    d = d * (max_norm / norm)
            kept.append((w[m], d))
        total = sum(wm for wm, _ in kept)
        if total == 0:
            accepted[e] = len(kept)
            continue
        if method == "mean":
            t = sum(((wm / total) * d for wm, d in kept), torch.zeros_like(bank[e]))
        else:
            d = np.sort(np.stack([d.numpy() for wm, d in kept if wm > 0]), axis=0)
            cut = int(trim * len(d))
            t = np.median(d, axis=0) if method == "median" else d[cut : len(d) - cut].mean(axis=0)
            t = torch.from_numpy(t)
        new = bank[e] + lr * t
        if bool(torch.isfinite(new.to(base.dtype)).all()):
            bank[e], accepted[e], weight_sum[e] = new, len(kept), total
        else:
            rejected[e] += len(kept)
    return AggregateRef(bank, accepted, rejected, weight_sum)
