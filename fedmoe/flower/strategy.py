"""fedmoe's server round as a Flower ``Strategy`` (Message API), for Flower's simulation engine and for
SuperLink/SuperNode deployments (docs/flower.md). The messages are described in
:mod:`fedmoe.flower.records`.

A node's fedmoe client is its ``node_config``'s ``partition-id``. The simulation knobs of
``[simulation]`` have no effect here (real nodes fail for real). A reply's round time is the reply's
creation time minus the time the round was configured (clocks of server and node are assumed in sync).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from logging import INFO, WARNING

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Result, Strategy

from fedmoe.alignment import ClientProfile, ModelCost, _checks
from fedmoe.data import DataSpec
from fedmoe.federated import (
    ClientReply,
    ClientUpdate,
    FederatedConfig,
    NodeProfile,
    RoundPlan,
    Server,
    model_cost,
    shared_vector,
)
from fedmoe.flower.records import (
    AFFINITY,
    BEFORE,
    PROFILE_KEYS,
    pack_arrays,
    pack_spec,
    unpack_arrays,
    unpack_feedback,
)
from fedmoe.models import FederatedMoE, Task, build_task

__all__ = ["FedMoEStrategy"]


class FedMoEStrategy(Strategy):
    """fedmoe's server round as a Flower strategy: ``configure_train`` = register new nodes (query),
    select, align and send each aligned node the shared parameters and its experts; ``aggregate_train`` =
    fault filtering, aggregation (shared: weighted FedAvg; experts: per expert with
    :func:`fedmoe_kernels.aggregate`) and fitness/load/profile updates, all by :class:`Server`.

    Args:
        config: the experiment (``federation.num_clients`` = partitions, one node each).
        model: the initial global model (updated in place).
        spec: the data spec the nodes build their model workspace for.
        task: the model's task (default: the one ``[model]`` builds for ``spec``).
        cost: model sizes for the client profiles (default: measured from ``model`` on zeros of ``spec``).
        min_nodes: nodes that must be registered before the first round (default ``num_clients``).
        setup_timeout: seconds to wait for them (and for registration replies).

    ``server`` holds the state; ``nodes`` maps node id -> client; ``history`` holds one
    :class:`RoundReport` dict per round. Federated evaluation is not used (it would ship every expert to
    every node): evaluate centrally with ``evaluate_fn`` and ``server.evaluate``.
    """

    def __init__(self, config: FederatedConfig, model: FederatedMoE, spec: DataSpec, *,
                 task: Task | None = None, cost: ModelCost | None = None, min_nodes: int | None = None,
                 setup_timeout: float = 120.0):
        if not isinstance(config, FederatedConfig):
            raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}")
        if not isinstance(model, FederatedMoE):
            raise TypeError(f"model must follow fedmoe.models.FederatedMoE, got {type(model).__name__}")
        if not isinstance(spec, DataSpec):
            raise TypeError(f"spec must be a DataSpec, got {type(spec).__name__}")
        if cost is None:
            cost = model_cost(model, torch.zeros((1, *spec.input_shape)), config.train.epochs)
        if not isinstance(cost, ModelCost):
            raise TypeError(f"cost must be a ModelCost, got {type(cost).__name__}")
        n = config.federation.num_clients
        self.min_nodes = n if min_nodes is None else _checks.integer("min_nodes", min_nodes, 1)
        if self.min_nodes > n:
            raise ValueError(f"min_nodes must be <= num_clients={n}, got {min_nodes}")
        self.setup_timeout = _checks.real("setup_timeout", setup_timeout, 0.0, lo_open=True)
        # clients that have not registered fit no expert (memory 0) until they report their profile
        unknown = ClientProfile(np.ones(n), np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n),
                                model=cost, config=config.profiles)
        self.server = Server(model, build_task(config.model, spec) if task is None else task, unknown, config)
        self.config, self.spec = config, spec
        self.nodes: dict[int, int] = {}
        self.rejected: dict[int, str] = {}  # node id -> why its registration failed
        self.history: list[dict] = []
        self._registered: set[int] = set()  # clients that ever registered (cold-started once)
        self._plan: RoundPlan | None = None
        self._sent_at = math.nan
        self._arrays: ArrayRecord | None = None  # the last global arrays returned

    # ------------------------------------------------------------------ Flower entry points

    def summary(self) -> None:
        c = self.config
        log(INFO, "\t├──> fedmoe: strategy %s, %d clients (%s per round), %d experts, <= %d per client",
            c.alignment.strategy, c.federation.num_clients, c.federation.clients_per_round or "all",
            c.model.num_experts, c.alignment.max_experts)
        log(INFO, "\t└──> registered nodes: %d (waiting for %d)", len(self.nodes), self.min_nodes)

    def arrays(self) -> ArrayRecord:
        """The global model (shared parameters and the full expert bank) as an ArrayRecord."""
        return ArrayRecord(self.server.model.state_dict())

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Flower's round loop; ``initial_arrays`` defaults to the current global model and ``num_rounds``
        to ``federation.rounds``."""
        return super().start(grid, self.arrays() if initial_arrays is None else initial_arrays,
                             self.config.federation.rounds if num_rounds is None else num_rounds, timeout,
                             train_config, evaluate_config, evaluate_fn)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        if arrays is not self._arrays and len(arrays):
            self.server.model.load_state_dict(arrays.to_torch_state_dict())
        self._register(grid)
        connected = set(grid.get_node_ids())
        node_of = {c: node for node, c in self.nodes.items() if node in connected}
        self._plan = plan = self.server.configure(np.fromiter(node_of, np.int64, len(node_of)))
        self._sent_at = time.time()
        messages = []
        for client, payload in plan.payloads.items():
            record = ConfigRecord({**config, "experts": payload.experts.tolist(), "round": payload.round,
                                   "seed": payload.seed, AFFINITY: payload.affinity,
                                   "server-round": server_round, **pack_spec(self.spec)})
            packed = pack_arrays(self.server.model, payload.shared, payload.expert_rows)
            content = RecordDict({"arrays": packed, "config": record})
            messages.append(Message(content, node_of[client], MessageType.TRAIN))
        log(INFO, "configure_train: %d of %d online clients selected, %d nodes sent %d experts",
            plan.selected.size, len(node_of), len(messages), len(plan.alignment))
        return messages

    def aggregate_train(self, server_round: int,
                        replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        plan, self._plan = self._plan, None
        if plan is None:
            raise RuntimeError("aggregate_train called without a configure_train before it")
        received: dict[int, ClientReply] = {}
        for msg in replies:
            client = self.nodes.get(msg.metadata.src_node_id)
            if client is None or client not in plan.payloads:
                log(WARNING, "aggregate_train: ignoring a reply from node %d, which was not asked",
                    msg.metadata.src_node_id)
                continue
            received[client] = self._reply(client, msg)
        report = self.server.aggregate(plan, received)
        self.history.append(report.to_dict())
        metrics = {"accepted": len(report.accepted), "dropped": len(report.dropped),
                   "late": len(report.late), "invalid": len(report.invalid),
                   "bytes-sent": report.bytes_sent, "bytes-received": report.bytes_received}
        if report.train_loss is not None:
            metrics["train-loss"] = report.train_loss
        for kind in ("dropped", "late", "invalid"):
            for client, reason in getattr(report, kind).items():
                log(WARNING, "aggregate_train: client %s %s: %s", client, kind, reason)
        self._arrays = self.arrays()
        return self._arrays, MetricRecord(metrics)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return None

    # ------------------------------------------------------------------ helpers

    def _reply(self, client: int, msg: Message) -> ClientReply:
        """A train reply as the server's :class:`ClientReply` (an unparseable one carries no update)."""
        if msg.has_error():
            return ClientReply(client, None, math.nan, f"node error: {msg.error.reason}")
        seconds = max(msg.metadata.created_at - self._sent_at, 1e-6)
        content = msg.content
        try:
            arrays, config = content.array_records["arrays"], content.config_records["config"]
            metrics = content.metric_records["metrics"]
            shared, rows = unpack_arrays(self.server.model, arrays)
            update = ClientUpdate(client, np.asarray(config["experts"], dtype=np.int64), shared, rows,
                                  metrics["num-examples"], metrics["train-loss"], unpack_feedback(metrics),
                                  unpack_feedback(metrics, BEFORE),
                                  np.asarray(metrics[AFFINITY], np.float32) if AFFINITY in metrics
                                  else None)
        except (KeyError, ValueError, TypeError) as exc:
            return ClientReply(client, None, math.nan, f"malformed reply: {type(exc).__name__}: {exc}")
        return ClientReply(client, update, seconds)

    def _register(self, grid: Grid) -> None:
        """Query nodes not seen before for their partition and profile (and, for a cold start, their gate
        affinity); before the first round wait until ``min_nodes`` are registered."""
        deadline = time.monotonic() + self.setup_timeout
        while True:
            new = [n for n in grid.get_node_ids() if n not in self.nodes and n not in self.rejected]
            if new:
                self._query(grid, new, max(deadline - time.monotonic(), 1.0))
            if self.server.round > 0 or len(self.nodes) >= self.min_nodes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.nodes)} of min_nodes={self.min_nodes} nodes registered "
                                   f"within {self.setup_timeout:g} s; rejected: {self.rejected}")
            time.sleep(0.5)

    def _query(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        cold = self.config.fitness.cold_start
        content = {"config": ConfigRecord({"cold-start": cold, **pack_spec(self.spec)})}
        if cold:
            content["arrays"] = pack_arrays(self.server.model, shared_vector(self.server.model))
        messages = [Message(RecordDict(content), node, MessageType.QUERY) for node in nodes]
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        for node in set(nodes) - {msg.metadata.src_node_id for msg in replies}:
            self.rejected[node] = f"no reply to the registration query within {timeout:.3g} s"
        profiles = self.server.profiles.state_dict()
        fresh, affinity = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                client, values, row = self._profile(msg, cold)
                if client in self.nodes.values():
                    other = next(n for n, c in self.nodes.items() if c == client)
                    if other in set(grid.get_node_ids()):
                        raise ValueError(f"partition-id {client} is already taken by node {other}")
                    del self.nodes[other]
            except (KeyError, ValueError, TypeError) as exc:
                self.rejected[node] = f"{type(exc).__name__}: {exc}"
                log(WARNING, "node %d not registered: %s", node, self.rejected[node])
                continue
            self.nodes[node] = client
            if client not in self._registered:  # reported profile; estimates start from the report
                for key, value in values.items():
                    profiles[key][client] = value
                profiles["time_scale"][client] = 1.0
                profiles["reliability_estimate"][client] = values["reliability"]
                fresh.append(client)
                affinity.append(row)
        if fresh:
            self.server.profiles.load_state_dict(profiles)  # validates the reported values
            self._registered.update(fresh)
            if cold:
                order = np.argsort(fresh)
                self.server.cold_start(np.asarray(fresh)[order], np.stack(affinity)[order])
            log(INFO, "registered clients %s (nodes: %s)", sorted(fresh), self.nodes)

    def _profile(self, msg: Message, cold: bool):
        """``(client, profile values, affinity row or None)`` of a query reply; ValueError if unusable."""
        if msg.has_error():
            raise ValueError(f"node error: {msg.error.reason}")
        profile = msg.content.metric_records["profile"]
        client = profile["partition-id"]
        n = self.config.federation.num_clients
        if not isinstance(client, int) or not 0 <= client < n:
            raise ValueError(f"partition-id must be an int in [0, {n}), got {client!r}")
        values = {field: profile[key] for key, field in PROFILE_KEYS.items()}
        values["samples"] = profile["samples"]
        NodeProfile(**values)  # checks them, naming a bad one
        row = None
        if cold:
            row = msg.content.array_records["affinity"]["affinity"].numpy()
            if row.shape != (self.server.num_experts,) or not np.all(np.isfinite(row)):
                raise ValueError(f"affinity must be finite with shape ({self.server.num_experts},)")
        return client, values, row
