"""Triton kernels of dispatch and combine (launched by :mod:`fedmoe_kernels._details.rows`): row gathers
and per-token weighted sums, no atomics.

``gather`` copies token rows into grouped order, optionally scaled per row (dispatch; the gradient of
combine for ``y``). ``combine`` sums, per token and in slot order, the (weighted) grouped rows of its kept
slots (combine; the gradient of dispatch). ``slot_dot`` is the per-(token, slot) dot product of a token row
with a grouped row (the gradient of combine for the weights). Every output element is written by exactly
one program with a fixed reduction order, so results are bitwise reproducible. Accumulation is float32
(float64 for float64 inputs); H is covered in masked blocks, so any H works, and ``H_DIV`` (a power of two
dividing H) tells the kernels how far rows are aligned (:mod:`~fedmoe_kernels._details.align_triton`).
Tensors must be contiguous.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe_kernels._backend import interpreting
from fedmoe_kernels._details.align_triton import aligned, divisor

# Elements per program tile (rows x columns), and rows per tile. Under the interpreter each program is one
# Python-level step, so fewer, larger tiles run much faster there; on a GPU 4096 elements over 4 warps is a
# balanced tile. Where rows are not 16-byte aligned each thread holds an address per element, and each row
# of a tile costs an index per thread (in slot_dot an accumulator too): larger tiles than these spilled
# registers (docs/codegen.md).
TILE, UNALIGNED_TILE, MAX_ROWS = (65536, 65536, 65536) if interpreting() else (4096, 512, 256)
MAX_BLOCK_H = 1024


@triton.jit
def _gather_kernel(
    x_ptr,
    perm_ptr,
    scale_ptr,
    out_ptr,
    R,
    H,
    K: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    H_DIV: tl.constexpr,
):
    H = aligned(H, H_DIV)
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row_ok = rows < R
    mask = row_ok[:, None] & (cols < H)[None, :]
    entry = tl.load(perm_ptr + rows, mask=row_ok, other=0)
    token = entry // K
    values = tl.load(x_ptr + token[:, None] * H + cols[None, :], mask=mask)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + entry, mask=row_ok, other=0).to(ACC)
        values = values.to(ACC) * scale[:, None]
    tl.store(
        out_ptr + rows.to(tl.int64)[:, None] * H + cols[None, :],
        values.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _combine_kernel(
    y_ptr,
    inverse_ptr,
    w_ptr,
    out_ptr,
    T,
    H,
    K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    H_DIV: tl.constexpr,
):
    H = aligned(H, H_DIV)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    token_ok = tokens < T
    col_ok = cols < H
    acc = tl.zeros([BLOCK_T, BLOCK_H], ACC)
    for slot in range(K):  # a loop: unrolled, sm_90a's ptxas kept every slot's loads in flight and spilled
        row = tl.load(inverse_ptr + tokens.to(tl.int64) * K + slot, mask=token_ok, other=-1)
        kept = row >= 0
        values = tl.load(
            y_ptr + row[:, None] * H + cols[None, :], mask=kept[:, None] & col_ok[None, :], other=0
        ).to(ACC)
        if HAS_WEIGHTS:
            weight = tl.load(w_ptr + tokens.to(tl.int64) * K + slot, mask=kept, other=0).to(ACC)
            values = values * weight[:, None]
        acc += values
    tl.store(
        out_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=token_ok[:, None] & col_ok[None, :],
    )


@triton.jit
def _slot_dot_kernel(
    g_ptr,
    y_ptr,
    inverse_ptr,
    out_ptr,
    T,
    H,
    K: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    H_DIV: tl.constexpr,
):
    H = aligned(H, H_DIV)
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    token_ok = tokens < T
    for slot in tl.static_range(K):
        row = tl.load(inverse_ptr + tokens.to(tl.int64) * K + slot, mask=token_ok, other=-1)
        kept = row >= 0
        acc = tl.zeros([BLOCK_T], ACC)
        for start in range(0, H, BLOCK_H):
            cols = start + tl.arange(0, BLOCK_H)
            col_ok = (cols < H)[None, :]
            g = tl.load(
                g_ptr + tokens.to(tl.int64)[:, None] * H + cols[None, :],
                mask=token_ok[:, None] & col_ok,
                other=0,
            ).to(ACC)
            y = tl.load(y_ptr + row[:, None] * H + cols[None, :], mask=kept[:, None] & col_ok, other=0).to(
                ACC
            )
            acc += tl.sum(g * y, axis=1)
        tl.store(out_ptr + tokens.to(tl.int64) * K + slot, acc.to(out_ptr.dtype.element_ty), mask=token_ok)


def _acc(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _tile(h: int, itemsize: int) -> tuple[int, int]:
    """(rows, columns) of a program tile for rows of ``h`` values of ``itemsize`` bytes."""
    tile = TILE if h * itemsize % 16 == 0 else UNALIGNED_TILE
    block_h = min(triton.next_power_of_2(h), MAX_BLOCK_H, tile)
    return max(1, min(tile // block_h, MAX_ROWS)), block_h


def gather(x: torch.Tensor, permutation: torch.Tensor, k: int, scale: torch.Tensor | None) -> torch.Tensor:
    """out[r] = x[permutation[r] // k] (* scale.flatten()[permutation[r]]): x [T,H] -> [R,H], x.dtype."""
    r, h = permutation.numel(), x.shape[1]
    out = torch.empty((r, h), dtype=x.dtype, device=x.device)
    if r == 0 or h == 0:
        return out
    block_r, block_h = _tile(h, x.element_size())
    grid = (triton.cdiv(r, block_r), triton.cdiv(h, block_h))
    _gather_kernel[grid](
        x,
        permutation,
        x if scale is None else scale,
        out,
        r,
        h,
        K=k,
        HAS_SCALE=scale is not None,
        ACC=_acc(x.dtype),
        BLOCK_R=block_r,
        BLOCK_H=block_h,
        H_DIV=divisor(h),
    )
    return out


def combine(y: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """out[t] = sum over kept slots s of (weights[t,s] *) y[inverse[t,s]]: y [R,H] -> [T,H], y.dtype."""
    (t, k), h = inverse.shape, y.shape[1]
    out = torch.empty((t, h), dtype=y.dtype, device=y.device)
    if h == 0:
        return out
    block_t, block_h = _tile(h, y.element_size())
    grid = (triton.cdiv(t, block_t), triton.cdiv(h, block_h))
    _combine_kernel[grid](
        y,
        inverse,
        y if weights is None else weights,
        out,
        t,
        h,
        K=k,
        HAS_WEIGHTS=weights is not None,
        ACC=_acc(y.dtype),
        BLOCK_T=block_t,
        BLOCK_H=block_h,
        H_DIV=divisor(h),
    )
    return out


def slot_dot(g: torch.Tensor, y: torch.Tensor, inverse: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t,s] = <g[t], y[inverse[t,s]]> (0 where dropped): g [T,H], y [R,H] -> [T,k] of ``dtype``."""
    t, k = inverse.shape
    out = torch.empty((t, k), dtype=dtype, device=g.device)
    h = g.shape[1]
    block_t, block_h = _tile(h, y.element_size())
    _slot_dot_kernel[(triton.cdiv(t, block_t),)](
        g, y, inverse, out, t, h, K=k, ACC=_acc(y.dtype), BLOCK_T=block_t, BLOCK_H=block_h, H_DIV=divisor(h)
    )
    return out
