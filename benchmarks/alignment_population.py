"""Synthetic federated population for the alignment experiment (no training).

* Latent data clusters: client ``i`` draws a main cluster ``z_i`` (popularity Zipf(1.2) in the *contested*
  population, uniform in the *uniform* one) and mixes it 0.8 / 0.2 with a Dirichlet spread over the others.
* Expert specialisations: expert ``j`` specialises in cluster ``j mod K`` with quality ~ U(0.5, 1), plus a
  weak response 0.1·U(0, 1) to every cluster.
* Ground-truth affinity ``A = mix @ spec + 0.1·(u @ v)/sqrt(r)`` (a client-specific low-rank term, r = 8),
  kept factorised: rows and pairs are computed on demand, never the whole [N, E].
* Feedback for a trained pair: ``A_ij + N(0, 0.1²)``; cold-start gate affinity: ``A_ij + N(0, 0.2²)``.
* Capacity tiers: ``fedmoe.alignment.generate_profiles`` (self-reported); true round times are the
  reported model times x a per-client bias exp(N(0.1, 0.25²)) x per-round noise exp(N(0, 0.15²)); a client
  fails to reply with probability 1 - reliability of its tier.
* Availability churn: a two-state Markov chain per client with stationary availability 0.9 / 0.7 / 0.5 for
  the high / mid / low tier and mixing rate 0.5.

Everything is drawn from ``seed`` and is identical for every strategy that runs on the population.
"""

from __future__ import annotations

import numpy as np

from fedmoe.alignment import ClientProfile, generate_profiles

AVAILABILITY = np.array([0.9, 0.7, 0.5])  # per tier of DEFAULT_TIERS: high, mid, low
RANK = 8
FEEDBACK_NOISE = 0.1
GATE_NOISE = 0.2


class Population:
    """``client_factors`` float32 [N, K + r] and ``expert_factors`` float32 [K + r, E] with A = product."""

    def __init__(self, num_clients: int, num_experts: int, *, kind: str = "contested", seed: int = 0):
        if kind not in ("contested", "uniform"):
            raise ValueError(f"kind must be 'contested' or 'uniform', got {kind!r}")
        self.num_clients, self.num_experts, self.kind, self.seed = num_clients, num_experts, kind, seed
        rng = np.random.default_rng([seed, 0])
        k = max(2, num_experts // 32)
        self.num_clusters = k
        popularity = 1.0 / np.arange(1, k + 1) ** 1.2 if kind == "contested" else np.ones(k)
        main = rng.choice(k, size=num_clients, p=popularity / popularity.sum())
        mix = 0.2 * rng.dirichlet(np.full(k, 0.5), size=num_clients)
        mix[np.arange(num_clients), main] += 0.8
        spec = 0.1 * rng.random((k, num_experts))
        spec[np.arange(num_experts) % k, np.arange(num_experts)] += rng.uniform(0.5, 1.0, num_experts)
        u = rng.standard_normal((num_clients, RANK))
        v = 0.1 * rng.standard_normal((RANK, num_experts)) / np.sqrt(RANK)
        self.client_factors = np.hstack([mix, u]).astype(np.float32)
        self.expert_factors = np.vstack([spec, v]).astype(np.float32)
        self.profiles_seed = seed
        self.tier = generate_profiles(num_clients, seed=seed).tier
        self.time_bias = np.exp(rng.normal(0.1, 0.25, num_clients))

    def profiles(self) -> ClientProfile:
        """Fresh self-reported profiles (each strategy run gets its own estimates)."""
        return generate_profiles(self.num_clients, seed=self.profiles_seed)

    def affinity_rows(self, clients: np.ndarray) -> np.ndarray:
        """float32 [n, E]: true affinity of ``clients``."""
        return self.client_factors[clients] @ self.expert_factors

    def affinity_pairs(self, clients: np.ndarray, experts: np.ndarray) -> np.ndarray:
        """float32 [K]: true affinity of the pairs."""
        return np.einsum("kf,fk->k", self.client_factors[clients], self.expert_factors[:, experts])

    def feedback(self, clients: np.ndarray, experts: np.ndarray, round_: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, 1, round_])
        noise = FEEDBACK_NOISE * rng.standard_normal(clients.size).astype(np.float32)
        return self.affinity_pairs(clients, experts) + noise

    def gate_affinity(self, clients: np.ndarray) -> np.ndarray:
        """float32 [n, E]: what the shared gate, scored on each client's data, reports at cold start."""
        rng = np.random.default_rng([self.seed, 2, int(clients[0]) if clients.size else 0])
        rows = self.affinity_rows(clients)
        rows += GATE_NOISE * rng.standard_normal(rows.shape, dtype=np.float32)
        return rows

    def availability(self, rounds: int) -> list[np.ndarray]:
        """Per round, the sorted ids of the available clients (Markov churn)."""
        rng = np.random.default_rng([self.seed, 3])
        a = AVAILABILITY[self.tier]
        mixing = 0.5
        on = rng.random(self.num_clients) < a
        out = []
        for _ in range(rounds):
            out.append(np.flatnonzero(on))
            u = rng.random(self.num_clients)
            on = np.where(on, u >= (1 - a) * mixing, u < a * mixing)
        return out

    def round_outcome(self, profiles: ClientProfile, clients: np.ndarray, num_experts: np.ndarray,
                      round_: int) -> tuple[np.ndarray, np.ndarray]:
        """True round time (s) of each client training ``num_experts`` experts, and whether it replied."""
        rng = np.random.default_rng([self.seed, 4, round_])
        noise = np.exp(0.15 * rng.standard_normal(self.num_clients))[clients]
        replied = (rng.random(self.num_clients) < profiles.reliability)[clients]
        scale = profiles.time_scale[clients]
        model_time = profiles.round_time(num_experts, clients) / scale  # the self-reported model time
        return model_time * self.time_bias[clients] * noise, replied
