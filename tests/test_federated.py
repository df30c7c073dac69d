"""fedmoe.federated: the configuration tree, client nodes, server round steps, fault filtering,
simulation, checkpoints and resume."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import sys

import numpy as np
import pytest
import torch

from fedmoe.alignment import RoundState
from fedmoe.data import Samples
from fedmoe.federated import (
    ClientPayload,
    ClientReply,
    FederatedConfig,
    FederatedRun,
    TrainConfig,
    check_update,
    gate_affinity,
    load_checkpoint,
    make_profiles,
    run_experiment,
    save_checkpoint,
    shared_vector,
    train_client,
)
from fedmoe.federated import checkpoint as checkpoint_module

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CFG = FederatedConfig.from_dict({
    "federation": {"num_clients": 6, "clients_per_round": 4, "rounds": 3, "deadline": "none"},
    "model": {"num_experts": 4, "d_model": 8, "d_hidden": 16, "channels": [4]},
    "alignment": {"max_experts": 2}, "train": {"batch_size": 32}, "data": {"dirichlet_alpha": 1.0},
    "simulation": {"dropout": False}})


pytestmark = pytest.mark.usefixtures("one_thread")



def _model_state(run: FederatedRun) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in run.server.model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"federation.num_clients": 0}, ValueError, "federation: num_clients"),
        ({"federation.clients_per_round": 30}, ValueError, "clients_per_round"),
        ({"model.top_k": 5}, ValueError, "model: top_k"),
        ({"alignment.strategy": "best"}, ValueError, "alignment: strategy"),
        ({"data.partition": "zipf"}, ValueError, "data: partition"),
        ({"simulation.tiers": "huge"}, ValueError, "simulation: tiers"),
        ({"federation.deadline": -1.0}, ValueError, "deadline"),
        ({"federation.deadline": None, "alignment.strategy": "deadline-aware"}, ValueError, "deadline"),
        ({"train.lr": 0.0}, ValueError, "train: lr"),
        ({"train.optimizer": "adamw"}, ValueError, "train: optimizer"),
        ({"model.channels": (4, 0)}, ValueError, "channels"),
        ({"federation.rounds": 2.5}, TypeError, "rounds"),
        ({"fitness.cold_start": 1}, TypeError, "cold_start"),
        ({"load.decay": 0.0}, ValueError, "decay"),
        ({"fitness.ema": 1.0}, ValueError, "ema"),
        ({"drift.rescore": True}, ValueError, "drift: rescore needs"),
        ({"alignment.desirability.alpha": -1.0}, ValueError, "alignment.desirability: alpha"),
    ],
)
def test_config_rejects_bad_options_by_name(changes, error, match):
    with pytest.raises(error, match=match):
        CFG.replace(changes)


def test_config_round_trips_through_plain_dicts_and_names_unknown_keys():
    for config in (CFG, CFG.replace({"federation.deadline": 3.5, "model.channels": (2, 3)})):
        assert FederatedConfig.from_dict(config.to_dict()) == config
    assert CFG.to_dict()["federation"]["deadline"] == "none"
    with pytest.raises(ValueError, match=r"unknown option \['num_client'\] in \[federation\].*num_clients"):
        FederatedConfig.from_dict({"federation": {"num_client": 3}})
    with pytest.raises(ValueError, match=r"unknown section \['federaton'\].*'federation'"):
        FederatedConfig.from_dict({"federaton": {"rounds": 3}})
    with pytest.raises(ValueError, match="deadline"):
        FederatedConfig.from_dict({"federation": {"deadline": "soon"}})
    with pytest.raises(ValueError, match=r"unknown option 'alignment.desirability.fairnes'.*'fairness'"):
        CFG.replace({"alignment.desirability.fairnes": 0.5})


def test_every_option_of_the_sections_is_in_the_tree_once():
    """The tree re-declares nothing: each option is a field of its part's own config dataclass."""
    options = FederatedConfig.options()
    assert len(options) == len(set(options))
    assert {"alignment.desirability.fairness", "alignment.desirability.deadline", "alignment.expert_slack",
            "alignment.min_share", "alignment.window", "alignment.candidates", "fitness.prior",
            "drift.warmup", "load.starved_after"} <= set(options)
    assert CFG.get("alignment.desirability") is CFG.alignment.desirability
    flat = CFG.flat()
    assert FederatedConfig.from_flat({k.replace("_", "-"): v for k, v in flat.items()}) == CFG
    assert FederatedConfig.from_flat({"model.channels": "8,16", "federation.deadline": "none",
                                      "drift.threshold": "1", "drift.rescore": "true"}).drift.rescore
    assert FederatedConfig.from_flat({"model.channels": ""}).model.channels == ()


