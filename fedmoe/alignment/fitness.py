"""Client-expert fitness ``F[N, E]`` (docs/design.md, Alignment engine): how well each expert suits each
client.

Update rule, applied once per :meth:`FitnessTable.update` call (one call per round):

* a pair with feedback ``v`` this round: ``F <- lambda·F + (1 - lambda)·v`` (``lambda = ema``, the weight
  on history);
* every other pair decays towards its client's prior: ``F <- prior_i + rho·(F - prior_i)`` (``rho = decay``).

Before any feedback ``F = prior_i`` (``FitnessConfig.prior``). Cold start (:meth:`FitnessTable.cold_start`)
sets a client's row to its gate affinity (the shared gate scored on local data, no training) and its prior
to the row mean, so untrained pairs fade back towards the client's average affinity.

Two forms share this interface and these semantics:

* :class:`DenseFitness`: float32 ``[N, E]``; use it where ``N·E·4`` bytes fit comfortably.
* :class:`LeanFitness`: only pairs that differ from the prior (trained ones and the ``lean_keep`` best
  cold-start experts per client) plus the per-client prior; decay is applied lazily from the round of the
  last write, and a pair is dropped once ``|F - prior| < prune_below``. Memory O(pairs seen recently),
  e.g. N = 100,000 x E = 4,096. Under ``signal = "affinity"`` every reply writes its client's whole row
  (E pairs), so the pairs kept grow by clients per round x E until the decay prunes them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from fedmoe.alignment import _checks
from fedmoe.alignment._select import top_per_row

__all__ = ["FITNESS_SIGNALS", "DenseFitness", "FitnessConfig", "FitnessTable", "LeanFitness", "fitness_table"]

FITNESS_SIGNALS = ("after", "before", "affinity")


@dataclass(frozen=True)
class FitnessConfig:
    """The ``[fitness]`` section. ema (lambda) in [0, 1): weight on history; decay (rho) in [0, 1]:
    per-round pull of untrained pairs towards the prior (1 = none); prior: initial value of every pair;
    lean_keep >= 0: cold-start experts kept per client by :class:`LeanFitness`; prune_below >= 0:
    :class:`LeanFitness` forgets a pair once it is this close to the prior. For the federated loop:
    signal ("after" | "before" | "affinity"): what the EMA follows: the feedback of the assigned experts
    (share x accuracy) measured after local training or before it with the received weights, or the gate
    affinity (the full router's mean probability of every expert on the client's data, held or not, with
    the received weights: the whole row moves); cold_start: score every expert with the initial gate's
    affinity first."""

    ema: float = 0.7
    decay: float = 0.95
    prior: float = 0.0
    lean_keep: int = 16
    prune_below: float = 1e-4
    signal: str = "affinity"
    cold_start: bool = True

    def __post_init__(self):
        if self.signal not in FITNESS_SIGNALS:
            raise ValueError(f"signal must be one of {list(FITNESS_SIGNALS)}, got {self.signal!r}")
        _checks.boolean("cold_start", self.cold_start)
        _checks.real("ema (lambda)", self.ema, 0.0, 1.0, hi_open=True)
        _checks.real("decay (rho)", self.decay, 0.0, 1.0)
        _checks.real("prior", self.prior)
        _checks.integer("lean_keep", self.lean_keep, 0)
        _checks.real("prune_below", self.prune_below, 0.0)


class FitnessTable(ABC):
    """Common interface of the dense and lean forms. ``round`` counts :meth:`update` calls."""

    kind: str

    def __init__(self, num_clients: int, num_experts: int, config: FitnessConfig | None = None):
        self.num_clients = _checks.integer("num_clients", num_clients, 0)
        self.num_experts = _checks.integer("num_experts", num_experts, 1)
        config = FitnessConfig() if config is None else config
        if not isinstance(config, FitnessConfig):
            raise TypeError(f"config must be a FitnessConfig, got {type(config).__name__}")
        self.config = config
        self.prior = np.full(self.num_clients, config.prior, dtype=np.float32)
        self.round = 0

    # ------------------------------------------------------------------ public API

    def update(self, clients, experts, values) -> None:
        """Apply one round: EMA for the given pairs (int [K], int [K], float [K]; pairs must be distinct),
        decay towards the prior for all others."""
        clients = _checks.indices("clients", clients, self.num_clients)
        experts = _checks.indices("experts", experts, self.num_experts)
        if experts.shape != clients.shape:
            raise ValueError(f"experts must have the shape of clients {clients.shape}, got {experts.shape}")
        values = _checks.floats("values", values, clients.shape)
        keys = clients * self.num_experts + experts
        order = np.argsort(keys, kind="stable")
        keys = keys[order]
        if keys.size > 1 and np.any(keys[1:] == keys[:-1]):
            raise ValueError("clients/experts must not repeat a pair within one update")
        self._update(keys, values[order])
        self.round += 1

    def cold_start(self, clients, affinity) -> None:
        """Set rows to gate affinities: clients int [n] (distinct), affinity float [n, E] (finite)."""
        clients = _checks.indices("clients", clients, self.num_clients)
        if np.unique(clients).size != clients.size:
            raise ValueError("clients must be distinct")
        affinity = _checks.floats("affinity", affinity, (clients.size, self.num_experts), dtype=np.float32)
        self.prior[clients] = affinity.mean(axis=1)
        self._cold_start(clients, affinity)

    def shrink_rows(self, clients, factor: float) -> None:
        """Pull the rows of ``clients`` (int [n], distinct) towards their priors:
        ``F <- prior + factor·(F - prior)`` with ``factor`` in [0, 1] (0 resets them); no round passes."""
        clients = _checks.indices("clients", clients, self.num_clients)
        if np.unique(clients).size != clients.size:
            raise ValueError("clients must be distinct")
        self._shrink(clients, np.float32(_checks.real("factor", factor, 0.0, 1.0)))

    def fill(self, clients: np.ndarray, out: np.ndarray) -> None:
        """Write the current rows of ``clients`` (int64 [n], in range) into ``out`` (float32 [n, E])."""
        self._fill(clients, out)

    def get(self, clients, experts) -> np.ndarray:
        """float32 [K]: current fitness of the pairs (clients[k], experts[k])."""
        clients = _checks.indices("clients", clients, self.num_clients)
        experts = _checks.indices("experts", experts, self.num_experts)
        if experts.shape != clients.shape:
            raise ValueError(f"experts must have the shape of clients {clients.shape}, got {experts.shape}")
        return self._get(clients, experts)

    def to_dense(self) -> np.ndarray:
        """float32 [N, E]: the whole table (tests and small problems only)."""
        out = np.empty((self.num_clients, self.num_experts), dtype=np.float32)
        self._fill(np.arange(self.num_clients), out)
        return out

    def state_dict(self) -> dict:
        """Plain arrays and scalars (a checkpoint); :meth:`load_state_dict` restores them."""
        return {"kind": self.kind, "shape": np.array([self.num_clients, self.num_experts]),
                "round": self.round, "prior": self.prior.copy(), **self._arrays()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind") != self.kind:
            raise ValueError(f"state is for a {state.get('kind')!r} fitness table, this one is {self.kind!r}")
        shape = tuple(int(s) for s in np.asarray(state.get("shape", ())))
        if shape != (self.num_clients, self.num_experts):
            raise ValueError(f"state shape {shape} does not match {(self.num_clients, self.num_experts)}")
        round_ = _checks.integer("state['round']", int(state.get("round", -1)), 0)
        prior = _checks.state_array(state, "prior", (self.num_clients,), np.float32)
        arrays = self._parse_arrays(state)  # everything checked before anything is replaced
        self.round, self.prior = round_, prior
        self.__dict__.update(arrays)

    # ------------------------------------------------------------------ per form

    @abstractmethod
    def _update(self, keys: np.ndarray, values: np.ndarray) -> None: ...

    @abstractmethod
    def _cold_start(self, clients: np.ndarray, affinity: np.ndarray) -> None: ...

    @abstractmethod
    def _shrink(self, clients: np.ndarray, factor: np.float32) -> None: ...

    @abstractmethod
    def _fill(self, clients: np.ndarray, out: np.ndarray) -> None: ...

    @abstractmethod
    def _get(self, clients: np.ndarray, experts: np.ndarray) -> np.ndarray: ...

    @abstractmethod
    def _arrays(self) -> dict: ...

    @abstractmethod
    def _parse_arrays(self, state: dict) -> dict: ...


class DenseFitness(FitnessTable):
    """``values``: float32 [N, E], decayed eagerly every round."""

    kind = "dense"

    def __init__(self, num_clients: int, num_experts: int, config: FitnessConfig | None = None):
        super().__init__(num_clients, num_experts, config)
        self.values = np.full((self.num_clients, self.num_experts), self.config.prior, dtype=np.float32)

    def _update(self, keys, values):
        flat = self.values.reshape(-1)
        old = flat[keys]
        rho = np.float32(self.config.decay)
        if rho != 1:  # values <- rho·values + (1 - rho)·prior: one pass in place, on torch's threads
            v = torch.from_numpy(self.values)
            torch.add(torch.from_numpy((1 - rho) * self.prior)[:, None], v, alpha=float(rho), out=v)
        lam = self.config.ema
        flat[keys] = (lam * old + (1 - lam) * values).astype(np.float32)

    def _cold_start(self, clients, affinity):
        self.values[clients] = affinity

    def _shrink(self, clients, factor):
        prior = self.prior[clients][:, None]
        self.values[clients] = prior + factor * (self.values[clients] - prior)

    def _fill(self, clients, out):
        if out.flags.c_contiguous:  # on torch's threads
            values, rows = torch.from_numpy(self.values), torch.from_numpy(clients)
            torch.index_select(values, 0, rows, out=torch.from_numpy(out))
        else:
            np.take(self.values, clients, axis=0, out=out)

    def _get(self, clients, experts):
        return self.values[clients, experts]

    def _arrays(self):
        return {"values": self.values.copy()}

    def _parse_arrays(self, state):
        shape = (self.num_clients, self.num_experts)
        return {"values": _checks.state_array(state, "values", shape, np.float32)}


class LeanFitness(FitnessTable):
    """Sparse storage: ``keys`` (int64 [M], ``client·E + expert``, sorted), ``dev`` (float32 [M],
    ``F - prior`` when last written) and ``stamp`` (int32 [M], the round of that write); every other pair
    is at its client's prior."""

    kind = "lean"

    def __init__(self, num_clients: int, num_experts: int, config: FitnessConfig | None = None):
        super().__init__(num_clients, num_experts, config)
        self.keys = np.zeros(0, dtype=np.int64)
        self.dev = np.zeros(0, dtype=np.float32)
        self.stamp = np.zeros(0, dtype=np.int32)

    def __len__(self) -> int:
        """Number of stored pairs."""
        return int(self.keys.size)

    def _current_dev(self, positions: np.ndarray) -> np.ndarray:
        """float32: ``F - prior`` now, for stored pairs at ``positions``."""
        age = self.round - self.stamp[positions]
        return self.dev[positions] * np.power(np.float32(self.config.decay), age, dtype=np.float32)

    def _rows(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Positions of the stored pairs of ``clients`` and, for each, its index into ``clients``."""
        e = self.num_experts
        start = np.searchsorted(self.keys, clients * e)
        count = np.searchsorted(self.keys, clients * e + e) - start
        owner = np.repeat(np.arange(clients.size), count)
        positions = np.arange(owner.size) + np.repeat(start - (np.cumsum(count) - count), count)
        return positions, owner

    def _update(self, keys, values):
        pos = np.searchsorted(self.keys, keys)
        found = pos < self.keys.size
        found[found] &= self.keys[pos[found]] == keys[found]
        prior = self.prior[keys // self.num_experts]
        current = np.zeros(keys.size, dtype=np.float32)
        current[found] = self._current_dev(pos[found])
        lam = self.config.ema
        new_dev = (lam * current + (1 - lam) * (values - prior)).astype(np.float32)
        stamp = np.int32(self.round + 1)
        self.dev[pos[found]] = new_dev[found]
        self.stamp[pos[found]] = stamp
        fresh = ~found
        self._insert(pos[fresh], keys[fresh], new_dev[fresh], stamp)
        self._prune(self.round + 1)

    def _insert(self, pos: np.ndarray, keys: np.ndarray, dev: np.ndarray, stamp: np.int32) -> None:
        """Insert new pairs (``keys`` sorted, absent from ``self.keys``, ``pos`` their insertion points)."""
        self.keys = np.insert(self.keys, pos, keys)
        self.dev = np.insert(self.dev, pos, dev)
        self.stamp = np.insert(self.stamp, pos, stamp)

    def _prune(self, now: int) -> None:
        """Forget pairs that, decayed to round ``now``, are within ``prune_below`` of their prior."""
        if self.config.prune_below > 0 and self.config.decay < 1 and self.keys.size:
            decayed = self.dev * np.power(np.float32(self.config.decay), now - self.stamp, dtype=np.float32)
            keep = np.abs(decayed) >= self.config.prune_below
            if not keep.all():
                self.keys, self.dev, self.stamp = self.keys[keep], self.dev[keep], self.stamp[keep]

    def _cold_start(self, clients, affinity):
        e = self.num_experts
        keep = ~np.isin(self.keys // e, clients)
        self.keys, self.dev, self.stamp = self.keys[keep], self.dev[keep], self.stamp[keep]
        keep_per_client = np.full(clients.size, self.config.lean_keep, dtype=np.int64)
        rows, cols, vals = top_per_row(affinity.copy(), keep_per_client)
        keys = clients[rows] * e + cols
        order = np.argsort(keys)
        dev = vals - self.prior[clients[rows]]
        self._insert(np.searchsorted(self.keys, keys[order]), keys[order], dev[order], np.int32(self.round))

    def _shrink(self, clients, factor):
        positions, _ = self._rows(clients)
        self.dev[positions] *= factor
        if factor == 0:
            keep = np.ones(self.keys.size, dtype=bool)
            keep[positions] = False
            self.keys, self.dev, self.stamp = self.keys[keep], self.dev[keep], self.stamp[keep]

    def _fill(self, clients, out):
        out[:] = self.prior[clients][:, None]
        positions, owner = self._rows(clients)
        values = self.prior[clients[owner]] + self._current_dev(positions)
        out[owner, self.keys[positions] % self.num_experts] = values

    def _get(self, clients, experts):
        keys = clients * self.num_experts + experts
        pos = np.minimum(np.searchsorted(self.keys, keys), max(self.keys.size - 1, 0))
        out = self.prior[clients].copy()
        if self.keys.size:
            hit = self.keys[pos] == keys
            out[hit] += self._current_dev(pos[hit])
        return out

    def _arrays(self):
        return {"keys": self.keys.copy(), "dev": self.dev.copy(), "stamp": self.stamp.copy()}

    def _parse_arrays(self, state):
        keys = _checks.state_array(state, "keys", None, np.int64)
        dev = _checks.state_array(state, "dev", keys.shape, np.float32)
        stamp = _checks.state_array(state, "stamp", keys.shape, np.int32)
        if keys.ndim != 1 or (keys.size and (np.any(np.diff(keys) <= 0) or keys[0] < 0
                                             or keys[-1] >= self.num_clients * self.num_experts)):
            raise ValueError("state['keys'] must be 1-D, strictly increasing and in range")
        return {"keys": keys, "dev": dev, "stamp": stamp}


def fitness_table(num_clients: int, num_experts: int, config: FitnessConfig | None = None, *,
                  form: str = "auto", dense_limit_bytes: int = 512 << 20) -> FitnessTable:
    """A fitness table of the given ``form``: "dense", "lean", or "auto" (dense while
    ``N·E·4 <= dense_limit_bytes``)."""
    if form not in ("auto", "dense", "lean"):
        raise ValueError(f"form must be 'auto', 'dense' or 'lean', got {form!r}")
    if form == "auto":
        form = "dense" if num_clients * num_experts * 4 <= dense_limit_bytes else "lean"
    return (DenseFitness if form == "dense" else LeanFitness)(num_clients, num_experts, config)
