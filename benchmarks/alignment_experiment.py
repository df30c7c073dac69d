"""Large expert-count alignment experiment: every strategy of ``fedmoe.alignment`` on a synthetic population
(``alignment_population.py``) for many rounds, without training (feedback drawn from the true affinity).

Per strategy and round it measures the alignment step (``strategy.assign`` plus the fitness, load and
profile updates; the simulation itself is not timed), the balance of the decayed expert load (CV, max/mean,
Gini, experts never trained or starved), the regret of the true affinity of the assigned pairs against the
per-round optimum (for each client, its best experts by true affinity, as many as it was given), deadline
misses (assigned clients that replied late or not at all), and at the end the Jain fairness of the
participation rate (rounds with >= 1 expert / rounds available) over the lowest capacity tier.

    python benchmarks/alignment_experiment.py --quick      # < 1 min: 2,000 x 256, 20 rounds
    python benchmarks/alignment_experiment.py              # 10,000 x 1,024 (contested, uniform) and
                                                           # 100,000 x 4,096 (contested), 50 rounds,
                                                           # at most ~600 s per strategy and scenario

Fitness forms: ``--fitness`` (default auto: dense up to 512 MiB, lean above, i.e. at 100,000 x 4,096) for
random, greedy and load-balanced; ``--solver-fitness`` (default dense) for the strategies that call
``fedmoe_kernels.assign``. With the lean form most of a client's experts share its prior, so the score
matrix is nearly rank one (every client ranks its untrained experts by load alone); the solver takes
minutes per round on such matrices at 10,000 x 1,024 (measured), so the solver strategies get the dense
form, whose cold start keeps every gate score.

Writes ``benchmarks/results/alignment_experiment[_quick].json`` (after every strategy) and one set of PNGs
per scenario.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict
from pathlib import Path

import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from alignment_population import Population

from fedmoe.alignment import (
    AlignmentConfig,
    DesirabilityConfig,
    ExpertLoad,
    RoundState,
    fitness_table,
    make_strategy,
)

RESULTS = Path(__file__).resolve().parent / "results"
MAX_EXPERTS = 4
DEADLINE = 100.0  # seconds: with DEFAULT_TIERS a low-tier client fits about one expert, a mid-tier one four
LOW_TIER = 2
BETA = 1.0  # the load weight of docs/experiments/alignment-at-scale.md (the library's default is 0.2)
STRATEGIES = {
    "random": AlignmentConfig(strategy="random", max_experts=MAX_EXPERTS),
    "greedy": AlignmentConfig(strategy="greedy", max_experts=MAX_EXPERTS),
    "load-balanced": AlignmentConfig(strategy="load-balanced", max_experts=MAX_EXPERTS,
                                     desirability=DesirabilityConfig(beta=BETA)),
    "optimal": AlignmentConfig(strategy="optimal", max_experts=MAX_EXPERTS,
                               desirability=DesirabilityConfig(beta=BETA)),
    "deadline-aware": AlignmentConfig(strategy="deadline-aware", max_experts=MAX_EXPERTS,
                                      desirability=DesirabilityConfig(beta=BETA, deadline=0.5)),
    "fair": AlignmentConfig(strategy="fair", max_experts=MAX_EXPERTS, min_share=0.5, window=10,
                            desirability=DesirabilityConfig(beta=BETA, fairness=1.0, deadline=0.5)),
}
SOLVER_STRATEGIES = {"optimal", "deadline-aware", "fair"}


def solver_built() -> bool:
    try:
        import fedmoe_kernels._assign  # noqa: F401
    except ImportError:
        return False
    return True


def jain(x: np.ndarray) -> float:
    """Jain's fairness index (sum x)^2 / (n sum x^2); 1 = all equal, 0 for an all-zero vector."""
    sq = float(np.sum(np.square(x)))
    return float(np.sum(x) ** 2 / (x.size * sq)) if sq > 0 else 0.0


class Environment:
    """What every strategy shares on one population: availability per round, the per-round optimum
    (prefix sums of each available client's best true affinities) and the cold-started fitness."""

    def __init__(self, pop: Population, rounds: int, block: int = 4096):
        self.pop, self.block = pop, block
        self.available = pop.availability(rounds)
        self.best = []
        for avail in self.available:
            prefix = np.empty((avail.size, MAX_EXPERTS))
            for s in range(0, avail.size, block):
                top = torch.topk(torch.from_numpy(pop.affinity_rows(avail[s:s + block])), MAX_EXPERTS).values
                prefix[s:s + block] = np.cumsum(top.numpy(), axis=1)
            self.best.append(prefix)
        self._cold = {}

    def fitness(self, form: str):
        """A fresh fitness table of ``form``, cold-started from the gate affinities (once per form)."""
        pop = self.pop
        fitness = fitness_table(pop.num_clients, pop.num_experts, form=form)
        if fitness.kind not in self._cold:
            for s in range(0, pop.num_clients, self.block):
                clients = np.arange(s, min(s + self.block, pop.num_clients))
                fitness.cold_start(clients, pop.gate_affinity(clients))
            self._cold[fitness.kind] = fitness.state_dict()
        else:
            fitness.load_state_dict(self._cold[fitness.kind])
        return fitness