def test_a_classifier_without_convolutions_leaves_the_capacity_to_the_experts(digits):
    """``model.channels = ()``: the backbone is the pooled image's linear projection (a weak backbone)."""
    run = FederatedRun(CFG.replace({"model.channels": (), "federation.rounds": 1}), digits)
    model = run.server.model
    assert not any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    weak = sum(p.numel() for _, p in model.named_shared_parameters())
    strong = sum(p.numel() for _, p in FederatedRun(CFG, digits).server.model.named_shared_parameters())
    assert weak < strong
    record = run.step()
    assert record["accepted"] and np.isfinite(record["loss"])


# ---------------------------------------------------------------------------------------------- client


def _payload(run: FederatedRun, client: int, experts: list[int], round_: int = 0, seed: int = 7):
    ids = np.array(experts, dtype=np.int64)
    return ClientPayload(round_, client, ids, shared_vector(run.server.model),
                         run.server.model.expert_bank.detach()[torch.from_numpy(ids)].clone(), seed)


def _train(run: FederatedRun, payload: ClientPayload, data, config: TrainConfig):
    return train_client(run.nodes[0].model, run.task, payload, data, config)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_train_client_is_pure_and_trains_only_the_assigned_experts(digits, optimizer):
    run = FederatedRun(CFG, digits)
    data = run.simulation.data(0, 0)
    payload = _payload(run, 0, [1, 3])
    sent = (payload.shared.clone(), payload.expert_rows.clone())
    config = TrainConfig(epochs=2, batch_size=16, optimizer=optimizer, lr=0.1 if optimizer == "sgd" else 0.01)
    first = _train(run, payload, data, config)
    assert torch.equal(payload.shared, sent[0]) and torch.equal(payload.expert_rows, sent[1])  # not aliased
    with torch.no_grad():  # a dirty workspace: other values everywhere, NaN in the unassigned experts
        for p in run.nodes[0].model.parameters():
            p.normal_()
        run.nodes[0].model.expert_bank[[0, 2]] = float("nan")
    second = _train(run, payload, data, config)
    assert torch.equal(first.shared, second.shared) and torch.equal(first.expert_rows, second.expert_rows)
    assert torch.isfinite(second.shared).all()
    assert first.expert_rows.shape == (2, run.server.model.expert_bank.shape[1])
    assert not torch.equal(first.shared, payload.shared)
    assert (first.expert_rows != payload.expert_rows).any(1).all()  # both assigned experts trained
    np.testing.assert_array_equal(first.experts, [1, 3])
    assert check_update(first, payload) is None
    other = _train(run, dataclasses.replace(payload, seed=8), data, config)
    assert not torch.equal(other.shared, first.shared)  # the seed drives the shuffling
    assert first.feedback.loss.mean() < first.feedback_before.loss.mean()  # it learns


def test_feedback_follows_the_masked_gate(digits):
    run = FederatedRun(CFG, digits)
    data = run.simulation.data(1, 0)
    x, y = data.inputs, data.targets
    single = _train(run, _payload(run, 1, [2]), data, TrainConfig())
    fb = single.feedback
    assert fb.samples.tolist() == [len(y)] and fb.share.tolist() == [1.0]  # the only allowed expert
    with torch.no_grad():  # measured as the client trained: gate masked to its experts
        run.nodes[0].model.set_expert_mask(torch.tensor([False, False, True, False]))
        logits, _ = run.nodes[0].model(x)
        run.nodes[0].model.set_expert_mask(None)
    assert fb.accuracy[0] == pytest.approx(float((logits.argmax(1) == y).double().mean()))
    pair = _train(run, _payload(run, 1, [0, 3]), data, TrainConfig()).feedback
    # top-2 of 2 allowed experts: every sample is routed to both, each gets half of the choices
    assert pair.samples.tolist() == [len(y)] * 2 and pair.share.tolist() == [0.5, 0.5]
    np.testing.assert_allclose(pair.fitness(), pair.share * pair.accuracy)


