"""Test session setup: without a GPU, Triton kernels run under the interpreter on CPU tensors (with one,
the tests' CPU tensors go to the GPU at the kernel launchers: ``triton_on_cuda``); Flower
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

try:
    import torch

    _has_cuda = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _has_cuda = False
if "TRITON_INTERPRET" not in os.environ and not _has_cuda:
    os.environ["TRITON_INTERPRET"] = "1"


def _on_cuda(launcher):
    """``launcher`` run on the GPU: its tensor arguments go there, its results back to the device of the
    first (a no-op for CUDA tensors)."""

    def run(*args):
        device = next(a.device for a in args if isinstance(a, torch.Tensor))
        out = launcher(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.to(device) for o in out) if isinstance(out, tuple) else out.to(device)

    return run


@pytest.fixture(autouse=True)
def triton_on_cuda(monkeypatch):
    """On a GPU (and not under the interpreter), the tests of route, dispatch and combine keep their CPU
    tensors (their loop references need them) and run the compiled Triton kernels: the launchers of
    ``fedmoe_kernels._details`` move their inputs to the GPU and their results back."""
    if not _has_cuda or os.environ.get("TRITON_INTERPRET") == "1":
        yield
        return
    from fedmoe_kernels import _backend
    from fedmoe_kernels._details import route_triton, rows_triton

    monkeypatch.setattr(_backend, "interpreting", lambda: True)  # backend="triton" takes CPU tensors
    for module, name in ((route_triton, "route"), (rows_triton, "gather"), (rows_triton, "combine"),
                         (rows_triton, "slot_dot")):
        monkeypatch.setattr(module, name, _on_cuda(getattr(module, name)))
    yield


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
