"""Validation check 1 of the paper: end to end, Dirichlet(0.1) non-IID, random vs greedy vs
load-balanced vs optimal alignment: final accuracy, rounds to the target, per-expert usage over rounds.

Scenarios (each: 10 clients per round, 8 experts, heterogeneous tiers, 4 s deadline, drop-outs):
``clients20`` (20 clients) and ``clients50`` (50 clients: each holds ~29 digits on average, some only 2,
and takes part in a fifth of the rounds).

    python benchmarks/end_to_end.py                          # digits, 3 seeds x 50 rounds, both scenarios
    python benchmarks/end_to_end.py --data my.npz --tag npz  # any .npz, or a CIFAR-10 python directory
    python benchmarks/end_to_end.py --quick                  # 2 seeds x 8 rounds, 20 clients

Writes ``benchmarks/results/end_to_end[_<tag>].json`` (per scenario and strategy: per-seed final accuracy,
last-5 accuracy, rounds to target, final load CV, per-expert share of routed training samples per round,
and the accuracy curves) and per scenario ``..._<scenario>_accuracy.png`` and ``..._<scenario>_usage.png``
(per-expert usage over rounds, seed 0). Per-run JSONs and checkpoints go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info

from fedmoe.federated import FederatedConfig, compare_strategies, format_table, summarize
from fedmoe.plots import plot_accuracy, plot_load_heatmap

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("random", "greedy", "load-balanced", "optimal")
# Dirichlet(0.1) over 50 clients cannot give each 8 of the 1,437 training digits: min_samples 2 there
SCENARIOS = {"clients20": {"federation.num_clients": 20},
             "clients50": {"federation.num_clients": 50, "data.min_samples": 2}}


def expert_usage(run: dict) -> list[list[float]]:
    """Per round, each expert's share of the routed training samples of the accepted replies."""
    samples = np.array([r["expert_samples"] for r in run["rounds"]], dtype=np.float64)
    return (samples / np.maximum(samples.sum(1, keepdims=True), 1)).round(4).tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default="digits", help="digits, an .npz file or a CIFAR-10 directory")
    parser.add_argument("--tag", default="", help="suffix of the output files (e.g. npz, cifar10)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help=f"comma-separated, of {list(SCENARIOS)}")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedmoe_end_to_end"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2 seeds x 8 rounds, clients20 only")
    args = parser.parse_args()
    names = ["clients20"] if args.quick else args.scenarios.split(",")
    if not set(names) <= set(SCENARIOS):
        parser.error(f"--scenarios must be among {list(SCENARIOS)}, got {args.scenarios!r}")
    if args.quick:
        args.seeds, args.rounds = 2, 8
    stem = "end_to_end" + (f"_{args.tag}" if args.tag else "") + ("_quick" if args.quick else "")
    base = FederatedConfig.from_dict({"data": {"source": args.data, "dirichlet_alpha": 0.1},
                                      "federation": {"rounds": args.rounds, "clients_per_round": 10},
                                      "model": {"num_experts": 8},
                                      "evaluation": {"target_accuracy": args.target}})
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    report = {"check": "end to end: Dirichlet(0.1), random vs greedy vs load-balanced vs optimal",
              "environment": machine_info(torch=torch.__version__, workers=args.workers), "scenarios": {}}
    for name in names:
        config = base.replace(SCENARIOS[name])
        results = compare_strategies(config, STRATEGIES, seeds, args.work / stem / name, workers=args.workers,
                                     resume=args.resume)
        summary = summarize(results)
        print(f"\n== {name}: {config.data.source}, {config.federation.num_clients} clients, "
              f"{config.federation.rounds} rounds ==")
        print(format_table(summary, args.target))
        scenario = {"config": config.to_dict(), "seeds": seeds, "summary": summary, "strategies": {}}
        for strategy, runs in results.items():
            scenario["strategies"][strategy] = {
                "last5": [statistics.fmean(r["accuracy"] for r in run["rounds"][-5:]) for run in runs],
                "curves": [[r["accuracy"] for r in run["rounds"]] for run in runs],
                "expert_usage_seed0": expert_usage(runs[0]),
                "run_seconds": [run["wall_seconds"] for run in runs],
            }
        report["scenarios"][name] = scenario
        plot_accuracy(results, RESULTS / f"{stem}_{name}_accuracy.png", target=args.target,
                      title=f"{name}: test accuracy (min-max band, {len(seeds)} seeds)")
        plot_load_heatmap({s: runs[0] for s, runs in results.items()}, RESULTS / f"{stem}_{name}_usage.png",
                          title=f"{name}, seed 0")
    report["wall_seconds"] = time.perf_counter() - start
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['wall_seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
