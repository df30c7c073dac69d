"""One simulated federated run: data, partition, model, server and client nodes built from a
:class:`FederatedConfig`; rounds, per-round metrics, checkpoints and resume.

Per round: online clients -> ``server.configure`` -> each payload played by the simulation
(``FederatedRun.train``: the client's node on its data at that round) -> ``server.aggregate`` ->
evaluation on the held-out set. The record of a round is the server's :class:`RoundReport` plus
``accuracy``, ``loss``, ``load_cv`` and ``load`` (the decayed expert load [E]), ``sim_time`` (cumulative
simulated seconds) and ``time_error`` (median over clients of ``|log(estimated / true round time)|``: how
far the server's client profiles are off, after the round's observations) and, with
``evaluation.aligned``,
``aligned_accuracy`` (:meth:`FederatedRun.aligned_accuracy`).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from fedmoe.alignment import ModelCost
from fedmoe.data import Dataset, Samples, load_dataset, partition
from fedmoe.federated.checkpoint import load_checkpoint, save_checkpoint
from fedmoe.federated.config import FederatedConfig
from fedmoe.federated.evaluation import aligned_accuracy, client_evaluation
from fedmoe.federated.node import (
    ClientPayload,
    ClientUpdate,
    Node,
    NodeProfile,
    profiles_of,
    shared_vector,
)
from fedmoe.federated.server import Server
from fedmoe.federated.simulation import Simulation, make_profiles, model_cost
from fedmoe.models import build_model, build_task

__all__ = ["CHECKPOINT_VERSION", "FederatedRun", "build_nodes", "initial_model", "load_data",
           "partition_clients", "rounds_to_target", "run_experiment", "test_samples"]

_TEST_SUBSET = 12  # random stream of the evaluation's test subset
CHECKPOINT_VERSION = 4  # 4: checksummed files, the [aggregation] section
# options a resumed run may change: they leave the rounds already played as they were
_RESUMABLE_CHANGES = {"federation.rounds", "evaluation.clients", "evaluation.client_samples",
                      "evaluation.max_clients", "evaluation.finetune_steps"}


def rounds_to_target(accuracies, target: float) -> int | None:
    """The first round (1-based) whose accuracy reaches ``target``; None if none does."""
    hit = np.flatnonzero(np.asarray(accuracies, dtype=np.float64) >= target)
    return int(hit[0]) + 1 if hit.size else None


def load_data(config: FederatedConfig) -> Dataset:
    """The dataset ``[data] source`` names, split at random by ``federation.seed`` where it has no test
    set of its own; with ``partition = "natural"`` checked to hold ``federation.num_clients`` clients."""
    data = config.data
    dataset = load_dataset(data.source, test_fraction=data.test_fraction, seed=config.federation.seed)
    if data.partition == "natural":
        _natural_parts(config, dataset)
    return dataset


def test_samples(config: FederatedConfig, dataset: Dataset) -> Samples:
    """The samples each round's global evaluation uses: the test set, or ``evaluation.test_samples`` of it
    (a subset fixed by ``federation.seed``)."""
    test, cap = dataset.test_samples(), config.evaluation.test_samples
    if 0 < cap < len(test):
        rng = np.random.default_rng([config.federation.seed, _TEST_SUBSET])
        test = Samples(*test[np.sort(rng.choice(len(test), cap, replace=False))])
    return test


def partition_clients(config: FederatedConfig, dataset: Dataset) -> list[np.ndarray]:
    """The training indices of each of ``federation.num_clients`` clients, as ``[data]`` splits them
    (``natural``: the dataset's own clients, as many as ``federation.num_clients``)."""
    data, federation = config.data, config.federation
    if data.partition == "natural":
        return _natural_parts(config, dataset)
    return partition(dataset.y_train, federation.num_clients, data.partition, alpha=data.dirichlet_alpha,
                     shards_per_client=data.shards_per_client, min_samples=data.min_samples,
                     seed=federation.seed)


def _natural_parts(config: FederatedConfig, dataset: Dataset) -> list[np.ndarray]:
    """The natural clients' training indices; ValueError unless they are ``federation.num_clients``."""
    if dataset.client_train is None:
        raise ValueError(f"partition 'natural' needs a dataset with its own clients (an .npz in the natural "
                         f"format), and {config.data.source!r} has none")
    parts = dataset.client_indices()
    if len(parts) != config.federation.num_clients:
        raise ValueError(f"partition 'natural': {config.data.source} holds {len(parts)} clients; set "
                         f"federation.num_clients = {len(parts)} (got {config.federation.num_clients})")
    return parts


def initial_model(config: FederatedConfig, dataset: Dataset, cost: ModelCost | None = None):
    """``(model, task, cost)``: the initial global model of ``config`` for ``dataset`` (seeded by
    ``federation.seed``), its task and its cost (measured on one training sample unless given)."""
    model = build_model(config.model, dataset.spec, config.federation.seed)
    if cost is None:
        cost = model_cost(model, torch.from_numpy(dataset.x_train[:1]), config.train.epochs)
    return model, build_task(config.model, dataset.spec), cost


def build_nodes(config: FederatedConfig, dataset: Dataset, cost: ModelCost | None = None):
    """The simulated population of ``config`` on ``dataset``: ``(parts, model, task, cost, truth, nodes)``
    with the client partitions, the initial global model, its task, its cost (measured unless given),
    the clients' true self-reported profiles (default planning config) and one :class:`Node` per client,
    all sharing one model workspace."""
    parts = partition_clients(config, dataset)
    model, task, cost = initial_model(config, dataset, cost)
    truth = make_profiles(np.array([p.size for p in parts], dtype=np.float64), cost, config.simulation.tiers,
                          config.federation.seed)
    workspace = copy.deepcopy(model)
    nodes = [Node(c, dataset.train_samples(p), workspace, task, config.train, NodeProfile.of(truth, c))
             for c, p in enumerate(parts)]
    return parts, model, task, cost, truth, nodes


class FederatedRun:
    """A run in progress: ``server``, ``simulation`` (its ``nodes``), ``history`` (one record per finished
    round).

    ``dataset`` may be given to skip loading ``config.data`` (it must be what that would load), ``cost`` to
    skip measuring the model (it must be what :func:`model_cost` measures).
    """

    def __init__(self, config: FederatedConfig, dataset: Dataset | None = None,
                 cost: ModelCost | None = None):
        if not isinstance(config, FederatedConfig):
            raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}")
        self.config = config
        seed = config.federation.seed
        self.dataset = load_data(config) if dataset is None else dataset
        self.parts, model, self.task, self.cost, truth, nodes = build_nodes(config, self.dataset, cost)
        # the server plans with the reported profiles, refined by observation; the simulation keeps the truth
        reported = profiles_of([node.profile for node in nodes], self.cost, config.profiles)
        self.server = Server(model, self.task, reported, config)
        self.simulation = Simulation(self.dataset, self.parts, nodes, truth, config.simulation, seed)
        self.test = test_samples(config, self.dataset)
        self.history: list[dict] = []

    @property
    def nodes(self) -> list[Node]:
        return self.simulation.nodes

    def train(self, payload: ClientPayload, data: Samples) -> ClientUpdate:
        """Local training of one client's node on ``data`` (replaceable, e.g. to inject faults)."""
        return self.nodes[payload.client].train(payload, data)

    def cold_start(self) -> None:
        """Score every expert for every client with the initial shared gate on local data."""
        shared = shared_vector(self.server.model)
        affinity = np.stack([node.affinity(shared) for node in self.nodes])
        self.server.cold_start(np.arange(self.config.federation.num_clients), affinity)

    def step(self) -> dict:
        """Play one round; returns (and appends to ``history``) its record."""
        server, sim = self.server, self.simulation
        plan = server.configure(sim.online(server.round))
        replies = {c: sim.run(p, self.train) for c, p in plan.payloads.items()}
        report = server.aggregate(plan, replies)
        previous = self.history[-1]["sim_time"] if self.history else 0.0
        record = {**report.to_dict(), **server.evaluate(self.test),
                  "load_cv": server.load.stats().cv, "load": server.load.load.tolist(),
                  "sim_time": previous + report.seconds,
                  "time_error": float(np.median(np.abs(np.log(server.profiles.round_time(1)
                                                              / sim.expected_seconds(1)))))}
        if self.config.evaluation.aligned:
            record["aligned_accuracy"] = self.aligned_accuracy(plan.round, report.assigned)
        self.history.append(record)
        return record

    def aligned_accuracy(self, round_: int, assigned: dict) -> float | None:
        """:func:`fedmoe.federated.evaluation.aligned_accuracy` of this run."""
        return aligned_accuracy(self, round_, assigned)

    def client_evaluation(self) -> dict:
        """:func:`fedmoe.federated.evaluation.client_evaluation` of this run."""
        return client_evaluation(self)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict:
        return {"version": CHECKPOINT_VERSION, "config": self.config.to_dict(),
                "server": self.server.state_dict(), "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a checkpoint of a run with the same config (``federation.rounds`` and the options of the
        evaluation after the last round may differ)."""
        if state.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"checkpoint version {state.get('version')!r} is not {CHECKPOINT_VERSION}")
        try:
            saved = FederatedConfig.from_dict(state["config"]).flat()
        except (TypeError, ValueError) as exc:
            raise ValueError(f"checkpoint holds an unusable config: {exc}") from None
        mine = self.config.flat()
        differ = sorted(k for k in mine if k not in _RESUMABLE_CHANGES and saved[k] != mine[k])
        if differ:
            raise ValueError(f"checkpoint was written with a different config: options {differ} differ")
        self.server.load_state_dict(state["server"])
        self.history = list(state["history"])
        if len(self.history) != self.server.round:
            raise ValueError(f"checkpoint holds {len(self.history)} round records for round "
                             f"{self.server.round}")

    def result(self) -> dict:
        """The results JSON: config, data and client summary, per-round records and final figures."""
        acc = [r["accuracy"] for r in self.history]
        profiles = self.server.profiles
        return {
            "config": self.config.to_dict(),
            "dataset": {"name": self.dataset.name, "train": len(self.dataset.y_train),
                        "test": len(self.dataset.y_test), "classes": self.dataset.num_classes,
                        "input_shape": list(self.dataset.input_shape)},
            "clients": {"samples": [int(p.size) for p in self.parts], "tier": profiles.tier.tolist(),
                        "experts_fit": profiles.experts_fit().tolist(),
                        "drifted": sorted(self.simulation.drifted)},
            "model": {"shared_bytes": self.cost.base_bytes, "expert_bytes": self.cost.expert_bytes},
            "rounds": self.history,
            "final_accuracy": acc[-1] if acc else None,
            "best_accuracy": max(acc) if acc else None,
            "rounds_to_target": rounds_to_target(acc, self.config.evaluation.target_accuracy),
            "bytes_sent": sum(r["bytes_sent"] for r in self.history),
            "bytes_received": sum(r["bytes_received"] for r in self.history),
            "sim_time": self.history[-1]["sim_time"] if self.history else 0.0,
        }


def run_experiment(config: FederatedConfig, *, checkpoint=None, resume: bool = False,
                   progress: bool = False, desc: str | None = None, dataset: Dataset | None = None) -> dict:
    """Run ``federation.rounds`` rounds and return :meth:`FederatedRun.result` plus ``wall_seconds``.

    ``checkpoint``: a path written atomically after every round; with ``resume`` an existing checkpoint
    there is loaded first and the run continues from its round (same config and seed: the same result
    as an uninterrupted run).
    """
    start = time.perf_counter()
    run = FederatedRun(config, dataset)
    if resume and checkpoint is not None and Path(checkpoint).exists():
        try:
            run.load_state_dict(load_checkpoint(checkpoint))
        except ValueError as exc:
            raise ValueError(f"cannot resume from {checkpoint}: {exc}") from None
    elif config.fitness.cold_start:
        run.cold_start()
    rounds = config.federation.rounds
    bar = tqdm(total=rounds, initial=min(run.server.round, rounds), disable=not progress,
               desc=desc or config.alignment.strategy, unit="round", leave=False)
    with bar:
        while run.server.round < rounds:
            record = run.step()
            if checkpoint is not None:
                save_checkpoint(checkpoint, run.state_dict())
            bar.set_postfix(acc=f"{record['accuracy']:.3f}", cv=f"{record['load_cv']:.2f}")
            bar.update()
    result = run.result()
    if config.evaluation.clients:
        result["client_evaluation"] = run.client_evaluation()
    return {**result, "wall_seconds": time.perf_counter() - start}
