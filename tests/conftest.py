"""Test session setup: without a GPU, Triton kernels run under the interpreter on CPU tensors; Flower
runs offline (no telemetry, no runtime dependency installation, no update check). Shared fixtures:
``one_thread`` (small models: intra-op threads only add contention on a shared 2-core machine),
``digits`` (a third of digits: enough for the federated loop, quick to train) and ``small_npz`` (400
digits as an ``.npz`` file, for the command line). Hypothesis runs derandomized unless
``HYPOTHESIS_PROFILE=explore``."""

import dataclasses
import os

import pytest
from hypothesis import settings

# Property tests draw the same examples on every run (a red CI must be reproducible); set
# HYPOTHESIS_PROFILE=explore to search afresh.
settings.register_profile("ci", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

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


@pytest.fixture
def one_thread():
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    from fedmoe.data import load_digits

    d = load_digits()
    return dataclasses.replace(d, x_train=d.x_train[:480], y_train=d.y_train[:480], x_test=d.x_test[:120],
                               y_test=d.y_test[:120])


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory) -> str:
    """400 digits as an .npz with images [N, 8, 8] and no test set (a random split is made)."""
    import numpy as np
    from sklearn.datasets import load_digits

    d = load_digits()
    path = tmp_path_factory.mktemp("data") / "digits400.npz"
    np.savez(path, x=d.images[:400], y=d.target[:400])
    return str(path)
