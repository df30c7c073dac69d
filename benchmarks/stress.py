"""Validation check 3 of the paper: stress tests.

* ``dropout``: 20% of the assigned clients drop out mid-round (``simulation.dropout_rate = 0.2``, tier
  drop-outs off) against none, for the four strategies.
* ``capacity``: self-reported capacities off by up to 30% (``simulation.profile_error = 0.3``) with the
  deadline-aware strategy (the one that plans with round times): planning with the self-reports only
  (``profiles.ema = 1``) against estimating from observed round times (``profiles.ema`` 0.7 and 0.3), and an
  error-free reference, at the default 4 s deadline and a tight 2.5 s one. Per round: the share of
  assigned clients that missed the deadline or failed for memory, the client-expert pairs assigned, and
  the server's time-estimate error (median ``|log(estimated / true round time)|``).
* ``drift``: a setting where alignment decides accuracy (see below; docs/experiments/stress.md ran with the
  former defaults, ``fitness.signal = "after"``: with today's default the rows follow the gate affinity
  and the detector compares against it): from round 20 half of the clients
  move to a disjoint label set (where one exists). Greedy and load-balanced, each without drift
  (``nodrift``), with drift and no handling (``stale``), with the drift detector (on the feedback measured
  before local training, threshold 2) resetting a fired client's fitness row to its prior (``shrink``), and
  with the detector re-scoring the fired row from the gate affinity the client sends with its update
  (``rescore``: every expert, held or not, on its current data); and random alignment under drift (no
  fitness at all). Per run, for the global accuracy (all experts allowed) and for ``aligned_accuracy``
  (each client with only the experts it was given, on its own label mix): the level before the drift, the
  mean over the rounds from it, the lowest in the 5 rounds after it and the rounds until the pre-drift
  level is reached again; the detector's firing rate per report before the drift and, after it, for
  drifted and other clients; arms paired by seed with ``stale`` (and ``stale`` with ``nodrift``: what
  drift costs).

Dropout and capacity: digits, Dirichlet(0.1), 20 clients (10 per round), 8 experts (top-2), heterogeneous
tiers, 4 s deadline. Drift: the same but 16 experts with top-1 routing, at most 2 experts per client, all
20 clients every round, 2 local epochs, no deadline and no tier drop-outs, so that each client's assigned
experts decide what it scores. 40 rounds, 3 seeds.

    python benchmarks/stress.py                    # all three parts (75 runs)
    python benchmarks/stress.py --parts drift --workers 1   # 27 runs, 14 min on 1 busy core; other parts kept
    python benchmarks/stress.py --quick            # 1 seed x 8 rounds (drift at round 3)

Writes ``benchmarks/results/stress[_quick].json`` and PNGs ``stress[_quick]_<part>_*.png``; per-run JSONs
and checkpoints go to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from machine import machine_info
from seeds import add_run_arguments, mean_std

from fedmoe.federated import (
    FederatedConfig,
    FederatedRun,
    compare_configs,
    load_checkpoint,
    rounds_to_target,
    summarize,
)
from fedmoe.plots import plot_accuracy, plot_curves

RESULTS = Path(__file__).resolve().parent / "results"
PARTS = ("dropout", "capacity", "drift")
_THRESHOLD = 2.0
_WINDOW = 5  # rounds after the drift in which a detection counts


def variants(part: str, base: FederatedConfig, drift_round: int) -> dict[str, FederatedConfig]:
    if part == "dropout":
        calm = base.replace({"simulation.dropout": False})
        return {f"{s}{tag}": calm.replace({"alignment.strategy": s, "simulation.dropout_rate": rate})
                for s in ("random", "greedy", "load-balanced", "optimal") for tag, rate in (("", 0.0),
                                                                                            ("-drop20", 0.2))}
    if part == "capacity":
        out = {}
        for tag, deadline in (("", base.federation.deadline), ("-2.5s", 2.5)):
            plan = base.replace({"alignment.strategy": "deadline-aware", "federation.deadline": deadline})
            off = {"simulation.profile_error": 0.3}
            out.update({f"exact{tag}": plan,
                        f"self-reported{tag}": plan.replace({**off, "profiles.ema": 1.0}),
                        f"estimated{tag}": plan.replace({**off, "profiles.ema": 0.7}),
                        f"estimated-fast{tag}": plan.replace({**off, "profiles.ema": 0.3})})
        return out
    drift = base.replace({"model.num_experts": 16, "model.top_k": 1, "alignment.max_experts": 2,
                          "train.epochs": 2, "federation.clients_per_round": 0, "federation.deadline": None,
                          "simulation.dropout": False, "evaluation.aligned": True})
    out = {}
    for s in ("greedy", "load-balanced"):
        stale = drift.replace({"alignment.strategy": s, "simulation.drift_round": drift_round})
        out.update({f"{s}-nodrift": drift.replace({"alignment.strategy": s}), f"{s}-stale": stale,
                    f"{s}-shrink": stale.replace({"drift.threshold": _THRESHOLD}),
                    f"{s}-rescore": stale.replace({"drift.threshold": _THRESHOLD, "drift.rescore": True})})
    out["random-drift"] = drift.replace({"alignment.strategy": "random",
                                         "simulation.drift_round": drift_round})
    return out


def baseline(name: str) -> str | None:
    """The drift arm that ``name`` is paired with: drift handling with no handling (same strategy and
    seed), no handling with no drift (what drift costs); None for the others."""
    head, _, variant = name.rpartition("-")
    return {"shrink": f"{head}-stale", "rescore": f"{head}-stale", "stale": f"{head}-nodrift"}.get(variant)


def share(record: dict, reason: str | None = None) -> float:
    """Share of the round's assigned clients that were late (``reason`` None) or dropped for ``reason``."""
    assigned = max(len(record["assigned"]), 1)
    if reason is None:
        return len(record["late"]) / assigned
    return sum(why == reason for why in record["dropped"].values()) / assigned


