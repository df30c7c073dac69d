"""fedmoe_kernels: the native ops of fedmoe. Knows nothing of federated learning.

Each op has a plain reference in :mod:`fedmoe_kernels.reference` (the executable specification)
and a fast path (C++ for ``assign``, Triton / vectorised torch for the tensor ops).
"""

from fedmoe_kernels.aggregate import Accumulator, AggregateResult, aggregate
from fedmoe_kernels.assign import Assignment, Certificate, assign
from fedmoe_kernels.dispatch import combine, dispatch
from fedmoe_kernels.routing import RoutingPlan, route

__all__ = [
    "Accumulator",
    "AggregateResult",
    "Assignment",
    "Certificate",
    "RoutingPlan",
    "aggregate",
    "assign",
    "combine",
    "dispatch",
    "route",
]
