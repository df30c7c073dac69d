"""Models of fedmoe: the MoE layer on fedmoe_kernels' routing ops, the protocol every federated model and
task follows, and the models ``[model] kind`` can build."""

from fedmoe.models.classifier import INPUT_SHAPES, ClassificationTask, MoEClassifier
from fedmoe.models.moe import MoELayer, MoEStats, grouped_mm_available
from fedmoe.models.protocol import FederatedMoE, Task, expert_mask, units_per_sample
from fedmoe.models.registry import MODEL_KINDS, ModelConfig, build_model, build_task
from fedmoe.models.transformer import LanguageModelTask, LMOutputs, MoETransformer

__all__ = ["INPUT_SHAPES", "MODEL_KINDS", "ClassificationTask", "FederatedMoE", "LMOutputs",
           "LanguageModelTask", "MoEClassifier", "MoELayer", "MoEStats", "MoETransformer", "ModelConfig",
           "Task", "build_model", "build_task", "expert_mask", "grouped_mm_available", "units_per_sample"]
