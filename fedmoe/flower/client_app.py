"""The Flower ClientApp: one fedmoe :class:`~fedmoe.federated.Node` plus message packing
(docs/flower.md, Nodes).

A node knows only itself. Its ``node_config`` gives its client id ``partition-id`` (and, optionally,
``num-partitions``, checked against the run's ``federation.num_clients``) and its data:

- ``data-path``: its own ``.npz`` file (``x`` and ``y``, read as :func:`fedmoe.data.load_npz` reads them,
  standardised with the file's own statistics); or else
- a partition of the run's named dataset (``[data] source``), split as fedmoe's simulator splits it (for
  Flower's simulation engine).

Its profile is the ``node_config`` values of :data:`~fedmoe.flower.records.PROFILE_KEYS`; a value not
given is, for a partition, the one fedmoe's simulator draws for it, and for a ``data-path`` node the
median of the "uniform" tier. The model is built from the run's ``[model]`` section and the data spec the
server sends; its parameters always come from the server.
"""

from __future__ import annotations

import dataclasses
import numbers

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedmoe.alignment import ModelCost
from fedmoe.data import DataSpec, Samples, load_npz
from fedmoe.federated import (
    ClientPayload,
    FederatedConfig,
    Node,
    NodeProfile,
    load_data,
    make_profiles,
    model_cost,
    partition_clients,
)
from fedmoe.flower.records import (
    AFFINITY,
    BEFORE,
    PROFILE_KEYS,
    federated_config,
    pack_arrays,
    pack_feedback,
    unpack_arrays,
    unpack_spec,
)
from fedmoe.models import build_model, build_task

__all__ = ["client_app", "node_of"]

_COST = "fedmoe-model-cost"  # ConfigRecord in a node's Context.state
_NODES: dict[tuple, Node] = {}  # this process's node (one at a time)


def _client(config: FederatedConfig, node_config) -> int:
    n = config.federation.num_clients
    if "partition-id" not in node_config:
        raise ValueError("node_config must set partition-id (the node's fedmoe client)")
    client = node_config["partition-id"]
    if isinstance(client, bool) or not isinstance(client, int) or not 0 <= client < n:
        raise ValueError(f"node_config partition-id must be an int in [0, num_clients={n}), got {client!r}")
    parts = node_config.get("num-partitions", n)
    if parts != n:
        raise ValueError(f"node_config num-partitions={parts!r} differs from the run's num_clients={n}")
    return client


def _data(config: FederatedConfig, node_config, client: int) -> tuple[Samples, np.ndarray | None]:
    """The node's training samples and, for a partition of the named dataset, every client's sample count
    (the population its simulated profile is drawn from)."""
    if "data-path" in node_config:
        own = load_npz(str(node_config["data-path"]), test_fraction=config.data.test_fraction,
                       seed=config.federation.seed)
        return own.train_samples(), None
    dataset = load_data(config)
    parts = partition_clients(config, dataset)
    return dataset.train_samples(parts[client]), np.array([p.size for p in parts], dtype=np.float64)


def _profile(config: FederatedConfig, node_config, client: int, sizes: np.ndarray | None,
             samples: int, cost: ModelCost) -> NodeProfile:
    if sizes is None:
        default = NodeProfile.of(make_profiles(np.array([samples], float), cost, "uniform", 0), 0)
    else:
        default = NodeProfile.of(make_profiles(sizes, cost, config.simulation.tiers, config.federation.seed),
                                 client)
    values = {}
    for key, name in PROFILE_KEYS.items():
        value = node_config.get(key, getattr(default, name))
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"node_config {key} must be a number, got {value!r}")
        values[name] = float(value)
    return NodeProfile(**values, samples=float(samples), tier=default.tier if sizes is not None else -1)


def node_of(context: Context, spec: DataSpec) -> Node:
    """The node of this ``context`` for models of data ``spec`` (built once per process). The measured
    model cost is kept in ``context.state``: a SuperNode may start a process per message, and measuring
    costs seconds."""
    config = federated_config(context.run_config)
    key = (tuple(sorted(context.run_config.items())), tuple(sorted(context.node_config.items())), spec)
    if key not in _NODES:
        client = _client(config, context.node_config)
        data, sizes = _data(config, context.node_config, client)
        model = build_model(config.model, spec, config.federation.seed)
        saved = context.state.config_records.get(_COST)
        cost = ModelCost(**saved) if saved is not None else model_cost(model, data.inputs[:1],
                                                                        config.train.epochs)
        profile = _profile(config, context.node_config, client, sizes, len(data), cost)
        _NODES.clear()
        _NODES[key] = Node(client, data, model, build_task(config.model, spec), config.train, profile)
        context.state[_COST] = ConfigRecord(dataclasses.asdict(cost))
    return _NODES[key]


def _query(msg: Message, context: Context) -> Message:
    """Registration: partition, samples and profile; the gate affinity for a cold start."""
    config = msg.content.config_records["config"]
    node = node_of(context, unpack_spec(config))
    profile = {"partition-id": node.client, "samples": len(node.data),
               **{key: float(getattr(node.profile, name)) for key, name in PROFILE_KEYS.items()}}
    content = {"profile": MetricRecord(profile)}
    if config["cold-start"]:
        shared, _ = unpack_arrays(node.model, msg.content.array_records["arrays"])
        content["affinity"] = ArrayRecord({"affinity": Array(node.affinity(shared))})
    return Message(RecordDict(content), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    """One round: train the shared parameters and the assigned experts on the node's data."""
    config = msg.content.config_records["config"]
    node = node_of(context, unpack_spec(config))
    experts = np.asarray(config["experts"], dtype=np.int64)
    shared, rows = unpack_arrays(node.model, msg.content.array_records["arrays"], len(experts))
    payload = ClientPayload(int(config["round"]), node.client, experts, shared, rows, int(config["seed"]),
                            affinity=bool(config.get(AFFINITY, False)))
    update = node.train(payload)
    metrics = {"num-examples": update.num_samples, "train-loss": float(update.train_loss),
               **pack_feedback(update.feedback), **pack_feedback(update.feedback_before, BEFORE)}
    if update.affinity is not None:
        metrics[AFFINITY] = update.affinity.astype(np.float64).tolist()
    content = RecordDict({"arrays": pack_arrays(node.model, update.shared, update.expert_rows),
                          "config": ConfigRecord({"experts": update.experts.tolist()}),
                          "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


def client_app() -> ClientApp:
    """A ClientApp for :class:`~fedmoe.flower.FedMoEStrategy`: answers ``query`` (registration) and
    ``train`` messages as the node its ``node_config`` describes (module docstring)."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    return app
