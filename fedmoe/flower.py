"""Flower backend (DESIGN.md §5): fedmoe's alignment as a Flower ``Strategy`` (Message API) and a
``ClientApp`` that trains a fedmoe model on the node's partition, for Flower's simulation engine and for
SuperLink/SuperNode deployments.

Messages (record names in quotes):

- ``query`` (registration, once per node): server -> node ``"config"`` {``cold-start``} and, for a cold
  start, ``"arrays"`` (the shared parameters); node -> server ``"profile"`` (MetricRecord:
  ``partition-id``, ``samples`` and the capacity profile :data:`PROFILE_KEYS`, each from the node's
  ``node_config`` or else the profile fedmoe's simulation draws for that partition) and, for a cold
  start, ``"affinity"`` (the gate's affinity [E] on local data).
- ``train`` (every round, to the aligned nodes only): server -> node ``"arrays"`` (the shared parameters
  by name plus ``expert_rows`` [k, P], the assigned rows of the expert bank) and ``"config"``
  {``experts`` (their ids), ``round``, ``seed``, ``server-round``}; node -> server ``"arrays"`` (same
  keys, trained), ``"config"`` {``experts``} and ``"metrics"`` {``num-examples``, ``train-loss`` and the
  per-expert feedback lists ``share``, ``loss``, ``accuracy``, ``samples`` measured after local training,
  and the same measured before it as ``before-share``, ``before-loss``, ``before-accuracy``,
  ``before-samples``; with ``drift_rescore`` also ``affinity``, the gate's affinity [E] to every expert
  on the node's current data with the received weights}.

The node of a fedmoe client is the node whose ``node_config`` has ``partition-id`` = client (Flower's
simulation engine sets it; SuperNodes get ``--node-config "partition-id=0 num-partitions=2"``). Both
sides read the experiment from the Flower run config (:func:`federated_config`); the simulation knobs
``availability``, ``dropout`` and ``corrupt`` have no effect here (real nodes fail for real), and
``capacity`` only picks the default profiles. A reply's round time is the reply's creation time minus
the time the round was configured (clocks of server and node are assumed in sync).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import time
from collections.abc import Iterable, Mapping
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import Result, Strategy

from fedmoe.alignment import CapacityProfile, ModelCost, _checks
from fedmoe.federated import (
    ClientPayload,
    ClientReply,
    ClientUpdate,
    ExpertFeedback,
    FederatedConfig,
    FederatedRun,
    RoundPlan,
    Server,
    gate_affinity,
    model_cost,
    save_checkpoint,
    shared_vector,
)
from fedmoe.models import MoEClassifier

__all__ = ["EXPERT_ROWS", "PROFILE_KEYS", "FedMoEStrategy", "client_app", "federated_config", "server_app"]

# node_config key -> CapacityProfile field
PROFILE_KEYS = {"compute-flops": "compute", "memory-bytes": "memory", "bandwidth-bytes": "bandwidth",
                "latency-s": "latency", "reliability": "reliability"}
EXPERT_ROWS = "expert_rows"
_FEEDBACK = ("share", "loss", "accuracy", "samples")
_BEFORE = "before-"  # key prefix of the feedback measured before local training
_AFFINITY = "affinity"  # gate affinity [E] sent with a train reply when drift_rescore is on
_OUT = "out"  # run config key of the ServerApp's output directory ("" = none)
_COST = "fedmoe-model-cost"  # ConfigRecord in a node's Context.state


def federated_config(run_config: Mapping) -> FederatedConfig:
    """The :class:`FederatedConfig` of a Flower run config: keys are its options with ``-`` or ``_``
    (``channels`` as ``"16,32"``, ``deadline`` a number or ``"none"``); ``out`` (the ServerApp's output
    directory) is skipped. An unknown key raises ValueError naming it."""
    if not isinstance(run_config, Mapping):
        raise TypeError(f"run_config must be a mapping, got {type(run_config).__name__}")
    options = {str(k).replace("-", "_"): v for k, v in run_config.items() if k != _OUT}
    if isinstance(options.get("channels"), str):
        try:
            options["channels"] = tuple(int(c) for c in options["channels"].split(","))
        except ValueError:
            raise ValueError(f"channels must be comma-separated ints, got {options['channels']!r}") from None
    return FederatedConfig.from_dict(options)


# ---------------------------------------------------------------------- arrays <-> fedmoe tensors


def _pack(model: MoEClassifier, shared: torch.Tensor, rows: torch.Tensor | None = None) -> ArrayRecord:
    """``shared`` [S] split into the model's shared parameters by name, plus ``expert_rows`` if given."""
    arrays, offset = {}, 0
    for name, p in model.named_shared_parameters():
        arrays[name] = Array(shared[offset:offset + p.numel()].reshape(p.shape).numpy())
        offset += p.numel()
    if rows is not None:
        arrays[EXPERT_ROWS] = Array(rows.numpy())
    return ArrayRecord(arrays)


