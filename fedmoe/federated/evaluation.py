"""Evaluation of a federated MoE (docs/design.md, Evaluation): global and personal.

* :func:`evaluate`: a model on a set of samples, per unit of the task's loss, with all experts or some.
* :func:`aligned_accuracy`: each round, what the selected clients' devices score with the experts they
  were given (classifiers).
* :func:`client_evaluation`: after the last round, every client on its own data (LEAF's protocol) with all
  experts, with the experts of its last assignment, and with them after ``evaluation.finetune_steps`` of
  local fine-tuning (the personalised baseline any assignment is measured against).

A client's own data is its test split where the data has natural clients, else the global test set with
each class weighted by the client's share of it in its training data (the expectation over a test split
drawn like its training data, without the sampling noise of a small one).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING

import numpy as np
import torch

from fedmoe.data import Samples
from fedmoe.federated.node import local_training, probe_samples
from fedmoe.models import FederatedMoE, Task, expert_mask, units_per_sample

if TYPE_CHECKING:
    from fedmoe.federated.config import FederatedConfig
    from fedmoe.federated.runner import FederatedRun

__all__ = ["aligned_accuracy", "check_evaluation", "client_evaluation", "evaluate"]

_BATCH = 1024
_EVALUATED = 13  # random stream of the clients evaluation.max_clients keeps
_FINETUNE = 14  # random stream of the fine-tuning's shuffling


@torch.no_grad()
def evaluate(model: FederatedMoE, task: Task, data: Samples, batch_size: int = _BATCH,
             mask: torch.Tensor | None = None) -> dict[str, float]:
    """``{"loss", "accuracy"}`` of ``model`` on ``data``, per unit of the task's loss, with the experts where
    ``mask`` (bool [E]) is True (all if None). A task with ``metrics`` (sums of ``<name>_correct`` and
    ``<name>_units`` over the batch) adds ``<name>_accuracy``: the language model's ``last_accuracy``,
    LEAF's accuracy of the next character after each window."""
    model.set_expert_mask(mask)
    model.eval()
    loss, correct, units, sums = 0.0, 0, 0, {}
    try:
        for lo in range(0, len(data), batch_size):
            inputs, targets = data[lo:lo + batch_size]
            outputs, _ = model(inputs)
            loss += float(task.loss(outputs, targets, reduction="sum"))
            hits = task.correct(outputs, targets)
            correct += int(hits.sum())
            units += hits.numel()
            for name, value in getattr(task, "metrics", lambda o, t: {})(outputs, targets).items():
                sums[name] = sums.get(name, 0.0) + value
    finally:
        model.set_expert_mask(None)
    stems = [name.removesuffix("_correct") for name in sums if name.endswith("_correct")]
    extra = {f"{stem}_accuracy": sums[f"{stem}_correct"] / max(sums[f"{stem}_units"], 1) for stem in stems}
    return {"loss": loss / max(units, 1), "accuracy": correct / max(units, 1), **extra}


@torch.no_grad()
def class_accuracy(model: FederatedMoE, task: Task, test: Samples, classes: int,
                   mask: torch.Tensor | None = None) -> np.ndarray:
    """float64 [classes]: ``model``'s accuracy on the samples of each class of ``test`` (0 where a class has
    none), with the experts where ``mask`` is True. For models with one unit per sample."""
    model.set_expert_mask(mask)
    model.eval()
    try:
        batches = (test[lo:lo + _BATCH] for lo in range(0, len(test), _BATCH))
        correct = torch.cat([task.correct(model(inputs)[0], targets) for inputs, targets in batches])
    finally:
        model.set_expert_mask(None)
    y = test.targets.numpy()
    hits = np.bincount(y, weights=correct.numpy().astype(np.float64), minlength=classes)
    return hits / np.maximum(np.bincount(y, minlength=classes), 1)


def label_share(labels: torch.Tensor, classes: int) -> np.ndarray:
    """float64 [classes]: each class's share of ``labels`` (int64 [n])."""
    return np.bincount(labels.numpy(), minlength=classes) / max(labels.numel(), 1)


def check_evaluation(config: FederatedConfig, model: FederatedMoE) -> None:
    """ValueError naming the ``[evaluation]`` option that cannot score ``model`` with ``config``'s data."""
    several = units_per_sample(model) != 1
    if config.evaluation.aligned and several:
        raise ValueError("evaluation.aligned scores one unit per sample (classifiers); use "
                         "evaluation.clients for a model with several units per sample")
    if config.evaluation.clients and several and config.data.partition != "natural":
        raise ValueError("evaluation.clients weights classes by each client's labels without natural "
                         "clients, which needs one unit per sample; use data with natural clients ([data] "
                         "partition = natural)")


