"""The Flower backend: configure/aggregate units on an in-process grid, Flower's simulation engine and a
SuperLink + SuperNodes deployment on loopback, both checked against fedmoe's own loop."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import tracemalloc
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Array, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.config import flatten_dict
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmoe.federated import ClientReply, FederatedConfig, FederatedRun, load_checkpoint, shared_vector
from fedmoe.flower import EXPERT_ROWS, FedMoEStrategy, client_app, federated_config
from fedmoe.flower.client_app import node_of
from fedmoe.flower.records import pack_arrays, pinned_nodes, unpack_array, unpack_arrays

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
APP = REPO / "examples" / "flower_app"
BIN = Path(sys.executable).parent
CONFIG = FederatedConfig().replace({"federation.num_clients": 4, "federation.clients_per_round": 3,
                                    "federation.rounds": 2, "model.num_experts": 8,
                                    "alignment.max_experts": 4, "federation.deadline": None,
                                    "simulation.dropout": False, "federation.seed": 1})


def run_config(config: FederatedConfig) -> dict:
    """The Flower run config of ``config``: one flat key per option path, ``-`` for ``_`` (as the example's
    pyproject spells it), tuples comma-separated."""
    return {k.replace("_", "-"): ",".join(map(str, v)) if isinstance(v, list) else v
            for k, v in config.flat().items()}


def own_loop(config: FederatedConfig) -> FederatedRun:
    """fedmoe's own loop after ``federation.rounds`` rounds (no simulated faults: Flower nodes are real)."""
    run = FederatedRun(config.replace({"simulation.dropout": False, "simulation.availability": 1.0,
                                       "simulation.corrupt": 0.0}))
    run.cold_start()
    for _ in range(config.federation.rounds):
        run.step()
    return run


# ---------------------------------------------------------------------- an in-process grid


@pytest.fixture(autouse=True)
def server_process():
    """The identity Flower gives the ServerApp process (instruction messages need it); one torch thread,
    as every Flower process of these tests gets (on a shared 2-core machine more threads thrash)."""
    saved = {k: getattr(TaskIdentity, f"_{k}") for k in ("run_id", "node_id", "task_id")}
    threads = torch.get_num_threads()
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    for k, v in saved.items():
        setattr(TaskIdentity, f"_{k}", v)


class LocalGrid(Grid):
    """Nodes in this process: ``send_and_receive`` runs the ClientApp on each message (an exception
    becomes an error reply, as in Flower); ``tamper[node](message, reply) -> reply`` alters a node's train
    replies."""

    def __init__(self, node_configs: dict[int, dict], config: FederatedConfig = CONFIG):
        self.app = client_app()
        self.contexts = {node: Context(run_id=1, node_id=node, node_config=nc, state=RecordDict(),
                                       run_config=run_config(config)) for node, nc in node_configs.items()}
        self.tamper = {}
        self.silent: set[int] = set()  # nodes that never reply
        self.sent: list[Message] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            try:
                reply = self.app(msg, self.contexts[node])
            except Exception as exc:
                reply = Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
            if msg.metadata.message_type == "train" and node in self.tamper:
                reply = self.tamper[node](msg, reply)
            replies.append(reply)
        return replies

    def set_run(self, run):
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        raise NotImplementedError

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError


def nodes(n: int = 4, first: int = 100) -> dict[int, dict]:
    """Node id -> node_config for partitions 0..n-1 (node ids deliberately not the partition ids)."""
    return {first + 7 * c: {"partition-id": c, "num-partitions": n} for c in range(n)}


def strategy_for(config: FederatedConfig = CONFIG, **kwargs) -> FedMoEStrategy:
    run = FederatedRun(config)
    return FedMoEStrategy(config, copy.deepcopy(run.server.model), run.dataset.spec, cost=run.cost, **kwargs)


# ---------------------------------------------------------------------- units


def test_federated_config_from_run_config():
    rc = run_config(CONFIG)
    assert federated_config({**rc, "out": "/tmp/x"}) == CONFIG
    assert federated_config({"model.channels": "8,16,4", "federation.deadline": "none"}).model.channels == \
        (8, 16, 4)
    assert federated_config({"federation.num_clients": 12}).federation.num_clients == 12  # underscores too
    fair = federated_config({"alignment.strategy": "fair", "alignment.desirability.fairness": 0.5})
    assert fair.alignment.strategy == "fair" and fair.alignment.desirability.fairness == 0.5
    with pytest.raises(ValueError, match="num_experts_typo"):
        federated_config({"model.num-experts-typo": 3})
    with pytest.raises(ValueError, match="unknown option or section 'rounds'"):
        federated_config({"rounds": 3})
    with pytest.raises(ValueError, match="channels"):
        federated_config({"model.channels": "16,x"})
    with pytest.raises(TypeError, match="run_config"):
        federated_config([("rounds", 2)])
    # the example app's pyproject: nested tables, flattened by Flower to option paths
    declared = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    federated_config(flatten_dict(declared))


