"""Validation check 3 of the paper (issue 9): stress tests.

* ``dropout``: 20% of the assigned clients drop out mid-round (``dropout_rate = 0.2``, tier drop-outs off)
  against none, for the four strategies.
* ``capacity``: self-reported capacities off by up to 30% (``capacity_error = 0.3``) with the
  deadline-aware strategy (the one that plans with round times): planning with the self-reports only
  (``profile_ema = 1``) against estimating from observed round times (``profile_ema`` 0.7 and 0.3), and an
  error-free reference, at the default 4 s deadline and a tight 2.5 s one. Per round: the share of
  assigned clients that missed the deadline or failed for memory, the client-expert pairs assigned, and
  the server's time-estimate error (median ``|log(estimated / true round time)|``).
* ``drift``: from round 20 half of the clients' labels shift; greedy and load-balanced without drift
  handling (``stale``), with the drift detector resetting a fired client's fitness row (``reset``,
  threshold 2; ``reset-t4``: threshold 4) or halving its deviation from the prior (``decay``, shrink 0.5);
  and without drift, with the detector off and on (its false alarms must not cost accuracy).

All on digits, Dirichlet(0.1), 20 clients (10 per round), 8 experts, heterogeneous tiers, 4 s deadline,
40 rounds, 3 seeds.

    python benchmarks/stress.py                    # all three parts (90 runs, ~25 min on 2 busy cores)
    python benchmarks/stress.py --parts drift      # one part; other parts already in the JSON are kept
    python benchmarks/stress.py --quick            # 1 seed x 8 rounds (drift at round 3)

Writes ``benchmarks/results/stress[_quick].json`` and PNGs ``stress[_quick]_<part>_*.png``; per-run JSONs
and checkpoints go to ``--work``.
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

from fedmoe.federated import FederatedConfig, compare_configs, rounds_to_target, summarize
from fedmoe.plots import plot_accuracy, plot_curves

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("dropout", "capacity", "drift")
_THRESHOLD = 2.0


def variants(part: str, base: FederatedConfig, drift_round: int) -> dict[str, FederatedConfig]:
    if part == "dropout":
        calm = base.replace(dropout=False)
        return {f"{s}{tag}": calm.replace(strategy=s, dropout_rate=rate)
                for s in ("random", "greedy", "load-balanced", "optimal") for tag, rate in (("", 0.0),
                                                                                            ("-drop20", 0.2))}
    if part == "capacity":
        out = {}
        for tag, deadline in (("", base.deadline), ("-2.5s", 2.5)):
            plan = base.replace(strategy="deadline-aware", deadline=deadline)
            out.update({f"exact{tag}": plan,
                        f"self-reported{tag}": plan.replace(capacity_error=0.3, profile_ema=1.0),
                        f"estimated{tag}": plan.replace(capacity_error=0.3, profile_ema=0.7),
                        f"estimated-fast{tag}": plan.replace(capacity_error=0.3, profile_ema=0.3)})
        return out
    out = {}
    for s in ("greedy", "load-balanced"):
        drifting = base.replace(strategy=s, drift_round=drift_round)
        out.update({f"{s}-stale": drifting, f"{s}-reset": drifting.replace(drift_threshold=_THRESHOLD),
                    f"{s}-decay": drifting.replace(drift_threshold=_THRESHOLD, drift_shrink=0.5),
                    f"{s}-nodrift": base.replace(strategy=s),
                    f"{s}-nodrift-detector": base.replace(strategy=s, drift_threshold=_THRESHOLD),
                    f"{s}-reset-t4": drifting.replace(drift_threshold=4.0),
                    f"{s}-nodrift-detector-t4": base.replace(strategy=s, drift_threshold=4.0)})
    return out


def share(record: dict, reason: str | None = None) -> float:
    """Share of the round's assigned clients that were late (``reason`` None) or dropped for ``reason``."""
    assigned = max(len(record["assigned"]), 1)
    if reason is None:
        return len(record["late"]) / assigned
    return sum(why == reason for why in record["dropped"].values()) / assigned


def mean_std(values) -> list:
    values = [v for v in values if v is not None]
    if not values:
        return [None, None]
    return [statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0]


def drift_figures(run: dict, drift_round: int) -> dict:
    """Accuracy before the drift (mean of the 3 rounds before), its lowest in the 5 rounds after, rounds
    after the drift until accuracy is back at the pre-drift level, detector resets before and after."""
    acc = [r["accuracy"] for r in run["rounds"]]
    before = statistics.fmean(acc[max(drift_round - 3, 0):drift_round])
    back = rounds_to_target(acc[drift_round:], before)
    resets = [len(r["drift_reset"]) for r in run["rounds"]]
    return {"pre_drift": before, "post_drift_min": min(acc[drift_round:drift_round + 5]), "recovery": back,
            "resets_before": sum(resets[:drift_round]), "resets_after": sum(resets[drift_round:])}