def test_feedback_before_is_measured_with_the_received_weights_on_the_current_labels(digits):
    run = FederatedRun(CFG, digits)
    data = run.simulation.data(1, 0)
    x, y = data.inputs, data.targets
    payload = _payload(run, 1, [0, 3])
    trained = _train(run, payload, data, TrainConfig())
    # before training: independent of the local training (seed, learning rate), unlike the feedback after
    other = _train(run, dataclasses.replace(payload, seed=9), data, TrainConfig(lr=0.3))
    for field in ("share", "loss", "accuracy", "samples"):
        np.testing.assert_array_equal(getattr(other.feedback_before, field),
                                      getattr(trained.feedback_before, field))
    assert not np.array_equal(other.feedback.loss, trained.feedback.loss)
    # a vanishing step leaves the weights as received: after == before
    still = _train(run, payload, data, TrainConfig(lr=1e-12, momentum=0.0))
    np.testing.assert_allclose(still.feedback.fitness(), still.feedback_before.fitness(), atol=1e-6)
    # it sees the labels: same inputs, other labels, same routing, other accuracy
    moved = _train(run, payload, Samples(x, (y + 1) % digits.num_classes), TrainConfig())
    np.testing.assert_array_equal(moved.feedback_before.share, trained.feedback_before.share)
    assert not np.allclose(moved.feedback_before.accuracy, trained.feedback_before.accuracy)


def test_gate_affinity_is_the_mean_router_distribution(digits):
    run = FederatedRun(CFG, digits)
    affinity = gate_affinity(run.nodes[0].model, shared_vector(run.server.model), run.simulation.data(2, 0))
    assert affinity.shape == (4,) and affinity.dtype == np.float32
    assert affinity.sum() == pytest.approx(1.0, abs=1e-5) and (affinity > 0).all()
    # a reply's affinity comes from its pass before training, tokens routed through the held experts only:
    # the classifier's router sees the backbone alone, so that is the unmasked gate affinity
    payload = dataclasses.replace(_payload(run, 2, [1, 3]), affinity=True)
    sent = _train(run, payload, run.simulation.data(2, 0), TrainConfig()).affinity
    np.testing.assert_allclose(sent, affinity, rtol=1e-5, atol=1e-7)
    assert _train(run, _payload(run, 2, [1, 3]), run.simulation.data(2, 0), TrainConfig()).affinity is None


def test_the_affinity_signal_moves_every_expert_of_a_clients_fitness_row(digits):
    """``fitness.signal = "affinity"``: the payloads ask for the gate affinity and each accepted client's
    whole row follows it (EMA), held experts or not; other rows decay towards their priors."""
    config = CFG.replace({"fitness.signal": "affinity", "drift.threshold": 1.0})
    run = FederatedRun(config, digits)
    run.cold_start()
    sent, held, train = {}, {}, run.train

    def recording(payload, data):
        assert payload.affinity
        update = train(payload, data)
        sent[payload.client], held[payload.client] = update.affinity, payload.experts
        return update

    run.train = recording
    before = run.server.fitness.to_dense()
    record = run.step()
    after, lam, rho = run.server.fitness.to_dense(), config.fitness.ema, config.fitness.decay
    assert record["accepted"] and set(sent) >= set(record["accepted"])
    for client in range(config.federation.num_clients):
        if client in record["accepted"]:
            want = lam * before[client] + (1 - lam) * sent[client]
        else:
            prior = run.server.fitness.prior[client]
            want = prior + rho * (before[client] - prior)
        np.testing.assert_allclose(after[client], want, rtol=1e-5, atol=1e-7)
    # the drift detector compares like with like: the table against the held experts' affinity
    errors = np.concatenate([np.abs(sent[c][held[c]] - before[c, held[c]]) for c in record["accepted"]])
    assert record["fitness_error"] == pytest.approx(errors.mean(), rel=1e-5)


