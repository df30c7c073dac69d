"""Models of fedmoe: the MoE layer on fedmoe_kernels' routing ops, and a small MoE image classifier."""

from fedmoe.models.classifier import INPUT_SHAPES, MoEClassifier
from fedmoe.models.moe import MoELayer, MoEStats, grouped_mm_available

__all__ = ["INPUT_SHAPES", "MoEClassifier", "MoELayer", "MoEStats", "grouped_mm_available"]
