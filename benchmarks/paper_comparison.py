"""The paper's comparison (Chen et al., arXiv 2507.05685: load-balanced 59% vs greedy 43% final accuracy and
33 vs 38 rounds to target on CIFAR-10) on digits: random, greedy, load-balanced and optimal alignment,
Dirichlet alpha = 0.1 and 0.5, 20 clients (10 per round), 8 experts, heterogeneous capacity tiers, a round
deadline and drop-outs, several seeds on the same partitions. The follow-up scenario ``contested`` (32
experts, at most 2 per client, alpha = 0.1) is the regime where greedy can starve experts.

Besides accuracy it records, per run, diagnostics that explain the ordering:

* ``last5``: mean test accuracy over the last 5 rounds (the last round alone is noisy under label skew);
* ``no_experts``: test accuracy of the final model with the expert branch switched off (head on the
  backbone features alone): how much the experts contribute at all;
* ``coverage``: share of the test samples' top-k slots that the global gate sends to an expert that, in
  the last 10 rounds, was trained by a client holding the sample's label;
* ``persistence``: share of a client's experts that it already trained at its previous participation
  (1 = pinned to the same experts; random assignment is about c/E);
* ``starved``: experts that no accepted update trained in the last 10 rounds.

    python benchmarks/paper_comparison.py                           # alpha 0.1 and 0.5, 5 seeds x 50 rounds
    python benchmarks/paper_comparison.py --scenarios contested --seeds 3
    python benchmarks/paper_comparison.py --quick                   # 2 seeds x 12 rounds

Writes ``benchmarks/results/paper_comparison[_quick].json`` (scenarios of earlier invocations are kept;
``run_seconds``: wall time of each run, two runs at a time on the 2-core machine shared with other jobs)
and PNGs next to it; per-run JSONs and checkpoints go to ``--work`` (``--resume`` keeps finished runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from seeds import add_run_arguments, mean_std

from fedmoe.federated import (
    FederatedConfig,
    FederatedRun,
    compare_strategies,
    format_table,
    load_checkpoint,
    summarize,
)
from fedmoe.plots import plot_accuracy, plot_load_heatmap

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("random", "greedy", "load-balanced", "optimal")
# name -> (config changes, strategies); "contested" is the follow-up: many experts, few pairs per round
SCENARIOS = {
    "alpha0.1": ({"data.dirichlet_alpha": 0.1}, STRATEGIES),
    "alpha0.5": ({"data.dirichlet_alpha": 0.5}, STRATEGIES),
    "contested": ({"data.dirichlet_alpha": 0.1, "model.num_experts": 32, "alignment.max_experts": 2},
                  ("random", "greedy", "load-balanced")),
}


def checkpoint_diagnostics(checkpoint: Path, window: int = 10) -> tuple[float, float]:
    """From a final checkpoint: ``no_experts``, the test accuracy with the expert branch off
    (``head(backbone(x))``), and ``coverage``, the share of the test samples' kept top-k slots that the
    global gate sends to an expert trained in the last ``window`` rounds by a client holding that
    sample's label."""
    state = load_checkpoint(checkpoint)
    run = FederatedRun(FederatedConfig.from_dict(state["config"]))
    run.load_state_dict(state)
    model, x, y = run.server.model, run.test.inputs, run.test.targets.numpy()
    seen = np.zeros((model.num_experts, run.dataset.num_classes), dtype=bool)
    for record in run.history[-window:]:
        for client in record["accepted"]:
            labels = np.unique(run.dataset.y_train[run.parts[client]])
            seen[np.ix_(record["assigned"][str(client)], labels)] = True
    with torch.no_grad():
        no_experts = float((model.head(model.backbone(x)).argmax(1).numpy() == y).mean())
        slots = model(x)[1].expert_idx.numpy()
    kept = slots >= 0
    coverage = float(seen[slots[kept], np.broadcast_to(y[:, None], slots.shape)[kept]].mean())
    return no_experts, coverage


def persistence(rounds: list[dict]) -> float:
    """Mean over (client, participation after its first) of |experts now ∩ experts last time| / |now|."""
    last: dict[str, set[int]] = {}
    shares = []
    for record in rounds:
        for client, experts in record["assigned"].items():
            if client in last:
                shares.append(len(last[client] & set(experts)) / len(experts))
            last[client] = set(experts)
    return statistics.fmean(shares) if shares else float("nan")