def test_strategy_rejects_bad_arguments():
    run = FederatedRun(CONFIG)
    model = run.server.model
    spec = run.dataset.spec
    with pytest.raises(TypeError, match="config"):
        FedMoEStrategy(CONFIG.to_dict(), model, spec)
    with pytest.raises(TypeError, match="model"):
        FedMoEStrategy(CONFIG, object(), spec)
    with pytest.raises(TypeError, match="spec"):
        FedMoEStrategy(CONFIG, model, (1, 8, 8))
    with pytest.raises(TypeError, match="cost"):
        FedMoEStrategy(CONFIG, model, spec, cost=1.0)
    for bad, error in ((0, ValueError), (5, ValueError), (True, TypeError), ("2", TypeError)):
        with pytest.raises(error, match="min_nodes"):
            FedMoEStrategy(CONFIG, model, spec, min_nodes=bad)
    with pytest.raises(ValueError, match="setup_timeout"):
        FedMoEStrategy(CONFIG, model, spec, setup_timeout=0)
    with pytest.raises(RuntimeError, match="configure_train"):
        FedMoEStrategy(CONFIG, model, spec).aggregate_train(1, [])


def test_configure_registers_nodes_and_sends_only_assigned_experts():
    grid = LocalGrid(nodes())
    strategy = strategy_for()
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord({"note": "hi"}), grid))
    reference = FederatedRun(CONFIG)
    # registration: node -> partition, profiles as fedmoe's simulation reports them, cold-started fitness
    assert strategy.nodes == {node: nc["partition-id"] for node, nc in nodes().items()}
    for field in ("compute", "memory", "bandwidth", "latency", "reliability", "samples"):
        np.testing.assert_allclose(getattr(strategy.server.profiles, field),
                                   getattr(reference.server.profiles, field), rtol=1e-12)
    reference.cold_start()
    np.testing.assert_allclose(strategy.server.fitness.to_dense(), reference.server.fitness.to_dense())
    # the plan is fedmoe's own for the same state; each node gets the shared arrays and its experts only
    plan = reference.server.configure(np.arange(CONFIG.federation.num_clients))
    assert {m.metadata.dst_node_id for m in messages} == {n for n, c in strategy.nodes.items()
                                                          if c in plan.payloads}
    shared_names = {name for name, _ in strategy.server.model.named_shared_parameters()}
    bank = strategy.server.model.expert_bank.detach().numpy()
    for msg in messages:
        assert msg.metadata.message_type == "train"
        client = strategy.nodes[msg.metadata.dst_node_id]
        config, arrays = msg.content.config_records["config"], msg.content.array_records["arrays"]
        assert config["experts"] == plan.payloads[client].experts.tolist()
        assert config["note"] == "hi" and config["server-round"] == 1 and config["seed"] == plan.payloads[
            client].seed
        assert set(arrays) == shared_names | {EXPERT_ROWS}
        np.testing.assert_array_equal(arrays[EXPERT_ROWS].numpy(), bank[config["experts"]])
        assert 1 <= len(config["experts"]) <= CONFIG.alignment.max_experts


def test_rounds_on_local_grid_equal_own_loop():
    grid = LocalGrid(nodes())
    strategy = strategy_for()
    result = strategy.start(grid)
    reference = own_loop(CONFIG)
    assert [r["assigned"] for r in strategy.history] == [r["assigned"] for r in reference.history]
    assert [r["accepted"] for r in strategy.history] == [r["accepted"] for r in reference.history]
    final = result.arrays.to_torch_state_dict()
    for name, value in reference.server.model.state_dict().items():
        torch.testing.assert_close(final[name], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(strategy.server.fitness.to_dense(), reference.server.fitness.to_dense(),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(strategy.server.load.load, reference.server.load.load)
    assert result.train_metrics_clientapp[2]["accepted"] == len(reference.history[1]["accepted"])


@pytest.mark.parametrize("changes, asked", [({"fitness.signal": "after"}, False),
                                             ({"fitness.signal": "after", "drift.rescore": True}, True),
                                             ({}, True)])  # the default signal is the affinity
def test_the_gate_affinity_travels_with_a_train_reply_only_when_asked(changes, asked):
    config = CONFIG.replace({"federation.clients_per_round": 0, "drift.threshold": 1.0, **changes})
    grid = LocalGrid(nodes(), config)
    strategy = strategy_for(config)
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid))
    replies = grid.send_and_receive(messages)
    run = FederatedRun(config)
    plan = copy.deepcopy(strategy.server).configure(np.arange(config.federation.num_clients))
    for reply in replies:
        client = strategy.nodes[reply.metadata.src_node_id]
        metrics = reply.content.metric_records["metrics"]
        parsed = strategy._reply(client, reply, plan.payloads[client].experts.size).update
        if not asked:
            assert "affinity" not in metrics and parsed.affinity is None
            continue
        own = run.train(plan.payloads[client], run.simulation.data(client, 0)).affinity
        np.testing.assert_allclose(metrics["affinity"], own, rtol=1e-6)  # what fedmoe's own client sends
        np.testing.assert_allclose(parsed.affinity, own, rtol=1e-6)
    strategy.aggregate_train(1, replies)
    assert strategy.history[-1]["accepted"] == list(range(config.federation.num_clients))