def aligned_accuracy(run: FederatedRun, round_: int, assigned: dict) -> float | None:
    """What the clients' devices score with only the experts they were given: mean, over the clients in
    ``assigned`` (client -> experts), of the global model's test accuracy with the gate masked to the
    client's experts, each class weighted by its share of the client's data at round ``round_`` (so it
    follows drift). None if no client was assigned experts. Unlike ``accuracy`` (all experts allowed), it
    depends on which experts the alignment gives each client. For classification tasks."""
    model, classes = run.server.model, run.dataset.num_classes
    per_class, scores = {}, []
    for client, experts in assigned.items():
        key = tuple(int(e) for e in experts)
        if key not in per_class:
            mask = expert_mask(model.num_experts, key)
            per_class[key] = class_accuracy(model, run.task, run.test, classes, mask)
        share = label_share(run.simulation.data(int(client), round_).targets, classes)
        scores.append(float(share @ per_class[key]))
    return float(np.mean(scores)) if scores else None


def client_evaluation(run: FederatedRun) -> dict:
    """Every client (or ``evaluation.max_clients`` of them, a subset fixed by the seed) on its own data:
    ``all`` (the global model, all experts), ``aligned`` (with the experts of its last assignment) and,
    with ``evaluation.finetune_steps``, ``finetuned`` (a copy of the global model after that many local
    mini-batches on the client's training data with those experts, ``[train]``'s optimizer, learning rate
    and batch size, then scored with them). Per view: the headline metric (``last_accuracy`` where the
    task has it, else ``accuracy``) as ``mean``, ``p10``, ``p50``, ``p90`` over the clients, their number,
    and ``scores`` (client -> score). Clients never assigned are left out of the aligned views; with
    natural clients, those without test samples are left out of all."""
    config, server = run.config, run.server
    steps, natural = config.evaluation.finetune_steps, config.data.partition == "natural"
    last_round = max(server.round - 1, 0)
    last = {}
    for record in run.history:
        last.update({int(c): e for c, e in record["assigned"].items()})
    clients = np.arange(config.federation.num_clients)
    if 0 < config.evaluation.max_clients < clients.size:
        rng = np.random.default_rng([config.federation.seed, _EVALUATED])
        clients = np.sort(rng.choice(clients, config.evaluation.max_clients, replace=False))
    views = ["all", "aligned"] + (["finetuned"] if steps else [])
    scores = {view: {} for view in views}
    workspace = copy.deepcopy(server.model) if steps else None
    global_classes = {}  # experts -> per-class accuracy of the global model (no natural clients)
    for client in clients.tolist():
        score = _scorer(run, client, last_round, natural, global_classes)
        if score is None:
            continue
        scores["all"][client] = score(server.model, None)
        if client not in last:
            continue
        experts = tuple(int(e) for e in last[client])
        scores["aligned"][client] = score(server.model, experts)
        if steps:
            workspace.load_state_dict(server.model.state_dict())
            _finetune(run, workspace, client, last_round, experts, steps)
            scores["finetuned"][client] = score(workspace, experts)
    return {view: {**_percentiles(list(values.values())), "scores": values}
            for view, values in scores.items()}


def _scorer(run: FederatedRun, client: int, round_: int, natural: bool, global_classes: dict):
    """``score(model, experts)`` on ``client``'s own data (None where it has none to score on)."""
    task, cap = run.task, run.config.evaluation.client_samples
    if natural:
        gen = torch.Generator().manual_seed(client)
        test = probe_samples(run.dataset.client_test_samples(client), cap, gen)
        if len(test) == 0:
            return None

        def score(model, experts):
            mask = None if experts is None else expert_mask(model.num_experts, experts)
            result = evaluate(model, task, test, mask=mask)
            return result.get("last_accuracy", result["accuracy"])

        return score
    classes = run.dataset.num_classes
    share = label_share(run.simulation.data(client, round_).targets, classes)

    def score(model, experts):
        mask = None if experts is None else expert_mask(model.num_experts, experts)
        if model is not run.server.model:
            return float(share @ class_accuracy(model, task, run.test, classes, mask))
        if experts not in global_classes:
            global_classes[experts] = class_accuracy(model, task, run.test, classes, mask)
        return float(share @ global_classes[experts])

    return score


def _finetune(run: FederatedRun, model: FederatedMoE, client: int, round_: int, experts: tuple, steps: int):
    """``steps`` local mini-batches of ``client``'s training data on ``model``, routed to ``experts``."""
    data, config = run.simulation.data(client, round_), run.config.train
    epochs = math.ceil(steps / math.ceil(len(data) / config.batch_size))
    config = dataclasses.replace(config, epochs=epochs, max_steps=steps)
    model.set_expert_mask(expert_mask(model.num_experts, experts))
    try:
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence(
            [run.config.federation.seed, _FINETUNE, client]).generate_state(1)[0]))
        local_training(model, run.task, data, config, gen)
    finally:
        model.set_expert_mask(None)


def _percentiles(values: list[float]) -> dict:
    """``{"clients", "mean", "p10", "p50", "p90"}`` of per-client scores (None where there are none)."""
    if not values:
        return {"clients": 0, "mean": None, "p10": None, "p50": None, "p90": None}
    p10, p50, p90 = np.percentile(values, [10, 50, 90])
    return {"clients": len(values), "mean": float(np.mean(values)), "p10": float(p10), "p50": float(p50),
            "p90": float(p90)}