# ---------------------------------------------------------------------------------------------- server


def test_aggregate_leaves_faulty_replies_out_and_reports_them(digits):
    config = CFG.replace({"federation.clients_per_round": 0, "federation.deadline": 5.0,
                          "fitness.signal": "after"})  # the EMA of share x accuracy, checked below
    run = FederatedRun(config, digits)
    server = run.server
    plan = server.configure(np.arange(6))
    assert sorted(plan.payloads) == list(range(6))
    before = _model_state(run)
    old_fitness = server.fitness.to_dense().copy()
    good = {c: run.train(plan.payloads[c], run.simulation.data(c, 0)) for c in range(5)}
    nan_rows = good[2].expert_rows.clone()
    nan_rows[0, 5] = float("nan")
    replies = {
        0: ClientReply(0, good[0], 1.0),
        1: ClientReply(1, good[1], 4.9),
        2: ClientReply(2, dataclasses.replace(good[2], expert_rows=nan_rows), 1.0),
        3: ClientReply(3, dataclasses.replace(good[3], shared=good[3].shared[:-1]), 1.0),
        4: ClientReply(4, good[4], 7.5),  # after the deadline
        5: ClientReply(5, None, float("nan"), "dropped out"),
    }
    report = server.aggregate(plan, replies)
    assert report.accepted == [0, 1]
    assert set(report.invalid) == {"2", "3"} and "non-finite" in report.invalid["2"]
    assert "shape" in report.invalid["3"]
    assert list(report.late) == ["4"] and report.dropped == {"5": "dropped out"}
    assert report.seconds == 5.0 and server.round == 1
    assert report.bytes_sent == sum(p.nbytes for p in plan.payloads.values())
    assert report.bytes_received == sum(replies[c].update.nbytes for c in range(5))
    s_bytes, e_bytes = run.cost.base_bytes, run.cost.expert_bytes
    assert report.bytes_sent == sum(s_bytes + p.experts.size * e_bytes for p in plan.payloads.values())

    # shared: FedAvg of the two accepted clients by sample count
    w = torch.tensor([good[0].num_samples, good[1].num_samples], dtype=torch.float32)
    expected = (w[0] * good[0].shared + w[1] * good[1].shared) / w.sum()
    torch.testing.assert_close(shared_vector(server.model), expected, rtol=1e-5, atol=1e-6)
    # experts: routed-sample-weighted mean of the accepted copies; untouched experts keep their rows
    bank = server.model.expert_bank.detach()
    for e in range(4):
        copies = [(u.expert_rows[i], float(u.feedback.samples[i])) for u in (good[0], good[1])
                  for i, j in enumerate(u.experts) if j == e]
        total = sum(wt for _, wt in copies)
        want = sum(r * wt for r, wt in copies) / total if total > 0 else before["moe.expert_bank"][e]
        torch.testing.assert_close(bank[e], want, rtol=1e-5, atol=1e-6)
    assert report.expert_samples == np.bincount(
        np.concatenate([good[c].experts for c in (0, 1)]),
        weights=np.concatenate([good[c].feedback.samples for c in (0, 1)]), minlength=4).tolist()
    np.testing.assert_allclose(server.load.load, report.expert_samples)

    # fitness: EMA for the accepted pairs, decay towards the prior for all others
    fc = config.fitness
    fitness = server.fitness.to_dense()
    decayed = server.fitness.prior[:, None] + fc.decay * (old_fitness - server.fitness.prior[:, None])
    trained = np.zeros_like(fitness, dtype=bool)
    for u in (good[0], good[1]):
        trained[u.client, u.experts] = True
        want = fc.ema * old_fitness[u.client, u.experts] + (1 - fc.ema) * u.feedback.fitness()
        np.testing.assert_allclose(fitness[u.client, u.experts], want, rtol=1e-5)
    np.testing.assert_allclose(fitness[~trained], decayed[~trained], rtol=1e-5, atol=1e-7)
    # profiles learnt the reply rate: the client that dropped out is now thought less reliable
    rel = server.profiles.reliability_estimate
    assert rel[5] < run.simulation.truth.reliability[5] and rel[0] > run.simulation.truth.reliability[0]

    with pytest.raises(ValueError, match="round 0"):
        server.aggregate(plan, replies)