def _unpack(model: MoEClassifier, arrays: ArrayRecord, rows: bool = True):
    """``(shared [S], expert_rows or None)`` from an ArrayRecord of :func:`_pack`; a missing or misshapen
    shared array raises ValueError."""
    parts = []
    for name, p in model.named_shared_parameters():
        if name not in arrays:
            raise ValueError(f"arrays lack the shared parameter {name!r}")
        value = torch.from_numpy(arrays[name].numpy())
        if value.shape != p.shape:
            raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        parts.append(value.reshape(-1))
    if rows and EXPERT_ROWS not in arrays:
        raise ValueError(f"arrays lack {EXPERT_ROWS!r}")
    return torch.cat(parts), torch.from_numpy(arrays[EXPERT_ROWS].numpy()) if rows else None


def _pack_feedback(feedback: ExpertFeedback, prefix: str = "") -> dict[str, list]:
    """MetricRecord entries of ``feedback``: ``prefix + field`` -> per-expert list."""
    return {prefix + k: getattr(feedback, k).tolist() for k in _FEEDBACK}


def _unpack_feedback(metrics: MetricRecord, prefix: str = "") -> ExpertFeedback:
    """The :class:`ExpertFeedback` of :func:`_pack_feedback` entries (a missing key raises KeyError)."""
    return ExpertFeedback(*(np.asarray(metrics[prefix + k], np.int64 if k == "samples" else np.float64)
                            for k in _FEEDBACK))


# ---------------------------------------------------------------------- server side


