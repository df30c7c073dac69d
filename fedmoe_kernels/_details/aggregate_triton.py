"""Triton kernels of the fused per-expert aggregation (:func:`fedmoe_kernels.aggregate`): weighted mean,
median, trimmed mean.

Two launches per batch of rows (a third for experts whose values may overflow):

1. ``_row_stats_kernel``, grid ``(M, splits)``: for each row and span of columns, the number of values that
   are not finite in the accumulation dtype, their largest ``|value|`` and, when clipping, the partial
   ``sum((row - base[e])**2)`` (float64; :func:`row_stats` turns each row's sum into its clipping factor).
   A row's verdict and norm must be known before any of its columns is summed, so this pass reads every
   row once on its own.
2. One launch over (column block, expert) for the experts ``ids``, expert ``ids[j]`` written to row
   ``slots[j]`` of ``out``: the bank, or (a second launch) a scratch for the experts whose values may
   overflow, checked before they are copied into the bank (see :mod:`fedmoe_kernels.aggregate`).

   - ``_aggregate_kernel`` (the mean): each program walks its expert's rows (CSR ``offsets`` over a
     stable grouping ``perm``) in ascending row order, accumulates ``c * (row - base)`` in registers (no
     atomics; rows with ``c == 0`` skipped) and writes ``base + (lr / W) * acc`` where ``W`` (the sum of
     the accepted weights) is positive, ``base`` elsewhere. The streaming form runs the same kernel:
     ``add`` loads and stores the running sums instead of finishing, ``result`` finishes with no rows.
   - ``_robust_kernel`` (median, trimmed mean): each program loads its expert's ``n <= MAX_M`` rows (CSR
     over the accepted rows of positive weight) as a ``[BLOCK_P, MAX_M]`` tile of scaled deltas
     ``s * (row - base)``, padded with ``+inf``, sorts it along the rows (``tl.sort``, a bitonic network
     in registers) and writes ``base + lr * sum(v_r * (1 / k))`` over the ``k`` ranks ``r`` of the
     expert's window (a NaN delta makes the column NaN). ``MAX_M`` is a power of two, at most
     ``ROBUST_MAX_M``.

Rows may have any strides; ``DIV`` (a power of two dividing P and the row strides) tells the kernels how far
rows are aligned (:mod:`~fedmoe_kernels._details.align_triton`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe_kernels._details.align_triton import aligned, divisor

BLOCK_P = 1024  # columns per program of the aggregation kernel
STATS_BLOCK = 1024  # columns per step of the row-statistics kernel
STATS_STEPS = 16  # steps per row-statistics program
ROBUST_MAX_M = 256  # most rows per expert the robust kernel sorts in registers (more: the torch path)
ROBUST_TILE = 4096  # values per program of the robust kernel (rows x columns); half as many in float64

_TL_DTYPE = {torch.float32: tl.float32, torch.float64: tl.float64}


@triton.jit
def _row_stats_kernel(
    rows_ptr, stride_rm, stride_rp, experts_ptr, base_ptr, stride_be, stride_bp, bad_ptr, big_ptr, sq_ptr,
    P, SPLIT, NSPLIT,
    ACC: tl.constexpr, CLIP: tl.constexpr, BLOCK: tl.constexpr, DIV: tl.constexpr,
):
    P, stride_rm, stride_be = aligned(P, DIV), aligned(stride_rm, DIV), aligned(stride_be, DIV)
    m = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    bad = tl.zeros([BLOCK], tl.int32)
    big = tl.zeros([BLOCK], ACC)
    sq = tl.zeros([BLOCK], tl.float64)
    if CLIP:
        e = tl.load(experts_ptr + m).to(tl.int64)
    for start in range(0, SPLIT, BLOCK):
        cols = part * SPLIT + start + tl.arange(0, BLOCK)
        mask = cols < P
        x = tl.load(rows_ptr + m * stride_rm + cols * stride_rp, mask=mask, other=0.0).to(ACC)
        bad += (mask & ~(tl.abs(x) < float("inf"))).to(tl.int32)
        big = tl.maximum(big, tl.abs(x))
        if CLIP:
            b = tl.load(base_ptr + e * stride_be + cols * stride_bp, mask=mask, other=0.0).to(ACC)
            d = (x - b).to(tl.float64)
            sq += d * d
    tl.store(bad_ptr + m * NSPLIT + part, tl.sum(bad))
    tl.store(big_ptr + m * NSPLIT + part, tl.max(big).to(tl.float64))
    if CLIP:
        tl.store(sq_ptr + m * NSPLIT + part, tl.sum(sq))


@triton.jit
def _round_to(x, dtype: tl.constexpr):
    """``x.to(dtype)`` rounding to nearest-even also for bfloat16 (which the interpreter truncates)."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _aggregate_kernel(
    rows_ptr, stride_rm, stride_rp, perm_ptr, offsets_ptr, ok_ptr, wscaled_ptr, clip_ptr,
    base_ptr, stride_be, stride_bp, ids_ptr, slots_ptr, out_ptr, stride_oe, stride_op, sums_ptr, wsum_ptr,
    rescale_ptr, params_ptr, P,
    ACC: tl.constexpr, CLIP: tl.constexpr, LOAD: tl.constexpr, FINISH: tl.constexpr, BLOCK_P: tl.constexpr,
    DIV: tl.constexpr,
):
    P, stride_rm, stride_be, stride_oe = (aligned(P, DIV), aligned(stride_rm, DIV), aligned(stride_be, DIV),
                                          aligned(stride_oe, DIV))
    pb = tl.program_id(0)
    j = tl.program_id(1)
    e = tl.load(ids_ptr + j)
    cols = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cols < P
    lo = tl.load(offsets_ptr + e)
    hi = tl.load(offsets_ptr + e + 1)
    if FINISH or hi > lo:
        b = tl.load(base_ptr + e * stride_be + cols * stride_bp, mask=mask, other=0.0).to(ACC)
        if LOAD:
            r = tl.load(rescale_ptr + e)
            acc = (tl.load(sums_ptr + e * P + cols, mask=mask, other=0.0).to(tl.float64) * r).to(ACC)
            w_sum = tl.load(wsum_ptr + e) * r
        else:
            acc = tl.zeros([BLOCK_P], ACC)
            w_sum = tl.zeros([], tl.float64)
        for i in range(lo, hi):
            m = tl.load(perm_ptr + i)
            ok = tl.load(ok_ptr + m) != 0
            w = tl.load(wscaled_ptr + m)
            c = w
            if CLIP:
                c = w * tl.load(clip_ptr + m)
            c = tl.where(ok, c, 0.0).to(ACC)
            x = tl.load(rows_ptr + m * stride_rm + cols * stride_rp, mask=mask, other=0.0).to(ACC)
            acc += c * tl.where(c != 0, x - b, 0.0)  # c == 0 adds nothing, even if x - b is not finite
            w_sum += tl.where(ok, w, 0.0)
        if FINISH:
            lr = tl.load(params_ptr)
            divisor = tl.where(w_sum > 0, w_sum, 1.0)
            f = (lr / divisor).to(ACC)
            big = f == float("inf")  # lr near the top of the range: f / 2 times 2 * acc, exactly
            f = tl.where(big, (lr * 0.5 / divisor).to(ACC), f)
            res = tl.where(w_sum > 0, b + f * (acc * tl.where(big, 2.0, 1.0).to(ACC)), b)
            res = _round_to(res, out_ptr.dtype.element_ty)
            o = tl.load(slots_ptr + j)
            tl.store(out_ptr + o * stride_oe + cols * stride_op, res, mask=mask)
        else:
            tl.store(sums_ptr + e * P + cols, acc, mask=mask)
        if pb == 0:
            tl.store(wsum_ptr + e, w_sum)


