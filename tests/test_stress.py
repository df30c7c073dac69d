"""Stress knobs of the simulation and the loop: extra drop-outs, profile self-reports that are
off (memory failures; recovery of the time estimates from observed round times), label drift, drift
handling in the server, their config validation, and exact resume with all of them on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmoe.federated import ClientPayload, FederatedConfig, FederatedRun, load_checkpoint, run_experiment

CFG = FederatedConfig().replace({"federation.num_clients": 10, "federation.clients_per_round": 10,
                                 "federation.rounds": 4, "model.num_experts": 4, "model.d_model": 8,
                                 "model.d_hidden": 16, "model.channels": (4,), "alignment.max_experts": 2,
                                 "train.batch_size": 32, "data.dirichlet_alpha": 0.5,
                                 "simulation.dropout": False, "federation.deadline": None})


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"simulation.dropout_rate": 1.0}, ValueError, "simulation: dropout_rate"),
    ({"simulation.profile_error": -0.1}, ValueError, "simulation: profile_error"),
    ({"simulation.drift_round": -1}, ValueError, "simulation: drift_round"),
    ({"simulation.drift_round": 1.5}, TypeError, "simulation: drift_round"),
    ({"simulation.drift_fraction": 1.5}, ValueError, "simulation: drift_fraction"),
    ({"drift.threshold": -1.0}, ValueError, "drift: threshold"),
    ({"drift.shrink": 1.0}, ValueError, "drift: shrink"),
    ({"profiles.safety_margin": -0.1}, ValueError, "profiles: safety_margin"),
    ({"profiles.ema": 1.1}, ValueError, "profiles: ema"),
    ({"fitness.signal": "during"}, ValueError, "fitness: signal"),
    ({"drift.rescore": True}, ValueError, "drift: rescore"),
    ({"drift.rescore": 1, "drift.threshold": 2.0}, TypeError, "drift: rescore"),
    ({"evaluation.aligned": "yes"}, TypeError, "evaluation: aligned"),
])
def test_config_names_the_bad_stress_option(changes, error, match):
    with pytest.raises(error, match=match):
        CFG.replace(changes)


def test_stress_options_round_trip_and_reach_the_server(digits):
    config = CFG.replace({"profiles.safety_margin": 0.5, "profiles.ema": 1.0, "drift.threshold": 3.0,
                          "drift.shrink": 0.25})
    assert FederatedConfig.from_dict(config.to_dict()) == config
    run = FederatedRun(config, digits)
    assert run.server.profiles.config.safety_margin == 0.5 and run.server.profiles.config.ema == 1.0
    assert run.server.drift.config.threshold == 3.0 and run.server.drift.config.shrink == 0.25
    wide = FederatedRun(CFG.replace({"profiles.safety_margin": 0.0}), digits).server.profiles.experts_fit()
    fit = run.server.profiles.experts_fit()
    assert np.all(fit <= wide) and np.any(fit < wide)


def _payload(run: FederatedRun, client: int, k: int, round_: int = 0) -> ClientPayload:
    experts = np.arange(k, dtype=np.int64)
    return ClientPayload(round_, client, experts, torch.zeros(1), torch.zeros(k, 1), 0)


def test_without_profile_error_the_simulation_is_unchanged_and_never_runs_out_of_memory(digits):
    plain = FederatedRun(CFG, digits)
    zero = FederatedRun(CFG.replace({"profiles.safety_margin": 0.0}), digits)
    np.testing.assert_array_equal(plain.simulation.hidden, zero.simulation.hidden)
    assert np.all(zero.simulation.experts_fit >= zero.server.profiles.experts_fit())


def test_profile_error_moves_true_times_and_memory_within_its_bound(digits):
    plain = FederatedRun(CFG, digits)
    off = FederatedRun(CFG.replace({"simulation.profile_error": 0.3}), digits)
    ratio = off.simulation.hidden / plain.simulation.hidden
    assert np.all((ratio >= 0.7) & (ratio <= 1.3)) and np.ptp(ratio) > 0.1
    short = np.flatnonzero(off.simulation.experts_fit < plain.simulation.experts_fit)
    assert short.size  # some clients hold fewer experts than they reported
    c = int(short[0])
    k = int(off.simulation.experts_fit[c]) + 1
    reply = off.simulation.run(_payload(off, c, k), lambda *a: pytest.fail("must not train"))
    assert reply.update is None and reply.error == "out of memory"


@pytest.mark.parametrize(("ema", "recovers"), [(0.7, True), (0.3, True), (1.0, False)])
def test_time_estimates_recover_from_observed_round_times_unless_self_reported(digits, ema, recovers):
    run = FederatedRun(CFG.replace({"simulation.profile_error": 0.3, "profiles.ema": ema}), digits)
    profiles, sim = run.server.profiles, run.simulation
    clients = np.arange(CFG.federation.num_clients)

    def error() -> float:
        return float(np.median(np.abs(np.log(profiles.round_time(1) / sim.expected_seconds(1)))))

    start = error()
    assert start > 0.05
    for round_ in range(10):
        seconds = [sim.true_seconds(round_, c, 2) for c in clients]
        profiles.observe(clients, np.full(clients.size, 2), seconds)
    if recovers:
        assert error() < min(0.1, 0.6 * start)  # what is left is the per-round jitter (sigma 0.1)
    else:
        assert error() == start


def test_dropout_rate_drops_that_share_of_the_clients(digits):
    run = FederatedRun(CFG.replace({"simulation.dropout_rate": 0.2}), digits)
    trained = []
    for round_ in range(40):
        for c in range(CFG.federation.num_clients):
            run.simulation.run(_payload(run, c, 1, round_), lambda p, data: trained.append(p.client))
    assert abs(1 - len(trained) / 400 - 0.2) < 0.06


def test_drift_shifts_the_labels_of_a_fraction_of_the_clients_from_its_round_on(digits):
    run = FederatedRun(CFG.replace({"simulation.drift_round": 3, "simulation.drift_fraction": 0.4,
                                    "data.dirichlet_alpha": 0.1}), digits)
    sim, classes = run.simulation, digits.num_classes
    assert len(sim.drifted) == 4
    disjoint = 0
    for c in range(CFG.federation.num_clients):
        x, y = sim.data(c, 2).inputs, sim.data(c, 2).targets
        assert sim.data(c, 2) is run.nodes[c].data
        x_new, y_new = sim.data(c, 3).inputs, sim.data(c, 3).targets
        if c not in sim.drifted:
            assert sim.data(c, 3) is run.nodes[c].data
            continue
        assert x_new.shape == x.shape
        shift = (y_new - y) % classes
        assert torch.all(shift == shift[0]) and 0 < int(shift[0]) < classes
        old = set(y.tolist())
        if any(not old & {(k + s) % classes for k in old} for s in range(1, classes)):
            assert not old & set(y_new.tolist())  # a disjoint label set where one exists
            disjoint += 1
    assert disjoint >= 2
    assert not FederatedRun(CFG, digits).simulation.drifted


def _without_wall_time(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "wall_seconds"}


@pytest.mark.parametrize("rescore", [False, True])
def test_a_killed_stress_run_resumes_exactly_with_the_drift_detector_state(digits, tmp_path, monkeypatch,
                                                                           rescore):
    config = CFG.replace({"federation.rounds": 5, "simulation.drift_round": 2, "drift.threshold": 1.0,
                          "simulation.profile_error": 0.3, "simulation.dropout_rate": 0.2,
                          "alignment.strategy": "greedy", "fitness.signal": "before",
                          "drift.rescore": rescore, "evaluation.aligned": rescore})
    whole = run_experiment(config, checkpoint=tmp_path / "whole.pt", dataset=digits)
    assert whole["rounds"][-1]["fitness_error"] is not None and "time_error" in whole["rounds"][-1]
    assert ("aligned_accuracy" in whole["rounds"][-1]) == rescore
    honest = FederatedRun.train

    def killed_in_round_3(self, payload, data):
        if payload.round == 3:
            raise KeyboardInterrupt
        return honest(self, payload, data)

    monkeypatch.setattr(FederatedRun, "train", killed_in_round_3)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(config, checkpoint=tmp_path / "killed.pt", dataset=digits)
    monkeypatch.setattr(FederatedRun, "train", honest)
    saved = load_checkpoint(tmp_path / "killed.pt")["server"]["drift"]
    assert np.asarray(saved["count"]).sum() > 0
    resumed = run_experiment(config, checkpoint=tmp_path / "killed.pt", resume=True, dataset=digits)
    assert _without_wall_time(resumed) == _without_wall_time(whole)
    a, b = load_checkpoint(tmp_path / "whole.pt")["server"], load_checkpoint(tmp_path / "killed.pt")["server"]
    for key in ("level", "spread", "count"):
        np.testing.assert_array_equal(np.asarray(a["drift"][key]), np.asarray(b["drift"][key]))


def test_aligned_accuracy_masks_each_client_to_its_experts_and_weights_by_its_current_labels(digits):
    run = FederatedRun(CFG.replace({"simulation.drift_round": 2, "simulation.drift_fraction": 0.5,
                                    "data.dirichlet_alpha": 0.1}), digits)
    model, x, y = run.server.model, run.test.inputs, run.test.targets.numpy()
    client = min(run.simulation.drifted)

    def expected(experts, round_):
        mask = torch.zeros(CFG.model.num_experts, dtype=torch.bool)
        mask[experts] = True
        model.set_expert_mask(mask)
        with torch.no_grad():
            correct = (model(x)[0].argmax(1).numpy() == y).astype(float)
        model.set_expert_mask(None)
        labels = run.simulation.data(client, round_).targets.numpy()
        return sum((labels == k).mean() * correct[y == k].mean() for k in np.unique(labels))

    for experts in ([0], [1, 3], [0, 1, 2, 3]):
        for round_ in (0, 2):  # before and after the client's drift
            got = run.aligned_accuracy(round_, {str(client): experts})
            assert got == pytest.approx(expected(experts, round_), abs=1e-9)
    assert run.aligned_accuracy(0, {}) is None
