"""What fedmoe's messages carry, packed into Flower records (docs/flower.md, Messages).

- ``query`` (registration, once per node): server -> node ``"config"`` {``cold-start``, the data spec
  ``input-shape`` and ``num-classes``} and, for a cold start, ``"arrays"`` (the shared parameters);
  node -> server ``"profile"`` (MetricRecord: ``partition-id``, ``samples`` and :data:`PROFILE_KEYS`)
  and, for a cold start, ``"affinity"`` (the gate's affinity [E] on local data).
- ``train`` (every round, to the aligned nodes only): server -> node ``"arrays"`` (the shared parameters
  by name plus ``expert_rows`` [k, P], the assigned rows of the expert bank) and ``"config"``
  {``experts`` (their ids), ``round``, ``seed``, ``affinity`` (whether to measure it), ``server-round``
  and the data spec}; node -> server ``"arrays"`` (same keys, trained), ``"config"`` {``experts``} and
  ``"metrics"`` {``num-examples``, ``train-loss`` and the per-expert feedback lists ``share``, ``loss``,
  ``accuracy``, ``samples`` measured after local training, and the same measured before it as
  ``before-share``, ``before-loss``, ``before-accuracy``, ``before-samples``; when asked, ``affinity``,
  the gate's affinity [E] to every expert on the node's current data with the received weights}.

The run config (flat string keys) maps to the configuration tree by one rule: each key is an option's path
(``alignment.desirability.fairness``), ``-`` allowed for ``_``; Flower flattens nested
``[tool.flwr.app.config.<section>]`` tables to such keys. The key ``out`` (the ServerApp's output
directory) is not an option.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord

from fedmoe.data import DataSpec
from fedmoe.federated import ExpertFeedback, FederatedConfig
from fedmoe.models import FederatedMoE

__all__ = ["EXPERT_ROWS", "OUT", "PROFILE_KEYS", "federated_config", "pack_arrays", "pack_feedback",
           "pack_spec", "unpack_arrays", "unpack_feedback", "unpack_spec"]

# node_config key -> NodeProfile field
PROFILE_KEYS = {"compute-flops": "compute", "memory-bytes": "memory", "bandwidth-bytes": "bandwidth",
                "latency-s": "latency", "reliability": "reliability"}
EXPERT_ROWS = "expert_rows"
OUT = "out"  # run config key of the ServerApp's output directory ("" = none)
BEFORE = "before-"  # key prefix of the feedback measured before local training
AFFINITY = "affinity"  # gate affinity [E] sent with a train reply when asked
_FEEDBACK = ("share", "loss", "accuracy", "samples")


def federated_config(run_config: Mapping) -> FederatedConfig:
    """The :class:`FederatedConfig` of a Flower run config (module docstring); an unknown key raises
    ValueError naming it."""
    if not isinstance(run_config, Mapping):
        raise TypeError(f"run_config must be a mapping, got {type(run_config).__name__}")
    return FederatedConfig.from_flat({k: v for k, v in run_config.items() if k != OUT})


def pack_spec(spec: DataSpec) -> dict:
    """ConfigRecord entries of the data spec the node builds its model for."""
    return {"input-shape": list(spec.input_shape), "num-classes": spec.num_classes}


def unpack_spec(config: Mapping) -> DataSpec:
    return DataSpec(tuple(config["input-shape"]), config["num-classes"])


def pack_arrays(model: FederatedMoE, shared: torch.Tensor, rows: torch.Tensor | None = None) -> ArrayRecord:
    """``shared`` [S] split into the model's shared parameters by name, plus ``expert_rows`` if given."""
    arrays, offset = {}, 0
    for name, p in model.named_shared_parameters():
        arrays[name] = Array(shared[offset:offset + p.numel()].reshape(p.shape).numpy())
        offset += p.numel()
    if rows is not None:
        arrays[EXPERT_ROWS] = Array(rows.numpy())
    return ArrayRecord(arrays)


def unpack_arrays(model: FederatedMoE, arrays: ArrayRecord, rows: bool = True):
    """``(shared [S], expert_rows or None)`` from an ArrayRecord of :func:`pack_arrays`; a missing or
    misshapen shared array raises ValueError."""
    parts = []
    for name, p in model.named_shared_parameters():
        if name not in arrays:
            raise ValueError(f"arrays lack the shared parameter {name!r}")
        value = torch.from_numpy(arrays[name].numpy())
        if value.shape != p.shape:
            raise ValueError(f"array {name!r} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
        parts.append(value.reshape(-1))
    if rows and EXPERT_ROWS not in arrays:
        raise ValueError(f"arrays lack {EXPERT_ROWS!r}")
    return torch.cat(parts), torch.from_numpy(arrays[EXPERT_ROWS].numpy()) if rows else None


def pack_feedback(feedback: ExpertFeedback, prefix: str = "") -> dict[str, list]:
    """MetricRecord entries of ``feedback``: ``prefix + field`` -> per-expert list."""
    return {prefix + k: getattr(feedback, k).tolist() for k in _FEEDBACK}


def unpack_feedback(metrics: MetricRecord, prefix: str = "") -> ExpertFeedback:
    """The :class:`ExpertFeedback` of :func:`pack_feedback` entries (a missing key raises KeyError)."""
    return ExpertFeedback(*(np.asarray(metrics[prefix + k], np.int64 if k == "samples" else np.float64)
                            for k in _FEEDBACK))