@pytest.mark.parametrize("signal", ["after", "before"])
def test_fitness_follows_the_configured_signal_and_the_detector_the_one_before_training(digits, signal):
    run = FederatedRun(CFG.replace({"federation.clients_per_round": 0, "fitness.signal": signal,
                                    "drift.threshold": 1.0}), digits)
    server = run.server
    plan = server.configure(np.arange(6))
    updates = {c: run.train(p, run.simulation.data(c, 0)) for c, p in plan.payloads.items()}
    old = server.fitness.to_dense().copy()
    seen = []
    observe = server.drift.observe
    server.drift.observe = lambda clients, surprise: seen.append(surprise) or observe(clients, surprise)
    report = server.aggregate(plan, {c: ClientReply(c, u, 1.0) for c, u in updates.items()})
    lam = CFG.fitness.ema
    errors = {}
    for c, u in updates.items():
        values = (u.feedback_before if signal == "before" else u.feedback).fitness()
        want = lam * old[c, u.experts] + (1 - lam) * values
        np.testing.assert_allclose(server.fitness.to_dense()[c, u.experts], want, rtol=1e-5)
        errors[c] = np.abs(u.feedback_before.fitness() - old[c, u.experts])
    np.testing.assert_allclose(seen[0], [errors[c].mean() for c in sorted(errors)], rtol=1e-5)
    assert report.fitness_error == pytest.approx(np.concatenate(list(errors.values())).mean(), rel=1e-5)


@pytest.mark.parametrize("rescore", [False, True])
def test_a_fired_client_is_rescored_from_the_affinity_it_sent_only_with_drift_rescore(digits, rescore):
    """With ``drift_rescore`` clients send the gate affinity (as :func:`gate_affinity` measures it with
    the received weights) and a fired client's row becomes that affinity before the round's update;
    without it no affinity travels and the fired row is shrunk to its prior."""
    config = CFG.replace({"federation.clients_per_round": 0, "drift.threshold": 1.0, "drift.rescore": rescore,
                          "fitness.decay": 1.0, "fitness.signal": "after"})
    run = FederatedRun(config, digits)
    server = run.server
    plan = server.configure(np.arange(6))
    updates = {c: run.train(p, run.simulation.data(c, 0)) for c, p in plan.payloads.items()}
    for c, u in updates.items():
        if rescore:
            np.testing.assert_allclose(u.affinity, gate_affinity(run.nodes[0].model, plan.payloads[c].shared,
                                                                 run.simulation.data(c, 0)), rtol=1e-6)
        else:
            assert u.affinity is None
    fire = sorted(updates)[0]
    server.drift.observe = lambda clients, surprise: np.array([fire])  # force one client to fire
    old = server.fitness.to_dense().copy()
    prior = server.fitness.prior.copy()
    report = server.aggregate(plan, {c: ClientReply(c, u, 1.0) for c, u in updates.items()})
    lam, u = config.fitness.ema, updates[fire]
    row = u.affinity.astype(np.float64) if rescore else np.full(config.model.num_experts, prior[fire])
    row[u.experts] = lam * row[u.experts] + (1 - lam) * u.feedback.fitness()
    np.testing.assert_allclose(server.fitness.to_dense()[fire], row, rtol=1e-5, atol=1e-7)
    assert report.drift_reset == [fire] and report.drift_rescored == ([fire] if rescore else [])
    others = [c for c in range(6) if c != fire]
    untouched = np.ones_like(old, dtype=bool)
    for c, other in updates.items():
        untouched[c, other.experts] = False
    np.testing.assert_array_equal(server.fitness.to_dense()[others][untouched[others]],
                                  old[others][untouched[others]])


