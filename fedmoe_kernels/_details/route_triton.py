"""Triton kernels of the routing plan: a stable counting sort of the T*k (token, slot) entries by expert.

Four launches, no full sort: per-block expert histograms (``[B, E]``), an exclusive scan of each expert's
column over the blocks (where in its expert's segment each block starts), an exclusive scan of the expert
totals (the offsets), and a scatter in which every entry adds its rank among the equal entries earlier in
its block. Blocks are taken in entry order and ranks are by entry order, so the grouping is stable.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fedmoe_kernels._backend import interpreting

# Entries per block (the in-block rank compares all BLOCK_N**2 pairs) and experts per column-scan program.
# Under the interpreter each program is one Python-level step, so fewer, larger blocks run faster there.
BLOCK_N = 512 if interpreting() else 128
SCAN_BLOCK_E = 1024 if interpreting() else 32


@triton.jit
def _block_histogram_kernel(idx_ptr, table_ptr, N, E, BLOCK: tl.constexpr, NUM_BINS: tl.constexpr):
    block = tl.program_id(0)
    entry = block * BLOCK + tl.arange(0, BLOCK)
    expert = tl.load(idx_ptr + entry, mask=entry < N, other=-1)
    # Dropped (-1) and past-the-end lanes go to bin E (NUM_BINS > E), which is not stored: every value stays
    # in range, as the GPU lowering of tl.histogram bins by the low log2(NUM_BINS) bits of each value.
    expert = tl.where(expert >= 0, expert, E).to(tl.int32)
    counts = tl.histogram(expert, NUM_BINS)
    bins = tl.arange(0, NUM_BINS)
    tl.store(table_ptr + block * E + bins, counts, mask=bins < E)


@triton.jit
def _column_scan_kernel(table_ptr, totals_ptr, B, E, BLOCK_B: tl.constexpr, BLOCK_E: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)
    carry = tl.zeros([BLOCK_E], tl.int32)
    for start in range(0, B, BLOCK_B):
        rows = start + tl.arange(0, BLOCK_B)
        mask = (rows[:, None] < B) & (cols[None, :] < E)
        ptrs = table_ptr + rows[:, None] * E + cols[None, :]
        counts = tl.load(ptrs, mask=mask, other=0)
        tl.store(ptrs, tl.cumsum(counts, axis=0) - counts + carry[None, :], mask=mask)
        carry += tl.sum(counts, axis=0)
    tl.store(totals_ptr + cols, carry, mask=cols < E)


@triton.jit
def _offsets_kernel(totals_ptr, offsets_ptr, E, BLOCK_E: tl.constexpr):
    carry = tl.zeros([1], tl.int64)
    tl.store(offsets_ptr + tl.arange(0, 1), carry)
    for start in range(0, E, BLOCK_E):
        cols = start + tl.arange(0, BLOCK_E)
        totals = tl.load(totals_ptr + cols, mask=cols < E, other=0).to(tl.int64)
        tl.store(offsets_ptr + 1 + cols, tl.cumsum(totals, axis=0) + carry, mask=cols < E)
        carry += tl.sum(totals, axis=0)


@triton.jit
def _scatter_kernel(idx_ptr, table_ptr, offsets_ptr, perm_ptr, inverse_ptr, N, E, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    lane = tl.arange(0, BLOCK)
    entry = block * BLOCK + lane
    expert = tl.load(idx_ptr + entry, mask=entry < N, other=-1).to(tl.int32)
    kept = expert >= 0
    earlier_same = (expert[:, None] == expert[None, :]) & (lane[None, :] < lane[:, None])
    rank = tl.sum(earlier_same.to(tl.int32), axis=1)
    safe = tl.where(kept, expert, 0)
    start = tl.load(offsets_ptr + safe, mask=kept, other=0)
    before = tl.load(table_ptr + block * E + safe, mask=kept, other=0)
    row = start + before + rank
    tl.store(perm_ptr + row, entry.to(tl.int64), mask=kept)
    tl.store(inverse_ptr + entry, tl.where(kept, row, -1), mask=entry < N)


def route(flat_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stable grouping of ``flat_idx`` (int32/int64 [N], contiguous, values in [-1, E)) by expert.

    Returns ``permutation`` (int64 [N]; its first ``offsets[E]`` entries are the kept entry indices in
    grouped order, the rest unwritten), ``offsets`` (int64 [E+1]) and ``inverse`` (int64 [N], -1 where
    dropped). Scratch: an int32 [ceil(N / BLOCK_N), E] table of per-block counts.
    """
    n, e = flat_idx.numel(), num_experts
    device = flat_idx.device
    blocks = triton.cdiv(n, BLOCK_N)
    table = torch.empty((blocks, e), dtype=torch.int32, device=device)
    totals = torch.empty(e, dtype=torch.int32, device=device)
    offsets = torch.empty(e + 1, dtype=torch.int64, device=device)
    permutation = torch.empty(n, dtype=torch.int64, device=device)
    inverse = torch.empty(n, dtype=torch.int64, device=device)
    _block_histogram_kernel[(blocks,)](
        flat_idx, table, n, e, BLOCK=BLOCK_N, NUM_BINS=triton.next_power_of_2(e + 1)
    )
    block_e = min(triton.next_power_of_2(e), SCAN_BLOCK_E)
    _column_scan_kernel[(triton.cdiv(e, block_e),)](table, totals, blocks, e, BLOCK_B=64, BLOCK_E=block_e)
    _offsets_kernel[(1,)](totals, offsets, e, BLOCK_E=min(triton.next_power_of_2(e), 1024))
    # 8 warps: the in-block rank holds a BLOCK_N x BLOCK_N comparison
    _scatter_kernel[(blocks,)](
        flat_idx, table, offsets, permutation, inverse, n, e, BLOCK=BLOCK_N, num_warps=8
    )
    return permutation, offsets, inverse