def test_aggregate_filters_faults_and_updates_fitness_and_load_from_metrics():
    config = CONFIG.replace({"federation.clients_per_round": 0})
    grid = LocalGrid(nodes(), config)
    strategy = strategy_for(config)
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid))
    by_client = {strategy.nodes[m.metadata.dst_node_id]: m.metadata.dst_node_id for m in messages}
    assert sorted(by_client) == [0, 1, 2, 3]

    def drop_feedback_before(msg, reply):
        del reply.content.metric_records["metrics"]["before-share"]
        return reply

    def poison(msg, reply):
        rows = reply.content.array_records["arrays"][EXPERT_ROWS].numpy().copy()
        rows[0, 0] = np.nan
        reply.content.array_records["arrays"][EXPERT_ROWS] = Array(rows)
        return reply

    grid.tamper = {by_client[0]: lambda msg, reply: Message(Error(code=1, reason="boom"), reply_to=msg),
                   by_client[1]: drop_feedback_before, by_client[2]: poison}
    reference = copy.deepcopy(strategy.server)  # fedmoe's server, to be fed client 3's update only
    bank_before = strategy.server.model.expert_bank.detach().clone()
    replies = grid.send_and_receive(messages)
    arrays, metrics = strategy.aggregate_train(1, replies)
    report = strategy.history[-1]
    assert report["accepted"] == [3]
    assert "boom" in report["dropped"]["0"] and "malformed reply" in report["invalid"]["1"]
    assert "non-finite" in report["invalid"]["2"]
    assert metrics["accepted"] == 1 and metrics["dropped"] == 1 and metrics["invalid"] == 2
    # only client 3's experts moved; fitness and load follow its MetricRecord as fedmoe's server has them
    good = next(r for r in replies if r.metadata.src_node_id == by_client[3])
    trained = good.content.config_records["config"]["experts"]
    moved = (strategy.server.model.expert_bank.detach() != bank_before).any(1).nonzero().flatten().tolist()
    assert moved == trained
    plan = reference.configure(np.arange(config.federation.num_clients))
    run = FederatedRun(config)
    update = run.train(plan.payloads[3], run.simulation.data(3, 0))
    reference.aggregate(plan, {3: ClientReply(3, update, 1.0)})
    samples = good.content.metric_records["metrics"]["samples"]
    for field in ("share", "loss", "accuracy", "samples"):  # both feedbacks travel in the MetricRecord
        sent = good.content.metric_records["metrics"]
        np.testing.assert_allclose(sent[field], getattr(update.feedback, field), rtol=1e-12)
        np.testing.assert_allclose(sent[f"before-{field}"], getattr(update.feedback_before, field),
                                   rtol=1e-12)
    np.testing.assert_allclose(strategy.server.load.load,
                               np.bincount(trained, weights=samples, minlength=CONFIG.model.num_experts))
    np.testing.assert_allclose(strategy.server.load.load, reference.load.load)
    np.testing.assert_allclose(strategy.server.fitness.to_dense(), reference.fitness.to_dense(), rtol=1e-6)
    np.testing.assert_array_equal(arrays["moe.expert_bank"].numpy(),
                                  strategy.server.model.expert_bank.detach().numpy())
    # a reply from a node that was not asked is ignored: the asked ones count as not replying
    asked = list(strategy.configure_train(2, arrays, ConfigRecord(), grid))
    stranger = Message(RecordDict(), reply_to=Message(RecordDict(), 999, "train"))
    strategy.aggregate_train(2, [stranger])
    assert strategy.history[-1]["accepted"] == []
    assert len(strategy.history[-1]["dropped"]) == len(asked) > 0


def test_registration_uses_node_config_profiles_and_rejects_bad_nodes():
    config = CONFIG.replace({"federation.clients_per_round": 0})
    small = FederatedRun(config).cost
    memory = (small.base_bytes + 1.5 * small.expert_bytes) * 1.2  # one expert fits after the safety margin
    node_configs = {10: {"partition-id": 0, "memory-bytes": memory, "latency-s": 0.5},
                    11: {"num-partitions": 4},  # no partition-id
                    12: {"partition-id": 1}, 13: {"partition-id": 1},  # a duplicate
                    14: {"partition-id": 2, "num-partitions": 3},  # wrong federation size
                    15: {"partition-id": 3}, 16: {"partition-id": 2},  # silent
                    17: {"partition-id": 2, "reliability": 1.5}}
    grid = LocalGrid(node_configs, config)
    grid.silent = {16}
    strategy = strategy_for(config, min_nodes=3)
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid))
    assert strategy.nodes == {10: 0, 12: 1, 15: 3}
    assert "partition-id" in strategy.rejected[11] and "already bound to node 12" in strategy.rejected[13]
    assert "num-partitions" in strategy.rejected[14] and "no reply" in strategy.rejected[16]
    assert "reliability" in strategy.rejected[17]
    assert strategy.server.profiles.memory[0] == memory and strategy.server.profiles.latency[0] == 0.5
    assert strategy.server.profiles.memory[2] == 0  # never registered: fits no expert
    experts = {strategy.nodes[m.metadata.dst_node_id]: m.content.config_records["config"]["experts"]
               for m in messages}
    assert sorted(experts) == [0, 1, 3] and len(experts[0]) == 1
    with pytest.raises(TimeoutError, match="only 3 of min_nodes=4"):
        strategy_for(config, setup_timeout=0.2).configure_train(1, strategy.arrays(), ConfigRecord(), grid)


# ---------------------------------------------------------------------- who a node is, what a reply may hold


def _round(strategy: FedMoEStrategy, grid: LocalGrid, server_round: int, alter=None):
    """One configure/train/aggregate round on ``grid``; ``alter(messages, replies) -> replies``."""
    messages = list(strategy.configure_train(server_round, strategy.arrays(), ConfigRecord(), grid))
    replies = list(grid.send_and_receive(messages))
    if alter is not None:
        replies = alter(messages, replies)
    return messages, strategy.aggregate_train(server_round, replies)