def _tripled_share(feedback):
    return dataclasses.replace(feedback, share=3 * feedback.share)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda u: dataclasses.replace(u, client=u.client + 1), "names client"),
        (lambda u: dataclasses.replace(u, experts=u.experts[:1]), "differ from the assigned"),
        (lambda u: dataclasses.replace(u, expert_rows=u.expert_rows.double()), "float32"),
        (lambda u: dataclasses.replace(u, shared=u.shared.clone().fill_(float("inf"))), "non-finite"),
        (lambda u: dataclasses.replace(u, num_samples=0), "num_samples"),
        (lambda u: dataclasses.replace(u, train_loss=float("nan")), "train_loss"),
        (lambda u: dataclasses.replace(u, feedback=_tripled_share(u.feedback)), "share"),
        (lambda u: dataclasses.replace(u, feedback=None), "ExpertFeedback"),
        (lambda u: dataclasses.replace(u, feedback_before=_tripled_share(u.feedback_before)),
         "feedback_before share"),
        (lambda u: dataclasses.replace(u, feedback_before=None), "feedback_before must be"),
        (lambda u: dataclasses.replace(u, affinity=np.full(5, 0.2, np.float32)), "affinity"),
        (lambda u: dataclasses.replace(u, affinity=np.array([0.5, np.nan, 0.2, 0.3], np.float32)),
         "affinity"),
        (lambda u: dataclasses.replace(u, affinity=-np.full(4, 0.25, np.float32)), "affinity"),
        (lambda u: "garbage", "not a ClientUpdate"),
    ],
)
def test_check_update_names_what_is_wrong(digits, mutate, reason):
    run = FederatedRun(CFG, digits)
    payload = _payload(run, 0, [0, 2])
    update = _train(run, payload, run.simulation.data(0, 0), TrainConfig())
    assert reason in check_update(mutate(update), payload, CFG.model.num_experts)


def test_a_reply_without_the_affinity_it_was_asked_for_is_invalid(digits):
    run = FederatedRun(CFG, digits)
    payload = dataclasses.replace(_payload(run, 0, [0, 2]), affinity=True)
    update = _train(run, payload, run.simulation.data(0, 0), TrainConfig())
    assert check_update(update, payload, CFG.model.num_experts) is None
    missing = dataclasses.replace(update, affinity=None)
    assert "affinity was asked for" in check_update(missing, payload, CFG.model.num_experts)


def test_select_takes_a_seeded_subset_of_the_online_clients(digits):
    server = FederatedRun(CFG, digits).server
    online = np.array([5, 0, 2, 3, 4])
    chosen = server.select(online)
    assert chosen.size == 4 and set(chosen) <= set(online) and np.all(np.diff(chosen) > 0)
    np.testing.assert_array_equal(server.select(online), chosen)
    np.testing.assert_array_equal(server.select(np.array([1, 4])), [1, 4])
    server.round = 1
    picks = {tuple(server.select(online)) for server.round in range(1, 12)}
    assert len(picks) > 1


# ---------------------------------------------------------------------------------------------- faults, loop


def test_the_loop_survives_crashing_corrupt_and_malformed_clients(digits):
    run = FederatedRun(CFG.replace({"federation.clients_per_round": 0, "federation.rounds": 3}), digits)
    honest = run.train

    def faulty(payload, data):
        if payload.client == 1:
            raise RuntimeError("out of memory")
        update = honest(payload, data)
        if payload.client == 2:
            return dataclasses.replace(update, shared=update.shared * float("nan"))
        if payload.client == 3:
            return dataclasses.replace(update, expert_rows=update.expert_rows[:, :-3])
        return update

    run.train = faulty
    for _ in range(3):
        before = shared_vector(run.server.model)
        record = run.step()
        assert record["dropped"] == {"1": "RuntimeError: out of memory"}
        assert set(record["invalid"]) == {"2", "3"}
        assert set(record["accepted"]) == {0, 4, 5}
        assert np.isfinite(record["loss"]) and record["rejected_rows"] == 0
        assert not torch.equal(shared_vector(run.server.model), before)  # the honest clients count
    assert all(torch.isfinite(p).all() for p in run.server.model.parameters())


