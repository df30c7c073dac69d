"""fedmoe's server round as a Flower ``Strategy`` (Message API), for Flower's simulation engine and for
SuperLink/SuperNode deployments (docs/flower.md). The messages are described in
:mod:`fedmoe.flower.records`.

A node's fedmoe client is the ``partition-id`` it claims when it registers, and from then on the client
belongs to that Flower node id: the first node to register a partition binds it, a later node claiming
it is refused (logged, listed in ``rejected``; the client keeps its node, online or not), and a node
answers for one client only. Under SuperNode authentication a Flower node id stands for one registered
public key (docs/flower.md, Who can get in), so a client is bound to a key, not to what a node claims.
With ``pinned`` (node id -> partition-id, known in advance) only those nodes register, each only as its
listed partition; other nodes are not even queried.

A train reply counts only if it comes from the node the client is bound to and asked this round; the
first reply per node per round counts, later ones are left out and counted as ``duplicate``. Its arrays
must be exactly the shared parameters and the assigned experts' rows, with their shapes and dtypes, checked
before any array is deserialised (:func:`~fedmoe.flower.records.unpack_array`), and its ``num-examples``
an int in [1, the samples the node registered]; otherwise it carries no update (reported as dropped,
"malformed reply").

The simulation knobs of ``[simulation]`` have no effect here (real nodes fail for real). A reply's round
time is the reply's creation time minus the time the round was configured (clocks of server and node are
assumed in sync).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping
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
    unpack_array,
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
        pinned: node id -> partition-id: the run's nodes, known in advance (the ids ``flwr supernode
            register`` printed); only they register, each only as its listed partition. Default: any node,
            first come, first bound.

    ``server`` holds the state; ``nodes`` maps node id -> client (the bindings, module docstring);
    ``rejected`` node id -> why it was not registered; ``history`` holds one :class:`RoundReport` dict per
    round, plus ``duplicate`` (client -> why replies were left out) where a node replied more than once.
    Federated evaluation is not used (it would ship every expert to every node): evaluate centrally with
    ``evaluate_fn`` and ``server.evaluate``.
    """

    def __init__(self, config: FederatedConfig, model: FederatedMoE, spec: DataSpec, *,
                 task: Task | None = None, cost: ModelCost | None = None, min_nodes: int | None = None,
                 setup_timeout: float = 120.0, pinned: Mapping[int, int] | None = None):
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
        if pinned is not None:
            if not isinstance(pinned, Mapping):
                raise TypeError(f"pinned must map node ids to partition-ids, got {type(pinned).__name__}")
            pinned = {_checks.integer("pinned node id", node, 0): _checks.integer("pinned partition-id", c, 0)
                      for node, c in pinned.items()}
            if len(set(pinned.values())) < len(pinned) or any(c >= n for c in pinned.values()):
                raise ValueError(f"pinned must give each node its own partition-id in [0, {n}), got {pinned}")
        self.pinned = pinned
        # clients that have not registered fit no expert (memory 0) until they report their profile
        unknown = ClientProfile(np.ones(n), np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n),
                                model=cost, config=config.profiles)
        self.server = Server(model, build_task(config.model, spec) if task is None else task, unknown, config)
        self.config, self.spec = config, spec
        self.nodes: dict[int, int] = {}
        self.rejected: dict[int, str] = {}  # node id -> why its registration failed
        self.history: list[dict] = []
        self._samples: dict[int, float] = {}  # client -> samples it registered (caps num-examples)
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
        extra: dict[int, int] = {}  # client -> replies left out after its node's first
        for msg in replies:
            node = msg.metadata.src_node_id
            client = self.nodes.get(node)
            if client is None or client not in plan.payloads:
                log(WARNING, "aggregate_train: ignoring a reply from node %d, which was not asked", node)
                continue
            if client in received:  # the first reply per node per round counts, as in Flower's SuperLink
                extra[client] = extra.get(client, 0) + 1
                log(WARNING, "aggregate_train: node %d (client %d) replied more than once; only its first "
                    "reply counts", node, client)
                continue
            received[client] = self._reply(client, msg, plan.payloads[client].experts.size)
        report = self.server.aggregate(plan, received)
        duplicate = {str(c): f"{n} more repl{'y' if n == 1 else 'ies'} from node {self._node_of(c)} left out"
                     for c, n in sorted(extra.items())}
        self.history.append({**report.to_dict(), **({"duplicate": duplicate} if duplicate else {})})
        metrics = {"accepted": len(report.accepted), "dropped": len(report.dropped),
                   "late": len(report.late), "invalid": len(report.invalid), "duplicate": len(duplicate),
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

    def _reply(self, client: int, msg: Message, experts: int) -> ClientReply:
        """A train reply for ``experts`` assigned experts as the server's :class:`ClientReply`; one that
        cannot be parsed or holds other arrays than expected is ``malformed`` and carries no update (the
        server checks the rest: :func:`fedmoe.federated.check_update`, the registered sample count)."""
        if msg.has_error():
            return ClientReply(client, None, math.nan, f"node error: {msg.error.reason}")
        seconds = max(msg.metadata.created_at - self._sent_at, 1e-6)
        content = msg.content
        try:
            arrays, config = content.array_records["arrays"], content.config_records["config"]
            metrics = content.metric_records["metrics"]
            shared, rows = unpack_arrays(self.server.model, arrays, experts)
            update = ClientUpdate(client, np.asarray(config["experts"], dtype=np.int64), shared, rows,
                                  metrics["num-examples"], metrics["train-loss"], unpack_feedback(metrics),
                                  unpack_feedback(metrics, BEFORE),
                                  np.asarray(metrics[AFFINITY], np.float32) if AFFINITY in metrics
                                  else None)
        except (KeyError, ValueError, TypeError) as exc:
            return ClientReply(client, None, seconds, f"malformed reply: {type(exc).__name__}: {exc}",
                               malformed=True)
        return ClientReply(client, update, seconds)

    def _register(self, grid: Grid) -> None:
        """Query nodes not seen before for their partition and profile (and, for a cold start, their gate
        affinity); before the first round wait until ``min_nodes`` are registered."""
        deadline = time.monotonic() + self.setup_timeout
        while True:
            new = [n for n in grid.get_node_ids() if n not in self.nodes and n not in self.rejected]
            for node in [n for n in new if self.pinned is not None and n not in self.pinned]:
                self.rejected[node] = f"node {node} is not one of the run's nodes"  # not even asked
                log(WARNING, "node %d not registered: %s", node, self.rejected[node])
                new.remove(node)
            if new:
                self._query(grid, new, max(deadline - time.monotonic(), 1.0))
            if self.server.round > 0 or len(self.nodes) >= self.min_nodes:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"only {len(self.nodes)} of min_nodes={self.min_nodes} nodes registered "
                                   f"within {self.setup_timeout:g} s; rejected: {self.rejected}")
            time.sleep(0.5)

    def _node_of(self, client: int) -> int | None:
        """The node id ``client`` is bound to (None if it never registered)."""
        return next((node for node, c in self.nodes.items() if c == client), None)

    def _query(self, grid: Grid, nodes: list[int], timeout: float) -> None:
        cold = self.config.fitness.cold_start
        content = {"config": ConfigRecord({"cold-start": cold, **pack_spec(self.spec)})}
        if cold:
            content["arrays"] = pack_arrays(self.server.model, shared_vector(self.server.model))
        messages = [Message(RecordDict(content), node, MessageType.QUERY) for node in nodes]
        replies, answered = [], set()
        for msg in grid.send_and_receive(messages, timeout=timeout):
            node = msg.metadata.src_node_id
            if node not in nodes or node in answered:  # one answer per asked node: its first
                log(WARNING, "ignoring a registration reply from node %d, which was not asked or has "
                    "answered already", node)
                continue
            answered.add(node)
            replies.append(msg)
        for node in set(nodes) - answered:
            self.rejected[node] = f"no reply to the registration query within {timeout:.3g} s"
        profiles = self.server.profiles.state_dict()
        fresh, affinity = [], []
        for msg in replies:
            node = msg.metadata.src_node_id
            try:
                client, values, row = self._profile(msg, cold)
                if self.pinned is not None and self.pinned[node] != client:
                    raise ValueError(f"node {node} claims partition-id {client}, but the run's nodes give it "
                                     f"{self.pinned[node]}")
                if (other := self._node_of(client)) is not None:
                    raise ValueError(f"partition-id {client} is already bound to node {other}")
            except (KeyError, ValueError, TypeError) as exc:
                self.rejected[node] = f"{type(exc).__name__}: {exc}"
                log(WARNING, "node %d not registered: %s", node, self.rejected[node])
                continue
            self.nodes[node] = client  # the binding: for the rest of the run
            for key, value in values.items():
                profiles[key][client] = value
            profiles["time_scale"][client] = 1.0
            profiles["reliability_estimate"][client] = values["reliability"]
            self._samples[client] = float(values["samples"])
            fresh.append(client)
            affinity.append(row)
        if fresh:
            self.server.profiles.load_state_dict(profiles)  # validates the reported values
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
        if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n:
            raise ValueError(f"partition-id must be an int in [0, {n}), got {client!r}")
        values = {field: profile[key] for key, field in PROFILE_KEYS.items()}
        values["samples"] = profile["samples"]
        NodeProfile(**values)  # checks them, naming a bad one
        row = None
        if cold:
            row = unpack_array(msg.content.array_records["affinity"]["affinity"], "affinity",
                               (self.server.num_experts,), np.float32)
            if not np.all(np.isfinite(row)):
                raise ValueError(f"affinity must be finite with shape ({self.server.num_experts},)")
        return client, values, row
