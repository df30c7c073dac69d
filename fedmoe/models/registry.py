"""The ``[model]`` section and the models it can build: ``kind`` picks one, the other options size it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fedmoe.alignment import _checks
from fedmoe.data import DataSpec
from fedmoe.models.classifier import ClassificationTask, MoEClassifier
from fedmoe.models.protocol import FederatedMoE, Task
from fedmoe.models.transformer import LanguageModelTask, MoETransformer
from fedmoe_kernels.route import MAX_EXPERTS

__all__ = ["MODEL_KINDS", "ModelConfig", "build_model", "build_task"]

MODEL_KINDS = ("classifier", "transformer")


@dataclass(frozen=True)
class ModelConfig:
    """``kind``: the model (``classifier``: :class:`~fedmoe.models.MoEClassifier`, a convolutional backbone
    with ``channels`` per layer (none: a linear projection of the pooled image, a weak backbone that
    leaves the capacity to the experts), then one MoE layer; ``transformer``:
    :class:`~fedmoe.models.MoETransformer`, a language model of ``blocks`` blocks with ``heads`` attention
    heads and an MoE feed-forward each, for token windows); ``num_experts`` E (at most 4096), ``top_k``
    experts per token, ``d_model`` token width, ``d_hidden`` expert hidden width."""

    kind: str = "classifier"
    num_experts: int = 8
    top_k: int = 2
    d_model: int = 32
    d_hidden: int = 64
    channels: tuple[int, ...] = (16, 32)
    blocks: int = 2
    heads: int = 4

    def __post_init__(self):
        if self.kind not in MODEL_KINDS:
            raise ValueError(f"kind must be one of {list(MODEL_KINDS)}, got {self.kind!r}")
        for name in ("num_experts", "top_k", "d_model", "d_hidden", "blocks", "heads"):
            _checks.integer(name, getattr(self, name), 1)
        if self.num_experts > MAX_EXPERTS:
            raise ValueError(f"num_experts must be at most {MAX_EXPERTS}, got {self.num_experts}")
        if self.top_k > min(8, self.num_experts):
            raise ValueError(f"top_k must be <= min(8, num_experts) = {min(8, self.num_experts)}, "
                             f"got {self.top_k}")
        channels = tuple(self.channels) if isinstance(self.channels, list | tuple) else None
        if channels is None or not all(type(c) is int and c > 0 for c in channels):
            raise ValueError(f"channels must be a sequence of positive ints (empty: no convolutions), got "
                             f"{self.channels!r}")
        object.__setattr__(self, "channels", channels)
        if self.kind == "transformer" and self.d_model % self.heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of heads={self.heads}")


def build_model(config: ModelConfig, spec: DataSpec, seed: int) -> FederatedMoE:
    """A freshly initialised model of ``config`` for data of ``spec``: the same (config, spec, seed) give
    the same parameters; the global torch random state is left as it was."""
    widths = {"d_model": config.d_model, "d_hidden": config.d_hidden, "num_experts": config.num_experts,
              "top_k": config.top_k}
    if config.kind == "transformer" and len(spec.input_shape) != 1:
        raise ValueError(f"model.kind 'transformer' needs token windows (input_shape (L,)), got "
                         f"{spec.input_shape}")
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        if config.kind == "transformer":  # vocabulary = classes, context = window length
            return MoETransformer(spec.num_classes, spec.input_shape[0], blocks=config.blocks,
                                  heads=config.heads, **widths)
        return MoEClassifier(spec.input_shape, spec.num_classes, channels=config.channels, **widths)


def build_task(config: ModelConfig, spec: DataSpec) -> Task:
    """The task that scores models of ``config`` on data of ``spec``."""
    return LanguageModelTask() if config.kind == "transformer" else ClassificationTask()
