"""The Triton kernels on an NVIDIA GPU against torch, within a time budget (issue 22 part B; docs/codegen.md).

Measures the copy roof (a 1 GiB device-to-device copy; bytes read + written per second), then times, with
``triton.testing.do_bench`` medians and in bfloat16, over T = 4,096..65,536 tokens, H = 1,024..7,168,
k = 2 and 8, E = 8..256 experts:

* ``route`` against a stable argsort and bincount;
* ``dispatch`` and ``combine``, forward and backward, against ``index_select`` / ``index_add_`` and their
  autograd (bench_dispatch.py's baseline): the backward of dispatch is a combine without weights, that of
  combine a gather scaled by the weights plus the weights' gradient;
* ``aggregate`` (the mean of M = 8E bfloat16 rows of P values into a float32 bank of E experts) against
  ``index_add_`` of the weighted rows divided by the weight sums;
* the MoE layer (``fedmoe.models.MoELayer`` in bfloat16) forward + backward against the same layer with the
  baseline in place of route / dispatch / combine.

Every op is checked against its baseline before it is timed. A row has both times, the speedup (baseline /
fedmoe), the bytes the op must move, fedmoe's GB/s and its fraction of the copy roof (aggregate also counts
the bytes it does move: its verdict pass reads the rows once more). Shapes go in an order that spreads them
over the grid (its corners first) until ``--budget`` seconds have passed; the rest are listed as skipped,
as are those that do not fit in memory. The targets (dispatch, combine, aggregate at >= 80% of the copy roof
on large shapes, never slower than torch on small ones) are checked at the end.

    python benchmarks/bench_gpu.py [--budget 210] [--out benchmarks/results/gpu_check.json]
    python benchmarks/bench_gpu.py --dry-run   # the plan, on any machine
    python benchmarks/bench_gpu.py --smoke     # every step on tiny shapes, on any machine (CPU: torch path)
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import subprocess
import time
from pathlib import Path

import torch
from bench_dispatch import (
    GB,
    baseline_combine,
    baseline_dispatch,
    baseline_layer_forward,
    baseline_plan,
    copy_roof_gbps,
    device_info,
    median_seconds,
    write,
)

from fedmoe.models import MoELayer
from fedmoe_kernels import aggregate, combine, dispatch, route

DTYPE = torch.bfloat16
OPS = list(itertools.product([4096, 16384, 65536], [1024, 4096, 7168], [2, 8], [8, 64, 256]))  # T, H, k, E
AGGREGATES = list(itertools.product([8, 64, 256], [100_000, 1_000_000]))  # E, P; M = 8 E rows
LAYERS = [(4096, 1024, 2048, 8, 2), (16384, 2048, 4096, 64, 8), (65536, 1024, 1024, 256, 2)]  # T,d,d_h,E,k
SMOKE = {"ops": [(64, 40, 2, 8), (64, 48, 8, 16)], "aggregates": [(4, 1000)], "layers": [(64, 32, 64, 4, 2)]}
LARGE_BYTES = 1 << 30  # a shape moving this much is "large" (the roof target), one moving < 1/16 of it small
ROOF_TARGET = 0.8
ROOFED = ("dispatch", "combine", "dispatch_backward", "combine_backward", "aggregate")


def ordered(items: list, seed: int = 0) -> list:
    """``items`` with the first and last (the grid's corners) first, the others shuffled (seeded)."""
    middle = items[1:-1]
    random.Random(seed).shuffle(middle)
    return [items[-1], items[0], *middle] if len(items) > 1 else items


def plan(smoke: bool) -> list[tuple[str, tuple]]:
    """(kind, shape) in the order they are run."""
    if smoke:
        return [(kind[:-1], s) for kind, shapes in SMOKE.items() for s in shapes]
    return ([("op", s) for s in ordered(OPS)] + [("aggregate", s) for s in ordered(AGGREGATES)]
            + [("layer", s) for s in LAYERS])


def need_bytes(kind: str, shape: tuple) -> int:
    """Device memory a shape needs (its tensors, gradients and the baseline's copies)."""
    if kind == "op":  # bfloat16: 7 tensors of grouped rows (R = T k), 6 of token rows
        t, h, k, _ = shape
        return (7 * t * k + 6 * t) * h * 2
    if kind == "aggregate":  # M = 8 E rows: bfloat16, and the float32 copies of the baseline; the bank
        e, p = shape
        return 8 * e * p * (2 + 4 + 4) + 4 * e * p * 4
    t, d, d_h, e, k = shape
    return 2 * (6 * t * k * (d + d_h) + 4 * e * d * d_h)


# ---------------------------------------------------------------- timing


def timed(ours, base, device, must_move: int | None = None, roof: float | None = None) -> dict:
    """Both median times (shorter ``do_bench`` runs than bench_dispatch.py's, to fit the budget), the
    speedup, and fedmoe's GB/s and share of the copy roof where the bytes the op must move are given."""
    t_ours, t_base = (median_seconds(fn, device, 0.01, warmup=10, rep=50) for fn in (ours, base))
    row = {"fedmoe_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3, "speedup": t_base / t_ours}
    if must_move is not None:
        row |= {"bytes": must_move, "fedmoe_gbps": must_move / t_ours / GB}
        if roof:
            row["roof_fraction"] = row["fedmoe_gbps"] / roof
    return row


# ---------------------------------------------------------------- the ops


def inputs(t: int, h: int, k: int, e: int, device: torch.device):
    """Top-k choices of distinct experts per token [T, k], bfloat16 tokens [T, H], float32 weights [T, k],
    drawn on the device."""
    gen = torch.Generator(device).manual_seed(0)
    expert_idx = torch.rand((t, e), generator=gen, device=device).topk(k, dim=1).indices
    x = torch.randn((t, h), generator=gen, device=device, dtype=DTYPE)
    return expert_idx, x, torch.rand((t, k), generator=gen, device=device)


def bench_op(shape: tuple, device: torch.device, roof: float | None) -> dict:
    t, h, k, e = shape
    expert_idx, x, weights = inputs(t, h, k, e, device)
    plan_ = route(expert_idx, e)
    order, token_of_row, offsets = baseline_plan(expert_idx, e)
    rows = dispatch(x, plan_)
    assert torch.equal(plan_.permutation, order) and torch.equal(plan_.offsets, offsets)
    assert torch.equal(rows, baseline_dispatch(x, token_of_row))
    out = combine(rows, plan_, weights)
    want = baseline_combine(rows.float(), order, token_of_row, weights, t)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())

    size, r = 2, plan_.num_rows
    row_bytes = r * h * size
    tok_bytes = t * h * size
    result = {"T": t, "H": h, "k": k, "E": e}
    result["route"] = timed(lambda: route(expert_idx, e), lambda: baseline_plan(expert_idx, e), device)
    result["dispatch"] = timed(lambda: dispatch(x, plan_), lambda: baseline_dispatch(x, token_of_row), device,
                               2 * row_bytes + 8 * r, roof)
    result["combine"] = timed(lambda: combine(rows, plan_, weights),
                              lambda: baseline_combine(rows, order, token_of_row, weights, t), device,
                              row_bytes + tok_bytes + 12 * t * k, roof)

    xg, yg, wg = (v.detach().requires_grad_() for v in (x, rows, weights))
    g_rows, g_tok = torch.randn_like(rows), torch.randn_like(x)
    d_ours, d_base = dispatch(xg, plan_), baseline_dispatch(xg, token_of_row)
    c_ours, c_base = combine(yg, plan_, wg), baseline_combine(yg, order, token_of_row, wg, t)
    for got, want in ((torch.autograd.grad(d_ours, xg, g_rows, retain_graph=True),
                       torch.autograd.grad(d_base, xg, g_rows, retain_graph=True)),
                      (torch.autograd.grad(c_ours, (yg, wg), g_tok, retain_graph=True),
                       torch.autograd.grad(c_base, (yg, wg), g_tok, retain_graph=True))):
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2 * b.abs().max().item())
    result["dispatch_backward"] = timed(
        lambda: torch.autograd.grad(d_ours, xg, g_rows, retain_graph=True),
        lambda: torch.autograd.grad(d_base, xg, g_rows, retain_graph=True), device,
        row_bytes + tok_bytes + 8 * t * k, roof)
    result["combine_backward"] = timed(  # scaled gather of g; the weights' gradient reads g and y again
        lambda: torch.autograd.grad(c_ours, (yg, wg), g_tok, retain_graph=True),
        lambda: torch.autograd.grad(c_base, (yg, wg), g_tok, retain_graph=True), device,
        3 * row_bytes + tok_bytes + 28 * t * k, roof)
    return result


