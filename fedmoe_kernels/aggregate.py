"""``aggregate``: fused per-expert weighted aggregation (docs/design.md, Ops), in one batch or streamed as
replies arrive. :func:`aggregate_reference` is the loop reference.

Each of the M received rows is one updated copy of one expert, flattened to P values. For every expert
``e`` the new value is computed over its *accepted* rows ``m`` (those whose values are all finite once
converted to the accumulation dtype; the others are rejected and counted, never averaged in)::

    d_m  = row_m - base[e]                                   # the row's delta
    s_m  = min(1, max_norm / ||d_m||_2)                      # clipping (1 without max_norm)
    W_e  = sum_m w_m
    new  = base[e] + lr * sum_m w_m * s_m * d_m / W_e        # if W_e > 0, else base[e]

With ``lr = 1`` and no clipping that is the weighted mean ``sum w row / sum w``; with clipping it is the
weighted mean of the clipped rows ``base + s * d``; ``lr`` is a server step on ``mean - base``. An expert
with no accepted rows, or whose accepted weights sum to zero, keeps ``base``. Weights must be finite and
``>= 0`` (integer sample counts are fine).

Dtypes. Rows may be float16, bfloat16, float32 or float64, independently of the bank ``base`` (same
choice). Sums are accumulated in float64 when the bank is float64, else in float32; the result is written
in the bank's dtype (rounded to nearest). A float64 value beyond float32 range in a row aggregated into a
float32 bank is not finite in the accumulation dtype: the row is rejected. ``base`` must be finite.
Weight sums are float64. Each weight is scaled by a power of two per expert (so that the largest is in
``[0.5, 1)``) before it multiplies a delta: any finite weights work, and the result is the same as
without the scaling (powers of two commute with rounding) unless values underflow.

Determinism. Per element, the rows of an expert are summed sequentially in ascending row order (a
stable grouping; no atomics), so the same call gives the same bits. The streaming :class:`Accumulator`
adds rows in the order they arrive; fed the rows of a batch in that order (in any number of ``add``
calls) it gives bitwise the batch result of the same backend, unless a power-of-two rescale pushes values
into subnormals, or an expert's sums overflow at the scale of the weights seen so far (before a later,
larger weight scales them down; the batch, scaled by its largest weight from the start, may stay finite,
and the stream then gives that expert a non-finite value); fed in another order, it agrees to float32
rounding. The two backends agree to float32
rounding: Triton sums ``c * (row - base)``, torch sums ``c * row`` and subtracts ``(sum c) * base`` at the
end (``c = w * s``), which spares it a gather of ``base`` per row. On torch each term is rounded (``c *
row`` in the accumulation dtype) and then added, in either of its two ways of summing (below), so the way
taken does not change the bits: it is chosen for speed alone.

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
sum with a value that is not finite in it is not finite, only the experts whose sums are not finite (a bad
row, or finite values whose sum overflows) are left unwritten, given per-row verdicts and summed again over
their accepted rows. Clipping (the deltas' norms) and float64 rows for a float32 bank (values beyond float32
range) need the verdicts first: a pass over whole rows about 1 MiB at a time (converted; deltas and norms),
then the sums, so two reads.
Triton (CUDA, or CPU tensors under ``TRITON_INTERPRET=1``): a verdict launch (finiteness, clipping
norms), then one launch over (column block, expert) that sums in registers and reads and writes the bank
once; see :mod:`fedmoe_kernels._details.aggregate_triton`. The streaming form gives each added batch its
verdicts first (on torch a second read, of rows likely still in cache), keeps ``[E, P]`` sums (that is its
O(E*P) memory; on torch each batch is added to them in tiles, where they lie) and writes the bank in
:meth:`Accumulator.result`.

In place. ``out=base`` (or ``out`` the same view of the same memory) updates the bank where it lies, so
parameters that are views of the flat ``[E, P]`` bank see the new values; no copy of the bank is made.
Out of place, ``out`` (a new tensor by default) receives ``base`` for the experts left as they are.
"""