@triton.jit
def _robust_kernel(
    rows_ptr, stride_rm, stride_rp, perm_ptr, offsets_ptr, clip_ptr, window_ptr, base_ptr, stride_be,
    stride_bp, ids_ptr, slots_ptr, out_ptr, stride_oe, stride_op, params_ptr, P,
    ACC: tl.constexpr, CLIP: tl.constexpr, MAX_M: tl.constexpr, BLOCK_P: tl.constexpr, DIV: tl.constexpr,
):
    P, stride_rm, stride_be, stride_oe = (aligned(P, DIV), aligned(stride_rm, DIV), aligned(stride_be, DIV),
                                          aligned(stride_oe, DIV))
    pb = tl.program_id(0)
    j = tl.program_id(1)
    e = tl.load(ids_ptr + j)
    cols = pb * BLOCK_P + tl.arange(0, BLOCK_P)
    mask = cols < P
    start = tl.load(offsets_ptr + e)
    ranks = tl.arange(0, MAX_M)
    present = ranks < tl.load(offsets_ptr + e + 1) - start
    m = tl.load(perm_ptr + start + ranks, mask=present, other=0)
    b = tl.load(base_ptr + e * stride_be + cols * stride_bp, mask=mask, other=0.0).to(ACC)
    tile = mask[:, None] & present[None, :]
    x = tl.load(rows_ptr + m[None, :] * stride_rm + cols[:, None] * stride_rp, mask=tile, other=0.0)
    y = x.to(ACC) - b[:, None]  # [BLOCK_P, MAX_M]: columns by rows
    if CLIP:
        y = y * tl.load(clip_ptr + m, mask=present, other=1.0).to(ACC)[None, :]
    nan = tl.max((present[None, :] & (y != y)).to(tl.int32), axis=1) > 0
    y = tl.sort(tl.where(present[None, :], y, float("inf")))
    lo = tl.load(window_ptr + 2 * e)
    hi = tl.load(window_ptr + 2 * e + 1)
    inv = (1.0 / (hi - lo).to(tl.float64)).to(ACC)
    inside = (ranks >= lo) & (ranks < hi)
    stat = tl.sum(tl.where(inside[None, :], y * inv, 0.0), axis=1)
    res = tl.where(nan, float("nan"), b + tl.load(params_ptr).to(ACC) * stat)
    o = tl.load(slots_ptr + j)
    tl.store(out_ptr + o * stride_oe + cols * stride_op, _round_to(res, out_ptr.dtype.element_ty), mask=mask)


