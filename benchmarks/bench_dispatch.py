"""fedmoe_kernels.route / dispatch / combine and the MoE layer against a plain-torch baseline, side by side.

Baseline (the usual plain-torch MoE dispatch): a stable ``argsort`` of the flat expert choices, then
``index_select`` of the token rows (dispatch) and ``index_add_`` of the weighted expert rows (combine), all
differentiated by torch autograd. Every configuration is checked for correctness before it is timed.

* CPU (always): ``route`` vs the sort; ``dispatch`` vs ``index_select``; ``combine`` vs ``index_add_``;
  dispatch + combine forward and backward; the MoE layer (:class:`fedmoe.models.MoELayer`) forward and
  backward vs the same layer with the baseline in place of route / dispatch / combine. Median wall time of
  ``torch.utils.benchmark`` runs (best of 3 alternating rounds); ratios are baseline time / fedmoe time.
* CUDA (when a GPU is present): the Triton kernels in bfloat16 for T = 4,096..65,536, H = 1,024..7,168,
  k = 2 and 8, E = 8..256: ``triton.testing.do_bench`` medians, effective GB/s (bytes each op must move)
  and its fraction of a measured copy roof (a large device-to-device copy).

    python benchmarks/bench_dispatch.py [--quick] [--out-dir benchmarks/results]

Writes ``dispatch_cpu[_quick].json`` and, on a GPU, ``dispatch_gpu[_quick].json``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path

import torch
from machine import cpu_model, machine_info
from torch.utils.benchmark import Timer

from fedmoe.models import MoELayer
from fedmoe_kernels import combine, dispatch, route

GB = 1e9
ROUNDS = 3
CPU_OPS = {  # (T, H, k, E)
    "full": [(4096, 1024, 2, 64), (4096, 1024, 8, 64), (16384, 256, 2, 256), (1024, 4096, 8, 8)],
    "quick": [(1024, 256, 2, 16), (1024, 256, 8, 64)],
}
CPU_LAYERS = {  # (T, d_model, d_hidden, E, k)
    "full": [(8192, 256, 512, 64, 2), (2048, 1024, 2048, 8, 2)],
    "quick": [(1024, 64, 128, 16, 2)],
}
GPU_OPS = {
    "full": list(itertools.product([4096, 16384, 65536], [1024, 4096, 7168], [2, 8], [8, 64, 256])),
    "quick": list(itertools.product([4096], [1024, 7168], [2, 8], [8, 256])),
}


# ---------------------------------------------------------------- baseline: sort + index_select / index_add_


def baseline_plan(expert_idx: torch.Tensor, num_experts: int):
    """(order [T*k], token of each grouped row, expert offsets [E+1]) by a stable sort; no dropped slots."""
    flat = expert_idx.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    return order, order // expert_idx.shape[1], torch.cat([counts.new_zeros(1), counts.cumsum(0)])


def baseline_dispatch(x, token_of_row):
    return x.index_select(0, token_of_row)


def baseline_combine(y, order, token_of_row, weights, num_tokens):
    scaled = y * weights.reshape(-1)[order].to(y.dtype)[:, None]
    return torch.zeros((num_tokens, y.shape[1]), dtype=y.dtype, device=y.device).index_add_(
        0, token_of_row, scaled
    )


# ---------------------------------------------------------------- timing


def median_seconds(fn, device: torch.device, min_run_time: float, warmup: int = 25, rep: int = 100) -> float:
    """Median seconds of ``fn()``: ``do_bench`` (``warmup`` and ``rep`` in ms) on a GPU, else
    ``torch.utils.benchmark`` runs of at least ``min_run_time`` seconds in all."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median") / 1e3
    return Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time).median