from __future__ import annotations

import functools
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch

from fedmoe_kernels._backend import resolve

__all__ = ["Accumulator", "AggregateRef", "AggregateResult", "aggregate", "aggregate_reference"]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_CHUNK_BYTES = 1 << 20  # torch path: bytes of rows per tile, and per step of the verdict pass over rows
_BLOCK_BYTES = 1 << 22  # torch path: bytes of the sums of the experts summed side by side (a block)
_LONG_BLOCK_BYTES = 1 << 20  # the same for rows of _PRODUCT_BYTES or more
_PRODUCT_BYTES = 1 << 17  # torch path: rows this long or longer (accumulation dtype) are summed by a product
_K_NONE = -1100  # weight exponent of an expert that has seen no positive weight (below any float64's)


@dataclass(frozen=True)
class AggregateResult:
    """What :func:`aggregate` and :meth:`Accumulator.result` return (E = number of experts).

    - ``bank``: [E, P] in the dtype of ``base``; the ``out`` tensor (``base`` itself when in place).
    - ``accepted``: int64 [E], rows averaged in per expert (zero-weight rows included).
    - ``rejected``: int64 [E], rows with a non-finite value per expert.
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


def _check_real(value, name: str, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value <= 0):
        raise ValueError(f"{name} must be finite{' and > 0' if positive else ''}, got {value}")
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
    k_old: torch.Tensor, experts: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-expert power-of-two weight scales, raised to cover a new batch.

    ``k_old`` (int64 [E]) holds each expert's exponent so far (``_K_NONE``: no positive weight yet). Returns
    the new exponents ``k`` (the largest scaled weight of an expert is below 1), the factors by which
    sums taken at the old exponents must be multiplied (float64 [E], powers of two <= 1) and the batch's
    weights divided by ``2**k`` of their experts (float64 [M]).
    """
    wmax = torch.zeros(k_old.shape, dtype=torch.float64, device=w.device)
    wmax.scatter_reduce_(0, experts, w, "amax")
    k_batch = torch.where(wmax > 0, torch.frexp(wmax).exponent.long(), _K_NONE)
    k = torch.maximum(k_old, k_batch)
    rescale = torch.where(k_old == _K_NONE, 1.0, _ldexp(torch.ones_like(wmax), (k_old - k).clamp(min=-2044)))
    return k, rescale, _ldexp(w, -k[experts])


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
    rows: torch.Tensor, experts: torch.Tensor, wscaled: torch.Tensor, base: torch.Tensor, acc: torch.dtype,
    max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A pass over the rows: ``ok`` (bool [M]) and the coefficients ``c = w' * s`` ([M], ``acc``; 0 for
    rejected rows). One reduction over all rows, or whole rows a few at a time (about 1 MiB) where they
    must be converted (float64 rows, float32 sums) or clipped (the deltas' norms)."""
    m, p = rows.shape
    clip = torch.ones(m, dtype=torch.float64, device=rows.device)
    if max_norm is None and not _converts(rows, acc):
        ok = _finite_rows(rows)
    else:
        ok = torch.empty(m, dtype=torch.bool, device=rows.device)
        step = max(1, _CHUNK_BYTES // (8 * p))
        for lo in range(0, m, step):
            x = rows[lo : lo + step].to(acc)
            ok[lo : lo + step] = _finite_rows(x)
            if max_norm is not None:
                b = base.index_select(0, experts[lo : lo + step]).to(acc)
                clip[lo : lo + step] = _clip_factors(x - b, max_norm)
    return ok, torch.where(ok, wscaled * clip, 0.0).to(acc)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """``lr / W`` and ``-C`` per expert ([E, 1] in ``acc``; meaningless where ``W == 0``)."""
    return (lr / wsum).to(acc)[:, None], (-csum).to(acc)[:, None]


def _finish(
    sums: torch.Tensor, at: slice | torch.Tensor, factor: torch.Tensor, neg_c: torch.Tensor,
    base: torch.Tensor, out: torch.Tensor,
) -> None:
    """``out[e] = b + factor[e] * (S - C * b)`` with ``b = base[e]`` for the experts ``at`` (``_index``);
    ``sums`` ([n, P], accumulation dtype) holds their S and is overwritten; ``factor = lr / W``,
    ``neg_c = -C`` ([E, 1])."""
    b = _take(base, at)
    sums.addcmul_(b, _take(neg_c, at))
    if isinstance(at, slice):  # a view of out: written where it lies
        torch.addcmul(b, sums, _take(factor, at), out=out[at])
    else:
        out.index_copy_(0, at, torch.addcmul(b, sums, _take(factor, at), out=sums).to(out.dtype))


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
    csum: torch.Tensor, lr: float, base: torch.Tensor, out: torch.Tensor, check: bool,
) -> list[int]:
    """A block of the experts of the rows that ``keep`` holds at a time: their sums of ``coef * row``
    over those rows (``_block_sums``), then the new values of those whose weight sum is positive
    (``_finish``). With ``check``, the experts whose sums are not finite are left as they are and
    returned."""
    factor, neg_c = _finish_factors(wsum, csum, lr, coef.dtype)
    positive = (wsum > 0).tolist()
    num_experts, p = base.shape
    blocks = _blocks(experts, keep, num_experts, p, coef.dtype)
    block = torch.empty((len(blocks[0]) if blocks else 0, p), dtype=coef.dtype, device=base.device)
    failed = []
    for group, (ids, slots) in zip(blocks, _block_rows(experts, keep, blocks, num_experts), strict=True):
        sums = block[: len(group)]
        _block_sums(sums, rows, ids, slots, coef[:, None])
        finite = torch.isfinite(sums.sum(dim=1)).tolist() if check else [True] * len(group)
        failed += [e for e, f in zip(group, finite, strict=True) if not f]
        write = [j for j, e in enumerate(group) if finite[j] and positive[e]]
        if write:
            sums = sums if len(write) == len(group) else sums[write]
            _finish(sums, _index([group[j] for j in write], base.device), factor, neg_c, base, out)
    return failed


def _torch_aggregate(
    rows: torch.Tensor, experts: torch.Tensor, wscaled: torch.Tensor, base: torch.Tensor,
    max_norm: float | None, lr: float, out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch torch path (``_torch_experts``); returns ``ok`` and the weight sums.

    Without clipping or conversion every row is first taken as accepted and summed: a sum with a value
    that is not finite in it is not finite, so only the experts whose sums are not finite (a bad row, or
    finite values that overflow) get per-row verdicts and are summed again over their accepted rows.
    Otherwise the verdicts come first (``_torch_verdicts``). Either way the accepted rows are summed,
    zero weights included (as the streaming form does), so that both add the same terms."""
    acc = _acc_dtype(base)
    num_experts = base.shape[0]
    optimistic = max_norm is None and not _converts(rows, acc)
    if optimistic:
        ok, coef = torch.ones(rows.shape[0], dtype=torch.bool, device=rows.device), wscaled.to(acc)
    else:
        ok, coef = _torch_verdicts(rows, experts, wscaled, base, acc, max_norm)
    wsum, csum = _weight_sums(experts, ok, wscaled, coef, num_experts)
    failed = _torch_experts(experts, ok, rows, coef, wsum, csum, lr, base, out, check=optimistic)
    if failed:
        again = torch.zeros(num_experts, dtype=torch.bool, device=rows.device)
        again[failed] = True
        again = again[experts]  # the rows of the failed experts (all taken as accepted so far)
        suspect = torch.nonzero(again).squeeze(1).tolist()
        ok[suspect] = torch.stack([torch.isfinite(rows[r]).all() for r in suspect])
        wsum, csum = _weight_sums(experts, ok, wscaled, coef, num_experts)
        _torch_experts(experts, ok & again, rows, coef, wsum, csum, lr, base, out, check=False)
    _keep_base(out, base, wsum == 0)  # no rows, zero weights, or every row rejected
    return ok, wsum


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


def _triton_stats(rows, experts, base, acc_dtype, max_norm):
    from fedmoe_kernels._details.aggregate_triton import row_stats

    if rows.shape[0] == 0:
        return torch.ones(0, dtype=torch.int8, device=rows.device), None
    return row_stats(rows, experts, base, acc_dtype, max_norm is not None)


def _params(lr: float, max_norm: float | None, device) -> torch.Tensor:
    return torch.tensor([lr, 0.0 if max_norm is None else max_norm], dtype=torch.float64, device=device)


# ---------------------------------------------------------------- ops


def aggregate(
    rows: torch.Tensor,
    experts: torch.Tensor,
    weights: torch.Tensor,
    num_experts: int,
    base: torch.Tensor,
    *,
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
        max_norm: clip each row's delta ``row - base`` to this L2 norm (> 0); None: no clipping.
        lr: server step size on ``mean - base`` (finite; 1 = plain weighted mean).
        out: [E, P] like ``base`` to write into; ``base`` itself for in place; None: a new tensor.
        backend: "auto" (Triton on CUDA, torch on CPU), "triton" or "torch".

    Returns:
        :class:`AggregateResult` (bank, accepted, rejected, weight_sum).
    """
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
    k_none = torch.full((num_experts,), _K_NONE, dtype=torch.int64, device=base.device)
    k, _, wscaled = _scale_weights(k_none, experts, w)
    if backend == "torch":
        ok, wsum = _torch_aggregate(rows, experts, wscaled, base, max_norm, lr, out)
    else:
        from fedmoe_kernels._details.aggregate_triton import aggregate_rows

        wsum = torch.zeros(num_experts, dtype=torch.float64, device=base.device)
        ok, sq = _triton_stats(rows, experts, base, acc_dtype, max_norm)
        perm, offsets = _group(experts, num_experts)
        aggregate_rows(
            rows, perm, offsets, ok, wscaled, sq, base, _params(lr, max_norm, base.device), wsum,
            acc_dtype=acc_dtype, out=out,
        )
    accepted, rejected = _counts(experts, ok, num_experts)
    return AggregateResult(out, accepted, rejected, _ldexp(wsum, k))


class Accumulator:
    """Streaming form of :func:`aggregate`: :meth:`add` replies as they arrive, :meth:`result` at the end.

    Holds ``base`` ([E, P], by reference: it must not change until :meth:`result`) and running sums:
    ``[E, P]`` in the accumulation dtype (float32, float64 for a float64 bank) plus O(E) counters, whatever
    the number of rows added. Rows of any expert may come in any order and in any number of calls; fed
    the rows of a batch in order it reproduces :func:`aggregate` bitwise (module docstring).

    Args:
        base: the bank the deltas are taken against (and clipped against).
        max_norm: as in :func:`aggregate`; fixed here because clipping happens as rows are added.
        backend: as in :func:`aggregate`, chosen once from ``base``.
    """

    def __init__(self, base: torch.Tensor, *, max_norm: float | None = None, backend: str = "auto"):
        _check_base(base)
        self._base = base
        self._max_norm = None if max_norm is None else _check_real(max_norm, "max_norm", positive=True)
        self._backend = resolve(backend, base)
        num_experts, p = base.shape
        device = base.device
        self._sums = torch.zeros((num_experts, p), dtype=_acc_dtype(base), device=device)
        self._wsum = torch.zeros(num_experts, dtype=torch.float64, device=device)
        self._csum = torch.zeros(num_experts, dtype=torch.float64, device=device)  # torch path only
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
        self._k, rescale, wscaled = _scale_weights(self._k, experts, w)
        if self._backend == "torch":
            sums = self._sums
            rescaled = torch.nonzero(rescale != 1.0).squeeze(1)
            sums[rescaled] = (sums[rescaled].double() * rescale[rescaled, None]).to(sums.dtype)
            self._wsum.mul_(rescale)
            self._csum.mul_(rescale)
            ok, coef = _torch_verdicts(rows, experts, wscaled, self._base, sums.dtype, self._max_norm)
            self._wsum.index_add_(0, experts, torch.where(ok, wscaled, 0.0))
            self._csum.index_add_(0, experts, coef.to(torch.float64))
            ids = torch.nonzero(ok).squeeze(1)
            _sum_tiles(sums, rows, ids, experts[ids], coef[:, None])  # added where the sums lie
        else:
            from fedmoe_kernels._details.aggregate_triton import aggregate_rows

            ok, sq = _triton_stats(rows, experts, self._base, self._sums.dtype, self._max_norm)
            perm, offsets = _group(experts, self.num_experts)
            aggregate_rows(
                rows, perm, offsets, ok, wscaled, sq, self._base, _params(1.0, self._max_norm, rows.device),
                self._wsum, acc_dtype=self._sums.dtype, sums=self._sums, rescale=rescale,
            )
        accepted, rejected = _counts(experts, ok, self.num_experts)
        self._accepted += accepted
        self._rejected += rejected

    def result(self, *, lr: float = 1.0, out: torch.Tensor | None = None) -> AggregateResult:
        """The aggregated bank so far (``out=base``: in place); the accumulator is left unchanged."""
        return self._result(_check_real(lr, "lr", positive=False), _check_out(out, self._base, None))

    def _result(self, lr: float, out: torch.Tensor) -> AggregateResult:
        if self._backend == "torch":
            touched = torch.nonzero(self._wsum > 0).squeeze(1).tolist()
            _keep_base(out, self._base, self._wsum == 0)
            factor, neg_c = _finish_factors(self._wsum, self._csum, lr, self._sums.dtype)
            step = _experts_per_block(self._sums.shape[1], self._sums.dtype)
            for lo in range(0, len(touched), step):
                at = _index(touched[lo : lo + step], self._base.device)
                _finish(_take(self._sums, at).clone(), at, factor, neg_c, self._base, out)
            wsum = self._wsum
        else:
            from fedmoe_kernels._details.aggregate_triton import aggregate_rows

            device = self._base.device
            no_rows = self._sums[:0]
            no_ids = torch.empty(0, dtype=torch.int64, device=device)
            wsum = self._wsum.clone()
            aggregate_rows(
                no_rows, no_ids, torch.zeros(self.num_experts + 1, dtype=torch.int64, device=device),
                no_ids, self._wsum[:0], None, self._base, _params(lr, None, device), wsum,
                acc_dtype=self._sums.dtype, out=out, sums=self._sums, rescale=torch.ones_like(wsum),
            )
        return AggregateResult(out, self._accepted.clone(), self._rejected.clone(), _ldexp(wsum, self._k))


# ---------------------------------------------------------------- reference


class AggregateRef(NamedTuple):
    """Reference answer of ``aggregate``: the bank in float64 [E, P] and the per-expert counters."""

    bank: torch.Tensor
    accepted: torch.Tensor
    rejected: torch.Tensor
    weight_sum: torch.Tensor


def aggregate_reference(rows, experts, weights, num_experts: int, base, *, max_norm=None, lr=1.0):
    """Per expert ``e``, over its rows whose values are all finite once converted to the accumulation dtype
    (float64 for a float64 ``base``, else float32): ``base[e] + lr * sum_m (w_m / W) * s_m * d_m`` with
    ``d_m = row_m - base[e]``, ``W = sum_m w_m``, ``s_m = min(1, max_norm / ||d_m||)`` (1 without
    ``max_norm``); ``base[e]`` where there is no such row or ``W == 0``. Computed in float64; returns
    :class:`AggregateRef`."""
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
        accepted[e] = len(kept)
        total = sum(wm for wm, _ in kept)
        weight_sum[e] = total
        if total > 0:
            bank[e] = bank[e] + lr * sum(((wm / total) * d for wm, d in kept), torch.zeros_like(bank[e]))
    return AggregateRef(bank, accepted, rejected, weight_sum)
