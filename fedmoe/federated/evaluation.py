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
from fedmoe.federated.node import EVAL_BATCH, local_training, probe_samples
from fedmoe.models import FederatedMoE, Task, expert_mask

if TYPE_CHECKING:
    from fedmoe.federated.runner import FederatedRun

__all__ = ["aligned_accuracy", "class_accuracy", "client_evaluation", "evaluate", "label_share",
           "weighted_accuracy"]

_EVALUATED = 13  # random stream of the clients evaluation.max_clients keeps
_FINETUNE = 14  # random stream of the fine-tuning's shuffling


@torch.no_grad()
def evaluate(model: FederatedMoE, task: Task, data: Samples, batch_size: int = EVAL_BATCH,
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
    """float64 [classes]: ``model``'s accuracy on the samples of each class of ``test`` (NaN where a class
    has none), with the experts where ``mask`` is True. For models with one unit per sample."""
    if len(test) == 0:
        raise ValueError("test must hold >= 1 sample")
    model.set_expert_mask(mask)
    model.eval()
    try:
        batches = (test[lo:lo + EVAL_BATCH] for lo in range(0, len(test), EVAL_BATCH))
        correct = torch.cat([task.correct(model(inputs)[0], targets) for inputs, targets in batches])
    finally:
        model.set_expert_mask(None)
    y = test.targets.numpy()
    counts = np.bincount(y, minlength=classes)
    hits = np.bincount(y, weights=correct.numpy().astype(np.float64), minlength=classes)
    return np.where(counts > 0, hits / np.maximum(counts, 1), np.nan)


def label_share(labels: torch.Tensor, classes: int) -> np.ndarray:
    """float64 [classes]: each class's share of ``labels`` (int64 [n])."""
    return np.bincount(labels.numpy(), minlength=classes) / max(labels.numel(), 1)


def weighted_accuracy(share: np.ndarray, per_class: np.ndarray) -> float | None:
    """The accuracy of a client whose classes come in ``share`` (float [C]), from ``per_class`` accuracies
    (float [C], NaN where the test set has none: the share is renormalised over the others); None where
    none of its classes can be scored."""
    scored = ~np.isnan(per_class)
    weight = share * scored
    return float(weight @ np.where(scored, per_class, 0.0) / weight.sum()) if weight.sum() > 0 else None


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
        if (score := weighted_accuracy(share, per_class[key])) is not None:
            scores.append(score)
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
    steps = config.evaluation.finetune_steps
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
    own = _OwnData(run, last_round)
    workspace = copy.deepcopy(server.model) if steps else None
    for client in clients.tolist():
        score = own.score(client, server.model, None, cached=True)
        if score is None:
            continue
        scores["all"][client] = score
        if client not in last:
            continue
        experts = tuple(int(e) for e in last[client])
        scores["aligned"][client] = own.score(client, server.model, experts, cached=True)
        if steps:
            workspace.load_state_dict(server.model.state_dict())
            _finetune(run, workspace, client, last_round, experts, steps)
            scores["finetuned"][client] = own.score(client, workspace, experts, cached=False)
    return {view: {**_percentiles(list(values.values())), "scores": values}
            for view, values in scores.items()}


class _OwnData:
    """Scores a model on a client's own data: its test split (at most ``evaluation.client_samples`` of it)
    with natural clients, else the whole test set with classes weighted by its labels at ``round_``."""

    def __init__(self, run: FederatedRun, round_: int):
        self.run, self.round = run, round_
        self.natural = run.config.data.partition == "natural"
        self.test = None if self.natural else run.dataset.test_samples()
        self.per_class = {}  # experts -> per-class accuracy of the global model

    def score(self, client: int, model: FederatedMoE, experts: tuple[int, ...] | None,
              cached: bool) -> float | None:
        """``model``'s score with ``experts`` (all if None); None where the client has nothing to score on.
        ``cached``: ``model`` is the global model, whose per-class accuracies are kept."""
        run, mask = self.run, None if experts is None else expert_mask(model.num_experts, experts)
        if self.natural:
            cap, gen = run.config.evaluation.client_samples, torch.Generator().manual_seed(client)
            test = probe_samples(run.dataset.client_test_samples(client), cap, gen)
            if len(test) == 0:
                return None
            result = evaluate(model, run.task, test, mask=mask)
            return result.get("last_accuracy", result["accuracy"])
        classes = run.dataset.num_classes
        share = label_share(run.simulation.data(client, self.round).targets, classes)
        if not cached:
            return weighted_accuracy(share, class_accuracy(model, run.task, self.test, classes, mask))
        if experts not in self.per_class:
            self.per_class[experts] = class_accuracy(model, run.task, self.test, classes, mask)
        return weighted_accuracy(share, self.per_class[experts])


def _finetune(run: FederatedRun, model: FederatedMoE, client: int, round_: int, experts: tuple, steps: int):
    """``steps`` local mini-batches of ``client``'s training data on ``model``, routed to ``experts``."""
    data, config = run.simulation.data(client, round_), run.config.train
    if len(data) == 0:
        raise ValueError(f"client {client} has no training samples to fine-tune on")
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