def pair(ours, base, device, min_run_time, bytes_moved=None) -> dict:
    """Times of fedmoe and the baseline, their ratio, and GB/s where the bytes an op must move are given.

    On the CPU the two alternate for ROUNDS rounds and each keeps its lowest median, which damps the noise
    of other processes sharing the cores.
    """
    rounds = 1 if device.type == "cuda" else ROUNDS
    timings = [
        (median_seconds(ours, device, min_run_time), median_seconds(base, device, min_run_time))
        for _ in range(rounds)
    ]
    t_ours, t_base = (min(column) for column in zip(*timings, strict=True))
    row = {"fedmoe_ms": t_ours * 1e3, "baseline_ms": t_base * 1e3, "speedup": t_base / t_ours}
    if bytes_moved is not None:
        row |= {"fedmoe_gbps": bytes_moved / t_ours / GB, "baseline_gbps": bytes_moved / t_base / GB}
    return row


# ---------------------------------------------------------------- route / dispatch / combine


def make_inputs(t, h, k, e, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # distinct experts per token, as top-k gives
    expert_idx = torch.rand((t, e), generator=gen).topk(k, dim=1).indices
    x = torch.randn((t, h), generator=gen).to(device, dtype)
    weights = torch.rand((t, k), generator=gen).to(device)
    return expert_idx.to(device), x, weights


def bench_ops(config, dtype, device, backend, min_run_time, with_backward=True) -> dict:
    t, h, k, e = config
    expert_idx, x, weights = make_inputs(t, h, k, e, dtype, device)
    plan = route(expert_idx, e, backend=backend)
    order, token_of_row, offsets = baseline_plan(expert_idx, e)
    rows = dispatch(x, plan, backend=backend)

    # correctness first
    assert torch.equal(plan.permutation, order) and torch.equal(plan.offsets, offsets)
    assert torch.equal(rows, baseline_dispatch(x, token_of_row))
    out = combine(rows, plan, weights, backend=backend)
    want = baseline_combine(rows.float(), order, token_of_row, weights, t)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2 * want.abs().max().item())

    size = torch.finfo(dtype).bits // 8
    r = plan.num_rows
    index_bytes = 8 * r  # one int64 index per grouped row
    result = {
        "T": t,
        "H": h,
        "k": k,
        "E": e,
        "dtype": str(dtype).removeprefix("torch."),
        "backend": backend,
        "route": pair(
            lambda: route(expert_idx, e, backend=backend),
            lambda: baseline_plan(expert_idx, e),
            device,
            min_run_time,
        ),
        "dispatch": pair(
            lambda: dispatch(x, plan, backend=backend),
            lambda: baseline_dispatch(x, token_of_row),
            device,
            min_run_time,
            bytes_moved=2 * r * h * size + index_bytes,
        ),
        "combine": pair(
            lambda: combine(rows, plan, weights, backend=backend),
            lambda: baseline_combine(rows, order, token_of_row, weights, t),
            device,
            min_run_time,
            bytes_moved=(r + t) * h * size + index_bytes + 4 * t * k,
        ),
    }
    if with_backward:
        x_grad, w_grad = x.detach().requires_grad_(), weights.detach().requires_grad_()
        grad_out = torch.randn_like(x)

        def ours():
            out = combine(dispatch(x_grad, plan, backend=backend), plan, w_grad, backend=backend)
            torch.autograd.grad(out, (x_grad, w_grad), grad_out)

        def base():
            out = baseline_combine(baseline_dispatch(x_grad, token_of_row), order, token_of_row, w_grad, t)
            torch.autograd.grad(out, (x_grad, w_grad), grad_out)

        result["dispatch_combine_fwd_bwd"] = pair(ours, base, device, min_run_time)
    return result


# ---------------------------------------------------------------- MoE layer


def baseline_layer_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """The layer's router and experts with the baseline's sort + index_select / index_add_ around them."""
    expert_idx, weights, *_ = layer._route(x)
    order, token_of_row, offsets = baseline_plan(expert_idx, layer.num_experts)
    rows = layer._experts(baseline_dispatch(x, token_of_row), offsets)
    return baseline_combine(rows, order, token_of_row, weights, x.shape[0])


