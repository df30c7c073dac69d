"""fedmoe_kernels: the native ops of fedmoe. Knows nothing of federated learning.

One module per op, named after it: :mod:`~fedmoe_kernels.route`, :mod:`~fedmoe_kernels.dispatch`,
:mod:`~fedmoe_kernels.combine`, :mod:`~fedmoe_kernels.aggregate` and :mod:`~fedmoe_kernels.assign`. Each
holds the op, its plain reference beside it (``<op>_reference``, or ``assign_linprog`` / ``assign_lsa``:
the executable specification every fast path is tested against) and the choice of fast path; the Triton
kernels live in :mod:`fedmoe_kernels._details`, the C++ solver of ``assign`` in ``csrc/``.

Names are imported on first use, so ``from fedmoe_kernels import assign`` does not load torch. As a
package attribute an op's name is always the op (the function), never its module: import what a module
holds with ``from fedmoe_kernels.route import RoutingPlan``, not ``import fedmoe_kernels.route``.
"""

import importlib
import sys
import types

_EXPORTS = {
    "Accumulator": "aggregate",
    "AggregateResult": "aggregate",
    "aggregate": "aggregate",
    "Assignment": "assign",
    "Certificate": "assign",
    "assign": "assign",
    "combine": "combine",
    "dispatch": "dispatch",
    "RoutingPlan": "route",
    "route": "route",
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


class _Package(types.ModuleType):
    """The package's module type: importing the submodule ``fedmoe_kernels.route`` binds the package
    attribute ``route`` to the submodule; this binds the function of that name instead."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _EXPORTS.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
