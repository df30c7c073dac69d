"""Flower backend (docs/flower.md): fedmoe's alignment as a Flower ``Strategy`` (Message API), a
``ClientApp`` that is one fedmoe node, and a ``ServerApp``; the records both sides exchange."""

from fedmoe.flower.client_app import client_app, node_of
from fedmoe.flower.records import EXPERT_ROWS, PROFILE_KEYS, federated_config
from fedmoe.flower.server_app import server_app
from fedmoe.flower.strategy import FedMoEStrategy

__all__ = ["EXPERT_ROWS", "PROFILE_KEYS", "FedMoEStrategy", "client_app", "federated_config", "node_of",
           "server_app"]