def run_strategy(name: str, env: Environment, rounds: int, budget_s: float | None = None,
                 form: str = "auto") -> dict:
    """Run ``rounds`` rounds, or stop after the round in which the run's wall time passes ``budget_s``."""
    pop = env.pop
    fitness = env.fitness(form)
    start = time.perf_counter()
    load, profiles = ExpertLoad(pop.num_experts), pop.profiles()
    strategy = make_strategy(STRATEGIES[name])
    participated = np.zeros(pop.num_clients)
    was_available = np.zeros(pop.num_clients)
    rec = {k: [] for k in ("step_s", "assign_s", "update_s", "cv", "max_over_mean", "gini", "never_trained",
                           "starved", "regret", "affinity_per_pair", "pairs", "assigned_clients", "misses")}
    low_misses = low_assigned = 0
    for r in range(rounds):
        avail = env.available[r]
        t0 = time.perf_counter()
        result = strategy.assign(RoundState(r, avail, fitness, load, profiles, deadline=DEADLINE))
        t1 = time.perf_counter()
        clients, counts = np.unique(result.clients, return_counts=True)
        seconds, replied = pop.round_outcome(profiles, clients, counts, r)
        on_time = replied & (seconds <= DEADLINE)
        done = on_time[np.searchsorted(clients, result.clients)]
        feedback = pop.feedback(result.clients[done], result.experts[done], r)
        samples = profiles.samples[result.clients[done]]
        observed = np.where(replied, seconds, np.nan)
        t2 = time.perf_counter()
        fitness.update(result.clients[done], result.experts[done], feedback)
        load.update(result.experts[done], samples)
        profiles.observe(clients, counts, observed)
        t3 = time.perf_counter()

        achieved = float(pop.affinity_pairs(result.clients, result.experts).sum())
        optimum = float(env.best[r][np.searchsorted(avail, clients), counts - 1].sum())
        stats = load.stats()
        participated[clients] += 1
        was_available[avail] += 1
        low = pop.tier[clients] == LOW_TIER
        low_misses += int(np.count_nonzero(~on_time & low))
        low_assigned += int(np.count_nonzero(low))
        for key, value in (("step_s", (t1 - t0) + (t3 - t2)), ("assign_s", t1 - t0), ("update_s", t3 - t2),
                           ("regret", 1 - achieved / optimum if optimum > 0 else 0.0),
                           ("affinity_per_pair", achieved / max(len(result), 1)), ("pairs", len(result)),
                           ("assigned_clients", int(clients.size)),
                           ("misses", int(np.count_nonzero(~on_time))), *stats.as_dict().items()):
            rec[key].append(value)
        if budget_s is not None and time.perf_counter() - start > budget_s:
            break

    seen = was_available > 0
    rate = participated[seen] / was_available[seen]
    tiers = pop.tier[seen]
    steps = np.array(rec["step_s"])
    half = steps.size // 2
    summary = {
        "rounds_run": int(steps.size),
        "step_s_median": float(np.median(steps)), "step_s_p95": float(np.percentile(steps, 95)),
        "step_s_max": float(steps.max()), "step_s_first": float(steps[0]),
        "assign_s_median": float(np.median(rec["assign_s"])),
        "update_s_median": float(np.median(rec["update_s"])),
        "load_cv_final": rec["cv"][-1], "load_cv_mean_last_half": float(np.mean(rec["cv"][half:])),
        "max_over_mean_final": rec["max_over_mean"][-1], "gini_final": rec["gini"][-1],
        "never_trained_final": rec["never_trained"][-1], "starved_final": rec["starved"][-1],
        "regret_mean": float(np.mean(rec["regret"])),
        "regret_mean_last_half": float(np.mean(rec["regret"][half:])),
        "affinity_per_pair_mean": float(np.mean(rec["affinity_per_pair"])),
        "jain_participation_low_tier": jain(rate[tiers == LOW_TIER]),
        "participation_rate_by_tier": [float(rate[tiers == t].mean()) if np.any(tiers == t) else None
                                       for t in range(3)],
        "deadline_miss_rate": float(np.sum(rec["misses"]) / max(np.sum(rec["assigned_clients"]), 1)),
        "deadline_miss_rate_low_tier": low_misses / max(low_assigned, 1),
    }
    return {"config": asdict(STRATEGIES[name]), "fitness_form": fitness.kind, "summary": summary,
            "rounds": rec}


