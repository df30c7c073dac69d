"""The federated loop (docs/design.md, The federated round): the configuration tree, client nodes, server
round steps, simulated heterogeneous clients, atomic checkpoints, and the runner that ties them together."""

from fedmoe.federated.bounds import AggregationConfig, Bounds
from fedmoe.federated.checkpoint import load_checkpoint, save_checkpoint
from fedmoe.federated.compare import compare_configs, compare_strategies, format_table, run_configs, summarize
from fedmoe.federated.config import EvaluationConfig, FederatedConfig, FederationConfig, Option
from fedmoe.federated.node import (
    ClientPayload,
    ClientUpdate,
    ExpertFeedback,
    Node,
    NodeProfile,
    TrainConfig,
    gate_affinity,
    load_shared,
    profiles_of,
    shared_vector,
    train_client,
)
from fedmoe.federated.runner import (
    FederatedRun,
    build_nodes,
    initial_model,
    load_data,
    partition_clients,
    rounds_to_target,
    run_experiment,
    test_samples,
)
from fedmoe.federated.server import Faults, RoundPlan, RoundReport, Server, check_update
from fedmoe.federated.simulation import ClientReply, Simulation, SimulationConfig, make_profiles, model_cost

__all__ = [
    "AggregationConfig",
    "Bounds",
    "ClientPayload",
    "ClientReply",
    "ClientUpdate",
    "EvaluationConfig",
    "ExpertFeedback",
    "Faults",
    "FederatedConfig",
    "FederatedRun",
    "FederationConfig",
    "Node",
    "NodeProfile",
    "Option",
    "RoundPlan",
    "RoundReport",
    "Server",
    "Simulation",
    "SimulationConfig",
    "TrainConfig",
    "build_nodes",
    "check_update",
    "compare_configs",
    "compare_strategies",
    "format_table",
    "gate_affinity",
    "initial_model",
    "load_checkpoint",
    "load_data",
    "load_shared",
    "make_profiles",
    "model_cost",
    "partition_clients",
    "profiles_of",
    "rounds_to_target",
    "run_configs",
    "run_experiment",
    "save_checkpoint",
    "shared_vector",
    "summarize",
    "test_samples",
    "train_client",
]