def drift_figures(run: dict, drift_round: int) -> dict:
    """For the global ``accuracy`` and, where recorded, ``aligned_accuracy`` (key prefix ``aligned_``): the
    level before the drift (mean of the 3 rounds before), the mean over the rounds from the drift on, the
    lowest in the ``_WINDOW`` rounds after, the rounds after the drift until the pre-drift level is reached
    again (None if never); the detector's resets per report (accepted client) before the drift and, in the
    ``_WINDOW`` rounds from it, of the drifted and of the other clients (None where no such report), and
    the share of resets that were re-scores."""
    rounds = run["rounds"]
    drifted = set(run["clients"]["drifted"])
    after = drift_round + _WINDOW
    out = {}
    for prefix, key in (("", "accuracy"), ("aligned_", "aligned_accuracy")):
        if any(r.get(key) is None for r in rounds):
            continue
        acc = [r[key] for r in rounds]
        before = statistics.fmean(acc[max(drift_round - 3, 0):drift_round])
        out.update({f"{prefix}pre_drift": before, f"{prefix}after_drift": statistics.fmean(acc[drift_round:]),
                    f"{prefix}post_drift_min": min(acc[drift_round:after]),
                    f"{prefix}recovery": rounds_to_target(acc[drift_round:], before)})

    def rate(lo: int, hi: int, clients) -> float | None:
        reports = sum(c in clients for r in rounds[lo:hi] for c in r["accepted"])
        fired = sum(c in clients for r in rounds[lo:hi] for c in r["drift_reset"])
        return fired / reports if reports else None

    everyone = range(len(run["clients"]["samples"]))
    resets = sum(len(r["drift_reset"]) for r in rounds)
    rescored = sum(len(r.get("drift_rescored", [])) for r in rounds)
    return {**out, "fire_rate_before": rate(0, drift_round, everyone),
            "fire_rate_drifted": rate(drift_round, after, drifted),
            "fire_rate_other": rate(drift_round, after, set(everyone) - drifted),
            "rescored_share": rescored / resets if resets else None}


@torch.no_grad()
def expert_shift(config: FederatedConfig, checkpoint: Path) -> dict:
    """At the end of a drifting run (its checkpoint): the accuracy of every single expert (the gate masked
    to it) on each drifted client's data before and after the drift. Returns, over the drifted clients, the
    mean spread of that accuracy across experts, the share whose best expert changed, the mean correlation
    of the per-expert accuracies before and after, and the mean accuracy before and after."""
    run = FederatedRun(config)
    run.load_state_dict(load_checkpoint(checkpoint))
    model, sim, e = run.server.model, run.simulation, config.model.num_experts
    model.eval()
    acc = np.empty((2, len(sim.drifted), e))
    for i, client in enumerate(sorted(sim.drifted)):
        for t, round_ in enumerate((0, config.simulation.drift_round)):
            data = sim.data(client, round_)
            x, y = data.inputs, data.targets
            for j in range(e):
                model.set_expert_mask(torch.arange(e) == j)
                acc[t, i, j] = float((model(x)[0].argmax(1) == y).double().mean())
    model.set_expert_mask(None)
    corr = [np.corrcoef(old, new)[0, 1] for old, new in zip(*acc, strict=True)]
    return {"spread": float(np.ptp(acc, axis=2).mean()), "best_changed": float(np.mean(
        acc[0].argmax(1) != acc[1].argmax(1))), "correlation": float(np.nanmean(corr)),
        "accuracy_before": float(acc[0].mean()), "accuracy_after": float(acc[1].mean())}


