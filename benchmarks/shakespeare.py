"""The transformer MoE language model federated on LEAF Shakespeare: fedmoe's alignment strategies (random,
greedy, load-balanced, optimal) against two FedAvg baselines, several seeds.

* ``dense-fedavg``: a dense transformer (one expert, top-1) whose feed-forward is ``max_experts`` experts
  wide, so that a client downloads what an MoE client does (shared part + ``max_experts`` experts);
* ``moe-full``: the MoE sent whole to every client (every expert, every round).

Setting: the MoE transformer of ``[model]`` below (8 experts, top-2, 2 experts per client), 10 clients per
round from all roles, no device limits (``simulation.tiers = "unlimited"``, no deadline), local Adam (fresh
each round; local SGD stays on the unigram plateau for hundreds of steps) capped at ``--steps`` mini-batches
of 32 windows a round (the FedAvg paper trains E = 1 epoch of B = 10, far more than 2 CPU cores allow).
Each round is evaluated on a fixed random subset of the test windows; after the last round ``--roles``
clients (a seeded subset) are evaluated on their own test splits (all and aligned experts). Reported per
arm and seed: LEAF's accuracy (the character after each window) per round, rounds to 54% (the FedAvg
paper's target, reached by its 866k-parameter LSTM in 41 rounds at C = 0.1), final accuracy, bytes sent
and received per client per round, wall time per round, and the per-client evaluation.

    python benchmarks/shakespeare.py --data DIR           # DIR from `fedmoe data shakespeare --out DIR`
    python benchmarks/shakespeare.py --data DIR --quick   # 1 seed x 3 rounds

Writes ``benchmarks/results/shakespeare[_quick].json`` and ``shakespeare[_quick]_accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from machine import machine_info
from seeds import add_run_arguments, mean_std

from fedmoe.data import load_dataset
from fedmoe.federated import FederatedConfig, compare_configs
from fedmoe.plots import plot_curves

RESULTS = Path(__file__).resolve().parent / "results"
TARGET = 0.54
MODEL = {"kind": "transformer", "num_experts": 8, "top_k": 2, "d_model": 64, "d_hidden": 128, "blocks": 2,
         "heads": 4}


def arms(max_experts: int) -> dict[str, dict]:
    """Arm name -> options changed from the base setting."""
    out = {s: {"alignment.strategy": s} for s in ("random", "greedy", "load-balanced", "optimal")}
    out["dense-fedavg"] = {"model.num_experts": 1, "model.top_k": 1,
                           "model.d_hidden": MODEL["d_hidden"] * max_experts, "alignment.max_experts": 1}
    out["moe-full"] = {"alignment.strategy": "random", "alignment.max_experts": MODEL["num_experts"]}
    return out


def base_config(data: Path, clients: int, rounds: int, steps: int, test_samples: int,
                roles: int) -> FederatedConfig:
    return FederatedConfig.from_dict({
        "data": {"source": str(data), "partition": "natural"},
        "federation": {"num_clients": clients, "clients_per_round": 10, "rounds": rounds, "deadline": "none"},
        "model": MODEL, "alignment": {"max_experts": 2},
        "train": {"batch_size": 32, "optimizer": "adam", "lr": 0.003, "max_steps": steps,
                  "feedback_samples": 64},
        "simulation": {"tiers": "unlimited", "dropout": False},
        "evaluation": {"target_accuracy": TARGET, "test_samples": test_samples, "clients": True,
                       "client_samples": 100, "max_clients": roles}})


def summary(runs: list[dict]) -> dict:
    """Per arm: LEAF accuracy curves, rounds to the target, final accuracy, traffic and time per round, and
    the rounds that aggregated no reply (each run's)."""
    curves = [[r["last_accuracy"] for r in run["rounds"]] for run in runs]
    reached = [next((i + 1 for i, a in enumerate(c) if a >= TARGET), None) for c in curves]
    per_client_round = [(run["bytes_sent"] + run["bytes_received"])
                        / max(sum(len(r["accepted"]) for r in run["rounds"]), 1) for run in runs]
    return {"last_accuracy": curves, "final": mean_std([c[-1] for c in curves]),
            "rounds_to_target": reached, "mb_per_client_round": mean_std([b / 1e6 for b in per_client_round]),
            "seconds_per_round": mean_std([run["wall_seconds"] / len(run["rounds"]) for run in runs]),
            "client_evaluation": [run["client_evaluation"] for run in runs],
            "empty_rounds": [[i + 1 for i, r in enumerate(run["rounds"]) if not r["accepted"]]
                             for run in runs],
            "model": runs[0]["model"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="what `fedmoe data shakespeare --out` wrote")
    parser.add_argument("--steps", type=int, default=20, help="local mini-batches per round (default 20)")
    parser.add_argument("--test-samples", type=int, default=2000, help="test windows per round's evaluation")
    parser.add_argument("--roles", type=int, default=300, help="roles in the final per-client evaluation")
    add_run_arguments(parser, seeds=3, rounds=20, work="fedmoe_out/shakespeare", quick="1 seed x 3 rounds")
    args = parser.parse_args()
    seeds, rounds = (1, 3) if args.quick else (args.seeds, args.rounds)
    data = args.data / "shakespeare.npz"
    clients = load_dataset(str(data)).num_clients
    base = base_config(data, clients, rounds, args.steps, args.test_samples, args.roles)
    variants = {name: base.replace(changes) for name, changes in arms(2).items()}
    start = time.perf_counter()
    results = compare_configs(variants, range(seeds), args.work, workers=args.workers, resume=args.resume)
    table = {name: summary(runs) for name, runs in results.items()}
    for name, row in table.items():
        final, mb, sec = row["final"], row["mb_per_client_round"], row["seconds_per_round"]
        print(f"{name:14s} final {final[0]:.3f} ± {final[1]:.3f}  to {TARGET}: {row['rounds_to_target']}  "
              f"{mb[0]:.2f} MB/client/round  {sec[0]:.1f} s/round")
    suffix = "_quick" if args.quick else ""
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"shakespeare{suffix}.json"
    out.write_text(json.dumps({"machine": machine_info(), "clients": clients, "seeds": seeds,
                               "rounds": rounds, "steps": args.steps, "test_samples": args.test_samples,
                               "roles": args.roles,
                               "target": TARGET,
                               "config": base.to_dict(), "arms": arms(2), "results": table,
                               "wall_seconds": time.perf_counter() - start}, indent=1))
    plot_curves({name: row["last_accuracy"] for name, row in table.items()},
                RESULTS / f"shakespeare{suffix}_accuracy.png", ylabel="next-character accuracy (LEAF)",
                title=f"Shakespeare, {clients} roles, 10 per round", hline=TARGET, hline_label="54%")
    print(f"-> {out}")


if __name__ == "__main__":
    main()
