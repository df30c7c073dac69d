"""Plain references for every op of fedmoe_kernels: the executable specification.

Obviously correct, not fast: loops are fine here. Every fast path is tested against these.
"""

from __future__ import annotations

import numpy as np

# ---------------------------------------------------------------- assign (DESIGN.md §3.1)

# ---------------------------------------------------------------- route / dispatch / combine (§3.2)

# ---------------------------------------------------------------- aggregate (§3.3)