def bench_layer(config, device, min_run_time) -> dict:
    t, d_model, d_hidden, e, k = config
    torch.manual_seed(0)
    layer = MoELayer(d_model, d_hidden, e, k).to(device)
    x = torch.randn(t, d_model, device=device, requires_grad=True)
    grad_out = torch.randn(t, d_model, device=device)
    params = (x, *layer.parameters())
    torch.testing.assert_close(layer(x)[0], baseline_layer_forward(layer, x), rtol=1e-4, atol=1e-4)

    def ours():
        torch.autograd.grad(layer(x)[0], params, grad_out)

    def base():
        torch.autograd.grad(baseline_layer_forward(layer, x), params, grad_out)

    return {
        "T": t,
        "d_model": d_model,
        "d_hidden": d_hidden,
        "E": e,
        "k": k,
        "dtype": "float32",
        "expert_compute": "grouped_mm" if layer._use_grouped_mm(x) else "loop",
        "fwd_bwd": pair(ours, base, device, min_run_time),
    }


# ---------------------------------------------------------------- GPU


def copy_roof_gbps(device, nbytes=2**30) -> float:
    """GB/s of a large device-to-device copy (bytes read + bytes written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / median_seconds(lambda: dst.copy_(src), device, 1.0) / GB


def fits(config, device) -> bool:
    t, h, k, _ = config
    need = (3 * t * k + 3 * t) * h * 2  # rows, their gradient copy, x, out: bfloat16
    return device.type != "cuda" or need < 0.6 * torch.cuda.mem_get_info(device)[0]


def run_gpu(configs, device, min_run_time=0.5) -> dict:
    roof = copy_roof_gbps(device)
    rows = []
    for config in configs:
        if not fits(config, device):
            rows.append({"T": config[0], "H": config[1], "k": config[2], "E": config[3], "skipped": "memory"})
            continue
        row = bench_ops(config, torch.bfloat16, device, "triton", min_run_time, with_backward=False)
        for op in ("dispatch", "combine"):
            row[op]["fedmoe_roof_fraction"] = row[op]["fedmoe_gbps"] / roof
        rows.append(row)
        print(
            f"  {config}: dispatch {row['dispatch']['fedmoe_gbps']:.0f} GB/s "
            f"({row['dispatch']['speedup']:.2f}x), combine {row['combine']['fedmoe_gbps']:.0f} GB/s "
            f"({row['combine']['speedup']:.2f}x)",
            flush=True,
        )
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {"copy_roof_gbps": roof, "ops": rows}


# ---------------------------------------------------------------- report


def device_info(device: torch.device) -> dict:
    import triton

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_model()}"
    return machine_info(device=name, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                        triton=triton.__version__)


def write(results: dict, path: Path) -> None:
    results["machine"]["load_average_at_end"] = os.getloadavg()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, about a minute on the CPU")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--min-run-time", type=float, default=0.5, help="CPU: seconds per timing")
    args = parser.parse_args()
    size = "quick" if args.quick else "full"
    suffix = "_quick" if args.quick else ""

    cpu = torch.device("cpu")
    results = {
        "machine": device_info(cpu),
        "baseline": "stable argsort + index_select / index_add_ (autograd)",
        "ops": [],
        "layers": [],
    }
    for config, dtype in itertools.product(CPU_OPS[size], (torch.float32, torch.bfloat16)):
        row = bench_ops(config, dtype, cpu, "torch", args.min_run_time)
        results["ops"].append(row)
        print(
            f"cpu {config} {row['dtype']}: "
            + ", ".join(
                f"{op} {row[op]['speedup']:.2f}x"
                for op in ("route", "dispatch", "combine", "dispatch_combine_fwd_bwd")
            ),
            flush=True,
        )
    for config in CPU_LAYERS[size]:
        row = bench_layer(config, cpu, args.min_run_time)
        results["layers"].append(row)
        print(f"cpu layer {config}: fwd+bwd {row['fwd_bwd']['speedup']:.2f}x", flush=True)
    write(results, args.out_dir / f"dispatch_cpu{suffix}.json")

    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        print("gpu:")
        results = {
            "machine": device_info(gpu),
            "baseline": "stable argsort + index_select / index_add_",
            **run_gpu(GPU_OPS[size], gpu),
        }
        write(results, args.out_dir / f"dispatch_gpu{suffix}.json")


if __name__ == "__main__":
    main()
