"""fedmoe: federated Mixture-of-Experts training with dynamic client-expert alignment."""

__version__ = "0.1.0"
