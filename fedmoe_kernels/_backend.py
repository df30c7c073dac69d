"""Choice between the Triton kernels and the vectorised-torch path of a tensor op."""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def interpreting() -> bool:
    """True when Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def resolve(backend: str, tensor: torch.Tensor) -> str:
    """Return "triton" or "torch" for an op on ``tensor``.

    "auto" takes Triton on CUDA tensors and torch elsewhere. "triton" on a CPU tensor needs the
    interpreter (``TRITON_INTERPRET=1`` set before fedmoe_kernels is imported).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if tensor.is_cuda else "torch"
    if backend == "triton" and not tensor.is_cuda and not interpreting():
        raise ValueError(
            "backend='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before fedmoe_kernels is imported"
        )
    return backend
