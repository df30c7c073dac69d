"""fedmoe_kernels: the native ops of fedmoe. Knows nothing of federated learning.

Each op has a plain reference in :mod:`fedmoe_kernels.reference` (the executable specification)
and a fast path (C++ for ``assign``, Triton / vectorised torch for the tensor ops). Names are
imported on first use, so ``from fedmoe_kernels import assign`` does not load torch.
"""

import importlib

_EXPORTS = {
    "Accumulator": "aggregation",
    "AggregateResult": "aggregation",
    "aggregate": "aggregation",
    "Assignment": "assignment",
    "Certificate": "assignment",
    "assign": "assignment",
    "combine": "dispatch_combine",
    "dispatch": "dispatch_combine",
    "RoutingPlan": "routing",
    "route": "routing",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'fedmoe_kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"fedmoe_kernels.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
