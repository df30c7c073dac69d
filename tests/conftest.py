"""Test session setup: without a GPU, Triton kernels run under the interpreter on CPU tensors; Flower
runs offline (no telemetry, no runtime dependency installation, no update check)."""

import os

os.environ.update(FLWR_TELEMETRY_ENABLED="0", RAY_USAGE_STATS_ENABLED="0",
                  FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1", FLWR_DISABLE_UPDATE_CHECK="1")

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        _has_cuda = False
    if not _has_cuda:
        os.environ["TRITON_INTERPRET"] = "1"