def bench_aggregate(shape: tuple, device: torch.device, roof: float | None) -> dict:
    e, p = shape
    m = 8 * e
    gen = torch.Generator(device).manual_seed(0)
    base = torch.randn((e, p), generator=gen, device=device)
    experts = torch.arange(m, device=device) % e
    rows = (base[experts] + 0.01 * torch.randn((m, p), generator=gen, device=device)).to(DTYPE)
    weights = torch.rand(m, generator=gen, device=device).add_(0.5)

    def baseline():
        sums = torch.zeros_like(base).index_add_(0, experts, rows.float() * weights[:, None])
        return sums / torch.zeros(e, device=device).index_add_(0, experts, weights)[:, None]

    got = aggregate(rows, experts, weights, e, base).bank
    want = baseline()
    torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2 * want.abs().max().item())
    must = m * p * 2 + 2 * e * p * 4
    row = timed(lambda: aggregate(rows, experts, weights, e, base), baseline, device, must, roof)
    row["bytes_moved"] = must + m * p * 2  # the verdict pass reads every row before the sums
    if roof:
        row["moved_roof_fraction"] = row["bytes_moved"] / (row["fedmoe_ms"] / 1e3) / GB / roof
    return {"E": e, "P": p, "M": m, "rows": "bfloat16", "bank": "float32", "aggregate": row}