def starved(rounds: list[dict], window: int = 10) -> int:
    trained = np.sum([r["expert_samples"] for r in rounds[-window:]], axis=0)
    return int(np.sum(trained == 0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds=5, rounds=50, work="/tmp/fedmoe_paper", quick="2 seeds x 12 rounds")
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--scenarios", default="alpha0.1,alpha0.5",
                        help=f"comma-separated, of {list(SCENARIOS)} (default alpha0.1,alpha0.5); results of "
                             "other scenarios already in the output JSON are kept")
    args = parser.parse_args()
    names = args.scenarios.split(",")
    if not set(names) <= set(SCENARIOS):
        parser.error(f"--scenarios must be among {list(SCENARIOS)}, got {args.scenarios!r}")
    if args.quick:
        args.seeds, args.rounds = 2, 12
    suffix = "_quick" if args.quick else ""
    base = FederatedConfig.from_dict({"federation": {"rounds": args.rounds, "num_clients": 20,
                                                     "clients_per_round": 10},
                                      "model": {"num_experts": 8},
                                      "simulation": {"tiers": "heterogeneous"},
                                      "evaluation": {"target_accuracy": args.target}})
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    out = RESULTS / f"paper_comparison{suffix}.json"
    report = json.loads(out.read_text()) if out.exists() else {"scenarios": {}}
    report.update({
        "paper": {"dataset": "CIFAR-10", "final_accuracy": {"load-balanced": 0.59, "greedy": 0.43},
                  "rounds_to_target": {"load-balanced": 33, "greedy": 38}},
        "environment": {"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                        "workers": args.workers}})
    for name in names:
        changes, strategies = SCENARIOS[name]
        config = base.replace(changes)
        results = compare_strategies(config, strategies, seeds, args.work / name, workers=args.workers,
                                     resume=args.resume)
        summary = summarize(results)
        print(f"\n== {name}: digits, " + ", ".join(f"{k} = {v}" for k, v in changes.items()) + " ==")
        print(format_table(summary, args.target))
        scenario = {"config": config.to_dict(), "seeds": seeds, "summary": summary, "diagnostics": {},
                    "curves": {}, "run_seconds": {}}
        for strategy, runs in results.items():
            ckpts = [args.work / name / "runs" / f"{strategy}-seed{s}.pt" for s in seeds]
            no_experts, coverage = zip(*(checkpoint_diagnostics(c) for c in ckpts), strict=True)
            diag = {
                "last5": [statistics.fmean(r["accuracy"] for r in run["rounds"][-5:]) for run in runs],
                "no_experts": list(no_experts),
                "coverage": list(coverage),
                "persistence": [persistence(run["rounds"]) for run in runs],
                "starved": [starved(run["rounds"]) for run in runs],
            }
            scenario["diagnostics"][strategy] = diag
            scenario["curves"][strategy] = [[r["accuracy"] for r in run["rounds"]] for run in runs]
            scenario["run_seconds"][strategy] = [run["wall_seconds"] for run in runs]
            (f_m, f_s), (l_m, l_s) = mean_std(summary[strategy]["final_accuracy"]), mean_std(diag["last5"])
            n_m, _ = mean_std(diag["no_experts"])
            print(f"  {strategy:<14} final {f_m:.3f} ± {f_s:.3f}   last-5 {l_m:.3f} ± {l_s:.3f}   "
                  f"no-experts {n_m:.3f}   coverage {statistics.fmean(coverage):.2f}   "
                  f"persistence {statistics.fmean(diag['persistence']):.2f}   "
                  f"starved {statistics.fmean(diag['starved']):.1f}")
        report["scenarios"][name] = scenario
        plot_accuracy(results, RESULTS / f"paper_comparison{suffix}_{name}_accuracy.png", target=args.target,
                      title=f"{name}: test accuracy (min-max band, {len(seeds)} seeds)")
        plot_load_heatmap({s: runs[0] for s, runs in results.items()},
                          RESULTS / f"paper_comparison{suffix}_{name}_load.png", title=f"{name}, seed 0")
    out.write_text(json.dumps(report, indent=1))
    print(f"\n{time.perf_counter() - start:.0f} s -> {out}")


if __name__ == "__main__":
    main()
