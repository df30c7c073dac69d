"""Drift handling (fedmoe.alignment.drift): the detector fires on a jump in a client's feedback, not on
noise, and pulls a fired client's fitness row towards its prior or re-scores it from a fresh gate affinity,
for dense and lean fitness tables."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.alignment import DenseFitness, DriftConfig, DriftDetector, FitnessConfig, LeanFitness

FORMS = (DenseFitness, LeanFitness)


@pytest.mark.parametrize(("changes", "match"), [
    ({"threshold": -1.0}, "threshold"), ({"shrink": 1.0}, "shrink"), ({"warmup": 1}, "warmup"),
    ({"ema": 1.0}, "ema"), ({"threshold": float("nan")}, "threshold")])
def test_config_names_the_bad_argument(changes, match):
    with pytest.raises(ValueError, match=match):
        DriftConfig(**changes)


def test_observe_checks_its_arguments():
    d = DriftDetector(3, DriftConfig(threshold=2.0))
    with pytest.raises(ValueError, match="clients"):
        d.observe([0, 3], [0.1, 0.1])
    with pytest.raises(ValueError, match="distinct"):
        d.observe([1, 1], [0.1, 0.1])
    with pytest.raises(ValueError, match="surprise"):
        d.observe([0], [-0.1])
    with pytest.raises(TypeError, match="config"):
        DriftDetector(3, {"threshold": 2.0})


def _noise(rng, n, rounds, mean=0.15, sd=0.03):
    return np.abs(rng.normal(mean, sd, (rounds, n)))


def test_detects_a_jump_and_not_the_noise_before_it():
    n, rng = 500, np.random.default_rng(0)
    d = DriftDetector(n, DriftConfig(threshold=6.0))
    clients = np.arange(n)
    false_alarms = sum(d.observe(clients, s).size for s in _noise(rng, n, 30))
    assert false_alarms / (30 * n) < 0.005
    jumped = np.arange(0, n, 2)  # half the clients' feedback jumps by 10 noise sds
    surprise = _noise(rng, n, 1)[0]
    surprise[jumped] += 0.3
    fired = d.observe(clients, surprise)
    assert np.isin(fired, jumped).mean() > 0.95 and fired.size > 0.9 * jumped.size
    assert np.all(d.count[fired] == 0) and np.all(d.level[fired] == 0)  # baseline restarts
    assert d.observe(fired, np.full(fired.size, 5.0)).size == 0  # within warmup again


def test_off_by_default_and_during_warmup():
    clients = np.arange(4)
    off = DriftDetector(4)
    assert not off.config.enabled
    for value in (0.1, 0.1, 0.1, 9.0):
        assert off.observe(clients, np.full(4, value)).size == 0
    on = DriftDetector(4, DriftConfig(threshold=2.0, warmup=3))
    for value in (0.1, 0.1, 9.0):  # the third report comes before the warmup is over
        assert on.observe(clients, np.full(4, value)).size == 0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=4, max_size=40), st.floats(0.1, 8.0),
       st.floats(0.01, 100.0))
def test_fires_only_above_the_level_and_is_scale_free(series, threshold, scale):
    """A report fires only if it exceeds the client's running level; scaling all feedback errors by a
    constant changes nothing; a constant series never fires."""
    a = DriftDetector(1, DriftConfig(threshold=threshold))
    b = DriftDetector(1, DriftConfig(threshold=threshold))
    flat = DriftDetector(1, DriftConfig(threshold=threshold))
    for value in series:
        level = a.level[0]
        fired = a.observe([0], [value]).size
        assert b.observe([0], [value * scale]).size == fired
        assert not fired or value > level
        assert flat.observe([0], [series[0]]).size == 0


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("shrink", [0.0, 0.5])
def test_step_pulls_a_fired_row_to_its_prior_before_the_update(form, shrink):
    cfg = FitnessConfig(ema=0.5, decay=1.0, prior=0.1, prune_below=0.0)
    table = form(3, 4, cfg)
    table.cold_start(np.arange(3), np.array([[0.4, 0.2, 0.1, 0.3]] * 3, dtype=np.float32))
    before = table.to_dense()
    detector = DriftDetector(3, DriftConfig(threshold=2.0, shrink=shrink, warmup=2))
    clients, experts = np.array([0, 0, 1]), np.array([0, 1, 2])
    for values in ([0.4, 0.2, 0.1], [0.4, 0.2, 0.1]):  # exactly what the table holds: no surprise
        fired, error = detector.step(table, clients, experts, np.array(values))
        np.testing.assert_allclose(error, 0, atol=1e-6)
        assert fired.size == 0
        table.update(clients, experts, np.array(values))
    fired, error = detector.step(table, clients, experts, np.array([0.0, 1.0, 0.1]))  # client 0 jumps
    assert fired.tolist() == [0]
    np.testing.assert_allclose(error, [0.4, 0.8, 0.0], atol=1e-6)
    prior = table.prior[0]
    np.testing.assert_allclose(table.to_dense()[0], prior + shrink * (before[0] - prior), atol=1e-6)
    np.testing.assert_allclose(table.to_dense()[1:], before[1:], atol=1e-6)


def _warm(form, n=4, e=5, keep=5):
    """A table with every row cold-started and trained, and a detector past its warmup on it."""
    cfg = FitnessConfig(ema=0.5, decay=0.9, prior=0.1, prune_below=0.0, lean_keep=keep)
    table = form(n, e, cfg)
    rng = np.random.default_rng(3)
    table.cold_start(np.arange(n), rng.random((n, e)).astype(np.float32))
    detector = DriftDetector(n, DriftConfig(threshold=2.0, shrink=0.5, warmup=2))
    clients, experts = np.repeat(np.arange(n), 2), np.tile([0, 1], n)
    for _ in range(2):  # report exactly what the table holds: no surprise, no firing
        values = table.get(clients, experts).astype(np.float64)
        assert detector.step(table, clients, experts, values)[0].size == 0
        table.update(clients, experts, values)
    return table, detector, clients, experts


@pytest.mark.parametrize("form", FORMS)
def test_rescore_replaces_a_fired_row_with_its_fresh_affinity(form):
    """A fired client whose affinity is given gets exactly that row (for every expert, held or not) and
    its mean as prior; a fired client without one is shrunk; clients that did not fire are untouched,
    even when their affinity is given."""
    table, detector, clients, experts = _warm(form)
    before, prior = table.to_dense(), table.prior.copy()
    values = table.get(clients, experts).astype(np.float64)
    values[clients == 0] = [0.9, 0.9]  # clients 0 and 2 jump
    values[clients == 2] = [0.9, 0.9]
    fresh = {0: np.array([0.05, 0.6, 0.15, 0.1, 0.1]), 1: np.array([0.2] * 5),
             3: np.array([0.9, 0, 0, 0, 0.1])}
    fired, _ = detector.step(table, clients, experts, values, rescore=fresh)
    assert fired.tolist() == [0, 2]
    after = table.to_dense()
    np.testing.assert_allclose(after[0], fresh[0], atol=1e-6)
    assert table.prior[0] == pytest.approx(fresh[0].mean())
    np.testing.assert_allclose(after[2], prior[2] + 0.5 * (before[2] - prior[2]), atol=1e-6)  # no affinity
    np.testing.assert_array_equal(after[[1, 3]], before[[1, 3]])  # did not fire: untouched
    np.testing.assert_array_equal(table.prior[[1, 2, 3]], prior[[1, 2, 3]])
    # what the next update then does starts from the fresh row
    table.update(clients, experts, values)
    lam = 0.5
    np.testing.assert_allclose(table.get([0, 0], [0, 1]), lam * fresh[0][:2] + (1 - lam) * 0.9, atol=1e-6)


def test_rescore_of_a_lean_table_keeps_the_best_experts_of_the_fresh_affinity():
    table, detector, clients, experts = _warm(LeanFitness, keep=2)
    values = table.get(clients, experts).astype(np.float64)
    values[clients == 1] = [0.9, 0.9]
    fresh = np.array([0.05, 0.1, 0.5, 0.05, 0.3])
    assert detector.step(table, clients, experts, values, rescore={1: fresh})[0].tolist() == [1]
    row = table.to_dense()[1]
    np.testing.assert_allclose(row[[2, 4]], fresh[[2, 4]], atol=1e-6)  # the two best, unheld, experts
    np.testing.assert_allclose(row[[0, 1, 3]], fresh.mean(), atol=1e-6)  # the rest at the new prior


def test_rescore_checks_the_affinity_shape():
    table, detector, clients, experts = _warm(DenseFitness)
    values = table.get(clients, experts).astype(np.float64) + np.where(clients == 0, 0.8, 0.0)
    with pytest.raises(ValueError, match="affinity"):
        detector.step(table, clients, experts, values, rescore={0: np.ones(3)})


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0.0, 1.0))
def test_shrink_rows_agrees_between_dense_and_lean(seed, factor):
    rng = np.random.default_rng(seed)
    n, e = 6, 5
    cfg = FitnessConfig(ema=0.6, decay=0.8, prune_below=0.0, lean_keep=e)
    dense, lean = DenseFitness(n, e, cfg), LeanFitness(n, e, cfg)
    affinity = rng.random((n, e)).astype(np.float32)
    for t in (dense, lean):
        t.cold_start(np.arange(n), affinity)
    for _ in range(3):
        pairs = rng.choice(n * e, size=8, replace=False)
        values = rng.random(8)
        for t in (dense, lean):
            t.update(pairs // e, pairs % e, values)
    rows = rng.choice(n, size=3, replace=False)
    before = dense.to_dense()
    for t in (dense, lean):
        t.shrink_rows(rows, factor)
    np.testing.assert_allclose(lean.to_dense(), dense.to_dense(), atol=1e-5)
    expected = before.copy()
    expected[rows] = dense.prior[rows, None] + factor * (before[rows] - dense.prior[rows, None])
    np.testing.assert_allclose(dense.to_dense(), expected, atol=1e-5)
    with pytest.raises(ValueError, match="factor"):
        dense.shrink_rows(rows, 1.5)
    with pytest.raises(ValueError, match="distinct"):
        lean.shrink_rows([0, 0], 0.5)


def test_state_round_trips_and_bad_state_is_refused():
    d = DriftDetector(5, DriftConfig(threshold=2.0))
    rng = np.random.default_rng(1)
    for _ in range(4):
        d.observe(np.arange(5), rng.random(5))
    e = DriftDetector(5, DriftConfig(threshold=2.0))
    e.load_state_dict(d.state_dict())
    for name in ("level", "spread", "count"):
        np.testing.assert_array_equal(getattr(e, name), getattr(d, name))
    surprise = rng.random(5) * 3
    assert e.observe(np.arange(5), surprise).tolist() == d.observe(np.arange(5), surprise).tolist()
    bad = {**d.state_dict(), "spread": -np.ones(5)}
    with pytest.raises(ValueError, match="spread"):
        e.load_state_dict(bad)
    with pytest.raises(ValueError, match="count"):
        e.load_state_dict({"level": np.zeros(5), "spread": np.zeros(5)})