def test_a_partition_stays_bound_to_the_node_that_registered_it():
    """A node that comes later claiming a bound partition-id is refused, also while the bound node is
    offline; the bound node keeps its client and trains when it is back. A node answers for one client."""
    config = CONFIG.replace({"federation.clients_per_round": 0})
    grid = LocalGrid(nodes(), config)
    strategy = strategy_for(config)
    _round(strategy, grid, 1)
    assert strategy.nodes == {100: 0, 107: 1, 114: 2, 121: 3}
    bound = grid.contexts.pop(100)  # client 0's node goes offline; an impostor claims its partition
    grid.contexts[999] = Context(run_id=1, node_id=999, node_config={"partition-id": 0}, state=RecordDict(),
                                 run_config=run_config(config))
    messages, _ = _round(strategy, grid, 2)
    assert "partition-id 0 is already bound to node 100" in strategy.rejected[999]
    assert strategy.nodes == {100: 0, 107: 1, 114: 2, 121: 3}
    assert 999 not in {m.metadata.dst_node_id for m in grid.sent[-len(messages):]}
    assert strategy.history[-1]["accepted"] == [1, 2, 3]
    grid.contexts[100] = bound  # back: the same node id (under SuperNode auth, the same key)
    _round(strategy, grid, 3)
    assert strategy.history[-1]["accepted"] == [0, 1, 2, 3] and strategy.nodes[100] == 0
    assert 999 not in strategy.nodes and strategy.rejected[999]  # asked once, never again

    # one node, two registration answers (a second claiming another partition): only its first counts
    class TwoFaced(LocalGrid):
        def send_and_receive(self, messages, *, timeout=None):
            replies = super().send_and_receive(messages, timeout=timeout)
            for msg, reply in zip(messages, list(replies), strict=True):
                if msg.metadata.message_type == "query" and msg.metadata.dst_node_id == 107:
                    content = copy.deepcopy(reply.content)
                    content.metric_records["profile"]["partition-id"] = 3
                    replies.append(Message(content, reply_to=msg))
            return replies

    grid = TwoFaced({100: {"partition-id": 0}, 107: {"partition-id": 1}}, config)
    strategy = strategy_for(config, min_nodes=2)
    strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid)
    assert strategy.nodes == {100: 0, 107: 1} and strategy.server.profiles.memory[3] == 0


def test_pinned_nodes_register_only_as_their_partition():
    """``nodes`` in the run config (``pinned``): the run's node ids, each with its partition; another node
    is not even queried, a listed node claiming another partition is refused."""
    assert pinned_nodes({"nodes": "5:0, 6:1"}) == {5: 0, 6: 1} and pinned_nodes({"nodes": ""}) is None
    assert pinned_nodes({}) is None and federated_config({"nodes": "5:0", "out": ""}) == FederatedConfig()
    for bad in ("5:0 5:1", "5:0 6:0", "x:1", "5-0", "5:-1"):
        with pytest.raises(ValueError, match="nodes"):
            pinned_nodes({"nodes": bad})
    with pytest.raises(ValueError, match="pinned"):
        strategy_for(pinned={1: 4})  # partition out of range
    with pytest.raises(ValueError, match="pinned"):
        strategy_for(pinned={1: 0, 2: 0})
    with pytest.raises(TypeError, match="pinned"):
        strategy_for(pinned=[(1, 0)])
    config = CONFIG.replace({"federation.clients_per_round": 0})
    node_configs = {**nodes(), 999: {"partition-id": 2}}
    grid = LocalGrid(node_configs, config)
    strategy = strategy_for(config, min_nodes=2, pinned={100: 0, 107: 1, 114: 3})
    _round(strategy, grid, 1)
    assert strategy.nodes == {100: 0, 107: 1}
    assert "node 114 claims partition-id 2, but the run's nodes give it 3" in strategy.rejected[114]
    assert strategy.rejected[999] == "node 999 is not one of the run's nodes"
    assert strategy.rejected[121] == "node 121 is not one of the run's nodes"
    assert not {999, 121} & {m.metadata.dst_node_id for m in grid.sent}  # never sent anything
    assert strategy.history[-1]["accepted"] == [0, 1]


def _replace_array(reply: Message, name: str, array: Array) -> Message:
    reply.content.array_records["arrays"][name] = array
    return reply


def _npy(shape, dtype="<f4", payload=b"") -> bytes:
    """A .npy file whose header claims ``shape`` and ``dtype``, followed by ``payload``."""
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue() + payload