def plot(scenario: str, results: dict, prefix: str) -> list[str]:
    """Three PNGs: load over rounds, regret over rounds, fairness and misses per strategy."""
    names = list(results)
    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name in names:
        axes[0].plot(results[name]["rounds"]["cv"], label=name)
        axes[1].plot(results[name]["rounds"]["max_over_mean"], label=name)
    axes[0].set(title=f"load CV — {scenario}", xlabel="round", ylabel="CV of decayed load", yscale="log")
    axes[1].set(title="load max / mean", xlabel="round", ylabel="max / mean", yscale="log")
    axes[0].legend(fontsize=8)
    files.append(_save(fig, f"{prefix}_load.png"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        ax.plot(results[name]["rounds"]["regret"], label=name)
    ax.set(title=f"regret vs per-round optimum — {scenario}", xlabel="round", ylabel="1 - achieved / optimum")
    ax.legend(fontsize=8)
    files.append(_save(fig, f"{prefix}_regret.png"))
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    x = np.arange(len(names))
    axes[0].bar(x, [results[n]["summary"]["jain_participation_low_tier"] for n in names])
    axes[0].set(title=f"Jain fairness of participation, low tier — {scenario}", ylim=(0, 1.05))
    axes[1].bar(x, [results[n]["summary"]["deadline_miss_rate"] for n in names])
    axes[1].set(title="deadline miss rate (assigned clients)")
    for ax in axes:
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    files.append(_save(fig, f"{prefix}_fairness.png"))
    return files


def _save(fig, name: str) -> str:
    fig.tight_layout()
    fig.savefig(RESULTS / name, dpi=110)
    plt.close(fig)
    return name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2,000 x 256, 20 rounds (< 1 min)")
    parser.add_argument("--scenarios", help="comma-separated kind:NxE, e.g. contested:10000x1024")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--budget", type=float, help="stop a strategy after the round that passes this many "
                        "seconds (default: none with --quick, 600 otherwise)")
    parser.add_argument("--seed", type=int, default=0)
    forms = ("auto", "dense", "lean")
    parser.add_argument("--fitness", choices=forms, default="auto", help="fitness form")
    parser.add_argument("--solver-fitness", choices=forms, default="dense",
                        help="fitness form for optimal, deadline-aware and fair (default dense, see above)")
    parser.add_argument("--out", help="JSON file name under benchmarks/results/")
    args = parser.parse_args()
    default = ("contested:2000x256" if args.quick
               else "contested:10000x1024,uniform:10000x1024,contested:100000x4096")
    rounds = args.rounds or (20 if args.quick else 50)
    budget = args.budget if args.budget is not None else (None if args.quick else 600.0)
    names = args.strategies.split(",")
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}")
    built = solver_built()
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / (args.out or f"alignment_experiment{'_quick' if args.quick else ''}.json")
    report = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                          "numpy": np.__version__, "torch": torch.__version__, "solver_built": built},
              "rounds": rounds, "budget_s_per_strategy": budget, "deadline_s": DEADLINE,
              "max_experts": MAX_EXPERTS, "seed": args.seed, "scenarios": {}}
    for scenario in (args.scenarios or default).split(","):
        kind, size = scenario.split(":")
        n, e = (int(v) for v in size.split("x"))
        t = time.perf_counter()
        env = Environment(Population(n, e, kind=kind, seed=args.seed), rounds)
        print(f"{scenario}: population + per-round optimum {time.perf_counter() - t:.1f} s", flush=True)
        results, skipped = {}, {}
        entry = report["scenarios"][scenario] = {"num_clients": n, "num_experts": e, "kind": kind,
                                                 "skipped": skipped, "strategies": results}
        for name in names:
            if name in SOLVER_STRATEGIES and not built:
                skipped[name] = "fedmoe_kernels._assign is not built"
                continue
            t = time.perf_counter()
            form = args.solver_fitness if name in SOLVER_STRATEGIES else args.fitness
            results[name] = run_strategy(name, env, rounds, budget, form)
            s = results[name]["summary"]
            print(f"  {name:15s} step median {s['step_s_median']:.3f} s (max {s['step_s_max']:.3f})  "
                  f"CV {s['load_cv_final']:.3f}  max/mean {s['max_over_mean_final']:.2f}  "
                  f"regret {s['regret_mean']:.3f}  Jain(low) {s['jain_participation_low_tier']:.3f}  "
                  f"miss {s['deadline_miss_rate']:.3f}  rounds {s['rounds_run']}  "
                  f"fitness {results[name]['fitness_form']}  [{time.perf_counter() - t:.0f} s]", flush=True)
            entry["load_average_1_5_15min"] = os.getloadavg()
            out.write_text(json.dumps(report, indent=1))  # after every strategy: a long run keeps its results
        entry["plots"] = plot(scenario, results, f"alignment_{kind}_{n}x{e}") if results else []
        out.write_text(json.dumps(report, indent=1))
        del env
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