def test_a_missed_deadline_or_corrupt_replies_leave_the_model_unchanged(digits):
    for changes, kind in (({"federation.deadline": 1e-6}, "late"), ({"simulation.corrupt": 1.0}, "invalid")):
        run = FederatedRun(CFG.replace(changes), digits)
        before = _model_state(run)
        record = run.step()
        assert record["accepted"] == [] and set(record[kind]) == set(record["assigned"])
        assert len(record["assigned"]) == 4
        after = run.server.model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert record["expert_samples"] == [0.0] * 4 and record["train_loss"] is None
        assert record["bytes_received"] > 0  # the replies arrived, they were just not used
        if kind == "late":
            assert record["seconds"] == 1e-6


def test_dropouts_follow_each_tiers_reliability(digits):
    run = FederatedRun(CFG.replace({"federation.num_clients": 30, "federation.clients_per_round": 0,
                                    "simulation.dropout": True}), digits)
    sim = run.simulation

    def instant(payload, data):
        return "update"

    payload = _payload(run, 0, [0])
    dropped = np.array([[sim.run(dataclasses.replace(payload, round=r, client=c), instant).update is None
                         for c in range(30)] for r in range(400)])
    rate = dropped.mean(0)
    expected = 1 - sim.truth.reliability
    assert np.abs(rate - expected).max() < 0.05
    assert rate[sim.truth.tier == 2].mean() > rate[sim.truth.tier == 0].mean()  # low tier drops more
    assert np.isnan(sim.run(payload, instant).seconds) == bool(dropped[0, 0])


def test_profiles_are_heterogeneous_and_times_grow_with_the_experts_held(digits):
    run = FederatedRun(CFG.replace({"federation.num_clients": 40, "data.min_samples": 4}), digits)
    samples = np.array([p.size for p in run.parts], dtype=np.float64)
    hetero = make_profiles(samples, run.cost, "heterogeneous", seed=0)
    fit = hetero.experts_fit()
    assert fit.min() >= 1 and fit[hetero.tier == 0].mean() > fit[hetero.tier == 1].mean() > \
        fit[hetero.tier == 2].mean()
    np.testing.assert_array_equal(hetero.samples, samples)
    uniform = make_profiles(samples, run.cost, "uniform", seed=0)
    assert set(uniform.experts_fit().tolist()) == {4}
    sim = run.simulation
    times = [sim.true_seconds(3, 5, k) for k in (1, 2, 3)]
    assert times[0] < times[1] < times[2] and sim.true_seconds(3, 5, 2) == times[1]
    assert sim.true_seconds(4, 5, 2) != times[1]  # per-round jitter
    with pytest.raises(ValueError, match="tiers"):
        make_profiles(samples, run.cost, "huge", seed=0)


# ---------------------------------------------------------------------------------------------- checkpoints


def _without_wall_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "wall_seconds"}


def test_a_killed_run_resumes_to_the_uninterrupted_result(digits, tmp_path, monkeypatch):
    config = CFG.replace({"federation.rounds": 4, "federation.deadline": 2.0, "simulation.dropout": True,
                          "alignment.strategy": "optimal"})
    whole = run_experiment(config, checkpoint=tmp_path / "whole.pt", dataset=digits)
    assert len(whole["rounds"]) == 4 and whole["final_accuracy"] == whole["rounds"][-1]["accuracy"]
    again = run_experiment(config, dataset=digits)
    assert _without_wall_time(again) == _without_wall_time(whole)  # same seed, same run

    honest = FederatedRun.train

    def killed_in_round_2(self, payload, data):
        if payload.round == 2:
            raise KeyboardInterrupt  # not a client fault: it stops the run like a kill
        return honest(self, payload, data)

    monkeypatch.setattr(FederatedRun, "train", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, checkpoint=tmp_path / "killed.pt", dataset=digits)
    monkeypatch.setattr(FederatedRun, "train", honest)
    assert len(load_checkpoint(tmp_path / "killed.pt")["history"]) == 2
    resumed = run_experiment(config, checkpoint=tmp_path / "killed.pt", resume=True, dataset=digits)
    assert _without_wall_time(resumed) == _without_wall_time(whole)
    a, b = load_checkpoint(tmp_path / "whole.pt"), load_checkpoint(tmp_path / "killed.pt")
    for key, tensor in a["server"]["model"].items():
        assert torch.equal(tensor, b["server"]["model"][key])

    longer = run_experiment(config.replace({"federation.rounds": 5}), checkpoint=tmp_path / "killed.pt",
                            resume=True, dataset=digits)
    assert longer["rounds"][:4] == whole["rounds"] and len(longer["rounds"]) == 5
    with pytest.raises(ValueError, match=r"\['train.lr'\]"):
        run_experiment(config.replace({"train.lr": 0.3}), checkpoint=tmp_path / "killed.pt", resume=True,
                       dataset=digits)
    # the evaluation after the last round may change: the rounds played stay as they were
    evaluated = run_experiment(config.replace({"federation.rounds": 5, "evaluation.clients": True,
                                               "evaluation.max_clients": 2}),
                               checkpoint=tmp_path / "killed.pt", resume=True, dataset=digits)
    assert evaluated["rounds"] == longer["rounds"] and evaluated["client_evaluation"]["all"]["clients"] == 2


