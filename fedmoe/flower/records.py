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
``[tool.flwr.app.config.<section>]`` tables to such keys. Two keys are not options: ``out`` (the
ServerApp's output directory) and ``nodes`` (the run's node ids and their partitions, :func:`pinned_nodes`).
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, MetricRecord
from flwr.common.constant import SType

from fedmoe.data import DataSpec
from fedmoe.federated import ExpertFeedback, FederatedConfig
from fedmoe.models import FederatedMoE

__all__ = ["EXPERT_ROWS", "NODES", "OUT", "PROFILE_KEYS", "federated_config", "pack_arrays", "pack_feedback",
           "pack_spec", "pinned_nodes", "unpack_array", "unpack_arrays", "unpack_feedback", "unpack_spec"]

# node_config key -> NodeProfile field
PROFILE_KEYS = {"compute-flops": "compute", "memory-bytes": "memory", "bandwidth-bytes": "bandwidth",
                "latency-s": "latency", "reliability": "reliability"}
EXPERT_ROWS = "expert_rows"
OUT = "out"  # run config key of the ServerApp's output directory ("" = none)
NODES = "nodes"  # run config key of the run's "node-id:partition-id" pairs ("" = first come, first bound)
BEFORE = "before-"  # key prefix of the feedback measured before local training
AFFINITY = "affinity"  # gate affinity [E] sent with a train reply when asked
_FEEDBACK = ("share", "loss", "accuracy", "samples")


def federated_config(run_config: Mapping) -> FederatedConfig:
    """The :class:`FederatedConfig` of a Flower run config (module docstring); an unknown key raises
    ValueError naming it."""
    if not isinstance(run_config, Mapping):
        raise TypeError(f"run_config must be a mapping, got {type(run_config).__name__}")
    return FederatedConfig.from_flat({k: v for k, v in run_config.items() if k not in (OUT, NODES)})


def pinned_nodes(run_config: Mapping) -> dict[int, int] | None:
    """Node id -> partition-id of the run config's ``nodes``: ``"NODE:PARTITION"`` pairs separated by commas
    or spaces, the node ids ``flwr supernode register`` printed (None where ``nodes`` is unset or ``""``).
    A malformed value, or a node or partition listed twice, raises ValueError."""
    value = str(run_config.get(NODES, "")).replace(",", " ").split()
    if not value:
        return None
    pinned: dict[int, int] = {}
    for pair in value:
        node, sep, partition = pair.partition(":")
        if not sep or not node.isdigit() or not partition.isdigit():
            raise ValueError(f"run config {NODES!r} must hold NODE:PARTITION pairs of ints, got {pair!r}")
        if int(node) in pinned or int(partition) in pinned.values():
            raise ValueError(f"run config {NODES!r} lists node {node} or partition {partition} twice")
        pinned[int(node)] = int(partition)
    return pinned


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


def _what(dtype, shape) -> str:
    """``dtype[shape]`` for a message, at most 80 characters (a reply chooses what it declares)."""
    text = f"{dtype}{list(shape)}"
    return text if len(text) <= 80 else text[:77] + "..."


def unpack_array(array, name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """The values of ``array`` (a Flower :class:`~flwr.app.Array`) if it is exactly a ``dtype`` array of
    ``shape``, else ValueError naming ``name``. Everything is checked before anything is allocated: the
    Array's declared ``stype``, ``dtype`` and ``shape``, then the ``.npy`` header in its bytes (parsed
    alone, at most 10 kB), then that the bytes after the header are exactly ``shape`` x ``dtype``; only
    then are the values copied out (one allocation of the expected size). A reply cannot make the server
    allocate more than the arrays it was sent for."""
    dtype = np.dtype(dtype)
    shape = tuple(int(d) for d in shape)
    expected = _what(dtype, shape)
    if not isinstance(array, Array):
        raise ValueError(f"array {name!r} is a {type(array).__name__}, not an Array")
    if array.stype != SType.NUMPY:
        raise ValueError(f"array {name!r} has stype {array.stype!r}, expected {SType.NUMPY!r}")
    try:
        declared = np.dtype(array.dtype)
    except (TypeError, ValueError):
        declared = None
    if declared != dtype or tuple(array.shape) != shape:
        raise ValueError(f"array {name!r} declares {_what(array.dtype, array.shape)}, expected {expected}")
    data = array.data
    stream = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            header = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            header = np.lib.format.read_array_header_2_0(stream)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, TypeError, SyntaxError, EOFError, RecursionError) as exc:
        raise ValueError(f"array {name!r} holds no valid .npy header: {str(exc)[:80]}") from exc
    stored_shape, fortran, stored_dtype = header
    if tuple(stored_shape) != shape or stored_dtype != dtype:
        raise ValueError(f"array {name!r} holds {_what(stored_dtype, stored_shape)}, expected {expected}")
    count = math.prod(shape)
    if len(data) - stream.tell() != count * dtype.itemsize:
        raise ValueError(f"array {name!r} holds {len(data) - stream.tell()} bytes of values, expected "
                         f"{count * dtype.itemsize}")
    values = np.frombuffer(data, dtype, count, stream.tell())
    return values.reshape(shape, order="F" if fortran else "C").copy()


def _numpy_dtype(tensor: torch.Tensor) -> np.dtype:
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def unpack_arrays(model: FederatedMoE, arrays: ArrayRecord, rows: int | None = None):
    """``(shared [S], expert_rows [rows, P] or None)`` from an ArrayRecord of :func:`pack_arrays`, with
    ``rows`` expert rows expected (None: no ``expert_rows``). The record must hold exactly the model's
    shared parameters (and ``expert_rows``) with their shapes and dtypes; anything else raises ValueError,
    before any array is deserialised (:func:`unpack_array`)."""
    if not isinstance(arrays, ArrayRecord):
        raise ValueError(f"arrays must be an ArrayRecord, got {type(arrays).__name__}")
    expected = {name: (tuple(p.shape), _numpy_dtype(p)) for name, p in model.named_shared_parameters()}
    if rows is not None:
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 0:
            raise ValueError(f"rows must be an int >= 0 or None, got {rows!r}")
        bank = model.expert_bank
        expected[EXPERT_ROWS] = ((rows, bank.shape[1]), _numpy_dtype(bank))
    if set(arrays) != set(expected):
        missing, extra = sorted(set(expected) - set(arrays)), sorted(set(arrays) - set(expected))[:5]
        raise ValueError(f"arrays lack {missing} and hold unexpected {extra}" if missing and extra else
                         f"arrays lack {missing}" if missing else f"arrays hold unexpected {extra}")
    values = {name: unpack_array(arrays[name], name, *spec) for name, spec in expected.items()}
    rows_out = torch.from_numpy(values.pop(EXPERT_ROWS)) if rows is not None else None
    return torch.cat([torch.from_numpy(v).reshape(-1) for v in values.values()]), rows_out


def pack_feedback(feedback: ExpertFeedback, prefix: str = "") -> dict[str, list]:
    """MetricRecord entries of ``feedback``: ``prefix + field`` -> per-expert list."""
    return {prefix + k: getattr(feedback, k).tolist() for k in _FEEDBACK}


def unpack_feedback(metrics: MetricRecord, prefix: str = "") -> ExpertFeedback:
    """The :class:`ExpertFeedback` of :func:`pack_feedback` entries (a missing key raises KeyError)."""
    return ExpertFeedback(*(np.asarray(metrics[prefix + k], np.int64 if k == "samples" else np.float64)
                            for k in _FEEDBACK))
