"""The model protocol and the node runtime: any model that follows ``FederatedMoE`` (here not the built-in
classifier) trains on nodes, aggregates on the server and checkpoints, with nothing else to plug in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from fedmoe.data import Samples
from fedmoe.federated import (
    ClientReply,
    FederatedConfig,
    Node,
    NodeProfile,
    Server,
    model_cost,
    profiles_of,
    shared_vector,
)
from fedmoe.models import ClassificationTask, FederatedMoE, MoELayer, Task

pytestmark = pytest.mark.usefixtures("one_thread")


class FlatMoE(nn.Module):
    """A model fedmoe does not ship: flat inputs -> linear -> residual MoE layer -> head."""

    def __init__(self, d_in: int, classes: int, experts: int = 4):
        super().__init__()
        self.proj = nn.Linear(d_in, 8)
        self.moe = MoELayer(8, 16, experts, top_k=2)
        self.head = nn.Linear(8, classes)

    @property
    def expert_bank(self) -> nn.Parameter:
        return self.moe.expert_bank

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    def named_shared_parameters(self):
        return ((n, p) for n, p in self.named_parameters() if p is not self.moe.expert_bank)

    def set_expert_mask(self, mask):
        self.moe.set_expert_mask(mask)

    def forward(self, x):
        h = self.proj(x.flatten(1))
        mixed, stats = self.moe(h)
        return self.head(h + mixed), stats


def test_any_model_that_follows_the_protocol_federates(digits, tmp_path):
    config = FederatedConfig.from_dict({"federation": {"num_clients": 3, "clients_per_round": 0,
                                                       "deadline": "none"},
                                        "alignment": {"max_experts": 2}, "model": {"num_experts": 4}})
    torch.manual_seed(0)
    model = FlatMoE(64, digits.num_classes)
    task = ClassificationTask()
    assert isinstance(model, FederatedMoE) and isinstance(task, Task)
    parts = np.array_split(np.arange(len(digits.y_train)), 3)
    cost = model_cost(model, torch.from_numpy(digits.x_train[:1]), config.train.epochs)
    assert cost.expert_bytes == model.expert_bank.shape[1] * 4
    profile = NodeProfile(compute=1e9, memory=cost.base_bytes + 8 * cost.expert_bytes, bandwidth=1e6,
                          latency=0.01, reliability=1.0, samples=160)
    workspace = copy.deepcopy(model)
    nodes = [Node(c, digits.train_samples(p), workspace, task, config.train, profile)
             for c, p in enumerate(parts)]
    server = Server(model, task, profiles_of([n.profile for n in nodes], cost, config.profiles), config)
    server.cold_start(np.arange(3), np.stack([n.affinity(shared_vector(model)) for n in nodes]))
    bank = model.expert_bank.detach().clone()
    shared = shared_vector(model)
    before = server.evaluate(digits.test_samples())
    for _ in range(3):
        plan = server.configure(np.arange(3))
        report = server.aggregate(plan, {c: ClientReply(c, nodes[c].train(p), 1.0)
                                         for c, p in plan.payloads.items()})
        assert report.accepted == [0, 1, 2] and report.invalid == {}
    trained = sorted({e for experts in report.assigned.values() for e in experts})
    assert (model.expert_bank.detach()[trained] != bank[trained]).any(1).all()
    assert not torch.equal(shared_vector(model), shared)
    after = server.evaluate(digits.test_samples())
    assert after["loss"] < before["loss"]
    state = server.state_dict()
    other = Server(FlatMoE(64, digits.num_classes), task, profiles_of([profile] * 3, cost, config.profiles),
                   config)
    other.load_state_dict(state)
    assert other.evaluate(digits.test_samples()) == after


def test_a_node_checks_what_it_is_given(digits):
    model = FlatMoE(64, digits.num_classes)
    data = digits.train_samples(np.arange(10))
    config = FederatedConfig().train
    with pytest.raises(TypeError, match="data"):
        Node(0, (data.inputs, data.targets), model, ClassificationTask(), config)
    with pytest.raises(TypeError, match="model"):
        Node(0, data, nn.Linear(2, 2), ClassificationTask(), config)
    with pytest.raises(ValueError, match="reliability"):
        NodeProfile(1e9, 1e6, 1e6, 0.0, 1.5, 10)
    node = Node(1, data, model, ClassificationTask(), config)
    payload_for_other = type("P", (), {"client": 2})()
    with pytest.raises(ValueError, match="client 2"):
        node.train(payload_for_other)
    with pytest.raises(ValueError, match="same number"):
        Samples(data.inputs, data.targets[:3])


def test_max_steps_and_feedback_samples_bound_a_rounds_work(digits):
    """``train.max_steps`` caps the local mini-batches over all epochs; ``train.feedback_samples`` measures
    the feedback on a seeded subset (the update still counts every sample)."""
    from fedmoe.federated import ClientPayload, TrainConfig, train_client

    model = FlatMoE(64, 10)
    data = Samples.from_numpy(digits.x_train[:100].reshape(100, -1), digits.y_train[:100])
    payload = ClientPayload(0, 0, np.array([1, 2]), shared_vector(model),
                            model.expert_bank[torch.tensor([1, 2])].detach().clone(), seed=7)

    class Counting(ClassificationTask):
        def __init__(self):
            super().__init__()
            self.calls = {"mean": 0, "none": 0}

        def loss(self, outputs, targets, reduction="mean"):
            self.calls[reduction] += outputs.shape[0] if reduction == "none" else 1
            return super().loss(outputs, targets, reduction)

    def run(**changes):
        task = Counting()
        update = train_client(copy.deepcopy(model), task, payload, data,
                              TrainConfig(batch_size=10, epochs=3, **changes))
        return task.calls, update

    calls, _ = run()
    assert calls == {"mean": 30, "none": 200}  # 3 epochs x 10 batches; feedback before and after
    calls, capped = run(max_steps=4, feedback_samples=25)
    assert calls == {"mean": 4, "none": 50} and capped.num_samples == 100
    assert int(capped.feedback.samples.max()) <= 25
    again = run(max_steps=4, feedback_samples=25)[1]
    assert torch.equal(again.shared, capped.shared)  # seeded: the same subset and the same steps
    with pytest.raises(ValueError, match="max_steps"):
        TrainConfig(max_steps=-1)
