"""Does the alignment pay off? fedmoe's strategies against random assignment and controls, with seeds, on
digits settings where the experts carry more or less of the model, and on LEAF Shakespeare.

Arms (each on every setting, same seeds, so differences are paired by seed):

* ``random``, ``greedy``, ``load-balanced``, ``optimal``: the strategies with the remedies of
  docs/experiments/alignment-value.md (``REMEDIES``: the routing loss, the gate-affinity fitness signal, a
  lighter load term);
* ``<strategy>-plain``: the same without the remedies (the former defaults, with the current update
  bound), and
  ``<strategy>-route-only``: with the routing loss alone, on the settings of ``--ablation`` (default: the
  two where the earlier comparison found the alignment losing);
* ``load-balanced-full-load``, ``optimal-full-load`` (digits): the remedies with the load term at its
  former weight (``alignment.desirability.beta`` 1.0 instead of 0.2);
* controls, with the remedies' training: ``oracle`` (digits: each client gets the experts of its main
  labels, expert ``l mod E`` for label ``l``), ``shared-expert`` (expert 0 for every client, the rest at
  random: every token of every client reaches expert 0) and ``dense`` (one expert ``max_experts`` times as
  wide, every client trains it: the same download per client).

Settings: digits with Dirichlet alpha 0.1 and 0.5, 8 and 32 experts (2 per client), a strong backbone
(two convolutions) or a weak one (none: the pooled image's projection, the experts carry the model);
``shakespeare`` (with ``--shakespeare DIR``): the transformer and training of benchmarks/shakespeare.py
(20 rounds of 10 roles from all 1,118), the per-client evaluation on ``--roles`` of them. Reported per
arm: final global accuracy (mean of the last 5 rounds), rounds to the target, personal accuracy (each
client's own data with its aligned experts, and after ``finetune_steps`` of local fine-tuning: ``random``
+ fine-tuning is the personalised baseline), bytes per client per round, and paired differences against
``random`` and ``greedy``.

    python benchmarks/alignment_value.py --quick            # 1 setting, 2 seeds, 10 rounds (~3 min)
    python benchmarks/alignment_value.py --resume           # digits: 8 settings x 5 seeds, 440 runs
    python benchmarks/alignment_value.py --settings shakespeare --shakespeare DIR --seeds 3 --resume  # 40 min

Writes ``benchmarks/results/alignment_value[_quick].json`` (settings of earlier invocations are kept) and
one accuracy plot per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from machine import machine_info
from seeds import mean_std
from shakespeare import MODEL as SHAKESPEARE_MODEL
from tqdm.auto import tqdm

from fedmoe.alignment._select import top_per_row
from fedmoe.alignment.strategies import RandomStrategy
from fedmoe.data import load_dataset
from fedmoe.federated import FederatedConfig, FederatedRun
from fedmoe.plots import plot_curves

RESULTS = Path(__file__).resolve().parent / "results"
STRATEGIES = ("random", "greedy", "load-balanced", "optimal")
REMEDIES = {"train.route_loss": 0.1, "fitness.signal": "affinity", "alignment.desirability.beta": 0.2}
PLAIN = {"train.route_loss": 0.0, "fitness.signal": "after", "alignment.desirability.beta": 1.0}
ROUTE_ONLY = {**PLAIN, "train.route_loss": REMEDIES["train.route_loss"]}
FULL_LOAD = {**REMEDIES, "alignment.desirability.beta": 1.0}  # the load term at its former weight
VARIANTS = {"plain": PLAIN, "route-only": ROUTE_ONLY, "full-load": FULL_LOAD}  # arm <strategy>-<variant>
DIGITS = {"federation.rounds": 50, "alignment.max_experts": 2, "evaluation.target_accuracy": 0.8,
          "evaluation.clients": True, "evaluation.finetune_steps": 10}


def settings(shakespeare: Path | None, roles: int) -> dict[str, dict]:
    """Setting name -> config changes from the defaults."""
    out = {}
    for alpha in (0.1, 0.5):
        for experts in (8, 32):
            for backbone, channels in (("strong", (16, 32)), ("weak", ())):
                out[f"a{alpha}-e{experts}-{backbone}"] = {**DIGITS, "data.dirichlet_alpha": alpha,
                                                          "model.num_experts": experts,
                                                          "model.channels": channels}
    if shakespeare is not None:
        out["shakespeare"] = {
            "data.source": str(shakespeare / "shakespeare.npz"), "data.partition": "natural",
            "federation.num_clients": load_dataset(str(shakespeare / "shakespeare.npz")).num_clients,
            "federation.clients_per_round": 10, "federation.rounds": 20, "federation.deadline": None,
            **{f"model.{k}": v for k, v in SHAKESPEARE_MODEL.items()}, "alignment.max_experts": 2,
            "train.batch_size": 32, "train.optimizer": "adam", "train.lr": 0.003, "train.max_steps": 20,
            "train.feedback_samples": 64, "simulation.tiers": "unlimited", "simulation.dropout": False,
            "evaluation.target_accuracy": 0.54, "evaluation.test_samples": 2000, "evaluation.clients": True,
            "evaluation.client_samples": 100, "evaluation.max_clients": roles,
            "evaluation.finetune_steps": 20}
    return out


def arms(setting: str, changes: dict, ablation: bool) -> dict[str, tuple[dict, str | None]]:
    """Arm name -> (config changes on top of the setting's, control or None)."""
    variants = [("", s) for s in STRATEGIES]
    if ablation:
        variants += [(v, s) for v in ("plain", "route-only") for s in STRATEGIES]
    if setting != "shakespeare":
        variants += [("full-load", s) for s in ("load-balanced", "optimal")]
    out = {f"{s}-{v}" if v else s: ({**VARIANTS.get(v, REMEDIES), "alignment.strategy": s}, None)
           for v, s in variants}
    control = {**REMEDIES, "alignment.strategy": "random"}
    if setting != "shakespeare":
        out["oracle"] = (control, "oracle")
    out["shared-expert"] = (control, "shared-expert")
    width = changes.get("model.d_hidden", FederatedConfig().model.d_hidden) * changes["alignment.max_experts"]
    out["dense"] = ({**control, "model.num_experts": 1, "model.top_k": 1, "model.d_hidden": width,
                     "alignment.max_experts": 1}, None)
    return out


class SharedExpert(RandomStrategy):
    """Random assignment that always includes expert 0 (with top-k = max_experts = 2, every token of every
    client is routed to it)."""

    def _select(self, state, scores, capacity):
        self._rng(state).random(out=scores, dtype=np.float32)
        scores[:, 0] = 2.0  # above every random score
        self._forbid(state, scores, state.available)
        return state.available, *top_per_row(scores, capacity), None


class LabelOracle(RandomStrategy):
    """Each client's experts by its training labels (expert ``l mod E`` for label ``l``, most frequent
    first; ties and the rest at random): what an alignment that knew the labels would hand out."""

    def __init__(self, config, seed, preference: np.ndarray):
        super().__init__(config, seed)
        self.preference = preference  # float32 [N, E]: samples of each client whose label maps to e

    def _select(self, state, scores, capacity):
        self._rng(state).random(out=scores, dtype=np.float32)
        scores += self.preference[state.available]
        self._forbid(state, scores, state.available)
        return state.available, *top_per_row(scores, capacity), None


def control_strategy(run: FederatedRun, control: str):
    config, seed = run.config.alignment, run.config.federation.seed
    if control == "shared-expert":
        return SharedExpert(config, seed)
    e = run.server.num_experts
    preference = np.zeros((len(run.parts), e), dtype=np.float32)
    for client, part in enumerate(run.parts):
        np.add.at(preference[client], run.dataset.y_train[part] % e, 1.0)
    return LabelOracle(config, seed, preference)


def play(config: dict, control: str | None, path: str) -> dict:
    """One run (``control`` replaces the strategy); its results JSON, also written to ``path``."""
    torch.set_num_threads(1)
    start = time.perf_counter()
    run = FederatedRun(FederatedConfig.from_dict(config))
    if control is not None:
        run.server.strategy = control_strategy(run, control)
    run.cold_start()
    for _ in range(run.config.federation.rounds):
        run.step()
    result = {**run.result(), "control": control, "client_evaluation": run.client_evaluation(),
              "wall_seconds": time.perf_counter() - start}
    Path(path).write_text(json.dumps(result))
    return result


def headline(run: dict) -> list[float]:
    """The run's per-round global accuracy (LEAF's last_accuracy for the language model)."""
    return [r.get("last_accuracy", r["accuracy"]) for r in run["rounds"]]


def final(run: dict) -> float:
    """The run's global accuracy over its last 5 rounds."""
    return float(np.mean(headline(run)[-5:]))


def summary(runs: list[dict], references: dict[str, list[dict]], target: float) -> dict:
    """One arm's figures over its seeds, and its paired differences (``vs_<name>``) against each of
    ``references`` (random and greedy)."""
    def personal(run, view, stat="mean"):
        return run["client_evaluation"].get(view, {}).get(stat)

    reached = [next((i + 1 for i, a in enumerate(headline(r)) if a >= target), None) for r in runs]
    out = {"final": mean_std([final(r) for r in runs]), "rounds_to_target": reached,
           "mb_per_client_round": mean_std([(r["bytes_sent"] + r["bytes_received"]) / 1e6
                                            / max(sum(len(x["accepted"]) for x in r["rounds"]), 1)
                                            for r in runs])}
    for view in ("all", "aligned", "finetuned"):
        out[f"personal_{view}"] = mean_std([personal(r, view) for r in runs])
        out[f"personal_{view}_p10"] = mean_std([personal(r, view, "p10") for r in runs])
    for name, reference in references.items():
        pairs = list(zip(runs, reference, strict=True))
        vs = out[f"vs_{name}"] = {"final": mean_std([final(a) - final(b) for a, b in pairs])}
        for view in ("aligned", "finetuned"):
            diffs = [personal(a, view) - personal(b, view) for a, b in pairs
                     if personal(a, view) is not None and personal(b, view) is not None]
            vs[f"personal_{view}"] = mean_std(diffs)
    return out


def ablations(runs: dict[str, list[dict]]) -> dict:
    """Per strategy, the paired differences of :func:`final` between its variants that ran:
    ``route-only - plain``, ``remedies - route-only`` and ``remedies - full-load`` ([mean, std])."""
    pairs = {"route-only - plain": ("-route-only", "-plain"), "remedies - route-only": ("", "-route-only"),
             "remedies - full-load": ("", "-full-load")}
    out = {}
    for strategy in STRATEGIES:
        for name, (a, b) in pairs.items():
            if strategy + a in runs and strategy + b in runs:
                seeds = zip(runs[strategy + a], runs[strategy + b], strict=True)
                out.setdefault(strategy, {})[name] = mean_std([final(x) - final(y) for x, y in seeds])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", default=None, help="comma-separated (default: every digits setting)")
    parser.add_argument("--ablation", default="a0.1-e8-strong,a0.1-e32-strong",
                        help="settings that also run the strategies without the remedies and with the "
                             "routing loss alone")
    parser.add_argument("--shakespeare", type=Path, default=None, help="what `fedmoe data shakespeare` wrote")
    parser.add_argument("--roles", type=int, default=50,
                        help="Shakespeare roles in the per-client evaluation")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=None, help="override the settings' rounds")
    parser.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--work", type=Path, default=Path("fedmoe_out/alignment_value"))
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--quick", action="store_true", help="a0.1-e32-weak, 2 seeds, 10 rounds")
    args = parser.parse_args()
    every = settings(args.shakespeare, args.roles)
    names = ["a0.1-e32-weak"] if args.quick else (args.settings.split(",") if args.settings else
                                                   [n for n in every if n != "shakespeare"])
    unknown = sorted(set(names) - set(every))
    if unknown:
        parser.error(f"--settings: unknown {unknown} (known: {list(every)}; shakespeare needs --shakespeare)")
    seeds, rounds = (2, 10) if args.quick else (args.seeds, args.rounds)
    ablation = set(names) if args.quick else set(args.ablation.split(","))
    jobs = {}  # (setting, arm, seed) -> (config dict, control)
    for setting in names:
        changes = every[setting] | ({"federation.rounds": rounds} if rounds else {})
        for arm, (extra, control) in arms(setting, changes, setting in ablation).items():
            for seed in range(seeds):
                config = FederatedConfig().replace({**changes, **extra, "federation.seed": seed})
                jobs[setting, arm, seed] = (config.to_dict(), control)
    work = args.work / ("quick" if args.quick else "runs")
    work.mkdir(parents=True, exist_ok=True)
    done = {}
    for key, (config, control) in jobs.items():
        path = work / ("{}-{}-seed{}.json".format(*key))
        if args.resume and path.exists():
            kept = json.loads(path.read_text())
            if kept["config"] == config and kept["control"] == control:
                done[key] = kept
    todo = [key for key in jobs if key not in done]
    start = time.perf_counter()
    with tqdm(total=len(jobs), initial=len(done), desc="runs", unit="run") as bar, \
            ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(play, *jobs[key], str(work / ("{}-{}-seed{}.json".format(*key)))): key
                   for key in todo}
        for future in as_completed(futures):
            done[futures[future]] = future.result()
            bar.update()
    out_path = RESULTS / f"alignment_value{'_quick' if args.quick else ''}.json"
    table = json.loads(out_path.read_text())["settings"] if out_path.exists() else {}
    for setting in names:
        arm_names = dict.fromkeys(arm for s, arm, _ in jobs if s == setting)  # in the order of arms()
        runs = {arm: [done[setting, arm, seed] for seed in range(seeds)] for arm in arm_names}
        target = runs["random"][0]["config"]["evaluation"]["target_accuracy"]
        references = {name: runs[name] for name in ("random", "greedy")}
        table[setting] = {"config": runs["random"][0]["config"], "seeds": seeds,
                          "rounds": len(runs["random"][0]["rounds"]),
                          "arms": {arm: summary(rs, references, target) for arm, rs in runs.items()},
                          "ablations": ablations(runs)}
        curves = {arm: [headline(r) for r in rs] for arm, rs in runs.items()
                  if not arm.endswith(tuple(f"-{name}" for name in VARIANTS))}
        plot_curves(curves, RESULTS / f"alignment_value{'_quick' if args.quick else ''}_{setting}.png",
                    ylabel="global test accuracy", title=f"{setting}, {seeds} seeds", hline=target)
        for arm, row in table[setting]["arms"].items():
            fin, diff = row["final"], row["vs_random"]["final"]
            tuned = row["personal_finetuned"][0]
            print(f"{setting:18s} {arm:22s} final {fin[0]:.3f} ± {fin[1]:.3f}  vs random {diff[0]:+.3f} ± "
                  f"{diff[1]:.3f}  personal (fine-tuned) {tuned if tuned is None else round(tuned, 3)}")
    RESULTS.mkdir(exist_ok=True)
    out_path.write_text(json.dumps({"machine": machine_info(), "remedies": REMEDIES, **VARIANTS,
                                    "settings": table,
                                    "wall_seconds": time.perf_counter() - start},
                                   indent=1))
    print(f"-> {out_path}")


if __name__ == "__main__":
    main()
