"""Server side of federated MoE training (docs/design.md, The federated round), as separate steps over
explicit state.

A round is ``configure`` (select the online clients to ask, align them with experts, build a payload per
client) -> clients train -> ``aggregate``, in five named steps: :meth:`Server.filter_replies` (leave out
faulty replies), :meth:`Server.bound_updates` (learn the round's bounds on update norms, leave out or
clip what exceeds them), :meth:`Server.merge` (the shared parameters and, per expert, the experts, with
:func:`fedmoe_kernels.aggregate`), :meth:`Server.update_alignment` (fitness, load, profiles, drift) and
:meth:`Server.report` -> ``evaluate``. A Flower strategy maps its configure/aggregate calls onto the same
methods.

Fault filtering: a reply is left out of the round's aggregation, and reported, when it never came
(``dropped``), came after the deadline (``late``) or is malformed (``invalid``: wrong client or experts,
wrong shapes or dtypes, non-finite values, nonsensical feedback, more samples than the client registered,
or, under ``norm_action = "reject"``, an update above the round's bound; :mod:`fedmoe.federated.bounds`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import numpy as np
import torch

from fedmoe.alignment import (
    AlignmentResult,
    ClientProfile,
    DriftDetector,
    ExpertLoad,
    RoundState,
    fitness_table,
    make_strategy,
)
from fedmoe.data import Samples
from fedmoe.federated.bounds import Bounds, delta_norms
from fedmoe.federated.checkpoint import check_finite, to_numpy
from fedmoe.federated.config import FederatedConfig
from fedmoe.federated.evaluation import evaluate
from fedmoe.federated.node import (
    EVAL_BATCH,
    ClientPayload,
    ClientUpdate,
    ExpertFeedback,
    load_shared,
    shared_vector,
)
from fedmoe.federated.simulation import ClientReply
from fedmoe.models import FederatedMoE, Task, units_per_sample
from fedmoe_kernels import aggregate

__all__ = ["Faults", "RoundPlan", "RoundReport", "Server", "check_update"]

_SELECT = 11  # random stream of client selection


@dataclass(frozen=True)
class RoundPlan:
    """What ``configure`` decided: the ``selected`` clients (int64, ascending), the ``alignment`` and one
    payload per client with at least one expert."""

    round: int
    selected: np.ndarray
    alignment: AlignmentResult
    payloads: dict[int, ClientPayload]


@dataclass(frozen=True)
class RoundReport:
    """What ``aggregate`` did. Client ids are JSON-ready strings in the fault maps.

    ``accepted``: clients aggregated; ``dropped`` / ``late`` / ``invalid``: client -> reason;
    ``bytes_sent`` / ``bytes_received``: tensor bytes of payloads and of replies that arrived;
    ``seconds``: simulated duration (until the last timely reply, or the deadline if one was missed);
    ``expert_samples``: [E] samples routed to each expert in the accepted replies; ``train_loss``: mean
    local loss of the accepted clients (None if none); ``rejected_rows``: expert rows the aggregation
    kernel refused as non-finite (0 after fault filtering); ``fitness_error``: mean
    ``|feedback_before - fitness|`` over the accepted pairs before the update (how stale the fitness is on
    the clients' current data; None if none); ``drift_reset``: clients whose fitness row the drift
    detector pulled back to the prior; ``drift_rescored``: those of them whose row was instead re-scored
    from the gate affinity they sent (``drift_rescore``).
    """

    round: int
    selected: list[int]
    assigned: dict[str, list[int]]
    accepted: list[int]
    dropped: dict[str, str]
    late: dict[str, str]
    invalid: dict[str, str]
    bytes_sent: int
    bytes_received: int
    seconds: float
    expert_samples: list[float]
    train_loss: float | None
    rejected_rows: int
    fitness_error: float | None
    drift_reset: list[int]
    drift_rescored: list[int]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Faults:
    """What :meth:`Server.filter_replies` left out (client -> reason, keys as JSON-ready strings), the
    tensor ``bytes_received`` of replies that arrived and each payload's reply time ``seconds`` (float64,
    in payload order, NaN where none arrived)."""

    dropped: dict[str, str] = dataclasses.field(default_factory=dict)
    late: dict[str, str] = dataclasses.field(default_factory=dict)
    invalid: dict[str, str] = dataclasses.field(default_factory=dict)
    bytes_received: int = 0
    seconds: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0))


def check_update(update: ClientUpdate, payload: ClientPayload, num_experts: int | None = None,
                 units_per_sample: int = 1) -> str | None:
    """Why ``update`` cannot be aggregated for ``payload`` (None if it can). An ``affinity`` must come
    where the payload asked for one, finite, >= 0 and of shape (``num_experts``,) (any length if None);
    the units routed to an expert can be at most ``num_samples * units_per_sample`` (the model's, e.g.
    tokens per window)."""
    k, p = payload.expert_rows.shape
    if not isinstance(update, ClientUpdate):
        return f"not a ClientUpdate: {type(update).__name__}"
    if update.client != payload.client:
        return f"reply names client {update.client}"
    experts = np.asarray(update.experts)
    if experts.shape != payload.experts.shape or not np.array_equal(experts, payload.experts):
        return f"experts {experts.tolist()} differ from the assigned {payload.experts.tolist()}"
    for name, tensor, shape in (("shared", update.shared, payload.shared.shape),
                                ("expert_rows", update.expert_rows, (k, p))):
        if not isinstance(tensor, torch.Tensor) or tensor.dtype != torch.float32:
            return f"{name} must be a float32 tensor"
        if tensor.shape != shape:
            return f"{name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}"
        if not bool(torch.isfinite(tensor).all()):
            return f"{name} has non-finite values"
    if not isinstance(update.num_samples, numbers.Integral) or update.num_samples < 1:
        return f"num_samples must be a positive int, got {update.num_samples!r}"
    if not isinstance(update.train_loss, numbers.Real) or not math.isfinite(update.train_loss):
        return f"train_loss must be a finite number, got {update.train_loss!r}"
    for field in ("feedback", "feedback_before"):
        fb = getattr(update, field)
        if not isinstance(fb, ExpertFeedback):
            return f"{field} must be an ExpertFeedback, got {type(fb).__name__}"
        arrays = {name: np.asarray(getattr(fb, name)) for name in ("share", "loss", "accuracy", "samples")}
        if any(a.shape != (k,) or not np.all(np.isfinite(a)) or np.any(a < 0) for a in arrays.values()):
            return f"{field} arrays must be finite, >= 0 and of shape ({k},)"
        if np.any(arrays["share"] > 1) or np.any(arrays["accuracy"] > 1) or np.any(
                arrays["samples"] > update.num_samples * units_per_sample):
            return f"{field} share/accuracy must be <= 1 and samples <= num_samples * units_per_sample"
    if payload.affinity and update.affinity is None:
        return "affinity was asked for and is missing"
    if update.affinity is not None:
        affinity = np.asarray(update.affinity)
        if (affinity.ndim != 1 or (num_experts is not None and affinity.shape != (num_experts,))
                or not np.issubdtype(affinity.dtype, np.number) or not np.all(np.isfinite(affinity))
                or np.any(affinity < 0)):
            return f"affinity must be finite, >= 0 and of shape ({num_experts},)"
    return None


class Server:
    """Server state: the global ``model`` (shared parameters and the expert bank [E, P]) and its ``task``,
    the fitness table, expert load, client ``profiles`` (as reported, refined by observation), the drift
    detector, the strategy and the ``round`` number. :meth:`state_dict` holds all of it as plain data."""

    def __init__(self, model: FederatedMoE, task: Task, profiles: ClientProfile, config: FederatedConfig):
        if not isinstance(model, FederatedMoE):
            raise TypeError(f"model must follow fedmoe.models.FederatedMoE, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task must follow fedmoe.models.Task, got {type(task).__name__}")
        if not isinstance(config, FederatedConfig):
            raise TypeError(f"config must be a FederatedConfig, got {type(config).__name__}")
        n = config.federation.num_clients
        if profiles.num_clients != n:
            raise ValueError(f"profiles has {profiles.num_clients} clients, federation.num_clients is {n}")
        self.config, self.model, self.task, self.profiles = config, model, task, profiles
        e = model.num_experts
        self.fitness = fitness_table(n, e, config.fitness)
        self.load = ExpertLoad(e, config.load)
        self.drift = DriftDetector(n, config.drift)
        self.strategy = make_strategy(config.alignment, config.federation.seed)
        self.round = 0

    @property
    def num_experts(self) -> int:
        return self.model.num_experts

    # ------------------------------------------------------------------ configure

    def cold_start(self, clients: np.ndarray, affinity: np.ndarray) -> None:
        """Seed the fitness of ``clients`` (int [n]) with their gate affinity (float [n, E])."""
        self.fitness.cold_start(clients, affinity)

    def select(self, online: np.ndarray) -> np.ndarray:
        """int64: up to ``clients_per_round`` of the ``online`` clients (all if 0), ascending; random but
        fixed by (seed, round)."""
        online = np.unique(np.asarray(online, dtype=np.int64))
        federation = self.config.federation
        want = federation.clients_per_round or online.size
        if online.size <= want:
            return online
        rng = np.random.default_rng([federation.seed, _SELECT, self.round])
        return np.sort(rng.choice(online, size=want, replace=False))

    def configure(self, online: np.ndarray) -> RoundPlan:
        """Select among ``online``, align the selected clients with experts, build their payloads."""
        selected = self.select(online)
        state = RoundState(self.round, selected, self.fitness, self.load, self.profiles,
                           deadline=self.config.federation.deadline)
        alignment = self.strategy.assign(state)
        shared = shared_vector(self.model)
        bank = self.model.expert_bank.detach()
        payloads = {}
        for client, experts in alignment.to_dict().items():
            experts = np.asarray(experts, dtype=np.int64)
            key = [self.config.federation.seed, self.round, client]
            seed = int(np.random.SeedSequence(key).generate_state(1)[0])
            payloads[client] = ClientPayload(self.round, client, experts, shared,
                                             bank[torch.from_numpy(experts)].clone(), seed,
                                             affinity=self._wants_affinity)
        return RoundPlan(self.round, selected, alignment, payloads)

    # ------------------------------------------------------------------ aggregate

    def aggregate(self, plan: RoundPlan, replies: Mapping[int, ClientReply]) -> RoundReport:
        """The round's aggregation in five steps: filter replies, bound the updates, merge them into the
        model, update the alignment state, report; then advance the round."""
        if plan.round != self.round:
            raise ValueError(f"plan is for round {plan.round}, the server is at round {self.round}")
        accepted, faults = self.filter_replies(plan, replies)
        accepted, bounds = self.bound_updates(plan, accepted, faults)
        rejected = self.merge(accepted, bounds)
        reset, error = self.update_alignment(plan, accepted, faults.seconds)
        self.round += 1
        return self.report(plan, accepted, faults, rejected, reset, error)

    @staticmethod
    def _pairs(accepted: list[ClientUpdate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The accepted (client, expert) pairs, in reply order: ``(clients, experts)`` int and ``samples``
        float64, the units routed to each expert."""
        clients = np.concatenate([np.full(u.experts.size, u.client) for u in accepted] or [np.zeros(0, int)])
        experts = np.concatenate([u.experts for u in accepted] or [np.zeros(0, int)])
        samples = np.concatenate([u.feedback.samples for u in accepted] or [np.zeros(0)]).astype(np.float64)
        return clients, experts, samples

    def filter_replies(self, plan: RoundPlan,
                       replies: Mapping[int, ClientReply]) -> tuple[list[ClientUpdate], Faults]:
        """The updates that can be aggregated, in payload order, and what was left out: replies that never
        came (``dropped``), came after the deadline (``late``), fail :func:`check_update` or claim more
        samples than the client registered (``invalid``)."""
        deadline = self.config.federation.deadline
        accepted: list[ClientUpdate] = []
        faults = Faults(seconds=np.full(len(plan.payloads), np.nan))
        for i, (client, payload) in enumerate(plan.payloads.items()):
            reply = replies.get(client)
            if reply is not None and reply.malformed:
                faults.seconds[i] = reply.seconds
                faults.invalid[str(client)] = reply.error or "malformed reply"
                continue
            if reply is None or reply.update is None:
                faults.dropped[str(client)] = "no reply" if reply is None else (reply.error or "no reply")
                continue
            faults.seconds[i] = reply.seconds
            faults.bytes_received += reply.update.nbytes if isinstance(reply.update, ClientUpdate) else 0
            if deadline is not None and not reply.seconds <= deadline:
                faults.late[str(client)] = f"replied after {reply.seconds:.3g} s > deadline {deadline:.3g} s"
            elif (reason := check_update(reply.update, payload, self.num_experts,
                                         units_per_sample(self.model))) is not None:
                faults.invalid[str(client)] = reason
            elif reply.update.num_samples > (registered := int(self.profiles.samples[client])):
                faults.invalid[str(client)] = (f"claims {reply.update.num_samples} samples, registered "
                                               f"{registered}")
            else:
                accepted.append(reply.update)
        return accepted, faults

    def bound_updates(self, plan: RoundPlan, updates: list[ClientUpdate],
                      faults: Faults) -> tuple[list[ClientUpdate], Bounds]:
        """Learn the round's :class:`~fedmoe.federated.Bounds` from the delta norms of ``updates`` (the
        filtered replies; for the experts, each reply's largest row delta); under ``norm_action =
        "reject"`` move the replies above them to ``faults.invalid``. Returns the updates to merge and the
        bounds to clip them to (none after a rejection)."""
        config = self.config.aggregation
        if not updates or config.norm_bound == 0:
            return updates, Bounds()
        base = plan.payloads[updates[0].client].shared  # every payload carries the same shared vector
        shared = delta_norms(torch.stack([u.shared for u in updates]), base)
        experts = [delta_norms(u.expert_rows, plan.payloads[u.client].expert_rows) for u in updates]
        bounds = Bounds.learn(config, shared, np.array([e.max() for e in experts if e.size]))
        if config.norm_action == "clip":
            return updates, bounds
        kept = []
        for update, s, e in zip(updates, shared, experts, strict=True):
            if (reason := bounds.exceeded(float(s), e)) is not None:
                faults.invalid[str(update.client)] = reason
            else:
                kept.append(update)
        return kept, Bounds()

    def merge(self, updates: list[ClientUpdate], bounds: Bounds | None = None) -> int:
        """Merge the shared vectors (weights: local samples) and, per expert, the expert rows (weights:
        samples routed to the expert) into the model in place, both with ``fedmoe_kernels.aggregate`` and
        ``[aggregation] method`` (the robust methods ignore the weights), each delta clipped to
        ``bounds``. Returns the rows the kernel rejected."""
        if not updates:
            return 0
        bounds = bounds or Bounds()
        config = self.config.aggregation
        robust = {"method": config.method, "trim": config.trim if config.method == "trimmed-mean" else 0.0}
        shared = torch.stack([u.shared for u in updates])
        weights = torch.tensor([float(u.num_samples) for u in updates], dtype=torch.float64)
        base = shared_vector(self.model)[None]
        merged = aggregate(shared, torch.zeros(len(updates), dtype=torch.int64), weights, 1, base, out=base,
                           max_norm=bounds.shared, **robust)
        load_shared(self.model, merged.bank[0])
        with torch.no_grad():
            rows = torch.cat([u.expert_rows for u in updates])
            experts = torch.from_numpy(np.concatenate([u.experts for u in updates]))
            routed = np.concatenate([u.feedback.samples for u in updates])
            weights = torch.from_numpy(routed.astype(np.float64))
            bank = self.model.expert_bank.data
            result = aggregate(rows, experts, weights, self.num_experts, bank, out=bank,
                               max_norm=bounds.expert, **robust)
        return int(merged.rejected.sum() + result.rejected.sum())

    def update_alignment(self, plan: RoundPlan, accepted: list[ClientUpdate],
                         seconds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Feed the accepted updates to the drift detector (on what the fitness follows, measured with the
        received weights: the feedback before training, or the assigned experts' affinity), the fitness
        table (on the ``fitness.signal`` values) and the expert load, and every payload's reply time
        ``seconds`` to the profiles. Returns the drift detector's ``(reset clients, fitness error)``."""
        clients, experts, samples = self._pairs(accepted)
        affinity = self.config.fitness.signal == "affinity"
        before = np.concatenate([np.asarray(u.affinity, np.float64)[u.experts] if affinity
                                 else u.feedback_before.fitness() for u in accepted] or [np.zeros(0)])
        fresh = self._rescored(accepted)
        reset, error = self.drift.step(self.fitness, clients, experts, before, rescore=fresh)
        self.fitness.update(*self._fitness_values(accepted, clients, experts, before))
        self.load.update(experts, samples)
        if plan.payloads:
            sizes = [p.experts.size for p in plan.payloads.values()]
            valid = np.isnan(seconds) | (np.isfinite(seconds) & (seconds > 0))  # what observe accepts
            self.profiles.observe(np.fromiter(plan.payloads, np.int64)[valid], np.asarray(sizes)[valid],
                                  seconds[valid])
        return reset, error

    @property
    def _wants_affinity(self) -> bool:
        """Whether the payloads ask for the gate affinity (the fitness follows it, or drift re-scores)."""
        return self.config.fitness.signal == "affinity" or self.config.drift.rescore

    def _fitness_values(self, accepted: list[ClientUpdate], clients: np.ndarray, experts: np.ndarray,
                        before: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The (clients, experts, values) the fitness EMA follows under ``fitness.signal``: the assigned
        pairs' feedback before or after training, or every expert of each client (its affinity; a reply
        asked for one carries it, :func:`check_update`)."""
        signal = self.config.fitness.signal
        if signal == "before":
            return clients, experts, before
        if signal == "after":
            return clients, experts, np.concatenate([u.feedback.fitness() for u in accepted] or [np.zeros(0)])
        e = self.num_experts
        return (np.repeat(np.array([u.client for u in accepted], dtype=np.int64), e),
                np.tile(np.arange(e, dtype=np.int64), len(accepted)),
                np.concatenate([np.asarray(u.affinity, np.float64) for u in accepted] or [np.zeros(0)]))

    def _rescored(self, accepted: list[ClientUpdate]) -> dict[int, np.ndarray] | None:
        """Client -> the gate affinity it sent, under ``drift.rescore`` (None otherwise)."""
        if not self.config.drift.rescore:
            return None
        return {u.client: u.affinity for u in accepted if u.affinity is not None}

    def report(self, plan: RoundPlan, accepted: list[ClientUpdate], faults: Faults, rejected: int,
               reset: np.ndarray, error: np.ndarray) -> RoundReport:
        """The :class:`RoundReport` of an aggregated round."""
        deadline = self.config.federation.deadline
        arrived = faults.seconds[np.isfinite(faults.seconds)]
        missed = deadline is not None and (faults.dropped or faults.late)
        _, experts, samples = self._pairs(accepted)
        fresh = self._rescored(accepted)
        return RoundReport(
            round=plan.round, selected=plan.selected.tolist(),
            assigned={str(c): p.experts.tolist() for c, p in plan.payloads.items()},
            accepted=[u.client for u in accepted], dropped=faults.dropped, late=faults.late,
            invalid=faults.invalid, bytes_sent=sum(p.nbytes for p in plan.payloads.values()),
            bytes_received=faults.bytes_received,
            seconds=float(deadline if missed else arrived.max(initial=0.0)),
            expert_samples=np.bincount(experts, weights=samples, minlength=self.num_experts).tolist(),
            train_loss=float(np.mean([u.train_loss for u in accepted])) if accepted else None,
            rejected_rows=rejected, fitness_error=float(error.mean()) if error.size else None,
            drift_reset=reset.tolist(),
            drift_rescored=[] if fresh is None else [c for c in reset.tolist() if c in fresh])

    # ------------------------------------------------------------------ evaluate

    def evaluate(self, data: Samples, batch_size: int = EVAL_BATCH,
                 mask: torch.Tensor | None = None) -> dict[str, float]:
        """:func:`fedmoe.federated.evaluation.evaluate` of the global model (``loss``, ``accuracy`` and the
        task's metrics, e.g. the language model's ``last_accuracy``)."""
        return evaluate(self.model, self.task, data, batch_size, mask)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Plain data (tensors, numpy arrays, numbers, strings) of the whole server state."""
        return {"round": self.round,
                "model": {k: v.detach().clone() for k, v in self.model.state_dict().items()},
                "fitness": self.fitness.state_dict(), "load": self.load.state_dict(),
                "profiles": self.profiles.state_dict(), "drift": self.drift.state_dict(),
                "strategy": self.strategy.state_dict()}

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (numpy arrays may come back as tensors); state with a
        non-finite float anywhere is refused before anything changes."""
        missing = {"round", "model", "fitness", "load", "profiles", "drift", "strategy"} - set(state)
        if missing:
            raise ValueError(f"server state is missing {sorted(missing)}")
        if (bad := check_finite(state)) is not None:
            raise ValueError(f"server state holds non-finite values in {bad}")
        self.model.load_state_dict(state["model"])
        self.fitness.load_state_dict(to_numpy(state["fitness"]))
        self.load.load_state_dict(to_numpy(state["load"]))
        self.profiles.load_state_dict(to_numpy(state["profiles"]))
        self.drift.load_state_dict(to_numpy(state["drift"]))
        self.strategy.load_state_dict(to_numpy(state["strategy"]))
        self.round = int(state["round"])
