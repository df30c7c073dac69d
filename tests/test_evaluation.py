"""Global and personal evaluation: per-client scores with all experts, the aligned experts and after local
fine-tuning (the personalised baseline), on natural clients and on label-weighted partitions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from fedmoe.federated import FederatedConfig, FederatedRun
from fedmoe.federated.evaluation import (
    _finetune,
    class_accuracy,
    client_evaluation,
    evaluate,
    label_share,
    weighted_accuracy,
)
from fedmoe.federated.node import probe_samples
from fedmoe.models import expert_mask

CFG = FederatedConfig().replace({"federation.num_clients": 6, "federation.clients_per_round": 4,
                                 "federation.rounds": 2, "model.num_experts": 4, "model.d_model": 8,
                                 "model.d_hidden": 16, "model.channels": (4,), "alignment.max_experts": 2,
                                 "train.batch_size": 16, "data.dirichlet_alpha": 0.3,
                                 "simulation.dropout": False, "federation.deadline": None,
                                 "evaluation.clients": True})

pytestmark = pytest.mark.usefixtures("one_thread")


def _played(config: FederatedConfig, dataset=None) -> FederatedRun:
    run = FederatedRun(config, dataset)
    run.cold_start()
    for _ in range(config.federation.rounds):
        run.step()
    return run


def _last_assignment(run: FederatedRun) -> dict[int, tuple[int, ...]]:
    last = {}
    for record in run.history:
        last.update({int(c): tuple(e) for c, e in record["assigned"].items()})
    return last


def digits_test(run: FederatedRun):
    """The whole test set (every class has samples in it)."""
    test = run.dataset.test_samples()
    assert set(test.targets.tolist()) == set(range(10))
    return test


def test_a_class_missing_from_the_test_set_leaves_the_weighting():
    share = np.array([0.5, 0.25, 0.25])
    assert weighted_accuracy(share, np.array([1.0, np.nan, 0.0])) == pytest.approx(0.5 / 0.75)
    assert weighted_accuracy(share, np.array([0.8, 0.4, 0.0])) == pytest.approx(0.5)
    assert weighted_accuracy(np.array([0.0, 1.0, 0.0]), np.array([1.0, np.nan, 0.0])) is None


def test_without_natural_clients_each_class_is_weighted_by_the_clients_labels(digits):
    run = _played(CFG, digits)
    state = {k: v.clone() for k, v in run.server.model.state_dict().items()}
    result = client_evaluation(run)
    model, classes = run.server.model, digits.num_classes
    last = _last_assignment(run)
    assert set(result) == {"all", "aligned"}
    assert result["all"]["clients"] == 6 and result["aligned"]["clients"] == len(last)
    for client in range(6):
        share = label_share(run.simulation.data(client, run.server.round - 1).targets, classes)
        test = digits_test(run)
        want = share @ class_accuracy(model, run.task, test, classes)
        assert result["all"]["scores"][client] == pytest.approx(want)
        if client in last:
            mask = expert_mask(4, last[client])
            want = share @ class_accuracy(model, run.task, test, classes, mask)
            assert result["aligned"]["scores"][client] == pytest.approx(want)
    scores = list(result["all"]["scores"].values())
    assert result["all"]["mean"] == pytest.approx(np.mean(scores))
    assert result["all"]["p10"] <= result["all"]["p50"] <= result["all"]["p90"]
    for name, value in run.server.model.state_dict().items():  # scoring leaves the global model alone
        assert torch.equal(value, state[name]), name


def test_fine_tuning_trains_a_copy_for_exactly_the_given_steps_with_the_aligned_experts(digits, monkeypatch):
    config = CFG.replace({"evaluation.finetune_steps": 7, "evaluation.max_clients": 3})
    run = _played(config, digits)
    state = {k: v.clone() for k, v in run.server.model.state_dict().items()}
    steps, masks = [], []
    loss = type(run.task).loss

    def counting(task, outputs, targets, reduction="mean"):
        if torch.is_grad_enabled():
            steps.append(1)
        return loss(task, outputs, targets, reduction)

    import fedmoe.models.classifier as classifier
    monkeypatch.setattr(type(run.task), "loss", counting)
    set_mask = classifier.MoEClassifier.set_expert_mask

    def recording(model, mask):
        if torch.is_grad_enabled() and mask is not None:
            masks.append(tuple(torch.nonzero(mask).flatten().tolist()))
        return set_mask(model, mask)

    monkeypatch.setattr(classifier.MoEClassifier, "set_expert_mask", recording)
    result = client_evaluation(run)
    evaluated = sorted(result["all"]["scores"])
    assert len(evaluated) == 3 and result["all"]["clients"] == 3  # max_clients, a seeded subset
    assert evaluated == sorted(client_evaluation(run)["all"]["scores"])
    tuned = sorted(result["finetuned"]["scores"])
    assert tuned == sorted(result["aligned"]["scores"]) and tuned
    assert len(steps) == 2 * 7 * len(tuned)  # two evaluations, 7 mini-batches per client, however small
    last = _last_assignment(run)
    assert sorted(masks) == sorted([last[c] for c in tuned] * 2)  # each client trains its own experts
    assert any(result["finetuned"]["scores"][c] != result["aligned"]["scores"][c] for c in tuned)
    for name, value in run.server.model.state_dict().items():
        assert torch.equal(value, state[name]), name


def test_natural_clients_are_scored_on_their_own_test_split_with_and_without_fine_tuning(tmp_path):
    from test_shakespeare import _lm_config, tiny_dataset

    path, clients = tiny_dataset(tmp_path)
    config = _lm_config(path, clients).replace({"evaluation.finetune_steps": 2})
    run = _played(config)
    result = client_evaluation(run)
    assert set(result) == {"all", "aligned", "finetuned"}
    assert result["finetuned"]["clients"] == result["aligned"]["clients"] == clients
    last = _last_assignment(run)
    for client in range(clients):
        test = probe_samples(run.dataset.client_test_samples(client), config.evaluation.client_samples,
                             torch.Generator().manual_seed(client))
        assert len(test) == config.evaluation.client_samples
        want = run.server.evaluate(test)["last_accuracy"]
        assert result["all"]["scores"][client] == pytest.approx(want)
        want = run.server.evaluate(test, mask=expert_mask(4, last[client]))["last_accuracy"]
        assert result["aligned"]["scores"][client] == pytest.approx(want)
        # a fresh copy fine-tuned alone scores the same: nothing leaks from one client to the next
        alone = copy.deepcopy(run.server.model)
        _finetune(run, alone, client, run.server.round - 1, last[client], 2)
        want = run.server.evaluate(test)  # the global model again: untouched
        assert result["all"]["scores"][client] == pytest.approx(want["last_accuracy"])
        mask = expert_mask(4, last[client])
        tuned = evaluate(alone, run.task, test, mask=mask)["last_accuracy"]
        assert result["finetuned"]["scores"][client] == pytest.approx(tuned)


@pytest.mark.parametrize(("changes", "match"), [
    ({"evaluation.finetune_steps": -1}, "evaluation: finetune_steps"),
    ({"evaluation.max_clients": 1.5}, "evaluation: max_clients"),
    ({"evaluation.clients": False, "evaluation.finetune_steps": 3},
     "finetune_steps needs evaluation.clients"),
    ({"evaluation.clients": False, "evaluation.max_clients": 3}, "max_clients needs evaluation.clients"),
    ({"model.kind": "transformer", "evaluation.clients": False, "evaluation.aligned": True},
     "evaluation.aligned scores one unit"),
])
def test_bad_evaluation_options_are_named(changes, match):
    with pytest.raises((TypeError, ValueError), match=match):
        CFG.replace(changes)
