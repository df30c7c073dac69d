"""What fedmoe_kernels launches on a GPU, as calls of its launchers on meta tensors (docs/codegen.md).

A :class:`Case` is one call of the launchers behind an op (``route``, ``dispatch``, ``combine`` and their
backward passes, ``aggregate`` in its modes) at a stated shape; :func:`codegen.record` turns it into the
kernel launches the op makes. :func:`grid` is the set of cases ``compile_gpu.py`` compiles: every value of
every axis a launcher chooses from (dtype, flag, mode, top-k, tile and width class, histogram size up to
E = 4,096, sort size) and the full product of the axes that shape a hot loop's code. :func:`domain` draws
cases from the ops' whole input domain instead, to check that the grid misses no value a launcher can
choose. :data:`HOT` and :func:`bytes_moved` say which accesses of a kernel are its hot loop and how many
bytes a launch must move.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from fedmoe_kernels._details import aggregate_triton, route_triton, rows_triton

FLOATS = (torch.bfloat16, torch.float16, torch.float32, torch.float64)
I64 = torch.int64
TOKENS = 16384  # T of the stated shapes of dispatch / combine / route
WIDE_H = (7168, 1000, 1025)  # row widths: 16-element aligned (H_DIV 16), 8-element aligned, unaligned
TOP_K = (2, 8)
AGG_SHAPE = (64, 512)  # (E, M) of the stated aggregate shapes
WIDE_P = (100_000, 100_002)  # expert sizes P: 16-element aligned, 2-element aligned
MAX_M = tuple(2**i for i in range(9))  # robust kernel's sort sizes, 1..ROBUST_MAX_M


def widths(top: int) -> list[int]:
    """Sizes up to ``top`` that meet every pair of next power of two (a tile size, a histogram size) and
    largest power-of-two divisor up to 16 (an alignment class): ``2**j - d`` and ``2**j + d``, d in 0, 1, 2,
    4, 8, 16."""
    near = {2**j + s * d for j in range(top.bit_length()) for d in (0, 1, 2, 4, 8, 16) for s in (-1, 1)}
    return sorted(n for n in near if 1 <= n <= top)


def meta(shape, dtype=I64) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


def name(dtype: torch.dtype | None) -> str:
    return "none" if dtype is None else str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Case:
    """One launcher call: ``call()`` runs the launchers of ``module`` for ``op`` at ``shape``."""

    op: str
    module: object
    call: Callable[[], object] = field(repr=False)
    shape: dict


# ---------------------------------------------------------------- the launcher calls of each op


def rows_case(op: str, t: int, h: int, k: int, dtype: torch.dtype, weights: torch.dtype | None) -> Case:
    """dispatch / its backward (a combine without weights) / combine / its backward (a gather scaled by the
    weights and the weights' gradient), as ``fedmoe_kernels._details.rows`` calls the kernels (no slot
    dropped: R = T*k)."""
    r = t * k
    tokens, grouped = meta((t, h), dtype), meta((r, h), dtype)
    perm, inverse = meta(r), meta((t, k))
    w = None if weights is None else meta((t, k), weights)

    def call():
        if op == "dispatch":
            rows_triton.gather(tokens, perm, k, None)
        elif op == "dispatch_backward":
            rows_triton.combine(grouped, inverse, None)
        elif op == "combine":
            rows_triton.combine(grouped, inverse, w)
        else:
            rows_triton.gather(tokens, perm, k, w)
            rows_triton.slot_dot(tokens, grouped, inverse, weights)

    shape = {"T": t, "H": h, "k": k, "dtype": name(dtype), "weights": name(weights)}
    return Case(op, rows_triton, call, shape)


def route_case(t: int, k: int, e: int, idx: torch.dtype) -> Case:
    flat = meta(t * k, idx)
    return Case("route", route_triton, lambda: route_triton.route(flat, e),
                {"T": t, "k": k, "E": e, "dtype": name(idx)})


def aggregate_case(
    mode: str, e: int, m: int, p: int, rows: torch.Tensor | torch.dtype, base: torch.dtype, clip: bool,
    max_m: int = 0,
) -> Case:
    """``aggregate`` as fedmoe_kernels.aggregate launches it. ``mode``: "mean" (a batch), "add" and "result"
    (the streaming Accumulator), "robust" (median / trimmed mean with ``max_m`` rows at most). ``rows``: a
    dtype ([M, P] contiguous) or a meta tensor (other strides)."""
    acc = torch.float64 if base == torch.float64 else torch.float32
    x = meta((m, p), rows) if isinstance(rows, torch.dtype) else rows
    bank, sums, f64 = meta((e, p), base), meta((e, p), acc), meta(max(m, e), torch.float64)
    ok, ids, offsets, params = meta(m, torch.int8), meta(e), meta(e + 1), meta(1, torch.float64)
    max_norm = 1.0 if clip else None
    at = aggregate_triton

    def call():
        if mode == "result":
            no_ids = meta(0)
            at.aggregate_rows(sums[:0], no_ids, offsets, no_ids, f64[:0], None, bank, params, f64[:e],
                              acc_dtype=acc, ids=ids, out=bank, slots=ids, sums=sums, rescale=f64[:e])
            return
        _, factors, _ = at.row_stats(x, meta(m), bank, acc, max_norm)
        if mode == "robust":
            at.robust_rows(x, meta(m), offsets, factors, meta((e, 2)), bank, params, acc_dtype=acc,
                           max_m=max_m, ids=ids, out=bank, slots=ids)
        elif mode == "add":
            at.aggregate_rows(x, meta(m), offsets, ok, f64[:m], factors, bank, params, f64[:e],
                              acc_dtype=acc, ids=ids, sums=sums, rescale=f64[:e])
        else:
            at.aggregate_rows(x, meta(m), offsets, ok, f64[:m], factors, bank, params, f64[:e],
                              acc_dtype=acc, ids=ids, out=bank, slots=ids)

    shape = {"mode": mode, "E": e, "M": m, "P": p, "rows": "none" if mode == "result" else name(x.dtype),
             "strides": list(x.stride()), "base": name(base), "clip": clip,
             **({"max_m": max_m} if mode == "robust" else {})}
    return Case("aggregate", aggregate_triton, call, shape)


# op -> whether it takes weights
ROWS_OPS = {"dispatch": False, "dispatch_backward": False, "combine": True, "combine_backward": True}
AGG_MODES = ("mean", "add", "result", "robust")  # batch mean, Accumulator.add / .result, median / trim


# ---------------------------------------------------------------- the grid


def _rows_grid() -> Iterator[Case]:
    for op, has_weights in ROWS_OPS.items():
        ws = FLOATS if has_weights else (None,)
        # full product at the wide widths: dtype x weights dtype x top-k x width class
        for h, k, dtype, w in itertools.product(WIDE_H, TOP_K, FLOATS, ws):
            yield rows_case(op, TOKENS, h, k, dtype, w)
        # every top-k, every weights dtype
        for h, k, w in itertools.product(WIDE_H, range(1, 9), ws):
            yield rows_case(op, TOKENS, h, k, torch.bfloat16, w)
        # every tile (BLOCK_H 1..1024) and alignment class (H_DIV) of a row width, with 2 and 8 slots; every
        # tile of unaligned float64 rows (the most registers)
        for h, k in itertools.product(widths(2048), TOP_K):
            yield rows_case(op, TOKENS, h, k, torch.bfloat16, ws[-1 if has_weights else 0])
        for j in range(12):
            yield rows_case(op, TOKENS, 2**j + 1, 8, torch.float64, ws[-1 if has_weights else 0])
        # token counts that Triton specialises: 1 (a constexpr), not a multiple of 16
        for t, k in itertools.product((1, 3), (1, 8)):
            yield rows_case(op, t, WIDE_H[0], k, torch.bfloat16, ws[-1 if has_weights else 0])


def _route_grid() -> Iterator[Case]:
    for e, idx in itertools.product(widths(4096), (torch.int32, torch.int64)):
        yield route_case(TOKENS, 8, e, idx)
    # entry and block counts of 1 (constexprs) and not multiples of 16
    for t, k in ((1, 1), (3, 1), (3, 8), (200, 8)):
        yield route_case(t, k, 64, torch.int64)


def _aggregate_grid() -> Iterator[Case]:
    e, m = AGG_SHAPE
    for p, mode, rows, base, clip in itertools.product(WIDE_P, AGG_MODES[:3], FLOATS, FLOATS, (False, True)):
        if mode != "result" or (rows == base and not clip):  # result reads no rows and never clips
            yield aggregate_case(mode, e, m, p, rows, base, clip)
    for max_m, base, clip in itertools.product(MAX_M, FLOATS, (False, True)):
        yield aggregate_case("robust", e, m, WIDE_P[0], torch.float32, base, clip, max_m)
    for p, rows in itertools.product(WIDE_P, FLOATS):
        yield aggregate_case("robust", e, m, p, rows, torch.float32, True, 16)
    # every tile and alignment class of P; 2**20: 64 row-statistics programs per row (a multiple of 16)
    for p, mode in itertools.product([*widths(2048), 2**20], AGG_MODES):
        yield aggregate_case(mode, e, m, p, torch.bfloat16, torch.float32, mode != "result", 4)
    # strided rows: a column stride (no vector access) and a row stride wider than P
    for mode in ("mean", "robust"):
        yield aggregate_case(mode, e, m, WIDE_P[0], meta((WIDE_P[0], m), torch.float32).t(), torch.float32,
                             True, 16)
        yield aggregate_case(mode, e, m, WIDE_P[0], meta((m, WIDE_P[0] + 8), torch.float32)[:, :WIDE_P[0]],
                             torch.float32, True, 16)


def grid() -> Iterator[Case]:
    """The cases ``compile_gpu.py`` compiles (module doc); deduplicated per configuration there."""
    yield from _rows_grid()
    yield from _route_grid()
    yield from _aggregate_grid()


def quick() -> list[Case]:
    """A few cases for the test suite: aligned and awkward widths of the memory-bound kernels, E = 4,096."""
    return [
        rows_case("dispatch", TOKENS, 7168, 8, torch.bfloat16, None),
        rows_case("dispatch", TOKENS, 1000, 8, torch.bfloat16, None),
        rows_case("combine", TOKENS, 7168, 8, torch.bfloat16, torch.float32),
        rows_case("combine_backward", TOKENS, 4096, 2, torch.bfloat16, torch.float32),
        aggregate_case("mean", *AGG_SHAPE, WIDE_P[0], torch.bfloat16, torch.float32, True),
        route_case(TOKENS, 8, 4096, torch.int64),
    ]


def headlines() -> list[tuple[str, Case]]:
    """The docs' example shapes: an MoE layer's ops at T = 16,384, H = 7,168, k = 8, E = 64 in bfloat16
    (float32 weights); aggregate of M = 512 bfloat16 rows of P = 100,000 into a float32 bank of E = 64."""
    e, m = AGG_SHAPE
    bf16, f32 = torch.bfloat16, torch.float32
    moe = (TOKENS, WIDE_H[0], 8, bf16)
    return [
        ("route", route_case(TOKENS, 8, 64, torch.int64)),
        ("dispatch", rows_case("dispatch", *moe, None)),
        ("dispatch backward", rows_case("dispatch_backward", *moe, None)),
        ("combine", rows_case("combine", *moe, f32)),
        ("combine backward", rows_case("combine_backward", *moe, f32)),
        ("aggregate (mean)", aggregate_case("mean", e, m, WIDE_P[0], bf16, f32, False)),
        ("aggregate (mean, clipped)", aggregate_case("mean", e, m, WIDE_P[0], bf16, f32, True)),
        ("Accumulator.add", aggregate_case("add", e, m, WIDE_P[0], bf16, f32, False)),
        ("Accumulator.result", aggregate_case("result", e, m, WIDE_P[0], bf16, f32, False)),
        ("aggregate (median, clipped, <= 16 rows each)",
         aggregate_case("robust", e, m, WIDE_P[0], bf16, f32, True, 16)),
    ]


# ---------------------------------------------------------------- the input domain


def domain(samples: int, seed: int = 0) -> Iterator[Case]:
    """``samples`` cases of each op drawn from its whole input domain (the ops' documented limits), plus
    the edges: one token, E = 1 and 4,096, widths of 1 and not a multiple of 16."""
    rng = random.Random(seed)
    width = lambda top: rng.choice((rng.randint(1, 64), rng.randint(1, top)))  # noqa: E731
    for _ in range(samples):
        op = rng.choice(list(ROWS_OPS))
        w = rng.choice(FLOATS) if ROWS_OPS[op] else None
        yield rows_case(op, width(70_000), width(20_000), rng.randint(1, 8), rng.choice(FLOATS), w)
        yield route_case(width(70_000), rng.randint(1, 8), rng.randint(1, 4096),
                         rng.choice((torch.int32, torch.int64)))
        mode = rng.choice(AGG_MODES)
        rows, base = rng.choice(FLOATS), rng.choice(FLOATS)
        yield aggregate_case(mode, rng.randint(1, 512), width(4096), width(10**7),
                             base if mode == "result" else rows, base,
                             mode != "result" and rng.random() < 0.5, rng.randint(1, 256))
    for op in ROWS_OPS:
        for t, h in ((1, 1), (1, 7), (65_536, 7168), (4099, 1000)):
            yield rows_case(op, t, h, 8, torch.bfloat16, torch.float32 if ROWS_OPS[op] else None)
    for e in (1, 4095, 4096):
        yield route_case(1, 1, e, torch.int32)
        yield route_case(65_536, 8, e, torch.int64)


# ---------------------------------------------------------------- hot loops and bytes

# Per memory-bound kernel, the pointers of its hot loop: name -> (row stride, column stride, tile), the
# arguments whose alignment decides how wide an access can be and the constexprs of the tile it loads or
# stores, its contiguous dimension first.
HOT = {
    "_gather_kernel": {p: ("H", None, ("BLOCK_H", "BLOCK_R")) for p in ("x_ptr", "out_ptr")},
    "_combine_kernel": {p: ("H", None, ("BLOCK_H", "BLOCK_T")) for p in ("y_ptr", "out_ptr")},
    "_slot_dot_kernel": {p: ("H", None, ("BLOCK_H", "BLOCK_T")) for p in ("g_ptr", "y_ptr")},
    "_row_stats_kernel": {"rows_ptr": ("stride_rm", "stride_rp", ("BLOCK",)),
                          "base_ptr": ("stride_be", "stride_bp", ("BLOCK",))},
    "_aggregate_kernel": {"rows_ptr": ("stride_rm", "stride_rp", ("BLOCK_P",)),
                          "base_ptr": ("stride_be", "stride_bp", ("BLOCK_P",)),
                          "out_ptr": ("stride_oe", "stride_op", ("BLOCK_P",)),
                          "sums_ptr": ("P", None, ("BLOCK_P",))},
    # the output of the robust kernel, a reduction over its expert's rows, is 1/n of its traffic
    "_robust_kernel": {"rows_ptr": ("stride_rm", "stride_rp", ("BLOCK_P", "MAX_M")),
                       "base_ptr": ("stride_be", "stride_bp", ("BLOCK_P",))},
}
WIDTH = {"_gather_kernel": "H", "_combine_kernel": "H", "_slot_dot_kernel": "H", "_row_stats_kernel": "P",
         "_aggregate_kernel": "P", "_robust_kernel": "P"}  # the masked row length


def expected_bits(kernel: str, pointer: str, args: dict, num_warps: int) -> tuple[int, str]:
    """How wide (bits) an access of ``pointer`` can be, and what bounds it: "128-bit" (the widest global
    access); "alignment" (the largest power of two dividing the row stride and the row length, in
    elements; pointers are taken as 16-byte aligned, as CUDA allocations are); "tile" (the elements of
    its tile's contiguous dimension that each thread holds); "column stride" (not 1: one element)."""
    row, col, tile = HOT[kernel][pointer]
    size = args[pointer].element_size()
    if col is not None and args[col] != 1:
        return 8 * size, "column stride"
    aligned = 16
    for n in (args[row], args[WIDTH[kernel]]):
        aligned = min(aligned, (n & -n) or aligned)
    per_thread = math.prod(args[t] for t in tile) // (32 * num_warps)
    limits = {"128-bit": 16 // size, "alignment": aligned, "tile": max(1, min(args[tile[0]], per_thread))}
    limit = min(limits, key=limits.get)  # the first of the smallest
    return 8 * size * limits[limit], limit


def _size(t) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def bytes_moved(kernel: str, a: dict, grid: tuple) -> int:
    """Bytes a launch must move from and to memory, each use of a value read once: a gathered row once
    per grouped row, a row a program reads again in its own loop once, per-row scalars included."""
    if kernel == "_gather_kernel":  # read a token row, write a grouped row; the permutation; scales
        r, h = a["R"], a["H"]
        return 2 * r * h * a["x_ptr"].element_size() + 8 * r + (r * a["scale_ptr"].element_size()
                                                                 if a["HAS_SCALE"] else 0)
    if kernel == "_combine_kernel":  # read the grouped rows, write the token rows; inverse; weights
        return (_size(a["y_ptr"]) + _size(a["out_ptr"]) + _size(a["inverse_ptr"])
                + (_size(a["inverse_ptr"]) // 8 * a["w_ptr"].element_size() if a["HAS_WEIGHTS"] else 0))
    if kernel == "_slot_dot_kernel":
        return _size(a["g_ptr"]) + _size(a["y_ptr"]) + _size(a["inverse_ptr"]) + _size(a["out_ptr"])
    if kernel == "_row_stats_kernel":  # each row, and its expert's base row when clipping
        m, p = grid[0], a["P"]
        base = m * p * a["base_ptr"].element_size() if a["CLIP"] else 0
        return m * p * a["rows_ptr"].element_size() + base + 8 * m + 20 * m * grid[1]
    if kernel == "_aggregate_kernel":  # the rows, the bank (read, written) or the running sums
        e, p, m = grid[1], a["P"], a["rows_ptr"].shape[0]
        sums = a["sums_ptr"]
        acc = 0 if sums is None else e * p * sums.element_size() * (int(a["LOAD"]) + int(not a["FINISH"]))
        out = e * p * a["out_ptr"].element_size() if a["FINISH"] else 0
        rows = m * p * a["rows_ptr"].element_size()
        return rows + e * p * a["base_ptr"].element_size() + out + acc + 24 * m
    if kernel == "_robust_kernel":
        e, p, m = grid[1], a["P"], a["perm_ptr"].shape[0]
        return (m * p * a["rows_ptr"].element_size() + e * p * a["base_ptr"].element_size()
                + e * p * a["out_ptr"].element_size() + 16 * m)
    if kernel == "_block_histogram_kernel":
        return _size(a["idx_ptr"]) + _size(a["table_ptr"])
    if kernel == "_column_scan_kernel":
        return 2 * _size(a["table_ptr"]) + _size(a["totals_ptr"])
    if kernel == "_offsets_kernel":
        return _size(a["totals_ptr"]) + _size(a["offsets_ptr"])
    if kernel == "_scatter_kernel":  # entries, their table cell, their expert's offset; perm, inverse
        n = a["N"]
        return n * (a["idx_ptr"].element_size() + 4 + 8 + 8 + 8)
    raise KeyError(f"no byte count for {kernel}")