def test_unpack_checks_declared_shapes_and_dtypes_before_deserialising():
    run = FederatedRun(CONFIG)
    model = run.server.model
    name, p = next(iter(model.named_shared_parameters()))
    good = p.detach().numpy()
    np.testing.assert_array_equal(unpack_array(Array(good), name, good.shape, np.float32), good)
    fortran = np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3))
    np.testing.assert_array_equal(unpack_array(Array(fortran), "f", (2, 3), np.float32), fortran)
    huge = (99999, 99999)
    cases = {  # the Array's declared dtype and shape, its bytes -> what is wrong
        "declares float32[99999, 99999]": ("float32", huge, _npy(huge)),
        "holds float32[99999, 99999]": ("float32", good.shape, _npy(huge)),
        "holds float64": ("float32", good.shape, _npy(good.shape, "<f8", good.astype(np.float64).tobytes())),
        "declares float64": ("float64", good.shape, Array(good.astype(np.float64)).data),
        "bytes of values": ("float32", good.shape, _npy(good.shape, "<f4", good.tobytes()[:-4])),
        "no valid .npy header": ("float32", good.shape, b"\x93NUMPY\x01\x00\xff\xff{'descr'"),
        "holds object": ("float32", good.shape, _npy(good.shape, "|O")),
    }
    for why, (dtype, shape, data) in cases.items():
        with pytest.raises(ValueError, match=re.escape(why)):
            unpack_array(Array(dtype=dtype, shape=shape, stype="numpy.ndarray", data=data), name, good.shape,
                         np.float32)
    with pytest.raises(ValueError, match="stype"):
        unpack_array(Array(dtype="float32", shape=good.shape, stype="torch", data=b""), name, good.shape,
                     np.float32)
    # a record: exactly the shared parameters and `rows` expert rows
    arrays = pack_arrays(model, shared_vector(model), model.expert_bank.detach()[:2])
    shared, rows = unpack_arrays(model, arrays, 2)
    torch.testing.assert_close(shared, shared_vector(model))
    torch.testing.assert_close(rows, model.expert_bank.detach()[:2])
    with pytest.raises(ValueError, match=r"expert_rows.*declares float32\[2, "):
        unpack_arrays(model, arrays, 3)  # more rows than the experts assigned
    with pytest.raises(ValueError, match="unexpected"):
        unpack_arrays(model, arrays)
    arrays["extra"] = Array(np.zeros(3, np.float32))
    with pytest.raises(ValueError, match=r"unexpected \['extra'\]"):
        unpack_arrays(model, arrays, 2)


def test_replies_that_would_exhaust_memory_or_inflate_their_weight_are_left_out(monkeypatch):
    """A reply whose .npy header claims shape (99999, 99999), one claiming 2**62 examples (with 1e30
    everywhere), one with an extra expert row: each is left out of its round (the round goes on, nothing
    is deserialised beyond the expected sizes); the honest replies are aggregated."""
    config = CONFIG.replace({"federation.clients_per_round": 0})
    grid = LocalGrid(nodes(), config)
    strategy = strategy_for(config)
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid))
    by_client = {strategy.nodes[m.metadata.dst_node_id]: m.metadata.dst_node_id for m in messages}
    registered = strategy.server.profiles.samples.astype(int)

    def oversized(msg, reply):
        shape = reply.content.array_records["arrays"][EXPERT_ROWS].shape  # declared right, header not
        return _replace_array(reply, EXPERT_ROWS, Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                                                        data=_npy((99999, 99999))))

    def inflated(msg, reply):
        for name, array in list(reply.content.array_records["arrays"].items()):
            _replace_array(reply, name, Array(np.full(array.shape, 1e30, np.float32)))
        reply.content.metric_records["metrics"]["num-examples"] = 2**62
        return reply

    def extra_row(msg, reply):
        rows = reply.content.array_records["arrays"][EXPERT_ROWS].numpy()
        return _replace_array(reply, EXPERT_ROWS, Array(np.concatenate([rows, rows[:1]])))

    grid.tamper = {by_client[0]: oversized, by_client[1]: inflated, by_client[2]: extra_row}
    replies = grid.send_and_receive(messages)
    monkeypatch.setattr(Array, "numpy", lambda self: pytest.fail("a reply was deserialised unchecked"))
    tracemalloc.start()
    try:
        arrays, metrics = strategy.aggregate_train(1, replies)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        monkeypatch.undo()
    report = strategy.history[-1]
    assert report["accepted"] == [3] and metrics["invalid"] == 3
    assert "expert_rows' holds float32[99999, 99999]" in report["invalid"]["0"]
    assert report["invalid"]["1"] == f"claims {2**62} samples, registered {registered[1]}"
    assert "expert_rows' declares float32[" in report["invalid"]["2"]
    assert peak < 50e6  # the model is 0.2 MB; 99999**2 float32 would be 40 GB
    assert all(np.isfinite(a.numpy()).all() for a in arrays.values())


@pytest.mark.parametrize("samples", ["registered", "registered+1", 0, 3.0, -5])
def test_num_examples_must_not_exceed_what_the_node_registered(samples):
    config = CONFIG.replace({"federation.clients_per_round": 0})
    grid = LocalGrid(nodes(), config)
    strategy = strategy_for(config)
    messages = list(strategy.configure_train(1, strategy.arrays(), ConfigRecord(), grid))
    node = messages[0].metadata.dst_node_id
    client = strategy.nodes[node]
    registered = int(strategy.server.profiles.samples[client])
    claim = {"registered": registered, "registered+1": registered + 1}.get(samples, samples)

    def claims(msg, reply):
        reply.content.metric_records["metrics"]["num-examples"] = claim
        return reply

    grid.tamper = {node: claims}
    strategy.aggregate_train(1, grid.send_and_receive(messages))
    report = strategy.history[-1]
    if samples == "registered":
        assert client in report["accepted"]
    elif samples == "registered+1":
        assert report["invalid"][str(client)] == f"claims {claim} samples, registered {registered}"
    else:
        assert report["invalid"][str(client)].startswith("num_samples must be a positive int")


