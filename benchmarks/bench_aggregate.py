"""fedmoe_kernels.aggregate against how FL code aggregates experts today, side by side in one run.

Input: M received expert copies (rows, P values each) from M / 4 clients holding 4 distinct experts each,
weighted by the clients' sample counts; the rows are not sorted by expert. Baselines:

* ``loop``: a Python loop over the experts; each expert's rows are stacked (``torch.stack``) and
  weight-summed.
* ``state_dict``: FedAvg over per-client state dicts, key by key (``sum(w * sd[key]) / sum(w)``), each
  client's experts being separate tensors (views of the rows here, as after unpacking the replies).

fedmoe: ``aggregate`` out of place (``fused``), in place on the bank (``fused_inplace``), with clipping
(``fused_clip``, which the baselines do not do) and the streaming ``Accumulator`` fed client by client
(``streaming``). Every method is checked against the loop (``fused_clip`` against the reference) before it is
timed.

* CPU, short rows (always): (E, P, M) = (64, 1,000, 20,000), (16, 100, 100,000), (16, 10,000, 64): many rows
  of a few KiB or less, where a torch call per row would dominate; loop, state_dict, fused, fused_inplace
  interleaved (``short_rows`` in the JSON, with ratios to both baselines).
* CPU (always): E = 64, P = 100,000, M = 512, float32. Interleaved rounds; median and best wall time and
  median CPU time (process time, all threads). Peak extra resident memory of one call, each method in a
  fresh process (``VmHWM`` over the resident set before the call, after ``malloc_trim``), against the size
  of the rows: the fused path must not copy them.
* CUDA (when a GPU is present): E = 64 and 256: ``triton.testing.do_bench`` medians; GB/s of the fused path
  counting the bytes it must move (rows once, bank read and written) and the bytes it does move (rows twice:
  a verdict pass, then the aggregation pass), each against a measured device-to-device copy roof; ratios to
  the baselines.

* CPU, robust statistics (``--robust``, instead of the sections above): the same kind of input on shapes
  from a few to a hundred rows per expert; ``aggregate`` with ``method="median"`` and ``"trimmed-mean"``
  (``trim=0.1``) against ``"mean"`` on the same rows, and against per-expert loops (``torch.quantile(rows,
  0.5, dim=0)``, the same median; ``torch.median``, the lower median, a different statistic for even
  counts; a sort and the mean of the middle rows, the same trimmed mean). Each fused statistic is checked
  against its loop before it is timed; interleaved rounds, median CPU time.

    python benchmarks/bench_aggregate.py [--quick] [--robust] [--threads N] [--out-dir benchmarks/results]

Writes ``aggregate_cpu[_threadsN][_quick].json`` and, on a GPU, ``aggregate_gpu[_quick].json``; with
``--robust``, ``aggregate_robust_cpu[_threadsN][_quick].json``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from machine import cpu_model, machine_info

from fedmoe_kernels import Accumulator, aggregate
from fedmoe_kernels.aggregate import aggregate_reference

EXPERTS_PER_CLIENT = 4
SHAPES = {"full": (64, 100_000, 512), "quick": (16, 10_000, 64)}  # (E, P, M) on CPU
# many short rows (the torch path's tiles): (E, P, M); the quick shape among them
SHORT_ROW_SHAPES = {
    "full": [(64, 1_000, 20_000), (16, 100, 100_000), (16, 10_000, 64)],
    "quick": [(16, 100, 2_000)],
}
SHORT_ROW_METHODS = ("loop", "state_dict", "fused", "fused_inplace")
GPU_SHAPES = {"full": [(64, 100_000, 512), (256, 100_000, 512)], "quick": [(256, 10_000, 512)]}
BASELINES = ("loop", "state_dict")
METHODS = ("loop", "state_dict", "fused", "fused_inplace", "fused_clip", "streaming")
# robust statistics: (E, P, M), from about 8 to 128 rows per expert
ROBUST_SHAPES = {
    "full": [(64, 100_000, 512), (256, 1_000, 4_096), (16, 10_000, 2_048), (1_024, 100, 16_384)],
    "quick": [(16, 1_000, 256)],
}
TRIM = 0.1


# ---------------------------------------------------------------- problem and methods


def make_problem(num_experts: int, p: int, m: int, device: str, seed: int = 0) -> dict:
    """Rows near the bank, ``m / 4`` clients with 4 distinct experts each, sample-count weights."""
    g = torch.Generator().manual_seed(seed)
    clients = m // EXPERTS_PER_CLIENT
    picks = [torch.randperm(num_experts, generator=g)[:EXPERTS_PER_CLIENT] for _ in range(clients)]
    experts = torch.stack(picks).reshape(-1)
    samples = torch.randint(50, 500, (clients,), generator=g).double()
    base = torch.randn(num_experts, p, generator=g)
    rows = base[experts] + 0.01 * torch.randn(m, p, generator=g)
    weights = samples.repeat_interleave(EXPERTS_PER_CLIENT)
    rows_on = rows.to(device)
    state_dicts = [  # one reply per client: its experts by name, as tensors of their own
        {f"experts.{int(experts[i])}": rows_on[i] for i in range(c * 4, c * 4 + 4)} for c in range(clients)
    ]
    return {
        "rows": rows_on,
        "experts": experts.to(device),
        "weights": weights.to(device),
        "base": base.to(device),
        "bank": base.clone().to(device),
        "state_dicts": state_dicts,
        "client_weights": samples.tolist(),
        "max_norm": 0.01 * p**0.5,  # about the median delta norm: clips half of the rows
    }


def loop_average(rows, experts, weights, base):
    """Per expert: stack its rows, weighted sum, divide by the weight sum; experts without rows keep base."""
    new = base.clone()
    for e in range(base.shape[0]):
        idx = torch.nonzero(experts == e).squeeze(1)
        if idx.numel() == 0:
            continue
        stacked = torch.stack([rows[i] for i in idx.tolist()])
        w = weights[idx].to(rows.dtype)
        new[e] = (w[:, None] * stacked).sum(0) / w.sum()
    return new


def state_dict_average(state_dicts, client_weights, base):
    """FedAvg key by key over the clients that hold the key."""
    new = base.clone()
    for key in sorted(set().union(*state_dicts), key=lambda k: int(k.split(".")[1])):
        holders = [(w, sd[key]) for w, sd in zip(client_weights, state_dicts, strict=True) if key in sd]
        total = sum(w for w, _ in holders)
        new[int(key.split(".")[1])] = sum(w * t for w, t in holders) / total
    return new


def methods(pb: dict) -> dict:
    rows, experts, weights, base = pb["rows"], pb["experts"], pb["weights"], pb["base"]
    num_experts = base.shape[0]

    def streaming():
        acc = Accumulator(base)
        for lo in range(0, rows.shape[0], EXPERTS_PER_CLIENT):  # one reply per client
            hi = lo + EXPERTS_PER_CLIENT
            acc.add(rows[lo:hi], experts[lo:hi], weights[lo:hi])
        return acc.result().bank

    def fused(into=base, **kw):
        return lambda: aggregate(rows, experts, weights, num_experts, into, **kw).bank

    return {
        "loop": lambda: loop_average(rows, experts, weights, base),
        "state_dict": lambda: state_dict_average(pb["state_dicts"], pb["client_weights"], base),
        "fused": fused(),
        "fused_inplace": fused(into=pb["bank"], out=pb["bank"]),
        "fused_clip": fused(max_norm=pb["max_norm"]),
        "streaming": streaming,
    }


def check(pb: dict, fns: dict) -> dict:
    """Max abs difference of every method from the loop (fused_clip: from the reference); raises if off."""
    expected = fns["loop"]()
    diffs = {}
    for name, fn in fns.items():
        if name == "fused_clip":
            cpu = {k: pb[k].cpu() for k in ("rows", "experts", "weights", "base")}
            want = aggregate_reference(
                cpu["rows"], cpu["experts"], cpu["weights"], cpu["base"].shape[0], cpu["base"],
                max_norm=pb["max_norm"],
            ).bank.float()
            got = fn().cpu()
        else:
            want, got = expected, fn()
        diffs[name] = float((got - want.to(got.device)).abs().max())
        if not torch.allclose(got, want.to(got.device), rtol=1e-5, atol=1e-5):
            raise AssertionError(f"{name} disagrees with the baseline by {diffs[name]}")
    pb["bank"].copy_(pb["base"])
    return diffs


# ---------------------------------------------------------------- CPU


def peak_extra_bytes(method: str, shape: tuple[int, int, int], threads: int) -> int:
    """Growth of the peak resident set during one call of ``method``, measured in a fresh process."""
    cmd = [sys.executable, __file__, "--peak", method, "--shape", *map(str, shape), "--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024  # kB
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_peak(method: str, shape: tuple[int, int, int]) -> int:
    small = make_problem(4, 1000, 16, "cpu", seed=1)  # first calls load and initialise libraries
    for fn in methods(small).values():
        fn()
    fn = methods(make_problem(*shape, "cpu"))[method]
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what setting up freed, so that it is not reused
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM) to the current one
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def timed(fns: dict, rounds: int) -> tuple[dict, dict]:
    """Wall and CPU seconds of each of ``fns``, ``rounds`` times each, interleaved so that load from other
    processes hits every method alike."""
    wall = {name: [] for name in fns}
    cpu = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            w0, c0 = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return wall, cpu


def cpu_section(quick: bool, threads: int, rounds: int) -> dict:
    shape = SHAPES["quick" if quick else "full"]
    num_experts, p, m = shape
    pb = make_problem(*shape, "cpu")
    fns = methods(pb)
    diffs = check(pb, fns)
    wall, cpu = timed(fns, rounds)
    rows_bytes = pb["rows"].numel() * pb["rows"].element_size()
    results = {}
    for name in fns:
        peak = peak_extra_bytes(name, shape, threads)
        results[name] = {
            "wall_ms_median": 1e3 * statistics.median(wall[name]),
            "wall_ms_best": 1e3 * min(wall[name]),
            "cpu_ms_median": 1e3 * statistics.median(cpu[name]),
            "max_abs_diff": diffs[name],
            "peak_extra_bytes": peak,
            "peak_extra_over_rows": peak / rows_bytes,
        }
    ratios = {
        f"{base}_over_{name}": {
            key: results[base][key] / results[name][key] for key in ("wall_ms_median", "cpu_ms_median")
        }
        for base in BASELINES
        for name in ("fused", "fused_inplace", "streaming")
    }
    return {
        "E": num_experts, "P": p, "M": m, "clients": m // EXPERTS_PER_CLIENT, "dtype": "float32",
        "rows_bytes": rows_bytes, "bank_bytes": pb["base"].numel() * 4, "rounds": rounds,
        "results": results, "ratios": ratios,
    }


def short_rows_section(quick: bool, rounds: int) -> list[dict]:
    """Wall and CPU time medians of the fused path against both baselines on shapes with many short rows."""
    configs = []
    for shape in SHORT_ROW_SHAPES["quick" if quick else "full"]:
        pb = make_problem(*shape, "cpu")
        fns = {name: fn for name, fn in methods(pb).items() if name in SHORT_ROW_METHODS}
        diffs = check(pb, fns)
        wall, cpu = timed(fns, rounds)
        results = {
            name: {
                "wall_ms_median": 1e3 * statistics.median(wall[name]),
                "wall_ms_best": 1e3 * min(wall[name]),
                "cpu_ms_median": 1e3 * statistics.median(cpu[name]),
                "max_abs_diff": diffs[name],
            }
            for name in fns
        }
        num_experts, p, m = shape
        configs.append({
            "E": num_experts, "P": p, "M": m, "dtype": "float32", "rounds": rounds, "results": results,
            "ratios": {
                f"{base}_over_{name}": {
                    key: results[base][key] / results[name][key]
                    for key in ("wall_ms_median", "cpu_ms_median")
                }
                for base in BASELINES
                for name in ("fused", "fused_inplace")
            },
        })
    return configs


# ---------------------------------------------------------------- CPU, robust statistics


def per_expert(rows, experts, base, statistic):
    """Loop over the experts: ``statistic`` of each one's rows ([n, P] -> [P]); experts without rows keep
    base."""
    new = base.clone()
    for e in range(base.shape[0]):
        idx = torch.nonzero(experts == e).squeeze(1)
        if idx.numel():
            new[e] = statistic(rows[idx])
    return new


def trimmed(x: torch.Tensor) -> torch.Tensor:
    cut = int(TRIM * x.shape[0])
    return torch.sort(x, dim=0).values[cut : x.shape[0] - cut].mean(dim=0)


def robust_methods(pb: dict) -> dict:
    rows, experts, weights, base = pb["rows"], pb["experts"], pb["weights"], pb["base"]

    def fused(**kw):
        return lambda: aggregate(rows, experts, weights, base.shape[0], base, **kw).bank

    return {
        "fused_mean": fused(),
        "fused_median": fused(method="median"),
        "fused_trimmed": fused(method="trimmed-mean", trim=TRIM),
        "loop_quantile": lambda: per_expert(rows, experts, base, lambda x: torch.quantile(x, 0.5, dim=0)),
        "loop_median": lambda: per_expert(rows, experts, base, lambda x: torch.median(x, dim=0).values),
        "loop_trimmed": lambda: per_expert(rows, experts, base, trimmed),
    }


ROBUST_CHECKS = {"fused_median": "loop_quantile", "fused_trimmed": "loop_trimmed"}


def robust_section(quick: bool, rounds: int) -> list[dict]:
    """Median CPU (and wall) time of the fused robust statistics, the fused mean and the loops."""
    configs = []
    for shape in ROBUST_SHAPES["quick" if quick else "full"]:
        pb = make_problem(*shape, "cpu")
        fns = robust_methods(pb)
        diffs = {}
        for name, against in ROBUST_CHECKS.items():
            got, want = fns[name](), fns[against]()
            diffs[name] = float((got - want).abs().max())
            if not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
                raise AssertionError(f"{name} disagrees with {against} by {diffs[name]}")
        wall, cpu = timed(fns, rounds)
        num_experts, p, m = shape
        counts = torch.bincount(pb["experts"], minlength=num_experts).tolist()
        results = {
            name: {
                "wall_ms_median": 1e3 * statistics.median(wall[name]),
                "wall_ms_best": 1e3 * min(wall[name]),
                "cpu_ms_median": 1e3 * statistics.median(cpu[name]),
            }
            for name in fns
        }
        ratio = {  # baseline / fused, median CPU time
            "loop_quantile_over_fused_median": ("loop_quantile", "fused_median"),
            "loop_median_over_fused_median": ("loop_median", "fused_median"),
            "loop_trimmed_over_fused_trimmed": ("loop_trimmed", "fused_trimmed"),
            "fused_median_over_fused_mean": ("fused_median", "fused_mean"),
            "fused_trimmed_over_fused_mean": ("fused_trimmed", "fused_mean"),
        }
        configs.append({
            "E": num_experts, "P": p, "M": m, "dtype": "float32", "trim": TRIM, "rounds": rounds,
            "rows_per_expert": {"min": min(counts), "median": statistics.median(counts), "max": max(counts)},
            "max_abs_diff": diffs, "results": results,
            "ratios": {key: results[a]["cpu_ms_median"] / results[b]["cpu_ms_median"]
                       for key, (a, b) in ratio.items()},
        })
    return configs


# ---------------------------------------------------------------- GPU


def copy_roof_gbps(bench) -> float:
    """Device-to-device copy of 1 GiB: bytes read and written per second."""
    nbytes = 1 << 30
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / bench(lambda: dst.copy_(src)) / 1e6


def gpu_section(quick: bool) -> dict:
    import triton.testing

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, return_mode="median")  # ms

    roof_gbps = copy_roof_gbps(bench)
    out = {"copy_roof_gbps": roof_gbps, "configs": []}
    for shape in GPU_SHAPES["quick" if quick else "full"]:
        pb = make_problem(*shape, "cuda")
        fns = methods(pb)
        diffs = check(pb, fns)
        ms = {name: bench(fn) for name, fn in fns.items()}
        num_experts, p, m = shape
        rows_bytes, bank_bytes = m * p * 4, num_experts * p * 4
        needed = rows_bytes + 2 * bank_bytes  # rows once, bank read and written
        moved = needed + rows_bytes  # the verdict pass reads the rows again
        gbps = {"needed": needed / ms["fused_inplace"] / 1e6, "moved": moved / ms["fused_inplace"] / 1e6}
        out["configs"].append({
            "E": num_experts, "P": p, "M": m, "dtype": "float32", "ms": ms, "max_abs_diff": diffs,
            "fused_inplace_gbps": gbps,
            "fused_inplace_fraction_of_roof": {k: v / roof_gbps for k, v in gbps.items()},
            "ratios": {f"{b}_over_fused_inplace": ms[b] / ms["fused_inplace"] for b in BASELINES},
        })
    return out


# ---------------------------------------------------------------- main


def device_info(device: str) -> dict:
    import triton

    return machine_info(device=device, torch_threads=torch.get_num_threads(), torch=torch.__version__,
                        triton=triton.__version__)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small shapes (a smoke run)")
    parser.add_argument("--robust", action="store_true", help="only the robust statistics (CPU)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds on CPU")
    parser.add_argument("--out-dir", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--peak", choices=METHODS, help=argparse.SUPPRESS)  # child process of the memory run
    parser.add_argument("--shape", type=int, nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.peak:
        print(measure_peak(args.peak, tuple(args.shape)))
        return
    suffix = "_quick" if args.quick else ""
    threads = f"_threads{args.threads}" if args.threads else ""
    args.out_dir.mkdir(parents=True, exist_ok=True)
    report = {"machine": device_info(f"cpu: {cpu_model()}")}
    if args.robust:
        report["robust"] = robust_section(args.quick, max(3, args.rounds // 2))
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        path = args.out_dir / f"aggregate_robust_cpu{threads}{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")
        return
    report["cpu"] = cpu_section(args.quick, torch.get_num_threads(), args.rounds)
    report["short_rows"] = short_rows_section(args.quick, max(3, args.rounds // 2))
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    path = args.out_dir / f"aggregate_cpu{threads}{suffix}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    if torch.cuda.is_available():
        report = {"machine": device_info(torch.cuda.get_device_name())}
        report["gpu"] = gpu_section(args.quick)
        report["machine"]["load_average_at_end"] = list(os.getloadavg())
        path = args.out_dir / f"aggregate_gpu{suffix}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
