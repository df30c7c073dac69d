"""A small image classifier: convolutional backbone -> residual MoE layer -> linear head.

For 8x8 digits (1, 8, 8), 28x28 images (1, 28, 28) and 32x32 colour images (3, 32, 32). The backbone,
the router and the head are the shared parameters of federated training; the experts are the rows of
``moe.expert_bank``. :class:`ClassificationTask` scores it: cross-entropy and top-1 accuracy per image.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from fedmoe.models.moe import MoELayer, MoEStats

__all__ = ["INPUT_SHAPES", "ClassificationTask", "MoEClassifier"]

INPUT_SHAPES = {"digits": (1, 8, 8), "mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class MoEClassifier(nn.Module):
    """images [B, C, H, W] (or flattened [B, C*H*W]) -> (logits [B, num_classes], MoEStats).

    Backbone: 3x3 convolutions with ReLU (``channels``; none is allowed), stride 2 while the feature map is
    wider than 4, then average-pooled to 4x4 and projected to ``d_model``. Then ``h + moe(layer_norm(h))``
    and a linear head. ``moe_kwargs`` go to :class:`MoELayer` (``top_k``, ``capacity_factor``, ``backend``,
    ...).
    """

    def __init__(
        self,
        input_shape: tuple[int, int, int],
        num_classes: int,
        *,
        d_model: int = 64,
        d_hidden: int = 128,
        num_experts: int = 8,
        channels: tuple[int, ...] = (32, 64),
        **moe_kwargs,
    ):
        super().__init__()
        if len(input_shape) != 3 or not all(isinstance(n, int) and n > 0 for n in input_shape):
            raise ValueError(
                f"input_shape must be (channels, height, width) of positive ints, got {input_shape!r}"
            )
        if not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        in_channels, size = input_shape[0], min(input_shape[1:])
        for out_channels in channels:
            stride = 2 if size > 4 else 1
            layers += [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1), nn.ReLU()]
            in_channels, size = out_channels, (size + stride - 1) // stride
        layers += [nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(in_channels * 16, d_model), nn.ReLU()]
        self.backbone = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(d_model)
        self.moe = MoELayer(d_model, d_hidden, num_experts, **moe_kwargs)
        self.head = nn.Linear(d_model, num_classes)

    @property
    def expert_bank(self) -> nn.Parameter:
        """[E, P]: one row per expert (see :class:`MoELayer`)."""
        return self.moe.expert_bank

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    def set_expert_mask(self, mask: torch.Tensor | None) -> None:
        """See :meth:`MoELayer.set_expert_mask`."""
        self.moe.set_expert_mask(mask)

    def named_shared_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """All parameters except the expert bank: backbone, router, norm and head."""
        return ((name, p) for name, p in self.named_parameters() if p is not self.moe.expert_bank)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        c, h, w = self.input_shape
        if images.ndim == 2 and images.shape[1] == c * h * w:
            images = images.view(-1, c, h, w)
        if images.ndim != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(
                f"images must be [B, {c}, {h}, {w}] or [B, {c * h * w}], got {tuple(images.shape)}"
            )
        features = self.backbone(images)
        mixed, stats = self.moe(self.norm(features))
        return self.head(features + mixed), stats


class ClassificationTask:
    """Cross-entropy of logits [B, C] against int64 labels [B]; a sample is correct when its top logit is
    its label."""

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return F.cross_entropy(outputs, targets, reduction=reduction)

    def correct(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return outputs.argmax(1) == targets