def test_only_the_first_reply_of_a_node_in_a_round_counts():
    """Flower's SuperLink keeps one reply per message; a grid that passes on more: the first counts, the
    rest are left out and reported (``duplicate``), whatever they hold."""
    config = CONFIG.replace({"federation.clients_per_round": 0})
    grids = {name: LocalGrid(nodes(), config) for name in ("once", "twice")}
    strategies = {name: strategy_for(config) for name in grids}

    def doubled(messages, replies):  # client 0's node (100) sends a second, different reply
        asked = next(m for m in messages if m.metadata.dst_node_id == 100)
        content = copy.deepcopy(next(r for r in replies if r.metadata.src_node_id == 100).content)
        rows = content.array_records["arrays"][EXPERT_ROWS].numpy()
        content.array_records["arrays"][EXPERT_ROWS] = Array(rows * 1000)
        return [*replies, Message(content, reply_to=asked)]

    _, (_, once) = _round(strategies["once"], grids["once"], 1)
    _, (arrays, twice) = _round(strategies["twice"], grids["twice"], 1, doubled)
    assert strategies["twice"].history[-1]["duplicate"] == {"0": "1 more reply from node 100 left out"}
    assert twice["duplicate"] == 1 and once["duplicate"] == 0 and "duplicate" not in strategies[
        "once"].history[-1]
    assert strategies["twice"].history[-1]["accepted"] == strategies["once"].history[-1]["accepted"]
    for name, value in strategies["once"].server.model.state_dict().items():
        torch.testing.assert_close(arrays[name].numpy(), value.numpy())


# ---------------------------------------------------------------------- real Flower processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, process group) of every process that is not a zombie."""
    table = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                state, ppid, pgid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
                if state != "Z":
                    table[int(entry.name)] = (int(ppid), int(pgid))
    return table


class Processes:
    """Processes started by a test, each in its own process group; :meth:`stop` ends them and everything
    they started (descendants, and members of their process groups, which Ray and Flower detach)."""

    def __init__(self, env: dict, tmp: Path, port: int):
        self.env, self.tmp, self.port, self.logs = env, tmp, port, tmp / "logs"
        self.ca: Path | None = None  # the CA certificate of a SuperLink with TLS
        self.started: list[subprocess.Popen] = []
        self.family: set[int] = set()
        self.groups: set[int] = set()  # process groups seen among the family

    def connect(self, ca: Path | None = None) -> None:
        """The ``flwr`` connection ``fedmoe-test`` (the default) to the SuperLink on ``port``: with TLS
        verified against ``ca``, else without TLS."""
        self.ca = ca
        tls = f'root-certificates = "{ca}"' if ca is not None else "insecure = true"
        (Path(self.env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "fedmoe-test"\n\n[superlink.fedmoe-test]\n'
            f'address = "127.0.0.1:{self.port}"\n{tls}\n')

    def run(self, *args: str, timeout: float = 60) -> str:
        """Run a short command (``args[0]`` from the venv) to its end; its stdout (AssertionError if it
        fails)."""
        done = subprocess.run([str(BIN / args[0]), *args[1:]], env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"{args} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}"
        return done.stdout

    def start(self, name: str, *args: str) -> subprocess.Popen:
        with open(self.logs / f"{name}.log", "wb") as log:  # the child keeps its own descriptor
            proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], env=self.env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append(proc)
        return proc

    def _collect(self) -> set[int]:
        """The started processes, their descendants and their process groups' members, seen so far."""
        table = _process_table()
        family = self.family | {p.pid for p in self.started}
        while True:
            self.groups |= {table[p][1] for p in family if p in table}
            grown = family | {p for p, (ppid, pgid) in table.items() if ppid in family or pgid in self.groups}
            if grown == family:
                break
            family = grown
        self.family = family
        return {p for p in family if p in table}

    def watch(self) -> None:
        self._collect()

    def stop(self, timeout: float = 15.0) -> set[int]:
        """SIGTERM, then SIGKILL after ``timeout``; returns the pids still alive (should be none)."""
        alive = self._collect()
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            for pid in alive:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)
            end = time.monotonic() + wait
            while alive and time.monotonic() < end:
                for proc in self.started:
                    proc.poll()
                time.sleep(0.2)
                alive = self._collect()
            if not alive:
                break
        for proc in self.started:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1)
        return alive


@pytest.fixture
def flower(tmp_path):
    """A SuperLink connection ``fedmoe-test`` on a free loopback port (FLWR_HOME in tmp_path) and the
    processes of the test, all stopped at teardown, also when the test fails."""
    home = tmp_path / "flwr_home"
    home.mkdir()
    (tmp_path / "logs").mkdir()
    port = _free_port()
    # Flower's processes start each other by name (flower-superexec, flwr-clientapp): the venv's bin first
    env = {**os.environ, "FLWR_HOME": str(home), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "PATH": os.pathsep.join([str(BIN), os.environ.get("PATH", "")])}
    procs = Processes(env, tmp_path, port)
    procs.connect()
    try:
        yield procs
    finally:
        alive = procs.stop()
        assert not alive, f"processes still alive after teardown: {sorted(alive)}"