class FedMoEStrategy(Strategy):
    """fedmoe's server round as a Flower strategy: ``configure_train`` = register new nodes (query),
    select, align and send each aligned node the shared parameters and its experts; ``aggregate_train`` =
    fault filtering, aggregation (shared: weighted FedAvg; experts: per expert with
    :func:`fedmoe_kernels.aggregate`) and fitness/load/profile updates, all by :class:`Server`.

    Args:
        config: the experiment (``num_clients`` = partitions, one node each).
        model: the initial global model (updated in place).
        cost: model sizes for the capacity profiles (default: measured from ``model``).
        min_nodes: nodes that must be registered before the first round (default ``num_clients``).
        setup_timeout: seconds to wait for them (and for registration replies).

    ``server`` holds the state; ``nodes`` maps node id -> client; ``history`` holds one
    :class:`RoundReport` dict per round. Federated evaluation is not used (it would ship every expert to
    every node): evaluate centrally with ``evaluate_fn`` and ``server.evaluate``.
    """

    def __init__(self, config: FederatedConfig, model: MoEClassifier, *, cost: ModelCost | None = None,
                 min_nodes: int | None = None, setup_timeout: float = 120.0):
        if not isinstance(config, FederatedConfig):
            raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}")
        if not isinstance(model, MoEClassifier):
            raise TypeError(f"model must be a MoEClassifier, got {type(model).__name__}")
        cost = model_cost(model, config.local_epochs) if cost is None else cost
        if not isinstance(cost, ModelCost):
            raise TypeError(f"cost must be a ModelCost, got {type(cost).__name__}")
        n = config.num_clients
        self.min_nodes = n if min_nodes is None else _checks.integer("min_nodes", min_nodes, 1)
        if self.min_nodes > n:
            raise ValueError(f"min_nodes must be <= num_clients={n}, got {min_nodes}")
        self.setup_timeout = _checks.real("setup_timeout", setup_timeout, 0.0, lo_open=True)
        # clients that have not registered fit no expert (memory 0) until they report their profile
        unknown = CapacityProfile(np.ones(n), np.zeros(n), np.ones(n), np.zeros(n), np.zeros(n), np.zeros(n),
                                  model=cost, config=config.profile_config())
        self.server = Server(model, unknown, config)
        self.config = config
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
            c.strategy, c.num_clients, c.clients_per_round or "all", c.num_experts, c.max_experts)
        log(INFO, "\t└──> registered nodes: %d (waiting for %d)", len(self.nodes), self.min_nodes)

    def arrays(self) -> ArrayRecord:
        """The global model (shared parameters and the full expert bank) as an ArrayRecord."""
        return ArrayRecord(self.server.model.state_dict())

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float = 3600, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn=None) -> Result:
        """Flower's round loop; ``initial_arrays`` defaults to the current global model and ``num_rounds``
        to ``config.rounds``."""
        return super().start(grid, self.arrays() if initial_arrays is None else initial_arrays,
                             self.config.rounds if num_rounds is None else num_rounds, timeout,
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
                                   "seed": payload.seed, "server-round": server_round})
            content = RecordDict({"arrays": _pack(self.server.model, payload.shared, payload.expert_rows),
                                  "config": record})
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
            shared, rows = _unpack(self.server.model, arrays)
            update = ClientUpdate(client, np.asarray(config["experts"], dtype=np.int64), shared, rows,
                                  metrics["num-examples"], metrics["train-loss"], _unpack_feedback(metrics),
                                  _unpack_feedback(metrics, _BEFORE),
                                  np.asarray(metrics[_AFFINITY], np.float32) if _AFFINITY in metrics
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
        cold = self.config.cold_start
        content = {"config": ConfigRecord({"cold-start": cold})}
        if cold:
            content["arrays"] = _pack(self.server.model, shared_vector(self.server.model))
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
        if not isinstance(client, int) or not 0 <= client < self.config.num_clients:
            raise ValueError(f"partition-id must be an int in [0, {self.config.num_clients}), got {client!r}")
        values = {field: profile[key] for key, field in PROFILE_KEYS.items()}
        values["samples"] = profile["samples"]
        CapacityProfile(**{k: [v] for k, v in values.items()})  # checks them, naming a bad one
        row = None
        if cold:
            row = msg.content.array_records["affinity"]["affinity"].numpy()
            if row.shape != (self.server.num_experts,) or not np.all(np.isfinite(row)):
                raise ValueError(f"affinity must be finite with shape ({self.server.num_experts},)")
        return client, values, row


def server_app() -> ServerApp:
    """A ServerApp running :class:`FedMoEStrategy` for ``config.rounds`` rounds on the run config's
    experiment (initial model and test set built as fedmoe's own loop builds them), evaluating the global
    model on the test set after every round. With ``out`` set in the run config it writes
    ``OUT/result.json`` (config, node -> client map, per-round reports with ``accuracy`` and ``loss``) and
    ``OUT/checkpoint.pt`` (the server state, :meth:`Server.state_dict`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        config = federated_config(context.run_config)
        run = FederatedRun(config)
        strategy = FedMoEStrategy(config, run.server.model, cost=run.cost)

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            return MetricRecord(strategy.server.evaluate(run.x_test, run.y_test))

        result = strategy.start(grid, evaluate_fn=evaluate)
        out = context.run_config.get(_OUT, "")
        if out:
            out = Path(str(out))
            rounds = [{**report, **result.evaluate_metrics_serverapp.get(i + 1, {})}
                      for i, report in enumerate(strategy.history)]
            save_checkpoint(out / "checkpoint.pt", strategy.server.state_dict())
            tmp = out / "result.json.tmp"
            tmp.write_text(json.dumps({"config": config.to_dict(), "rounds": rounds,
                                       "nodes": {str(n): c for n, c in strategy.nodes.items()}}, indent=1))
            tmp.replace(out / "result.json")

    return app


# ---------------------------------------------------------------------- client side


_RUNS: dict[FederatedConfig, FederatedRun] = {}  # this process's run (one experiment at a time)


def _node_run(config: FederatedConfig, cost: ModelCost | None) -> FederatedRun:
    """Data, partition, model workspace and simulated profiles of the experiment (cached per process)."""
    if config not in _RUNS:
        _RUNS.clear()
        _RUNS[config] = FederatedRun(config, cost=cost)
    return _RUNS[config]


def _node(context: Context) -> tuple[FederatedConfig, FederatedRun, int]:
    """The node's experiment, its run and its client id (``partition-id``), checked against the run.
    The measured model cost is kept in the node's ``context.state``: a SuperNode starts a process per
    message, and measuring costs seconds."""
    config = federated_config(context.run_config)
    node_config = context.node_config
    if "partition-id" not in node_config:
        raise ValueError("node_config must set partition-id (the node's fedmoe client)")
    client = node_config["partition-id"]
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < config.num_clients:
        raise ValueError(f"node_config partition-id must be an int in [0, num_clients={config.num_clients}), "
                         f"got {client!r}")
    parts = node_config.get("num-partitions", config.num_clients)
    if parts != config.num_clients:
        raise ValueError(f"node_config num-partitions={parts!r} differs from the run's num_clients="
                         f"{config.num_clients}")
    saved = context.state.config_records.get(_COST)
    run = _node_run(config, None if saved is None else ModelCost(**saved))
    if saved is None:
        context.state[_COST] = ConfigRecord(dataclasses.asdict(run.cost))
    return config, run, client


def _query(msg: Message, context: Context) -> Message:
    """Registration: partition, samples and capacity profile; the gate affinity for a cold start."""
    _, run, client = _node(context)
    simulated = run.simulation.truth
    profile = {"partition-id": client, "samples": int(run.simulation.x[client].shape[0])}
    for key, field in PROFILE_KEYS.items():
        value = context.node_config.get(key, float(getattr(simulated, field)[client]))
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"node_config {key} must be a number, got {value!r}")
        profile[key] = float(value)
    content = {"profile": MetricRecord(profile)}
    if msg.content.config_records["config"]["cold-start"]:
        shared, _ = _unpack(run.workspace, msg.content.array_records["arrays"], rows=False)
        affinity = gate_affinity(run.workspace, shared, run.simulation.x[client])
        content["affinity"] = ArrayRecord({"affinity": Array(affinity)})
    return Message(RecordDict(content), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    """One round: train the shared parameters and the assigned experts on the node's partition."""
    _, run, client = _node(context)
    config = msg.content.config_records["config"]
    shared, rows = _unpack(run.workspace, msg.content.array_records["arrays"])
    experts = np.asarray(config["experts"], dtype=np.int64)
    payload = ClientPayload(int(config["round"]), client, experts, shared, rows, int(config["seed"]))
    update = run.train(payload, *run.simulation.data(client, payload.round))
    metrics = {"num-examples": update.num_samples, "train-loss": float(update.train_loss),
               **_pack_feedback(update.feedback), **_pack_feedback(update.feedback_before, _BEFORE)}
    if update.affinity is not None:  # drift_rescore: the gate affinity to every expert on the current data
        metrics[_AFFINITY] = update.affinity.astype(np.float64).tolist()
    content = RecordDict({"arrays": _pack(run.workspace, update.shared, update.expert_rows),
                          "config": ConfigRecord({"experts": update.experts.tolist()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def client_app() -> ClientApp:
    """A ClientApp for :class:`FedMoEStrategy`: answers ``query`` (registration) and ``train`` messages
    on the partition ``partition-id`` of the run config's data (split as fedmoe's own loop splits it)."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    return app