def part_report(part: str, results: dict[str, list[dict]], drift_round: int) -> dict:
    summary = summarize(results)
    table = {}
    for name, runs in results.items():
        rounds = [run["rounds"] for run in runs]
        row = {"final_accuracy": mean_std(summary[name]["final_accuracy"]),
               "last5": mean_std([statistics.fmean(r["accuracy"] for r in rs[-5:]) for rs in rounds]),
               "rounds_to_target": summary[name]["rounds_to_target"],
               "load_cv": mean_std(summary[name]["final_load_cv"])}
        if part == "dropout":
            row["dropped_share"] = mean_std([statistics.fmean(len(r["dropped"]) / max(len(r["assigned"]), 1)
                                                              for r in rs) for rs in rounds])
        if part == "capacity":
            for key, reason in (("late", None), ("out_of_memory", "out of memory")):
                per_round = np.array([[share(r, reason) for r in rs] for rs in rounds])
                row[f"{key}_first5"] = mean_std(per_round[:, :5].mean(1).tolist())
                row[f"{key}_last10"] = mean_std(per_round[:, -10:].mean(1).tolist())
            error = np.array([[r["time_error"] for r in rs] for rs in rounds])
            row["time_error_round"] = {str(k): mean_std(error[:, k - 1].tolist()) for k in (1, 5, 10, 20)
                                       if k <= error.shape[1]}
            row["time_error_final"] = mean_std(error[:, -1].tolist())
            pairs = np.array([[sum(map(len, r["assigned"].values())) for r in rs] for rs in rounds],
                             dtype=np.float64)
            row["pairs_first5"] = mean_std(pairs[:, :5].mean(1).tolist())
            row["pairs_last10"] = mean_std(pairs[:, -10:].mean(1).tolist())
        if part == "drift" and "nodrift" not in name:
            figures = [drift_figures(run, drift_round) for run in runs]
            row.update({key: [f[key] for f in figures] for key in figures[0]})
            row["recovered"] = f"{sum(f['recovery'] is not None for f in figures)}/{len(figures)}"
            error = np.array([[r["fitness_error"] or 0.0 for r in rs] for rs in rounds])
            before = error[:, max(drift_round - 5, 0):drift_round]
            row["fitness_error_before"] = mean_std(before.mean(1).tolist())
            row["fitness_error_after"] = mean_std(error[:, drift_round:drift_round + 5].mean(1).tolist())
        if part == "drift" and "nodrift" in name:
            row["resets"] = [sum(len(r["drift_reset"]) for r in rs) for rs in rounds]
        table[name] = row
    return table


def plot_part(part: str, results: dict[str, list[dict]], stem: str, drift_round: int, target: float) -> None:
    prefix = RESULTS / f"{stem}_{part}"
    if part == "dropout":
        plot_accuracy(results, f"{prefix}_accuracy.png", target=target,
                      title="20% of the assigned clients drop out per round (-drop20) vs none")
    elif part == "capacity":
        curves = {name: [[r["time_error"] for r in run["rounds"]] for run in runs]
                  for name, runs in results.items()}
        plot_curves(curves, f"{prefix}_time_error.png", ylabel="median |log(estimated / true round time)|",
                    title="Capacity estimates off by up to 30%: time-estimate error", legend="upper right")
        curves = {name: [[share(r) for r in run["rounds"]] for run in runs] for name, runs in results.items()}
        plot_curves(curves, f"{prefix}_late.png", ylabel="share of assigned clients past the deadline",
                    title="Capacity estimates off by up to 30%: deadline misses", legend="upper right")
        plot_accuracy(results, f"{prefix}_accuracy.png", target=target, title="Capacity error: accuracy")
    else:
        for strategy in ("greedy", "load-balanced"):
            mine = {k: v for k, v in results.items() if k.startswith(strategy + "-")}
            curves = {k: [[r["accuracy"] for r in run["rounds"]] for run in runs] for k, runs in mine.items()}
            plot_curves(curves, f"{prefix}_{strategy}_accuracy.png", ylabel="test accuracy",
                        vline=drift_round + 0.5, vline_label="drift",
                        title=f"{strategy}: half the clients' labels shift at round {drift_round + 1}")
        curves = {k: [[r["fitness_error"] or 0.0 for r in run["rounds"]] for run in runs]
                  for k, runs in results.items() if "nodrift" not in k}
        plot_curves(curves, f"{prefix}_fitness_error.png", ylabel="mean |feedback - fitness|",
                    vline=drift_round + 0.5, vline_label="drift", legend="upper right",
                    title="How stale the fitness is: error on the pairs trained each round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--drift-round", type=int, default=20, help="first round (0-based) with drifted data")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--work", type=Path, default=Path("/tmp/fedmoe_stress"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="1 seed x 8 rounds, drift at round 3")
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be among {list(PARTS)}, got {args.parts!r}")
    if args.quick:
        args.seeds, args.rounds, args.drift_round = 1, 8, 3
    if not 1 <= args.drift_round <= args.rounds - 5:
        parser.error("--drift-round must be >= 1 and leave 5 rounds after it")
    stem = "stress" + ("_quick" if args.quick else "")
    base = FederatedConfig(dirichlet_alpha=0.1, rounds=args.rounds, target_accuracy=args.target)
    seeds = list(range(args.seeds))
    out = RESULTS / f"{stem}.json"
    report = json.loads(out.read_text()) if out.exists() else {"parts": {}}
    report["environment"] = machine_info(torch=torch.__version__, workers=args.workers)
    for part in parts:
        start = time.perf_counter()
        configs = variants(part, base, args.drift_round)
        results = compare_configs(configs, seeds, args.work / stem / part, workers=args.workers,
                                  resume=args.resume)
        table = part_report(part, results, args.drift_round)
        report["parts"][part] = {"configs": {k: c.to_dict() for k, c in configs.items()}, "seeds": seeds,
                                 "drift_round": args.drift_round, "results": table,
                                 "wall_seconds": time.perf_counter() - start}
        plot_part(part, results, stem, args.drift_round, args.target)
        print(f"\n== {part} ==")
        for name, row in table.items():
            print(f"  {name:<28}" + "  ".join(f"{k} {v}" for k, v in row.items() if k != "rounds_to_target"))
        out.write_text(json.dumps(report, indent=1))
    print(f"-> {out}")


if __name__ == "__main__":
    main()