def bench_layer(shape: tuple, device: torch.device) -> dict:
    t, d, d_h, e, k = shape
    torch.manual_seed(0)
    layer = MoELayer(d, d_h, e, k).to(device=device, dtype=DTYPE)
    x = torch.randn(t, d, device=device, dtype=DTYPE, requires_grad=True)
    grad = torch.randn(t, d, device=device, dtype=DTYPE)
    params = (x, *layer.parameters())
    want = baseline_layer_forward(layer, x)
    got = layer(x)[0]
    torch.testing.assert_close(got.float(), want.float(), rtol=3e-2, atol=3e-2 * want.abs().max().item())
    row = timed(lambda: torch.autograd.grad(layer(x)[0], params, grad),
                lambda: torch.autograd.grad(baseline_layer_forward(layer, x), params, grad), device)
    return {"T": t, "d_model": d, "d_hidden": d_h, "E": e, "k": k,
            "expert_compute": "grouped_mm" if layer._use_grouped_mm(x) else "loop", "fwd_bwd": row}


# ---------------------------------------------------------------- targets and report


def targets(ops: list[dict], aggregates: list[dict]) -> dict:
    """The rows that miss a target: below ROOF_TARGET of the roof on a large shape, slower than torch on a
    small one."""
    missed = []
    for row in ops + aggregates:
        for op in ROOFED:
            if op not in row:
                continue
            r = row[op]
            shape = {k: v for k, v in row.items() if not isinstance(v, dict)}
            if r["bytes"] >= LARGE_BYTES and r.get("roof_fraction", 1.0) < ROOF_TARGET:
                missed.append({"op": op, **shape, "roof_fraction": r["roof_fraction"]})
            if r["bytes"] < LARGE_BYTES // 16 and r["speedup"] < 1.0:
                missed.append({"op": op, **shape, "speedup": r["speedup"]})
    return {"roof_target": ROOF_TARGET, "large_bytes": LARGE_BYTES, "small_bytes": LARGE_BYTES // 16,
            "missed": missed}


def driver_version() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def run(args, device: torch.device) -> dict:
    roof = copy_roof_gbps(device, 1 << 30 if device.type == "cuda" else 1 << 24)
    print(f"copy roof {roof:.0f} GB/s", flush=True)
    results = {"ops": [], "aggregates": [], "layers": [], "skipped": []}
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    start = time.time()
    for kind, shape in plan(args.smoke):
        if time.time() - start > args.budget:
            results["skipped"].append({"kind": kind, "shape": shape, "why": "time budget"})
            continue
        if free is not None and need_bytes(kind, shape) > 0.8 * free:
            results["skipped"].append({"kind": kind, "shape": shape, "why": "memory"})
            continue
        if kind == "op":
            results["ops"].append(row := bench_op(shape, device, roof))
            summary = ", ".join(f"{op} {row[op]['speedup']:.2f}x" for op in ("route", *ROOFED[:4]))
        elif kind == "aggregate":
            results["aggregates"].append(row := bench_aggregate(shape, device, roof))
            summary = f"aggregate {row['aggregate']['speedup']:.2f}x"
        else:
            results["layers"].append(row := bench_layer(shape, device))
            summary = f"layer fwd+bwd {row['fwd_bwd']['speedup']:.2f}x"
        print(f"{kind} {shape}: {summary}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"copy_roof_gbps": roof, **results, "targets": targets(results["ops"], results["aggregates"]),
            "seconds": round(time.time() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=210.0, help="seconds for the timed shapes")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/gpu_check[_smoke].json")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, any device")
    args = parser.parse_args()
    if args.dry_run:
        for kind, shape in plan(args.smoke):
            gib = round(need_bytes(kind, shape) / 2**30, 2)
            print(json.dumps({"kind": kind, "shape": shape, "gib": gib}))
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("bench_gpu.py needs a CUDA device (or --smoke / --dry-run)")
    import triton

    machine = device_info(device) | {"driver": driver_version(), "cuda": torch.version.cuda,
                                     "triton": triton.__version__, "dtype": str(DTYPE).removeprefix("torch.")}
    results = {"machine": machine, **run(args, device)}
    print(json.dumps(results["targets"], indent=1))
    suffix = "_smoke" if args.smoke else ""
    write(results, args.out or Path(__file__).resolve().parent / "results" / f"gpu_check{suffix}.json")


if __name__ == "__main__":
    main()
