"""Poisoning drills: 10% of the replies come back poisoned (``simulation.poison = 0.1``) in each
``simulation.poison_mode`` (scale, sign-flip, inflate-samples), against the clean run of the same seed.

Arms: the defaults (``[aggregation]``: mean, deltas above 10x the round's median norm rejected), the plain
mean (``norm_bound = 0``; sample counts are still capped at what each client registered), clipping instead
of rejecting (``norm_action = "clip"``), and a control in which the same share of replies is lost without
any attack (``simulation.dropout_rate = 0.1``): what losing those clients' data costs by itself. The
default ``fedmoe run`` setting otherwise: digits, Dirichlet(0.5), 20 clients (10 per round), 8 experts,
heterogeneous tiers, 4 s deadline, 30 rounds.

    python benchmarks/poisoning.py              # 5 seeds: 55 runs, 2.5 minutes on 2 idle cores
    python benchmarks/poisoning.py --quick      # 1 seed x 8 rounds

Writes ``benchmarks/results/poisoning[_quick].json``: per arm and seed the final accuracy, the mean of the
last 5 rounds and the replies left out as invalid, and per arm the gap to the clean run, paired by seed.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import machine_info
from seeds import add_run_arguments, mean_std

from fedmoe.federated import FederatedConfig, compare_configs
from fedmoe.federated.simulation import POISON_MODES

RESULTS = Path(__file__).resolve().parent / "results"


def arms() -> dict[str, dict]:
    """Arm name -> options changed from the defaults."""
    out = {"clean": {}, "lost-replies": {"simulation.dropout_rate": 0.1}}
    for mode in POISON_MODES:
        attack = {"simulation.poison": 0.1, "simulation.poison_mode": mode}
        out[f"{mode}"] = attack
        out[f"{mode}-plain-mean"] = {**attack, "aggregation.norm_bound": 0}
        out[f"{mode}-clip"] = {**attack, "aggregation.norm_action": "clip"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_run_arguments(parser, seeds=5, rounds=30, work="fedmoe_out/poisoning", quick="1 seed x 8 rounds")
    args = parser.parse_args()
    seeds, rounds = (1, 8) if args.quick else (args.seeds, args.rounds)
    base = FederatedConfig().replace({"federation.rounds": rounds})
    variants = {name: base.replace(changes) for name, changes in arms().items()}
    start = time.perf_counter()
    results = compare_configs(variants, range(seeds), args.work, workers=args.workers, resume=args.resume)
    table = {}
    for name, runs in results.items():
        final = [r["final_accuracy"] for r in runs]
        last5 = [sum(x["accuracy"] for x in r["rounds"][-5:]) / 5 for r in runs]
        gap = [f - c["final_accuracy"] for f, c in zip(final, results["clean"], strict=True)]
        table[name] = {"final_accuracy": final, "last5_accuracy": last5, "gap_to_clean": gap,
                       "invalid": [sum(len(x["invalid"]) for x in r["rounds"]) for r in runs],
                       "final_mean_std": mean_std(final), "gap_mean_std": mean_std(gap),
                       "max_abs_gap": max(abs(g) for g in gap)}
        print(f"{name:28s} final {mean_std(final)[0]:.3f}  gap {mean_std(gap)[0]:+.3f} "
              f"(max |gap| {table[name]['max_abs_gap']:.3f})  invalid {table[name]['invalid']}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"poisoning{'_quick' if args.quick else ''}.json"
    out.write_text(json.dumps({"machine": machine_info(), "seeds": seeds, "rounds": rounds,
                               "arms": arms(), "results": table,
                               "wall_seconds": time.perf_counter() - start}, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
