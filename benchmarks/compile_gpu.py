"""GPU code generation of the fedmoe_kernels Triton kernels, checked without a GPU (docs/codegen.md).

Every configuration the launchers choose (``kernel_cases.grid()``: every dtype, flag, mode, top-k, tile and
alignment class, histogram size up to E = 4,096 and sort size) is compiled for sm_90a and sm_80 as Triton's
JIT would compile it (``codegen``), and read back: one record per (kernel, configuration, arch) with

* ``registers``, ``spill_stores``, ``spill_loads`` (bytes; ptxas -v) and ``shared_bytes`` (Triton's dynamic
  shared memory plus ptxas' static);
* ``global_access_bits``: the widest global load or store of the kernel's hot loop (the ``tl.load`` /
  ``tl.store`` of its data rows, ``kernel_cases.HOT``; for the route kernels, all of them), with
  ``hot_accesses`` (the narrowest instruction of each hot access, from the PTX), ``expected_bits`` (how
  wide each can be) and ``limited_by`` (what bounds it below 128 bits: the row alignment, the tile, a
  column stride), and the widths found in the SASS (``LDG.E.128`` ...; ``ptx_widths_match_sass``: the
  same set of widths, so that the PTX's attribution of widths to accesses holds for the SASS);
* ``bytes_moved`` per launch at the stated ``shape`` and ``h100_us``, the time that takes at the H100 SXM's
  HBM3 bandwidth (3.35 TB/s; ``gpu_check.sh`` measures the copy roof on the GPU itself).

    python benchmarks/compile_gpu.py [--quick] [--workers 2] [--out benchmarks/results/compile_gpu.json]
    python benchmarks/compile_gpu.py --check-coverage [--samples 400]
    python benchmarks/compile_gpu.py --tables benchmarks/results/compile_gpu.json   # docs/codegen.md's

Exits 1 if a configuration does not compile, spills or has a hot access narrower than its alignment and
tile allow (``--check-coverage``: if the ops' input domain reaches a configuration value the grid lacks).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
import warnings
from collections import defaultdict
from pathlib import Path

import codegen
import kernel_cases
import torch
import triton
from machine import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
H100_BYTES_PER_S = 3.35e12  # H100 SXM5, HBM3 peak
# Triton 3.9 warns that the default of fp fusion changes in 3.10; the JIT default (on) is what is compiled
warnings.filterwarnings("ignore", message="TRITON_DEFAULT_FP_FUSION")


def unique_launches(cases) -> list[tuple[codegen.Launch, kernel_cases.Case, set[str]]]:
    """One (launch, first case, ops that make it) per distinct configuration the cases launch."""
    found: dict[tuple, tuple] = {}
    for case in cases:
        for launch in codegen.record(case.module, case.call):
            key = codegen.config_key(launch, "sm_90a")  # the binder specialises alike for every arch
            found.setdefault(key, (launch, case, set()))[2].add(case.shape.get("mode", case.op))
    return list(found.values())


def make_record(launch: codegen.Launch, case: kernel_cases.Case, ops: set[str], arch: str) -> dict:
    """The record of ``launch`` (first made by ``case``; ``ops`` make it) compiled for ``arch``."""
    c = codegen.compile_launch(launch, arch)
    config = codegen.describe(launch, arch)
    hot = kernel_cases.HOT.get(launch.name)
    widths: dict[str, int] = {}
    for kind, pointers, bits in c.ptx:
        for pointer in pointers:
            key = f"{pointer} {kind}"
            widths[key] = min(bits, widths.get(key, bits))
    hot_widths = {k: b for k, b in widths.items() if hot is None or k.split()[0] in hot}
    if not hot_widths:
        raise RuntimeError(f"{launch.name}: no global access of its hot loop found in the PTX")
    warps = config["num_warps"]
    expected = {k: kernel_cases.expected_bits(launch.name, k.split()[0], launch.arguments, warps)
                for k in hot_widths} if hot else {}
    missed = [f"{k}: {b} bits where {expected[k][0]} are possible" for k, b in hot_widths.items()
              if b < expected.get(k, (0,))[0]]
    if c.spill_stores or c.spill_loads:
        missed.append(f"spills {c.spill_stores} B stored, {c.spill_loads} B loaded")
    moved = kernel_cases.bytes_moved(launch.name, launch.arguments, launch.grid)
    sass = defaultdict(set)
    for op, bits in c.sass:
        sass[op].add(bits)
    return {
        "kernel": launch.name,
        "ops": sorted(ops),
        "arch": arch,
        "config": config,
        "registers": c.registers,
        "spill_stores": c.spill_stores,
        "spill_loads": c.spill_loads,
        "shared_bytes": c.shared_bytes,
        "global_access_bits": max(hot_widths.values()),
        "hot_accesses": hot_widths,
        "expected_bits": {k: bits for k, (bits, _) in expected.items()},
        "limited_by": {k: limit for k, (bits, limit) in expected.items() if bits < 128},
        "sass_access_bits": {op: sorted(bits) for op, bits in sorted(sass.items())},
        "ptx_widths_match_sass": {b for *_, b in c.ptx} == {b for _, b in c.sass},
        "missed": missed,
        "shape": case.shape,
        "grid": list(launch.grid),
        "bytes_moved": moved,
        "h100_us": round(moved / H100_BYTES_PER_S * 1e6, 3),
    }


_TASKS: list = []  # (launch, case, ops, arch), set before the worker processes fork


def _compile(index: int) -> dict:
    launch, case, ops, arch = _TASKS[index]
    try:
        return make_record(launch, case, ops, arch)
    except Exception as error:  # a configuration that does not compile is a result, recorded
        return {"kernel": launch.name, "arch": arch, "config": codegen.describe(launch, arch),
                "shape": case.shape, "error": f"{type(error).__name__}: {error}"[:2000]}


def compile_all(cases, workers: int) -> list[dict]:
    launches = unique_launches(cases)
    _TASKS[:] = [(*entry, arch) for entry in launches for arch in codegen.ARCHS]
    print(f"{len(launches)} configurations x {len(codegen.ARCHS)} archs", flush=True)
    records, start = [], time.time()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for i, record in enumerate(pool.imap(_compile, range(len(_TASKS)), chunksize=4), 1):
            records.append(record)
            if i % 200 == 0:
                print(f"  {i}/{len(_TASKS)} compiled, {time.time() - start:.0f} s", flush=True)
    return records


def summary(records: list[dict]) -> list[dict]:
    """Per (kernel, arch): configurations, the most registers and shared memory, spills, access widths."""
    groups = defaultdict(list)
    for r in records:
        groups[(r["kernel"], r["arch"])].append(r)
    rows = []
    for (kernel, arch), group in groups.items():
        ok = [r for r in group if "error" not in r]
        rows.append({
            "kernel": kernel, "arch": arch, "configs": len(group), "errors": len(group) - len(ok),
            "max_registers": max((r["registers"] for r in ok), default=None),
            "spill_bytes": sum(r["spill_stores"] + r["spill_loads"] for r in ok),
            "max_shared_bytes": max((r["shared_bytes"] for r in ok), default=None),
            "global_access_bits": sorted({r["global_access_bits"] for r in ok}),
            "narrowest_hot_bits": sorted({min(r["hot_accesses"].values()) for r in ok}),
            "missed": sum(bool(r["missed"]) for r in ok),
        })
    return rows


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def print_summary(rows: list[dict]) -> None:
    print(f"{'kernel':<25}{'arch':<8}{'configs':>8}{'errors':>7}{'max regs':>9}{'spill B':>8}{'max smem':>9}"
          f"  {'widest':<16}{'narrowest':<16}missed")
    for r in rows:
        widest, narrowest = (",".join(map(str, r[k])) for k in ("global_access_bits", "narrowest_hot_bits"))
        regs, shared = _or_dash(r["max_registers"]), _or_dash(r["max_shared_bytes"])
        print(f"{r['kernel']:<25}{r['arch']:<8}{r['configs']:>8}{r['errors']:>7}{regs:>9}"
              f"{r['spill_bytes']:>8}{shared:>9}  {widest:<16}{narrowest:<16}{r['missed']}")


def write(results: dict, path: Path) -> None:
    """The JSON, one record per line (a few thousand records)."""
    records = results.pop("records")
    head = json.dumps(results, indent=2)[:-2]
    lines = ",\n".join("    " + json.dumps(r, separators=(",", ":")) for r in records)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'{head},\n  "records": [\n{lines}\n  ]\n}}\n')
    print(f"wrote {path}")


def tables(path: Path) -> str:
    """The docs' tables (markdown) of a compile_gpu.json: per kernel and arch over every configuration, and
    the launches of each op at the headline shapes (``kernel_cases.headlines()``)."""
    data = json.loads(path.read_text())
    bandwidth = data["bandwidth_bytes_per_s"]
    out = ["| kernel | arch | configs | registers (max) | spills (B) | shared memory (max B) | hot access "
           "bits (widest; narrowest) | narrower than possible |", "|---|---|---|---|---|---|---|---|"]
    for r in data["summary"]:
        bits = "; ".join(", ".join(map(str, r[k])) for k in ("global_access_bits", "narrowest_hot_bits"))
        out.append(f"| `{r['kernel']}` | {r['arch']} | {r['configs']} | {r['max_registers']} | "
                   f"{r['spill_bytes']} | {r['max_shared_bytes']:,} | {bits} | {r['missed']} |")
    records = {(r["kernel"], r["arch"], json.dumps(r["config"], sort_keys=True)): r
               for r in data["records"] if "error" not in r}
    out += ["", "| op | kernel | registers sm_90a / sm_80 | spills | shared B | hot accesses (bits) | bytes "
            f"moved | time at {bandwidth / 1e12:.2f} TB/s |", "|---|---|---|---|---|---|---|---|"]
    for label, case in kernel_cases.headlines():
        for i, launch in enumerate(codegen.record(case.module, case.call)):
            config = json.dumps(codegen.describe(launch, "sm_90a"), sort_keys=True)
            keys = [(launch.name, arch, config) for arch in codegen.ARCHS]
            if not all(key in records for key in keys):
                raise SystemExit(f"{path} lacks {launch.name} {config}: run compile_gpu.py without --quick")
            hopper, ampere = (records[key] for key in keys)
            moved = kernel_cases.bytes_moved(launch.name, launch.arguments, launch.grid)
            spills = sum(r["spill_stores"] + r["spill_loads"] for r in (hopper, ampere))
            accesses = ", ".join(f"{k.replace('_ptr', '')} {b}" for k, b in hopper["hot_accesses"].items())
            out.append(f"| {label if i == 0 else ''} | `{launch.name}` | {hopper['registers']} / "
                       f"{ampere['registers']} | {spills} | {hopper['shared_bytes']:,} | {accesses} | "
                       f"{moved / 1e6:,.1f} MB | {moved / bandwidth * 1e6:,.1f} µs |")
    return "\n".join(out)


def projection(cases) -> set[tuple[str, str, str]]:
    """(kernel, parameter, value) of every constexpr, specialised argument type and launch option that
    the cases' launches give."""
    values = set()
    for case in cases:
        for launch in codegen.record(case.module, case.call):
            config = codegen.describe(launch, "sm_90a")
            values |= {(launch.name, k, v) for k, v in config.pop("types").items()}
            values |= {(launch.name, k, repr(v)) for k, v in config.items()}
    return values