def _wait_healthy(procs: Processes, superlink: subprocess.Popen, timeout: float = 30.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if superlink.poll() is not None:
            raise AssertionError(f"flower-superlink exited: {(procs.logs / 'superlink.log').read_text()}")
        tls = ssl.create_default_context(cafile=procs.ca) if procs.ca is not None else None
        url = f"http{'s' if tls else ''}://127.0.0.1:{procs.port}/health"
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(url, timeout=1, context=tls) as r:
                if r.status == 200:
                    return
        time.sleep(0.3)
    raise AssertionError(f"SuperLink not healthy within {timeout} s")


def _flwr_run(procs: Processes, config: FederatedConfig, out: Path, timeout: float, *extra: str,
              nodes: str = "") -> dict:
    """``flwr run`` the example app with ``config`` (and run config ``nodes``); its result.json."""
    app_config = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    declared = flatten_dict(app_config)
    options = {k: v for k, v in run_config(config).items() if k in declared}  # the rest: simulation knobs
    overrides = " ".join(f"{k}={json.dumps(v)}" for k, v in {**options, "out": str(out),
                                                                 "nodes": nodes}.items())
    run = procs.start("flwr-run", "flwr", "run", str(APP), "--run-config", overrides, "--stream", *extra)
    end = time.monotonic() + timeout
    while run.poll() is None and time.monotonic() < end:
        procs.watch()  # remember the ServerApp/ClientApp processes while their parents live
        time.sleep(0.5)
    logs = "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(procs.logs.iterdir()))
    assert run.poll() is not None, f"flwr run did not finish within {timeout} s\n{logs}"
    assert (out / "result.json").exists(), f"the ServerApp wrote no result\n{logs}"
    return json.loads((out / "result.json").read_text())


def _assert_equals_own_loop(config: FederatedConfig, result: dict, out: Path) -> None:
    reference = own_loop(config)
    assert [r["assigned"] for r in result["rounds"]] == [r["assigned"] for r in reference.history]
    assert [r["accepted"] for r in result["rounds"]] == [r["accepted"] for r in reference.history]
    state = load_checkpoint(out / "checkpoint.pt")
    assert state["round"] == config.federation.rounds
    model = reference.server.model
    bank = state["model"][next(name for name, p in model.named_parameters() if p is model.expert_bank)]
    want = model.expert_bank.detach()
    for e in range(config.model.num_experts):  # per expert
        torch.testing.assert_close(bank[e], want[e], rtol=1e-5, atol=1e-6, msg=f"expert {e}")
    for name, value in reference.server.model.state_dict().items():
        torch.testing.assert_close(state["model"][name], value, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["load"]["load"], reference.server.load.load)
    np.testing.assert_allclose([r["accuracy"] for r in result["rounds"]],
                               [r["accuracy"] for r in reference.history], atol=2 / 360)


def test_simulation_engine_equals_own_loop(flower):
    """``flwr run`` of the example app in Flower's simulation engine (4 SuperNodes, 2 rounds)."""
    superlink = flower.start("superlink", "flower-superlink", "--insecure", "--simulation", "--host",
                             "127.0.0.1", "--port", str(flower.port))
    _wait_healthy(flower, superlink)
    config = CONFIG.replace({"federation.clients_per_round": 0})
    out = flower.tmp / "out"
    result = _flwr_run(flower, config, out, 150, "--federation-config",
                       "num-supernodes=4 client-resources-num-cpus=1 init-args-num-cpus=2")
    assert sorted(result["nodes"].values()) == [0, 1, 2, 3]
    _assert_equals_own_loop(config, result, out)


def test_simulation_engine_federates_the_transformer(flower, tmp_path):
    """The transformer on a built tiny Shakespeare (4 roles) through ``flwr run`` in the simulation engine:
    each SuperNode trains its role, and the rounds equal fedmoe's own loop."""
    from test_shakespeare import _lm_config, tiny_dataset

    path, clients = tiny_dataset(tmp_path)
    config = _lm_config(path, clients).replace({"evaluation.clients": False})
    superlink = flower.start("superlink", "flower-superlink", "--insecure", "--simulation", "--host",
                             "127.0.0.1", "--port", str(flower.port))
    _wait_healthy(flower, superlink)
    out = flower.tmp / "out"
    result = _flwr_run(flower, config, out, 150, "--federation-config",
                       f"num-supernodes={clients} client-resources-num-cpus=1 init-args-num-cpus=2")
    assert sorted(result["nodes"].values()) == list(range(clients))
    assert all(0 <= r["last_accuracy"] <= 1 for r in result["rounds"])  # LEAF's metric reaches the result
    _assert_equals_own_loop(config, result, out)


def test_deployment_with_tls_and_supernode_auth(flower):
    """The deployment of docs/flower.md ("Deployment, step by step") on loopback, 2 rounds: credentials
    from the example's make_credentials.py, a SuperLink with TLS and SuperNode authentication, two
    SuperNodes whose public keys were registered with ``flwr supernode register``, ``flwr run`` over TLS.
    Two more SuperNodes are refused at connection, before any message: one with a key nobody registered
    (claiming partition 0), one with none. The registered ones train, under the node ids their keys were
    registered as; every process stops."""
    creds = flower.tmp / "creds"
    flower.run("python", str(APP / "make_credentials.py"), str(creds), "--host", "127.0.0.1", "--host",
               "localhost", "--node", "node0", "--node", "node1", "--node", "intruder")
    flower.connect(ca=creds / "ca.crt")
    superlink = flower.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(creds / "ca.crt"),
                             "--ssl-certfile", str(creds / "server.pem"), "--ssl-keyfile",
                             str(creds / "server.key"), "--enable-supernode-auth", "--host", "127.0.0.1",
                             "--port", str(flower.port))
    _wait_healthy(flower, superlink)
    node_ids = {}  # registered node id -> partition
    for c in range(2):
        out = flower.run("flwr", "supernode", "register", str(creds / f"node{c}.pub"), "fedmoe-test",
                         "--format", "json")
        node_ids[str(json.loads(out[out.index("{"):])["node-id"])] = c

    def supernode(name: str, partition: int, *key: str) -> subprocess.Popen:
        return flower.start(name, "flower-supernode", "--superlink", f"127.0.0.1:{flower.port}",
                            "--root-certificates", str(creds / "ca.crt"), *key, "--port", str(_free_port()),
                            "--max-wait-time", "60", "--node-config",
                            f"partition-id={partition} num-partitions=2")

    for c in range(2):
        supernode(f"supernode{c}", c, "--auth-supernode-private-key", str(creds / f"node{c}"))
    refused = {"intruder": supernode("intruder", 0, "--auth-supernode-private-key", str(creds / "intruder")),
               "anonymous": supernode("anonymous", 1)}
    config = CONFIG.replace({"federation.num_clients": 2, "federation.clients_per_round": 0})
    out = flower.tmp / "out"
    pinned = " ".join(f"{node}:{c}" for node, c in node_ids.items())
    result = _flwr_run(flower, config, out, 100, nodes=pinned)  # 60-90 s on 2 cores: a process per message
    for name, proc in refused.items():
        log = (flower.logs / f"{name}.log").read_text()
        assert proc.poll() not in (None, 0), f"{name} was not refused:\n{log}"
        assert "Failed to initialize the connection to the SuperLink" in log, log
    assert "Failed to activate SuperNode" in (flower.logs / "intruder.log").read_text()
    assert "must be registered via the CLI" in (flower.logs / "anonymous.log").read_text()
    assert result["nodes"] == node_ids and result["rejected"] == {}  # the refused were never seen
    assert len(result["rounds"]) == 2 and all(r["accepted"] == [0, 1] for r in result["rounds"])
    assert result["rounds"][-1]["accuracy"] > 0.3  # chance is 0.1
    _assert_equals_own_loop(config, result, out)


