"""A client cannot break the federation: updates bounded by the round's own replies, sample counts capped
at what a client registered, poisoning drills that end where the clean run ends, checkpoints that refuse
corruption (docs/design.md, The federated round; fedmoe/federated/bounds.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from fedmoe.federated import (
    AggregationConfig,
    Bounds,
    ClientReply,
    FederatedConfig,
    FederatedRun,
    load_checkpoint,
    run_experiment,
    save_checkpoint,
)
from fedmoe.federated.simulation import POISON_MODES, poisoned

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = FederatedConfig.from_dict({
    "federation": {"num_clients": 8, "clients_per_round": 8, "rounds": 2, "deadline": "none"},
    "model": {"num_experts": 4, "d_model": 8, "d_hidden": 16, "channels": [4]},
    "alignment": {"max_experts": 2}, "data": {"dirichlet_alpha": 1.0}, "simulation": {"dropout": False}})


# --------------------------------------------------------------------------------------------- bounds


@pytest.mark.parametrize(("changes", "match"), [
    ({"method": "mode"}, "method"), ({"trim": 0.5}, "trim"), ({"trim": -0.1}, "trim"),
    ({"norm_bound": 0.5}, "norm_bound"), ({"norm_bound": float("inf")}, "norm_bound"),
    ({"norm_action": "drop"}, "norm_action")])
def test_bad_aggregation_options_are_named(changes, match):
    with pytest.raises(ValueError, match=match):
        AggregationConfig(**changes)
    with pytest.raises(ValueError, match=f"aggregation.*{match}"):
        CFG.replace({f"aggregation.{k}": v for k, v in changes.items()})


def test_bounds_are_a_multiple_of_the_round_median_and_one_outlier_moves_them_one_rank():
    config = AggregationConfig(norm_bound=3.0)
    honest = np.array([1.0, 2.0, 3.0, 4.0])
    bounds = Bounds.learn(config, np.append(honest, 1e30), np.array([0.5, 0.5, 1e30]))
    assert bounds.shared == pytest.approx(9.0) and bounds.expert == pytest.approx(1.5)
    assert bounds.exceeded(8.9, np.array([1.4])) is None
    assert "shared update norm" in bounds.exceeded(9.1, np.array([1.4]))
    assert "expert update norm" in bounds.exceeded(1.0, np.array([0.1, 1.6]))
    assert Bounds.learn(AggregationConfig(norm_bound=0), honest, honest) == Bounds()


def test_zero_deltas_are_left_out_of_the_bounds():
    """Replies that did not move (no token reached their experts) neither shrink a bound to 0, which would
    refuse every reply that moved and is no valid clip, nor count when nothing moved."""
    config = AggregationConfig(norm_bound=2.0)
    bounds = Bounds.learn(config, np.array([0.0, 0.0, 0.0, 1.0, 3.0]), np.array([0.0, 0.0, 4.0]))
    assert bounds.shared == pytest.approx(4.0) and bounds.expert == pytest.approx(8.0)
    assert bounds.exceeded(0.0, np.array([0.0])) is None
    assert Bounds.learn(config, np.zeros(3), np.zeros(2)) == Bounds()


def _round_replies(run: FederatedRun, mode: str | None):
    """Plan a round, train every client; the first planned client's reply becomes a ``mode`` poisoning
    (none if None). Returns ``(plan, replies, that client)``."""
    plan = run.server.configure(run.simulation.online(run.server.round))
    hostile = next(iter(plan.payloads))
    replies = {}
    for client, payload in plan.payloads.items():
        update = run.train(payload, run.simulation.data(client, payload.round))
        if client == hostile and mode is not None:
            update = poisoned(update, payload, mode)
        replies[client] = ClientReply(client, update, 1.0)
    return plan, replies, hostile


def _largest(run: FederatedRun) -> float:
    return max(float(t.abs().max()) for t in run.server.model.state_dict().values())


@pytest.mark.parametrize("mode", list(POISON_MODES))
@pytest.mark.parametrize("action", ["clip", "reject"])
def test_one_poisoned_reply_leaves_the_model_close_to_the_honest_round(digits, mode, action):
    config = CFG.replace({"aggregation.norm_action": action})
    honest = FederatedRun(config, digits)
    plan, replies, _ = _round_replies(honest, None)
    assert honest.server.aggregate(plan, replies).invalid == {}
    run = FederatedRun(config, digits)
    plan, replies, hostile = _round_replies(run, mode)
    report = run.server.aggregate(plan, replies)
    if mode == "inflate-samples":
        assert "registered" in report.invalid[str(hostile)]
    elif action == "reject":
        assert "bound" in report.invalid[str(hostile)]
    else:
        assert hostile in report.accepted and report.invalid == {}  # clipped, not refused
    state, reference = run.server.model.state_dict(), honest.server.model.state_dict()
    assert all(bool(torch.isfinite(t).all()) for t in state.values())
    moved = max(float((state[k] - reference[k]).abs().max()) for k in state)
    assert moved < 0.5 * _largest(honest)  # one reply of 8 moves no weight by half the largest one


def test_an_unbounded_mean_is_ruined_by_one_scaled_reply(digits):
    """The drill is real: without a bound the same poisoned round blows the model up."""
    run = FederatedRun(CFG.replace({"aggregation.norm_bound": 0}), digits)
    run.server.aggregate(*_round_replies(run, "scale")[:2])
    assert _largest(run) > 1e20


def test_reject_reports_the_bound_and_keeps_the_honest_replies(digits):
    run = FederatedRun(CFG.replace({"aggregation.norm_action": "reject"}), digits)
    plan, replies, hostile = _round_replies(run, "sign-flip")
    report = run.server.aggregate(plan, replies)
    assert report.invalid[str(hostile)].startswith("shared update norm")
    assert sorted(report.accepted) == sorted(c for c in plan.payloads if c != hostile)


@pytest.mark.parametrize("action", ["clip", "reject"])
def test_the_expert_bound_is_not_shrunk_by_rows_that_barely_moved(digits, action):
    """A client's experts that few or no tokens reach barely move: their small deltas, here most rows, must
    not shrink the bound until honest replies fail it. The bound is a multiple of the median reply's
    largest row delta."""
    config = CFG.replace({"aggregation.norm_action": action, "model.num_experts": 8,
                          "alignment.max_experts": 4, "simulation.tiers": "unlimited"})
    run = FederatedRun(config, digits)
    plan, replies, _ = _round_replies(run, None)
    norms = []
    for client, reply in replies.items():
        base = plan.payloads[client].expert_rows
        rows = base + 1e-3 * (reply.update.expert_rows - base)  # every expert row but the first barely moves
        rows[0] = reply.update.expert_rows[0]
        update = dataclasses.replace(reply.update, expert_rows=rows)
        replies[client] = dataclasses.replace(reply, update=update)
        norms.append(float(torch.linalg.vector_norm((rows - base).double(), dim=1).max()))
    updates, faults = run.server.filter_replies(plan, replies)
    assert len(updates) == len(replies) and sum(len(u.experts) for u in updates) > 2 * len(updates)
    kept, bounds = run.server.bound_updates(plan, updates, faults)
    assert len(kept) == len(updates) and faults.invalid == {}
    if action == "clip":
        assert bounds.expert == pytest.approx(config.aggregation.norm_bound * np.median(norms))
        assert max(norms) <= bounds.expert  # no honest row is clipped


def test_a_reply_claiming_more_samples_than_registered_is_invalid(digits):
    run = FederatedRun(CFG, digits)
    plan = run.server.configure(run.simulation.online(0))
    client, payload = next(iter(plan.payloads.items()))
    update = run.train(payload, run.simulation.data(client, 0))
    registered = int(run.server.profiles.samples[client])
    fb = dataclasses.replace(update.feedback, samples=update.feedback.samples)
    liar = dataclasses.replace(update, num_samples=registered + 1, feedback=fb)
    report = run.server.aggregate(plan, {client: ClientReply(client, liar, 1.0)})
    assert report.invalid[str(client)] == f"claims {registered + 1} samples, registered {registered}"


# ------------------------------------------------------------------------------------------ the drill


def test_poison_options_are_checked():
    with pytest.raises(ValueError, match="poison_mode"):
        CFG.replace({"simulation.poison_mode": "gentle"})
    with pytest.raises(ValueError, match="poison"):
        CFG.replace({"simulation.poison": 1.5})


def test_the_poison_drill_keeps_the_default_run_bitwise_and_poisons_the_share_asked(digits):
    base = CFG.replace({"federation.rounds": 3})
    a = run_experiment(base, dataset=digits)
    b = run_experiment(base.replace({"simulation.poison": 0.0, "simulation.poison_mode": "sign-flip"}),
                       dataset=digits)
    assert a["rounds"] == b["rounds"]
    every = base.replace({"simulation.poison": 1.0, "simulation.poison_mode": "inflate-samples"})
    hit = run_experiment(every, dataset=digits)
    assert all(r["accepted"] == [] and len(r["invalid"]) == 8 for r in hit["rounds"])


def _without_reasons(result: dict) -> list[dict]:
    return [{**r, "invalid": sorted(r["invalid"])} for r in result["rounds"]]


@pytest.mark.parametrize("mode", list(POISON_MODES))
def test_a_poisoned_run_equals_the_run_whose_same_replies_came_back_corrupt(digits, monkeypatch, mode):
    """With the defaults a hostile, finite update does exactly what an obviously broken one does: its reply
    is left out, and nothing else changes (same model, same alignment, bit for bit)."""
    config = CFG.replace({"federation.rounds": 4, "simulation.poison": 0.15, "simulation.poison_mode": mode})
    attacked = run_experiment(config, dataset=digits)
    assert sum(len(r["invalid"]) for r in attacked["rounds"]) >= 3

    def corrupt(update, payload, mode):
        return dataclasses.replace(update, shared=torch.full_like(update.shared, float("nan")))

    monkeypatch.setattr("fedmoe.federated.simulation.poisoned", corrupt)
    broken = run_experiment(config, dataset=digits)
    assert _without_reasons(attacked) == _without_reasons(broken)


def test_poisoned_runs_end_near_the_clean_run_and_the_plain_mean_does_not(digits):
    """10% poisoned replies, 3 seeds: with the defaults the run ends near the clean one (what is left is the
    cost of losing those replies' data, as the test above shows); the plain mean falls to chance."""
    gaps, plain = [], []
    for seed in range(3):
        config = CFG.replace({"federation.seed": seed, "federation.rounds": 8})
        clean = run_experiment(config, dataset=digits)["final_accuracy"]
        poison = config.replace({"simulation.poison": 0.1, "simulation.poison_mode": "scale"})
        gaps.append(run_experiment(poison, dataset=digits)["final_accuracy"] - clean)
        unbounded = poison.replace({"aggregation.norm_bound": 0})
        plain.append(run_experiment(unbounded, dataset=digits)["final_accuracy"])
    assert min(gaps) > -0.1
    assert max(plain) < 0.2


# -------------------------------------------------------------------------------------------- checkpoints


@pytest.fixture
def checkpoint(digits, tmp_path):
    path = tmp_path / "run.pt"
    run_experiment(CFG, checkpoint=path, dataset=digits)
    return path


def _flip(path, offsets, mask=0xFF):
    raw = bytearray(path.read_bytes())
    for at in offsets:
        raw[at] ^= mask
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["one bit", "64 bytes", "truncated"])
def test_a_damaged_checkpoint_is_refused_by_name(checkpoint, digits, damage):
    size = checkpoint.stat().st_size
    if damage == "one bit":
        _flip(checkpoint, [size // 2], mask=0x01)
    elif damage == "64 bytes":
        _flip(checkpoint, range(size - 2000, size - 1936))
    else:
        checkpoint.write_bytes(checkpoint.read_bytes()[:size // 2])
    with pytest.raises(ValueError, match=f"checkpoint {checkpoint} is corrupt"):
        load_checkpoint(checkpoint)
    with pytest.raises(ValueError, match=f"cannot resume from {checkpoint}"):
        run_experiment(CFG.replace({"federation.rounds": 3}), checkpoint=checkpoint, resume=True,
                       dataset=digits)


def test_files_that_are_not_checkpoints_are_refused_by_name(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"version": 3}, plain)  # a torch file without fedmoe's checksum
    with pytest.raises(ValueError, match=f"{plain} is not a fedmoe checkpoint"):
        load_checkpoint(plain)
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "missing.pt")


def test_a_checkpoint_with_nan_weights_is_not_resumed(checkpoint, digits):
    state = load_checkpoint(checkpoint)
    name = next(iter(state["server"]["model"]))
    state["server"]["model"][name].view(-1)[0] = float("nan")
    save_checkpoint(checkpoint, state)  # an intact file of a broken state
    run = FederatedRun(CFG, digits)
    before = {k: v.clone() for k, v in run.server.model.state_dict().items()}
    with pytest.raises(ValueError, match=f"non-finite values in model.{name}"):
        run.load_state_dict(load_checkpoint(checkpoint))
    assert all(torch.equal(v, before[k]) for k, v in run.server.model.state_dict().items())
