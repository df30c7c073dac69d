"""The federated loop (DESIGN.md §5): server round steps, pure client training, simulated heterogeneous
clients, atomic checkpoints, and the runner that ties them together."""

from fedmoe.federated.checkpoint import load_checkpoint, save_checkpoint
from fedmoe.federated.client import (
    ClientPayload,
    ClientUpdate,
    ExpertFeedback,
    TrainConfig,
    gate_affinity,
    load_shared,
    shared_vector,
    train_client,
)
from fedmoe.federated.compare import compare_configs, compare_strategies, format_table, run_configs, summarize
from fedmoe.federated.config import FederatedConfig
from fedmoe.federated.runner import FederatedRun, rounds_to_target, run_experiment
from fedmoe.federated.server import RoundPlan, RoundReport, Server, check_update
from fedmoe.federated.simulation import ClientReply, Simulation, make_profiles, model_cost

__all__ = [
    "ClientPayload",
    "ClientReply",
    "ClientUpdate",
    "ExpertFeedback",
    "FederatedConfig",
    "FederatedRun",
    "RoundPlan",
    "RoundReport",
    "Server",
    "Simulation",
    "TrainConfig",
    "check_update",
    "compare_configs",
    "compare_strategies",
    "format_table",
    "gate_affinity",
    "load_checkpoint",
    "load_shared",
    "make_profiles",
    "model_cost",
    "rounds_to_target",
    "run_configs",
    "run_experiment",
    "save_checkpoint",
    "shared_vector",
    "summarize",
    "train_client",
]