def test_checkpoints_are_atomic_and_load_only_plain_data(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    state = {"a": np.arange(3, dtype=np.int32), "b": {"c": [1.5, "x", None], "d": np.float32(2)},
             "t": torch.ones(2)}
    save_checkpoint(path, state)
    loaded = load_checkpoint(path)
    assert loaded["a"].dtype == torch.int32 and loaded["b"] == {"c": [1.5, "x", None], "d": 2.0}
    np.testing.assert_array_equal(checkpoint_module.to_numpy(loaded)["a"], state["a"])

    def crash(fd):  # the disk fills up while the new file is flushed
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint_module.os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"a": np.zeros(1)})
    monkeypatch.undo()
    assert load_checkpoint(path)["a"].tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind

    class Payload:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = io.BytesIO()
    torch.save({"x": Payload()}, evil)  # with a valid checksum: only weights_only stands in the way
    digest = hashlib.sha256(evil.getvalue()).hexdigest()
    (tmp_path / "evil.pt").write_bytes(b"fedmoe-checkpoint sha256=%s\n" % digest.encode() + evil.getvalue())
    with pytest.raises(ValueError, match="cannot be read: UnpicklingError"):
        load_checkpoint(tmp_path / "evil.pt")


FAIR_TOML = """
[federation]
num_clients = 8
clients_per_round = 0
deadline = "none"

[model]
num_experts = 4
d_model = 8
d_hidden = 16
channels = [4]

[alignment]
strategy = "fair"
max_experts = 2
expert_slack = 1.0

[alignment.desirability]
fairness = {fairness}
"""


def test_a_fairness_weight_set_in_toml_reaches_the_strategy_and_changes_assignments(digits, tmp_path):
    """Six clients may only train expert 0, which holds four: who gets it is the desirability's call. With
    fairness 0 the same four win every round; with 0.5 (set in TOML) the two left out catch up."""
    assigned = {}
    for fairness in (0.0, 0.5):
        path = tmp_path / f"fair{fairness}.toml"
        path.write_text(FAIR_TOML.format(fairness=fairness))
        config = FederatedConfig.from_dict(tomllib.loads(path.read_text()))
        server = FederatedRun(config, digits).server
        assert server.strategy.config.desirability.fairness == fairness
        assert server.strategy.name == "fair" and server.strategy.config.expert_slack == 1.0
        only_expert_0 = (np.repeat(np.arange(6), 3), np.tile([1, 2, 3], 6))
        assigned[fairness] = [server.strategy.assign(RoundState(r, np.arange(8), server.fitness, server.load,
                                                                server.profiles, forbidden=only_expert_0))
                              .to_dict() for r in range(4)]
    never = set(range(6)) - {c for a in assigned[0.0] for c in a if a[c] == [0]}
    assert never  # some clients never get expert 0 ...
    assert never <= {c for a in assigned[0.5] for c in a}  # ... until fairness weighs in
    assert assigned[0.0] != assigned[0.5]