def part_report(part: str, results: dict[str, list[dict]], drift_round: int, run_dir: Path) -> dict:
    """Per variant, mean ± std over seeds of the part's figures; drift arms are paired with their
    :func:`baseline` by seed, and stale ones get :func:`expert_shift` from their checkpoints in
    ``run_dir``."""
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
        if part == "drift":
            figures = [drift_figures(run, drift_round) for run in runs]
            row.update({key: [f[key] for f in figures] for key in figures[0]})
            for prefix in ("", "aligned_"):
                if f"{prefix}after_drift" in row:
                    row[f"{prefix}after_drift_mean"] = mean_std(row[f"{prefix}after_drift"])
                    row[f"{prefix}dip_mean"] = mean_std(np.subtract(row[f"{prefix}pre_drift"],
                                                                    row[f"{prefix}post_drift_min"]).tolist())
                    known = [r for r in row[f"{prefix}recovery"] if r is not None]
                    row[f"{prefix}recovered"] = f"{len(known)}/{len(figures)}"
                    row[f"{prefix}recovery_mean"] = mean_std(known)
            row["aligned_last5"] = mean_std([statistics.fmean(r["aligned_accuracy"] for r in rs[-5:])
                                             for rs in rounds]) if "aligned_after_drift" in row else None
            error = np.array([[r["fitness_error"] or 0.0 for r in rs] for rs in rounds])
            before = error[:, max(drift_round - 5, 0):drift_round]
            row["fitness_error_before"] = mean_std(before.mean(1).tolist())
            row["fitness_error_after"] = mean_std(error[:, drift_round:drift_round + 5].mean(1).tolist())
            if name.endswith("-stale"):
                shifts = [expert_shift(FederatedConfig.from_dict(run["config"]),
                                       run_dir / f"{name}-seed{run['config']['federation']['seed']}.pt")
                          for run in runs]
                row["expert_shift"] = {k: mean_std([s[k] for s in shifts]) for k in shifts[0]}
            if (reference := baseline(name)) is not None:  # paired by seed (same seed order)
                row["paired_vs"] = reference
                for prefix, key in (("", "accuracy"), ("aligned_", "aligned_accuracy")):
                    if f"{prefix}after_drift" not in row:
                        continue
                    last5 = [[statistics.fmean(r[key] for r in run["rounds"][-5:]) for run in results[k]]
                             for k in (name, reference)]
                    after = [[statistics.fmean(r[key] for r in run["rounds"][drift_round:])
                              for run in results[k]] for k in (name, reference)]
                    row[f"paired_{prefix}after_drift"] = mean_std(np.subtract(*after).tolist())
                    row[f"paired_{prefix}after_drift_each"] = np.subtract(*after).tolist()
                    row[f"paired_{prefix}last5"] = mean_std(np.subtract(*last5).tolist())
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
            mine = {k: v for k, v in results.items() if k.startswith(strategy + "-") or k == "random-drift"}
            for key, label in (("accuracy", "test accuracy (all experts)"),
                               ("aligned_accuracy", "aligned accuracy (each client's own experts)")):
                curves = {k: [[r.get(key) or 0.0 for r in run["rounds"]] for run in runs]
                          for k, runs in mine.items()}
                plot_curves(curves, f"{prefix}_{strategy}_{key}.png", ylabel=label,
                            vline=drift_round + 0.5, vline_label="drift",
                            title=f"{strategy}: half the clients move to new labels at round "
                                  f"{drift_round + 1}")
        curves = {k: [[r["fitness_error"] or 0.0 for r in run["rounds"]] for run in runs]
                  for k, runs in results.items() if "nodrift" not in k}
        plot_curves(curves, f"{prefix}_fitness_error.png", ylabel="mean |feedback before training - fitness|",
                    vline=drift_round + 0.5, vline_label="drift", legend="upper right",
                    title="How stale the fitness is: error on the pairs trained each round")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, of {list(PARTS)}")
    add_run_arguments(parser, seeds=3, rounds=40, work="/tmp/fedmoe_stress",
                      quick="1 seed x 8 rounds, drift at round 3")
    parser.add_argument("--drift-round", type=int, default=20, help="first round (0-based) with drifted data")
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()
    parts = args.parts.split(",")
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts must be among {list(PARTS)}, got {args.parts!r}")
    if args.quick:
        args.seeds, args.rounds, args.drift_round = 1, 8, 3
    if not 1 <= args.drift_round <= args.rounds - 5:
        parser.error("--drift-round must be >= 1 and leave 5 rounds after it")
    stem = "stress" + ("_quick" if args.quick else "")
    base = FederatedConfig.from_dict({"data": {"dirichlet_alpha": 0.1}, "federation": {"rounds": args.rounds},
                                      "evaluation": {"target_accuracy": args.target}})
    seeds = list(range(args.seeds))
    out = RESULTS / f"{stem}.json"
    report = json.loads(out.read_text()) if out.exists() else {"parts": {}}
    report["environment"] = machine_info(torch=torch.__version__, workers=args.workers)
    for part in parts:
        start = time.perf_counter()
        configs = variants(part, base, args.drift_round)
        results = compare_configs(configs, seeds, args.work / stem / part, workers=args.workers,
                                  resume=args.resume)
        table = part_report(part, results, args.drift_round, args.work / stem / part / "runs")
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