def row_stats(
    rows: torch.Tensor, experts: torch.Tensor, base: torch.Tensor, acc_dtype: torch.dtype,
    max_norm: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-row verdicts, clipping factors and largest values of ``rows`` ([M, P], M >= 1).

    Returns ``ok`` (int8 [M], 1 where every value is finite in ``acc_dtype``); with a ``max_norm``, the
    clipping factors ``min(1, max_norm / ||rows - base[experts]||_2)`` (float64 [M]; each row's norm from
    its own partial sums, whatever the other rows of its batch), else None; and the largest ``|value|`` of
    each row in ``acc_dtype`` (float64 [M]; meaningless where not ``ok``).
    """
    m, p = rows.shape
    block = min(STATS_BLOCK, triton.next_power_of_2(p))
    split = block * min(STATS_STEPS, triton.cdiv(p, block))
    nsplit = triton.cdiv(p, split)
    bad = torch.empty((m, nsplit), dtype=torch.int32, device=rows.device)
    big = torch.empty((m, nsplit), dtype=torch.float64, device=rows.device)
    clip = max_norm is not None
    sq = torch.empty((m, nsplit), dtype=torch.float64, device=rows.device) if clip else None
    _row_stats_kernel[(m, nsplit)](
        rows, rows.stride(0), rows.stride(1), experts, base, base.stride(0), base.stride(1), bad, big, sq,
        p, split, nsplit, ACC=_TL_DTYPE[acc_dtype], CLIP=clip, BLOCK=block,
        DIV=divisor(p, rows.stride(0), base.stride(0)),
    )
    factors = max_norm / sq.sum(dim=1).sqrt().clamp(min=max_norm) if clip else None
    return (bad.sum(dim=1) == 0).to(torch.int8), factors, big.amax(dim=1)


def aggregate_rows(
    rows: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, ok: torch.Tensor, wscaled: torch.Tensor,
    clip: torch.Tensor | None, base: torch.Tensor, params: torch.Tensor, wsum: torch.Tensor, *,
    acc_dtype: torch.dtype, ids: torch.Tensor, out: torch.Tensor | None = None,
    slots: torch.Tensor | None = None, sums: torch.Tensor | None = None, rescale: torch.Tensor | None = None,
) -> None:
    """One launch of the aggregation kernel over (column block, expert of ``ids``).

    ``rows`` [M, P]; ``perm`` (int64 [M]) groups the rows by expert stably, expert ``e`` owning
    ``perm[offsets[e]:offsets[e+1]]``; ``ok`` (int8 [M]) marks the accepted rows; ``wscaled`` (float64
    [M]) holds the weights scaled per expert; ``clip`` the clipping factors from :func:`row_stats` (None:
    no clipping); ``params`` (float64 [1]) is ``lr``; ``wsum`` (float64 [E]) receives
    the scaled weight sums; ``ids`` (int64 [n]) the experts to process. Modes:

    - ``out`` given, ``sums`` None: batch; writes the new value of expert ``ids[j]`` into row ``slots[j]``
      of ``out`` (``out`` may be ``base``).
    - ``sums`` given (contiguous [E, P] in ``acc_dtype``), ``rescale`` (float64 [E]) given: the running
      sums and ``wsum`` are first multiplied by ``rescale``, then the rows added; with ``out`` the result
      is written as above (streaming ``result``), without it the sums are stored back (streaming ``add``).
    """
    p = base.shape[1]
    load, finish = sums is not None, out is not None
    block_p = min(BLOCK_P, triton.next_power_of_2(p))
    grid = (triton.cdiv(p, block_p), ids.numel())
    stride_oe, stride_op = (0, 0) if out is None else out.stride()
    _aggregate_kernel[grid](
        rows, rows.stride(0), rows.stride(1), perm, offsets, ok, wscaled, clip,
        base, base.stride(0), base.stride(1), ids, slots, out, stride_oe, stride_op,
        sums, wsum, rescale, params, p,
        ACC=_TL_DTYPE[acc_dtype], CLIP=clip is not None, LOAD=load, FINISH=finish, BLOCK_P=block_p,
        DIV=divisor(p, rows.stride(0), base.stride(0), stride_oe),
    )


def robust_rows(
    rows: torch.Tensor, perm: torch.Tensor, offsets: torch.Tensor, clip: torch.Tensor | None,
    window: torch.Tensor, base: torch.Tensor, params: torch.Tensor, *, acc_dtype: torch.dtype, max_m: int,
    ids: torch.Tensor, out: torch.Tensor, slots: torch.Tensor,
) -> None:
    """One launch of the robust kernel over (column block, expert of ``ids``).

    ``perm`` (int64) and ``offsets`` (int64 [E+1]): the accepted rows of positive weight grouped by expert,
    expert ``e`` owning ``perm[offsets[e]:offsets[e+1]]`` (``1 <= n <= max_m <= ROBUST_MAX_M`` rows for
    the experts of ``ids``); ``clip`` (float64 [M]) the clipping factors (None: no clipping); ``window``
    (int64 [E, 2]) each expert's ranks ``[lo, hi)``; ``params`` (float64 [1]) ``lr``. Writes
    the new value of expert ``ids[j]`` into row ``slots[j]`` of ``out`` (which may be ``base``).
    """
    p = base.shape[1]
    max_m = triton.next_power_of_2(max_m)
    tile = ROBUST_TILE // (2 if acc_dtype == torch.float64 else 1)  # a full float64 tile spilled registers
    block_p = min(triton.next_power_of_2(p), max(1, tile // max_m))
    _robust_kernel[(triton.cdiv(p, block_p), ids.numel())](
        rows, rows.stride(0), rows.stride(1), perm, offsets, clip, window, base, base.stride(0),
        base.stride(1), ids, slots, out, out.stride(0), out.stride(1), params, p,
        ACC=_TL_DTYPE[acc_dtype], CLIP=clip is not None, MAX_M=max_m, BLOCK_P=block_p,
        DIV=divisor(p, rows.stride(0), base.stride(0), out.stride(0)),
    )
