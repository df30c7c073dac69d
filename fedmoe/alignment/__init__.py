"""Client-expert alignment (docs/design.md, Alignment engine): fitness, expert load, client profiles,
desirability and the strategies that turn them into each round's assignment.

Per round the federated loop calls ``strategy.assign(RoundState(...))``, then, with what came back,
``fitness.update(...)``, ``load.update(...)`` and ``profiles.observe(...)``; a :class:`DriftDetector` step
before the fitness update lets clients whose data changed forget their stale fitness. Every stateful part has
``state_dict()`` / ``load_state_dict()`` with plain numpy arrays and scalars, for checkpoints.
"""

from fedmoe.alignment.desirability import Desirability, DesirabilityConfig, minmax
from fedmoe.alignment.drift import DriftConfig, DriftDetector
from fedmoe.alignment.fitness import (
    FITNESS_SIGNALS,
    DenseFitness,
    FitnessConfig,
    FitnessTable,
    LeanFitness,
    fitness_table,
)
from fedmoe.alignment.load import ExpertLoad, LoadConfig, LoadStats, gini
from fedmoe.alignment.profiles import (
    DEFAULT_TIERS,
    ClientProfile,
    ModelCost,
    ProfileConfig,
    Tier,
    generate_profiles,
)
from fedmoe.alignment.strategies import (
    STRATEGIES,
    AlignmentConfig,
    AlignmentResult,
    RoundState,
    Strategy,
    make_strategy,
)

__all__ = [
    "DEFAULT_TIERS",
    "FITNESS_SIGNALS",
    "STRATEGIES",
    "AlignmentConfig",
    "AlignmentResult",
    "ClientProfile",
    "DenseFitness",
    "Desirability",
    "DesirabilityConfig",
    "DriftConfig",
    "DriftDetector",
    "ExpertLoad",
    "FitnessConfig",
    "FitnessTable",
    "LeanFitness",
    "LoadConfig",
    "LoadStats",
    "ModelCost",
    "ProfileConfig",
    "RoundState",
    "Strategy",
    "Tier",
    "fitness_table",
    "generate_profiles",
    "gini",
    "make_strategy",
    "minmax",
]
