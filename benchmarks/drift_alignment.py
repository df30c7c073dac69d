"""Concept drift on the synthetic population, where the true affinity is known: does drift handling
(``fedmoe.alignment.DriftDetector``) bring the fitness table back to the clients' new data faster?

From round ``--drift-round`` on, a share of the clients (``--fraction``) switch their main data cluster to
another one (their affinity row changes; the rest of the population does not). Each strategy that reads the
fitness (greedy, load-balanced) runs four arms on the same population, availability and feedback noise:

* ``no drift``: the population never changes (the reference);
* ``no handling``: drift, the detector off: stale rows fade only at the fitness table's normal pace;
* ``reset``: the detector on, a fired client's row is reset to its prior (``shrink = 0``);
* ``re-score``: the detector on, a fired client's row is replaced by its gate affinity on its current data
  (what ``drift.rescore`` sends with each update in the federated loop).

Per round: the regret of the true affinity of the drifted clients' assigned pairs against their per-round
optimum (their best experts by true affinity, as many as they were given), the same for the other
clients, and the detector's firings among drifted and other clients. Summaries: mean regret of drifted
clients over the ``--window`` rounds after the drift, rounds until it is back within 0.02 of its pre-drift
level, detection rate (drifted clients fired within the window, over those that reported) and false alarms.

    python benchmarks/drift_alignment.py           # 5,000 x 512, 60 rounds, 5 seeds (~80 s)
    python benchmarks/drift_alignment.py --quick   # 1,000 x 128, 30 rounds, 2 seeds

Writes ``benchmarks/results/drift_alignment[_quick].json`` and ``drift_alignment[_quick]_regret.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import matplotlib
import numpy as np
from alignment_population import Population
from machine import machine_info
from seeds import mean_std

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from fedmoe.alignment import (
    AlignmentConfig,
    DriftConfig,
    DriftDetector,
    ExpertLoad,
    RoundState,
    fitness_table,
    make_strategy,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_EXPERTS = 4
ARMS = ("no drift", "no handling", "reset", "re-score")
RECOVERED = 0.02  # regret within this of the pre-drift level counts as recovered


def drifted(pop: Population, fraction: float, seed: int) -> tuple[Population, np.ndarray]:
    """A copy of ``pop`` in which ``fraction`` of the clients moved their main cluster's weight to another
    cluster (their other mixing weights kept), and the sorted ids of those clients."""
    rng = np.random.default_rng([seed, 7])
    moved = np.sort(rng.choice(pop.num_clients, size=int(fraction * pop.num_clients), replace=False))
    after = copy.copy(pop)
    factors = pop.client_factors.copy()
    k = pop.num_clusters
    mix = factors[moved, :k]
    old = mix.argmax(axis=1)
    new = (old + rng.integers(1, k, moved.size)) % k  # any other cluster
    rows = np.arange(moved.size)
    mix[rows, old], mix[rows, new] = mix[rows, new], mix[rows, old]
    factors[moved, :k] = mix
    after.client_factors = factors
    return after, moved


def regret(pop: Population, clients: np.ndarray, experts: np.ndarray, among: np.ndarray) -> float:
    """1 - achieved / optimum of the true affinity over the assigned clients in ``among`` (bool [N])."""
    keep = among[clients]
    clients, experts = clients[keep], experts[keep]
    if clients.size == 0:
        return float("nan")
    ids, counts = np.unique(clients, return_counts=True)
    best = -np.sort(-pop.affinity_rows(ids), axis=1)
    optimum = float(sum(best[i, : counts[i]].sum() for i in range(ids.size)))
    return 1.0 - float(pop.affinity_pairs(clients, experts).sum()) / optimum


def run_arm(strategy: str, arm: str, before: Population, after: Population, moved: np.ndarray,
            rounds: int, drift_round: int, threshold: float) -> dict:
    n, e = before.num_clients, before.num_experts
    fitness = fitness_table(n, e, form="dense")
    fitness.cold_start(np.arange(n), before.gate_affinity(np.arange(n)))
    load, profiles = ExpertLoad(e), before.profiles()
    chooser = make_strategy(AlignmentConfig(strategy=strategy, max_experts=MAX_EXPERTS))
    detector = DriftDetector(n, DriftConfig(threshold=threshold if arm in ("reset", "re-score") else 0.0))
    is_moved = np.zeros(n, dtype=bool)
    is_moved[moved] = True
    available = before.availability(rounds)
    rec = {k: [] for k in ("regret_drifted", "regret_others", "fired_drifted", "fired_others",
                           "reported_drifted", "reported_others")}
    first_report = np.full(n, -1)  # from the drift round on: each client's first report and first firing
    first_fired = np.full(n, -1)
    for r in range(rounds):
        pop = after if (arm != "no drift" and r >= drift_round) else before
        result = chooser.assign(RoundState(r, available[r], fitness, load, profiles))
        clients, experts = result.clients, result.experts
        feedback = pop.feedback(clients, experts, r)
        reporting = np.unique(clients)
        rescore = None
        if arm == "re-score":
            rescore = dict(zip(reporting.tolist(), pop.gate_affinity(reporting), strict=True))
        fired, _ = detector.step(fitness, clients, experts, feedback, rescore)
        fitness.update(clients, experts, feedback)
        load.update(experts, profiles.samples[clients])
        if r >= drift_round:
            first_report[reporting[first_report[reporting] < 0]] = r
            first_fired[fired[first_fired[fired] < 0]] = r
        rec["regret_drifted"].append(regret(pop, clients, experts, is_moved))
        rec["regret_others"].append(regret(pop, clients, experts, ~is_moved))
        rec["fired_drifted"].append(int(is_moved[fired].sum()))
        rec["fired_others"].append(int((~is_moved[fired]).sum()))
        rec["reported_drifted"].append(int(is_moved[reporting].sum()))
        rec["reported_others"].append(int((~is_moved[reporting]).sum()))
    rec["first_report"], rec["first_fired"] = first_report.tolist(), first_fired.tolist()
    rec["moved"] = moved.tolist()
    return rec


def rate(fired: list[int], reported: list[int]) -> float:
    return sum(fired) / max(1, sum(reported))


def summarize(rec: dict, drift_round: int, window: int) -> dict:
    drifted_regret = np.array(rec["regret_drifted"])
    before = float(np.nanmean(drifted_regret[max(0, drift_round - 5):drift_round]))
    after = drifted_regret[drift_round:drift_round + window]
    back = np.flatnonzero(after <= before + RECOVERED)
    span = slice(drift_round, drift_round + window)
    early = slice(0, drift_round)
    first_report, first_fired = np.array(rec["first_report"]), np.array(rec["first_fired"])
    moved = np.zeros(first_report.size, dtype=bool)
    moved[rec["moved"]] = True
    seen = (first_report >= 0) & (first_report < drift_round + window)
    caught = seen & (first_fired >= 0) & (first_fired < drift_round + window)
    return {
        "regret_drifted_before": before,
        "regret_drifted_window": float(np.nanmean(after)),
        "regret_drifted_first_round": float(after[0]),
        "rounds_to_recover": int(back[0]) if back.size else None,
        "regret_others_window": float(np.nanmean(rec["regret_others"][span])),
        "fired_per_report_before": rate(rec["fired_drifted"][early] + rec["fired_others"][early],
                                        rec["reported_drifted"][early] + rec["reported_others"][early]),
        "detected": float(caught[moved].sum() / max(1, seen[moved].sum())),
        "detection_delay_rounds": float(np.mean(first_fired[caught & moved] - first_report[caught & moved]))
        if (caught & moved).any() else None,
        "false_alarm_clients": float(caught[~moved].sum() / max(1, seen[~moved].sum())),
        "fired_per_report_drifted": rate(rec["fired_drifted"][span], rec["reported_drifted"][span]),
        "fired_per_report_others": rate(rec["fired_others"][span], rec["reported_others"][span]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--experts", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--drift-round", type=int, default=20)
    parser.add_argument("--fraction", type=float, default=0.3)
    parser.add_argument("--window", type=int, default=10, help="rounds after the drift that are summarised")
    parser.add_argument("--threshold", type=float, default=3.0,
                        help="detector threshold t: fire above level + t * spread")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--strategies", default="greedy,load-balanced")
    parser.add_argument("--quick", action="store_true", help="1,000 x 128, 30 rounds (drift at 10), 2 seeds")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.experts, args.rounds, args.drift_round, args.seeds = 1000, 128, 30, 10, 2
    if not 0 < args.drift_round < args.rounds:
        parser.error("--drift-round must be inside (0, --rounds)")
    suffix = "_quick" if args.quick else ""
    settings = {k: v for k, v in vars(args).items() if k != "quick"}
    report = {"environment": machine_info(), "settings": settings, "runs": {}, "summary": {}}
    start = time.perf_counter()
    for strategy in args.strategies.split(","):
        for arm in ARMS:
            runs = []
            for seed in range(args.seeds):
                before = Population(args.clients, args.experts, kind="contested", seed=seed)
                after, moved = drifted(before, args.fraction, seed)
                runs.append(run_arm(strategy, arm, before, after, moved, args.rounds, args.drift_round,
                                    args.threshold))
            summaries = [summarize(run, args.drift_round, args.window) for run in runs]
            key = f"{strategy} / {arm}"
            report["runs"][key] = runs
            per_seed = {name: [s[name] for s in summaries] for name in summaries[0]}
            s = {name: mean_std(v) for name, v in per_seed.items()}
            report["summary"][key] = {k: {"mean_std": s[k], "per_seed": v} for k, v in per_seed.items()}
            print(f"{key:28s} drifted regret, {args.window} rounds after: "
                  f"{s['regret_drifted_window'][0]:.3f} "
                  f"± {s['regret_drifted_window'][1]:.3f}  (before {s['regret_drifted_before'][0]:.3f})  "
                  f"recover {per_seed['rounds_to_recover']}  "
                  f"detected {s['detected'][0]:.2f}, false alarms {s['false_alarm_clients'][0]:.3f}  "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"drift_alignment{suffix}.json"
    out.write_text(json.dumps(report, indent=1))
    plot(report, args, RESULTS / f"drift_alignment{suffix}_regret.png")
    print(f"wrote {out}")


def plot(report: dict, args, path: Path) -> None:
    strategies = args.strategies.split(",")
    fig, axes = plt.subplots(1, len(strategies), figsize=(5.5 * len(strategies), 4), squeeze=False)
    for ax, strategy in zip(axes[0], strategies, strict=True):
        for arm in ARMS:
            curves = np.array([run["regret_drifted"] for run in report["runs"][f"{strategy} / {arm}"]])
            mean = np.nanmean(curves, axis=0)
            x = np.arange(1, mean.size + 1)
            ax.plot(x, mean, label=arm)
            ax.fill_between(x, np.nanmin(curves, axis=0), np.nanmax(curves, axis=0), alpha=0.15)
        ax.axvline(args.drift_round + 0.5, color="gray", linestyle=":")
        ax.set(title=f"{strategy}: drifted clients", xlabel="round", ylabel="regret of true affinity")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
