"""Stress knobs of the simulation and the loop (issue 9): extra drop-outs, capacity self-reports that are
off (memory failures; recovery of the time estimates from observed round times), label drift, drift
handling in the server, their config validation, and exact resume with all of them on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmoe.federated import ClientPayload, FederatedConfig, FederatedRun, load_checkpoint, run_experiment

CFG = FederatedConfig(num_clients=10, clients_per_round=10, rounds=4, num_experts=4, d_model=8, d_hidden=16,
                      channels=(4,), max_experts=2, batch_size=32, dirichlet_alpha=0.5, dropout=False,
                      deadline=None)


pytestmark = pytest.mark.usefixtures("one_thread")



@pytest.mark.parametrize(("changes", "error", "match"), [
    ({"dropout_rate": 1.0}, ValueError, "dropout_rate"),
    ({"capacity_error": -0.1}, ValueError, "capacity_error"),
    ({"drift_round": -1}, ValueError, "drift_round"),
    ({"drift_round": 1.5}, TypeError, "drift_round"),
    ({"drift_fraction": 1.5}, ValueError, "drift_fraction"),
    ({"drift_threshold": -1.0}, ValueError, "drift_threshold"),
    ({"drift_shrink": 1.0}, ValueError, "drift_shrink"),
    ({"safety_margin": -0.1}, ValueError, "safety_margin"),
    ({"profile_ema": 1.1}, ValueError, "profile_ema"),
    ({"fitness_signal": "during"}, ValueError, "fitness_signal"),
    ({"drift_rescore": True}, ValueError, "drift_rescore"),
    ({"drift_rescore": 1, "drift_threshold": 2.0}, TypeError, "drift_rescore"),
    ({"eval_aligned": "yes"}, TypeError, "eval_aligned"),
])
def test_config_names_the_bad_stress_option(changes, error, match):
    with pytest.raises(error, match=match):
        CFG.replace(**changes)


def test_stress_options_round_trip_and_reach_the_server(digits):
    config = CFG.replace(safety_margin=0.5, profile_ema=1.0, drift_threshold=3.0, drift_shrink=0.25)
    assert FederatedConfig.from_dict(config.to_dict()) == config
    run = FederatedRun(config, digits)
    assert run.server.profiles.config.safety_margin == 0.5 and run.server.profiles.config.ema == 1.0
    assert run.server.drift.config.threshold == 3.0 and run.server.drift.config.shrink == 0.25
    wide = FederatedRun(CFG.replace(safety_margin=0.0), digits).server.profiles.experts_fit()
    fit = run.server.profiles.experts_fit()
    assert np.all(fit <= wide) and np.any(fit < wide)


def _payload(run: FederatedRun, client: int, k: int, round_: int = 0) -> ClientPayload:
    experts = np.arange(k, dtype=np.int64)
    return ClientPayload(round_, client, experts, torch.zeros(1), torch.zeros(k, 1), 0)


def test_without_capacity_error_the_simulation_is_unchanged_and_never_runs_out_of_memory(digits):
    plain, zero = FederatedRun(CFG, digits), FederatedRun(CFG.replace(safety_margin=0.0), digits)
    np.testing.assert_array_equal(plain.simulation.hidden, zero.simulation.hidden)
    assert np.all(zero.simulation.experts_fit >= zero.server.profiles.experts_fit())


def test_capacity_error_moves_true_times_and_memory_within_its_bound(digits):
    plain, off = FederatedRun(CFG, digits), FederatedRun(CFG.replace(capacity_error=0.3), digits)
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
    run = FederatedRun(CFG.replace(capacity_error=0.3, profile_ema=ema), digits)
    profiles, sim = run.server.profiles, run.simulation
    clients = np.arange(CFG.num_clients)

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
    run = FederatedRun(CFG.replace(dropout_rate=0.2), digits)
    trained = []
    for round_ in range(40):
        for c in range(CFG.num_clients):
            run.simulation.run(_payload(run, c, 1, round_), lambda p, x, y: trained.append(p.client))
    assert abs(1 - len(trained) / 400 - 0.2) < 0.06


def test_drift_shifts_the_labels_of_a_fraction_of_the_clients_from_its_round_on(digits):
    run = FederatedRun(CFG.replace(drift_round=3, drift_fraction=0.4, dirichlet_alpha=0.1), digits)
    sim, classes = run.simulation, digits.num_classes
    assert len(sim.drifted) == 4
    disjoint = 0
    for c in range(CFG.num_clients):
        x, y = sim.data(c, 2)
        assert x is sim.x[c] and y is sim.y[c]
        x_new, y_new = sim.data(c, 3)
        if c not in sim.drifted:
            assert y_new is sim.y[c]
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
    config = CFG.replace(rounds=5, drift_round=2, drift_threshold=1.0, capacity_error=0.3, dropout_rate=0.2,
                         strategy="greedy", fitness_signal="before", drift_rescore=rescore,
                         eval_aligned=rescore)
    whole = run_experiment(config, checkpoint=tmp_path / "whole.pt", dataset=digits)
    assert whole["rounds"][-1]["fitness_error"] is not None and "time_error" in whole["rounds"][-1]
    assert ("aligned_accuracy" in whole["rounds"][-1]) == rescore
    honest = FederatedRun.train

    def killed_in_round_3(self, payload, x, y):
        if payload.round == 3:
            raise KeyboardInterrupt
        return honest(self, payload, x, y)

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
    run = FederatedRun(CFG.replace(drift_round=2, drift_fraction=0.5, dirichlet_alpha=0.1), digits)
    model, x, y = run.server.model, run.x_test, run.y_test.numpy()
    client = min(run.simulation.drifted)

    def expected(experts, round_):
        mask = torch.zeros(CFG.num_experts, dtype=torch.bool)
        mask[experts] = True
        model.moe.set_expert_mask(mask)
        with torch.no_grad():
            correct = (model(x)[0].argmax(1).numpy() == y).astype(float)
        model.moe.set_expert_mask(None)
        labels = run.simulation.data(client, round_)[1].numpy()
        return sum((labels == k).mean() * correct[y == k].mean() for k in np.unique(labels))

    for experts in ([0], [1, 3], [0, 1, 2, 3]):
        for round_ in (0, 2):  # before and after the client's drift
            got = run.aligned_accuracy(round_, {str(client): experts})
            assert got == pytest.approx(expected(experts, round_), abs=1e-9)
    assert run.aligned_accuracy(0, {}) is None
