"""Validation check 2 of the paper: sensitivity of load-balanced alignment to the fitness EMA
factor (0.7-0.99), the desirability weights (fitness/load 0.3/0.7 to 0.7/0.3) and the capacity safety
margin (10-50%), as a full grid over seeds (``fedmoe sweep`` with a fixed grid).

Setup: digits, Dirichlet(0.1), 20 clients (10 per round), 8 experts, heterogeneous tiers, 4 s deadline,
drop-outs, 30 rounds, target accuracy 0.7, and self-reported capacities off by up to 30%
(``simulation.profile_error = 0.3``), so that the safety margin has something to protect against: a client
given more experts than its true memory holds fails the round.

    python benchmarks/sensitivity.py             # 3 x 3 x 3 grid x 3 seeds (81 runs, ~4 min on 2 workers)
    python benchmarks/sensitivity.py --quick     # 2 x 2 x 2 grid x 1 seed x 4 rounds

The same sweep from the command line::

    fedmoe sweep --data.dirichlet_alpha 0.1 --federation.rounds 30 --evaluation.target_accuracy 0.7 \\
        --simulation.profile_error 0.3 --seeds 3 \\
        --grid fitness.ema=0.7,0.9,0.99 \\
        --grid alignment.desirability.alpha/alignment.desirability.beta=0.3/0.7,0.5/0.5,0.7/0.3 \\
        --grid profiles.safety_margin=0.1,0.3,0.5

Writes ``benchmarks/results/sensitivity[_quick].json`` (the sweep summary plus the environment),
``sensitivity[_quick]_table.txt`` and ``sensitivity[_quick]_<metric>.png`` heatmaps; runs go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from machine import machine_info
from seeds import add_run_arguments

from fedmoe.federated import FederatedConfig
from fedmoe.federated.sweep import METRICS, format_sweep, parse_axis, run_sweep
from fedmoe.plots import plot_sweep

RESULTS = Path(__file__).resolve().parent / "results"
_WEIGHTS = "alignment.desirability.alpha/alignment.desirability.beta"
GRID = ("fitness.ema=0.7,0.9,0.99", f"{_WEIGHTS}=0.3/0.7,0.5/0.5,0.7/0.3",
        "profiles.safety_margin=0.1,0.3,0.5")
QUICK_GRID = ("fitness.ema=0.7,0.99", f"{_WEIGHTS}=0.3/0.7,0.7/0.3", "profiles.safety_margin=0.1,0.5")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds=3, rounds=30, work="/tmp/fedmoe_sensitivity",
                      quick="2 x 2 x 2 grid, 1 seed, 4 rounds")
    args = parser.parse_args()
    grid = QUICK_GRID if args.quick else GRID
    if args.quick:
        args.seeds, args.rounds = 1, 4
    stem = "sensitivity" + ("_quick" if args.quick else "")
    base = FederatedConfig.from_dict({"data": {"dirichlet_alpha": 0.1}, "federation": {"rounds": args.rounds},
                                      "alignment": {"strategy": "load-balanced"},
                                      "simulation": {"profile_error": 0.3},
                                      "evaluation": {"target_accuracy": 0.7}})
    start = time.perf_counter()
    summary = run_sweep(base, [parse_axis(a) for a in grid], range(args.seeds), args.work / stem,
                        workers=args.workers, resume=args.resume)
    table = format_sweep(summary)
    print(table)
    (RESULTS / f"{stem}_table.txt").write_text(table + "\n")
    for metric, (label, _) in METRICS.items():
        plot_sweep(summary, metric, RESULTS / f"{stem}_{metric}.png", label=label)
    report = {"check": "sensitivity: fitness EMA x desirability weights x safety margin", "grid": list(grid),
              "environment": machine_info(torch=torch.__version__, workers=args.workers),
              "wall_seconds": time.perf_counter() - start, **summary}
    out = RESULTS / f"{stem}.json"
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{report['wall_seconds']:.0f} s -> {out}")


if __name__ == "__main__":
    main()