# ---------------------------------------------------------------------- nodes that know only themselves


def test_nodes_build_only_their_own_runtime(monkeypatch):
    """A ClientApp builds one node (its partition, its profile, a model workspace): no whole-experiment
    run, no server, no other client's data; its rounds still equal fedmoe's own loop."""
    import fedmoe.federated.runner as runner

    def forbidden(*args, **kwargs):
        raise AssertionError("a node built more than itself")

    reference = own_loop(CONFIG)
    strategy = strategy_for()
    grid = LocalGrid(nodes())
    for name in ("FederatedRun", "Server", "build_nodes", "Simulation"):
        monkeypatch.setattr(runner, name, forbidden)
    monkeypatch.setattr(sys.modules["fedmoe.flower.client_app"], "_NODES", {})
    strategy.start(grid)
    assert [r["assigned"] for r in strategy.history] == [r["assigned"] for r in reference.history]
    node = node_of(grid.contexts[100], reference.dataset.spec)
    assert node.client == 0 and len(node.data) == reference.parts[0].size
    np.testing.assert_array_equal(node.data.targets.numpy(), reference.dataset.y_train[reference.parts[0]])


def test_a_node_with_its_own_data_file(tmp_path):
    """``data-path``: the node trains on its own .npz; unset profile values are the uniform tier's."""
    from sklearn.datasets import load_digits

    d = load_digits()
    files = {}
    for c in range(CONFIG.federation.num_clients):
        files[c] = tmp_path / f"node{c}.npz"
        np.savez(files[c], x=d.images[c * 60:(c + 1) * 60], y=d.target[c * 60:(c + 1) * 60])
    node_configs = {200 + c: {"partition-id": c, "data-path": str(f)} for c, f in files.items()}
    node_configs[200]["latency-s"] = 0.25
    grid = LocalGrid(node_configs)
    strategy = strategy_for()
    result = strategy.start(grid, num_rounds=1)
    assert sorted(strategy.nodes.values()) == [0, 1, 2, 3]
    assert strategy.history[0]["accepted"] == sorted(int(c) for c in strategy.history[0]["assigned"])
    profiles = strategy.server.profiles
    np.testing.assert_array_equal(profiles.samples, [48] * 4)  # 80% of 60 for training
    assert profiles.latency[0] == 0.25 and len(set(profiles.compute.tolist())) == 1  # the tier median
    assert np.isfinite(result.arrays.to_torch_state_dict()["moe.expert_bank"].numpy()).all()
    node = node_of(grid.contexts[201], strategy.spec)
    assert node.client == 1 and len(node.data) == 48


def test_the_flower_strategy_federates_the_transformer_as_the_own_loop(tmp_path):
    """The same run through fedmoe's Flower strategy and ClientApp (in-process grid): nodes that each build
    only their own role's data train the transformer, and the rounds equal fedmoe's own loop."""
    from test_shakespeare import _lm_config, tiny_dataset

    path, clients = tiny_dataset(tmp_path)
    config = _lm_config(path, clients).replace({"evaluation.clients": False})
    run = FederatedRun(config)
    strategy = FedMoEStrategy(config, copy.deepcopy(run.server.model), run.dataset.spec, cost=run.cost)
    strategy.start(LocalGrid(nodes(clients), config))
    reference = own_loop(config)
    assert [r["assigned"] for r in strategy.history] == [r["assigned"] for r in reference.history]
    assert [r["accepted"] for r in strategy.history] == [[0, 1, 2, 3]] * 2
    for name, value in reference.server.model.state_dict().items():
        torch.testing.assert_close(strategy.server.model.state_dict()[name], value, rtol=1e-5, atol=1e-6)
