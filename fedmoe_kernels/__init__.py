"""fedmoe_kernels: the native ops of fedmoe. Knows nothing of federated learning.

Each op has a plain reference in :mod:`fedmoe_kernels.reference` (the executable specification)
and a fast path (C++ for ``assign``, Triton / vectorised torch for the tensor ops).
"""

from fedmoe_kernels.assign import Assignment, Certificate, assign

__all__ = ["Assignment", "Certificate", "assign"]