def check_coverage(samples: int) -> int:
    gaps = sorted(projection(kernel_cases.domain(samples)) - projection(kernel_cases.grid()))
    for gap in gaps:
        print("not in the grid:", *gap)
    print(f"coverage: {len(gaps)} value(s) of the input domain missing from the grid ({samples} samples)")
    return 1 if gaps else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a few configurations (the test suite's)")
    parser.add_argument("--workers", type=int, default=2, help="compile processes")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/compile_gpu[_quick].json")
    parser.add_argument("--check-coverage", action="store_true",
                        help="only check that the grid holds every value sampled from the input domain")
    parser.add_argument("--samples", type=int, default=400, help="--check-coverage: draws per op")
    parser.add_argument("--tables", type=Path, metavar="JSON", help="print the docs' tables of a result")
    args = parser.parse_args()
    if args.check_coverage:
        return check_coverage(args.samples)
    if args.tables:
        print(tables(args.tables))
        return 0
    start = time.time()
    records = compile_all(kernel_cases.quick() if args.quick else kernel_cases.grid(), args.workers)
    rows = summary(records)
    print_summary(rows)
    results = {
        "machine": machine_info(torch=torch.__version__, triton=triton.__version__,
                                ptxas={arch: codegen.ptxas_version(arch) for arch in codegen.ARCHS}),
        "archs": list(codegen.ARCHS),
        "bandwidth_bytes_per_s": H100_BYTES_PER_S,
        "seconds": round(time.time() - start, 1),
        "summary": rows,
        "records": records,
    }
    write(results, args.out or RESULTS / f"compile_gpu{'_quick' if args.quick else ''}.json")
    failed = [r for r in records if "error" in r or r["missed"]]
    for r in failed:
        print("FAILED", r["kernel"], r["arch"], r.get("error") or r["missed"], json.dumps(r["shape"]))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
