"""fedmoe.alignment: fitness, load, client profiles, desirability and the strategies."""

from __future__ import annotations

import numpy as np
import pytest

import fedmoe_kernels
from fedmoe.alignment import (
    STRATEGIES,
    AlignmentConfig,
    ClientProfile,
    DenseFitness,
    Desirability,
    DesirabilityConfig,
    ExpertLoad,
    FitnessConfig,
    LeanFitness,
    LoadConfig,
    ModelCost,
    ProfileConfig,
    RoundState,
    Tier,
    fitness_table,
    generate_profiles,
    gini,
    make_strategy,
    minmax,
    strategies,
)
from fedmoe.alignment._select import top_per_row
from fedmoe_kernels.assign import assign_linprog

MODEL = ModelCost(base_bytes=50e6, expert_bytes=10e6, base_flops=1e9, expert_flops=0.5e9)


def profiles_with_fit(fit, *, bandwidth=None, margin=0.2) -> ClientProfile:
    """Profiles whose ``experts_fit`` is exactly ``fit`` (int [N]; 0: not even one expert fits without
    the margin)."""
    fit = np.asarray(fit)
    n = fit.size
    memory = (MODEL.base_bytes + (fit + 0.5) * MODEL.expert_bytes) * np.where(fit > 0, 1 + margin, 1.0)
    return ClientProfile(
        compute=np.full(n, 1e12), memory=memory,
        bandwidth=np.full(n, 1e7) if bandwidth is None else bandwidth,
        latency=np.full(n, 0.05), reliability=np.full(n, 0.9), samples=np.arange(n) % 7 + 10.0,
        model=MODEL, config=ProfileConfig(safety_margin=margin))


def world(n=80, e=16, *, form="dense", seed=0, contested=False):
    """A cold-started fitness table, some load history and profiles with fits 0..6."""
    rng = np.random.default_rng(seed)
    fitness = fitness_table(n, e, FitnessConfig(lean_keep=e, prune_below=0.0), form=form)
    affinity = rng.random((n, e))
    if contested:  # everyone prefers the same few experts
        affinity[:, :3] += 2.0
    fitness.cold_start(np.arange(n), affinity)
    load = ExpertLoad(e)
    load.update(rng.integers(0, e, 40), rng.random(40) * 10)
    profiles = profiles_with_fit(rng.integers(0, 7, n), bandwidth=rng.uniform(2e6, 2e7, n))
    return fitness, load, profiles


def round_state(fitness, load, profiles, round_=0, *, seed=0, deadline=30.0, forbidden=True):
    rng = np.random.default_rng([seed, round_])
    n, e = fitness.num_clients, fitness.num_experts
    available = rng.choice(n, size=3 * n // 4, replace=False)
    pairs = (rng.integers(0, n, 3 * n), rng.integers(0, e, 3 * n)) if forbidden else None
    return RoundState(round_, available, fitness, load, profiles, deadline=deadline, forbidden=pairs)


# ---------------------------------------------------------------------------------------------- fitness


def test_dense_fitness_follows_the_update_rule():
    f = DenseFitness(3, 4, FitnessConfig(ema=0.6, decay=0.5, prior=0.1))
    f.update([0, 2], [1, 3], [1.0, -1.0])
    expected = np.full((3, 4), 0.1)
    expected[0, 1] = 0.6 * 0.1 + 0.4 * 1.0
    expected[2, 3] = 0.6 * 0.1 - 0.4
    np.testing.assert_allclose(f.to_dense(), expected, rtol=1e-6)
    f.update([0], [1], [2.0])  # trained again: EMA; the other pair decays towards the prior
    expected[0, 1] = 0.6 * expected[0, 1] + 0.4 * 2.0
    expected[2, 3] = 0.1 + 0.5 * (expected[2, 3] - 0.1)
    np.testing.assert_allclose(f.to_dense(), expected, rtol=1e-6)
    np.testing.assert_allclose(f.get([2, 0], [3, 1]), [expected[2, 3], expected[0, 1]], rtol=1e-6)
    assert f.round == 2


def test_cold_start_sets_rows_and_prior():
    rng = np.random.default_rng(1)
    aff = rng.random((2, 6))
    dense, lean = DenseFitness(4, 6), LeanFitness(4, 6, FitnessConfig(lean_keep=2))
    for f in (dense, lean):
        f.cold_start([3, 1], aff)
        np.testing.assert_allclose(f.prior[[3, 1]], aff.mean(axis=1), rtol=1e-6)
        assert np.all(f.to_dense()[[0, 2]] == 0)
    np.testing.assert_allclose(dense.to_dense()[[3, 1]], aff, rtol=1e-6)
    assert len(lean) == 4  # two best experts per client, the rest at the client's prior
    rows = lean.to_dense()[[3, 1]]
    top2 = np.argsort(-aff, axis=1)[:, :2]
    for r in range(2):
        np.testing.assert_allclose(rows[r, top2[r]], aff[r, top2[r]], rtol=1e-6)
        others = np.setdiff1d(np.arange(6), top2[r])
        np.testing.assert_allclose(rows[r, others], aff[r].mean(), rtol=1e-6)


def test_lean_fitness_matches_dense():
    rng = np.random.default_rng(2)
    n, e = 30, 9
    cfg = FitnessConfig(ema=0.7, decay=0.8, prior=0.2, lean_keep=e, prune_below=0.0)
    dense, lean = DenseFitness(n, e, cfg), LeanFitness(n, e, cfg)
    for step in range(12):
        if step in (0, 5):
            clients = rng.choice(n, 10, replace=False)
            aff = rng.standard_normal((10, e))
            dense.cold_start(clients, aff)
            lean.cold_start(clients, aff)
        keys = rng.choice(n * e, 40, replace=False)
        values = rng.standard_normal(40)
        for f in (dense, lean):
            f.update(keys // e, keys % e, values)
        np.testing.assert_allclose(lean.to_dense(), dense.to_dense(), rtol=1e-5, atol=1e-6)
    clients = rng.permutation(n)[:7]
    out = np.empty((7, e), np.float32)
    lean.fill(clients, out)
    np.testing.assert_allclose(out, dense.to_dense()[clients], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(lean.get(clients, clients % e), dense.get(clients, clients % e), rtol=1e-5)


def test_lean_fitness_forgets_pairs_that_decayed_to_the_prior():
    f = LeanFitness(5, 8, FitnessConfig(ema=0.5, decay=0.5, prune_below=1e-3))
    f.update([0, 1, 4], [2, 3, 7], [1.0, 1.0, 1.0])
    assert len(f) == 3
    for _ in range(5):
        f.update([4], [7], [1.0])
    assert len(f) == 3  # 0.5 * 0.5**5 is still above the threshold
    for _ in range(5):
        f.update([4], [7], [1.0])
    assert len(f) == 1 and f.get([4], [7])[0] > 0.99
    np.testing.assert_array_equal(f.to_dense()[:4], 0)


@pytest.mark.parametrize("form", ["dense", "lean"])
def test_fitness_state_round_trip(form):
    rng = np.random.default_rng(3)
    a, b = fitness_table(20, 6, form=form), fitness_table(20, 6, form=form)
    a.cold_start(np.arange(20), rng.random((20, 6)))
    a.update([1, 2], [3, 4], [5.0, 6.0])
    b.load_state_dict(a.state_dict())
    for f in (a, b):
        f.update([2, 7], [4, 0], [1.0, -1.0])
    np.testing.assert_array_equal(a.to_dense(), b.to_dense())
    assert b.round == a.round == 2
    other = fitness_table(20, 6, form="lean" if form == "dense" else "dense")
    with pytest.raises(ValueError, match="fitness table"):
        other.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="shape"):
        fitness_table(21, 6, form=form).load_state_dict(a.state_dict())
    broken = a.state_dict() | {"round": 9, ("keys" if form == "lean" else "values"): np.zeros((2, 2))}
    before = b.to_dense()
    with pytest.raises(ValueError, match=r"state\["):
        b.load_state_dict(broken)
    assert b.round == 2 and np.array_equal(b.to_dense(), before)  # nothing half-loaded


def test_fitness_rejects_bad_input():
    f = DenseFitness(4, 3)
    with pytest.raises(ValueError, match="repeat a pair"):
        f.update([1, 1], [2, 2], [0.0, 1.0])
    with pytest.raises(ValueError, match="experts"):
        f.update([1], [3], [0.0])
    with pytest.raises(ValueError, match="values"):
        f.update([1], [2], [np.nan])
    with pytest.raises(ValueError, match="values"):
        f.update([1, 2], [2, 0], [1.0])
    with pytest.raises(TypeError, match="clients"):
        f.update([1.5], [2], [1.0])
    with pytest.raises(ValueError, match="affinity"):
        f.cold_start([0], np.ones((1, 4)))
    with pytest.raises(ValueError, match="distinct"):
        f.cold_start([0, 0], np.ones((2, 3)))
    assert f.round == 0 and np.all(f.to_dense() == 0)  # nothing half-applied
    with pytest.raises(ValueError, match="ema"):
        FitnessConfig(ema=1.0)
    with pytest.raises(ValueError, match="decay"):
        FitnessConfig(decay=1.5)
    with pytest.raises(TypeError, match="lean_keep"):
        FitnessConfig(lean_keep=2.5)
    with pytest.raises(ValueError, match="form"):
        fitness_table(2, 2, form="sparse")


def test_fitness_table_picks_the_form_by_size():
    assert isinstance(fitness_table(100, 64), DenseFitness)
    assert isinstance(fitness_table(100_000, 4_096), LeanFitness)  # 1.6 GB dense: lean, and cheap to create


# ---------------------------------------------------------------------------------------------- load


def test_expert_load_update_and_stats():
    load = ExpertLoad(4, LoadConfig(decay=0.5, starved_after=2))
    load.update([0, 0, 1], [2.0, 4.0, 3.0])
    np.testing.assert_allclose(load.load, [6, 3, 0, 0])
    np.testing.assert_allclose(load.clients, [2, 1, 0, 0])
    load.update([1], [1.0])
    np.testing.assert_allclose(load.load, [3, 2.5, 0, 0])
    np.testing.assert_allclose(load.clients, [1, 1.5, 0, 0])
    stats = load.stats()
    mean = 5.5 / 4
    assert stats.cv == pytest.approx(np.std([3, 2.5, 0, 0]) / mean)
    assert stats.max_over_mean == pytest.approx(3 / mean)
    assert stats.gini == pytest.approx(gini(np.array([3, 2.5, 0, 0])))
    assert stats.never_trained == 2 and stats.starved == 0
    load.update([1], [1.0])
    assert load.stats().starved == 2  # experts 2 and 3: 3 rounds untrained > W = 2
    load.update([1], [1.0])
    assert load.stats().starved == 3  # expert 0: last trained 3 rounds ago


def test_gini_and_empty_stats():
    assert gini(np.array([0.0, 0.0, 0.0, 1.0])) == pytest.approx(0.75)
    assert gini(np.ones(5)) == pytest.approx(0.0)
    assert ExpertLoad(3).stats().as_dict() == {"cv": 0.0, "max_over_mean": 0.0, "gini": 0.0,
                                               "never_trained": 3, "starved": 0}


def test_expert_load_state_and_validation():
    a = ExpertLoad(3)
    a.update([0, 2], [1.0, 5.0])
    b = ExpertLoad(3)
    b.load_state_dict(a.state_dict())
    a.update([1], [2.0])
    b.update([1], [2.0])
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        np.testing.assert_array_equal(value, b.state_dict()[key])
    with pytest.raises(ValueError, match="contributions"):
        a.update([0], [-1.0])
    with pytest.raises(ValueError, match="experts"):
        a.update([3], [1.0])
    with pytest.raises(ValueError, match="decay"):
        LoadConfig(decay=0.0)
    with pytest.raises(ValueError, match="starved_after"):
        LoadConfig(starved_after=0)
    with pytest.raises(ValueError, match="load"):
        ExpertLoad(4).load_state_dict(a.state_dict())


# ---------------------------------------------------------------------------------------------- capacity


def test_profile_cost_model():
    p = profiles_with_fit(np.array([0, 1, 5]), bandwidth=np.array([1e6, 1e7, 1e8]))
    np.testing.assert_array_equal(p.experts_fit(), [0, 1, 5])
    work = p.samples / 1e12
    a = 2 * 0.05 + 2 * 50e6 / p.bandwidth + work * 1e9
    b = 2 * 10e6 / p.bandwidth + work * 0.5e9
    np.testing.assert_allclose(p.round_time(3), a + 3 * b)
    order = [2, 1, 0]
    np.testing.assert_allclose(p.round_time([0, 1, 2], clients=order), a[order] + [0, 1, 2] * b[order])
    for deadline in (50.0, 130.0, 500.0):
        k = p.experts_within(deadline)
        assert np.all((p.round_time(k) * 1.2 <= deadline) | (k == 0))  # k experts fit (or none do)
        assert np.all(p.round_time(k + 1) * 1.2 > deadline)  # k + 1 do not
    assert p.experts_within(50.0)[0] == 0  # even the shared model alone misses a 50 s deadline at 1 MB/s


@pytest.mark.parametrize("margin", [0.0, 0.5, 3.0, 100.0])
def test_safety_margin_never_shuts_out_a_client_that_holds_one_expert(margin):
    memory = MODEL.base_bytes + np.array([0.5, 1.0, 1.5, 2.0, 4.5, 40.0]) * MODEL.expert_bytes
    p = ClientProfile(compute=np.full(6, 1e12), memory=memory, bandwidth=np.full(6, 1e7),
                        latency=np.full(6, 0.05), reliability=np.full(6, 0.9), samples=np.full(6, 10.0),
                        model=MODEL, config=ProfileConfig(safety_margin=margin))
    bare = np.array([0, 1, 1, 2, 4, 40])
    margined = np.floor((memory / (1 + margin) - MODEL.base_bytes) / MODEL.expert_bytes).clip(0)
    np.testing.assert_array_equal(p.experts_fit(), np.maximum(margined, np.minimum(bare, 1)))
    assert p.experts_fit()[0] == 0 and np.all(p.experts_fit()[1:] >= 1)  # held one without the margin
    assert np.all(p.experts_fit() <= bare)  # the margin still only ever takes experts away


def test_profile_estimates_from_observed_rounds():
    p = profiles_with_fit(np.full(3, 4))
    before = p.experts_within(30.0)
    for _ in range(30):
        p.observe([0, 1], [2, 2], [2 * p.round_time(2, [0])[0] / p.time_scale[0], np.nan])
    assert p.time_scale[0] == pytest.approx(2.0, rel=1e-3)
    assert p.time_scale[1] == 1.0 and p.reliability_estimate[1] < 0.01
    assert p.reliability_estimate[0] == pytest.approx(1.0, abs=1e-3)
    assert p.experts_within(30.0)[0] < before[0] and p.experts_within(30.0)[2] == before[2]
    q = profiles_with_fit(np.full(3, 1))  # a checkpoint restores the reported profile and the estimates
    q.load_state_dict(p.state_dict())
    np.testing.assert_array_equal(q.round_time(1), p.round_time(1))
    np.testing.assert_array_equal(q.experts_fit(), p.experts_fit())
    np.testing.assert_array_equal(q.tier, -1)
    with pytest.raises(ValueError, match="bandwidth"):
        q.load_state_dict(p.state_dict() | {"bandwidth": np.zeros(3)})
    with pytest.raises(ValueError, match="seconds"):
        p.observe([0], [1], [-1.0])
    with pytest.raises(ValueError, match="distinct"):
        p.observe([0, 0], [1, 1], [1.0, 1.0])


def test_generate_profiles_tiers():
    a = generate_profiles(1000, seed=4)
    b = generate_profiles(1000, seed=4)
    np.testing.assert_array_equal(a.compute, b.compute)
    np.testing.assert_array_equal(np.bincount(a.tier), [200, 500, 300])
    fit = [np.median(a.experts_fit()[a.tier == t]) for t in range(3)]
    speed = [np.median(a.round_time(1)[a.tier == t]) for t in range(3)]
    assert fit[0] > fit[1] > fit[2] and speed[0] < speed[1] < speed[2]
    assert not np.array_equal(generate_profiles(1000, seed=5).compute, a.compute)
    tier = Tier("x", 0.5, compute=1e9, memory=1e9, bandwidth=1e6, latency=0.1, reliability=0.9, samples=10)
    with pytest.raises(ValueError, match="sum to 1"):
        generate_profiles(10, (tier,))
    with pytest.raises(ValueError, match="reliability"):
        Tier("x", 1.0, compute=1e9, memory=1e9, bandwidth=1e6, latency=0.1, reliability=1.5, samples=10)


def test_profile_validation():
    ok = dict(compute=[1e9], memory=[1e9], bandwidth=[1e6], latency=[0.1], reliability=[0.9], samples=[10])
    ClientProfile(**ok)
    for key, bad in (("bandwidth", [0.0]), ("reliability", [1.2]), ("memory", [-1.0]), ("latency", [np.inf]),
                     ("samples", [1.0, 2.0])):
        with pytest.raises(ValueError, match=key):
            ClientProfile(**{**ok, key: bad})
    with pytest.raises(ValueError, match="safety_margin"):
        ProfileConfig(safety_margin=-0.1)
    with pytest.raises(ValueError, match="expert_bytes"):
        ModelCost(expert_bytes=0)
    with pytest.raises(ValueError, match="deadline"):
        ClientProfile(**ok).experts_within(0.0)


# ---------------------------------------------------------------------------------------------- desirability


@pytest.mark.parametrize("form", ["lean", "dense"])
def test_desirability_formula(form):
    fitness, load, _ = world(n=50, e=16, form=form)
    cfg = DesirabilityConfig(alpha=2.0, beta=0.5, fairness=0.3, deadline=0.7)
    rng = np.random.default_rng(5)
    clients = rng.choice(50, 23, replace=False)
    deficit, pressure = rng.random(23), rng.random(23)
    out = Desirability(cfg).fill(np.empty((23, 16), np.float32), clients, fitness, load.load,
                                 deficit=deficit, pressure=pressure)
    f = fitness.to_dense()[clients].astype(np.float64)
    expected = (2.0 * (f - f.min()) / (f.max() - f.min()) - 0.5 * minmax(load.load)[None, :]
                + 0.3 * deficit[:, None] - 0.7 * pressure[:, None])
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert Desirability(cfg).fill(np.empty((0, 16), np.float32), clients[:0], fitness).shape == (0, 16)
    flat = Desirability().fill(np.empty((2, 16), np.float32), np.array([0, 1]), DenseFitness(2, 16))
    np.testing.assert_array_equal(flat, 0)  # constant fitness, no load: all zeros, not NaN


def test_desirability_config_validation():
    with pytest.raises(ValueError, match="alpha"):
        DesirabilityConfig(alpha=-1.0)
    with pytest.raises(ValueError, match="both"):
        DesirabilityConfig(alpha=0.0, beta=0.0)
    with pytest.raises(ValueError, match="fairness"):
        DesirabilityConfig(fairness=np.inf)
    with pytest.raises(TypeError, match="beta"):
        DesirabilityConfig(beta="1")


def test_top_per_row_selects_and_restores():
    rng = np.random.default_rng(6)
    for k_max in (3, 12):  # repeated-argmax path and argpartition path
        scores = rng.standard_normal((20, 16)).astype(np.float32)
        scores[0] = -np.inf
        scores[1, 5:] = -np.inf
        before = scores.copy()
        cap = rng.integers(0, k_max + 1, 20)
        rows, cols, values = top_per_row(scores, cap)
        np.testing.assert_array_equal(scores, before)
        for r in range(20):
            mine = cols[rows == r]
            finite = np.flatnonzero(np.isfinite(before[r]))
            want = finite[np.argsort(-before[r, finite], kind="stable")][: cap[r]]
            np.testing.assert_array_equal(mine, np.sort(want))
        np.testing.assert_array_equal(values, before[rows, cols])


# ---------------------------------------------------------------------------------------------- strategies


def check_invariants(result, state, config):
    n, e = state.fitness.num_clients, state.fitness.num_experts
    key = result.clients * e + result.experts
    assert np.all(np.diff(key) > 0)  # sorted by client then expert, no repeated pair
    assert np.all(np.isin(result.clients, state.available))
    np.testing.assert_array_equal(np.sort(result.scored_clients), state.available)
    forbidden = state.forbidden[0] * e + state.forbidden[1]
    assert not np.any(np.isin(key, forbidden))
    counts = np.bincount(result.clients, minlength=n)[result.scored_clients]
    assert np.all(counts <= result.experts_per_client)
    fit = state.profiles.experts_fit(result.scored_clients)
    assert np.all(result.experts_per_client <= np.minimum(fit, config.max_experts))
    if result.clients_per_expert is not None:
        assert np.all(np.bincount(result.experts, minlength=e) <= result.clients_per_expert)
    rows = np.searchsorted(np.sort(result.scored_clients), result.clients)
    rows = np.argsort(result.scored_clients)[rows]
    np.testing.assert_array_equal(result.pair_scores, result.scores[rows, result.experts])


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_strategy_invariants_and_determinism(name):
    config = AlignmentConfig(strategy=name, max_experts=3, desirability=DesirabilityConfig(fairness=1.0,
                                                                                           deadline=0.5))
    runs = []
    for _ in range(2):
        fitness, load, profiles = world()
        strategy = make_strategy(config, seed=11)
        results = []
        for r in range(3):
            state = round_state(fitness, load, profiles, r)
            result = strategy.assign(state)
            check_invariants(result, state, config)
            if name in ("optimal", "deadline-aware", "fair"):  # clients filled as far as capacities allow
                assert len(result) == assign_linprog(result.scores, result.experts_per_client,
                                                     result.clients_per_expert).clients.size
            results.append(result)
            fitness.update(result.clients, result.experts, np.ones(len(result)))
            load.update(result.experts, profiles.samples[result.clients])
        runs.append(results)
    for a, b in zip(*runs, strict=True):  # same seed, same results
        np.testing.assert_array_equal(a.clients, b.clients)
        np.testing.assert_array_equal(a.experts, b.experts)
    assert len(runs[0][0]) > 0


def test_greedy_takes_the_top_experts_by_fitness():
    fitness, load, profiles = world(form="lean")
    state = round_state(fitness, load, profiles, forbidden=False)
    result = make_strategy(AlignmentConfig(strategy="greedy", max_experts=3)).assign(state)
    f = fitness.to_dense()
    for client, cap in zip(result.scored_clients, result.experts_per_client, strict=True):
        want = np.sort(np.argsort(-f[client], kind="stable")[:cap])
        np.testing.assert_array_equal(result.experts_of(client), want)
    assert result.to_dict() == {c: result.experts_of(c).tolist() for c in np.unique(result.clients)}


def test_random_strategy_is_seeded_and_spreads_evenly():
    fitness, load, profiles = world(n=200, e=8)
    profiles = profiles_with_fit(np.full(200, 2))
    counts = np.zeros(8)
    strategy = make_strategy(AlignmentConfig(strategy="random", max_experts=2), seed=1)
    everyone = np.arange(200)
    first = [strategy.assign(RoundState(r, everyone, fitness, load, profiles)).experts for r in range(2)]
    assert not np.array_equal(*first)
    other = make_strategy(AlignmentConfig(strategy="random", max_experts=2), seed=2)
    assert not np.array_equal(other.assign(RoundState(0, np.arange(200), fitness, load, profiles)).experts,
                              first[0])
    for r in range(10):
        counts += np.bincount(strategy.assign(RoundState(r, np.arange(200), fitness, load, profiles)).experts,
                              minlength=8)
    assert counts.sum() == 4000 and np.abs(counts / 500 - 1).max() < 0.15


def test_load_balanced_without_load_weight_is_greedy():
    fitness, load, profiles = world(seed=3)
    state = round_state(fitness, load, profiles)
    greedy = make_strategy(AlignmentConfig(strategy="greedy")).assign(state)
    balanced = make_strategy(AlignmentConfig(strategy="load-balanced",
                                             desirability=DesirabilityConfig(beta=0.0)))
    result = balanced.assign(state)
    np.testing.assert_array_equal(result.clients, greedy.clients)
    np.testing.assert_array_equal(result.experts, greedy.experts)


def test_load_balanced_sequential_spreads_load_evenly():
    fitness, _, _ = world(n=90, e=10, contested=True)
    profiles = profiles_with_fit(np.full(90, 3))
    profiles.samples[:] = 1.0
    config = AlignmentConfig(strategy="load-balanced", max_experts=3, batch_size=1,
                            desirability=DesirabilityConfig(alpha=0.0, beta=1.0))
    result = make_strategy(config).assign(RoundState(0, np.arange(90), fitness, ExpertLoad(10), profiles))
    counts = np.bincount(result.experts, minlength=10)
    assert counts.sum() == 270 and counts.max() - counts.min() <= 1


def test_balancing_strategies_beat_greedy_on_a_contested_population():
    """With the load weight at 1, load-balanced and optimal even out a population that greedy piles onto a
    few experts; the default weight (0.2) trades part of that balance for fitness."""
    cv = {}
    for name, beta in (("greedy", 1.0), ("load-balanced", 1.0), ("optimal", 1.0), ("load-balanced", 0.2)):
        fitness, _, profiles = world(n=200, e=16, contested=True)
        load = ExpertLoad(16)
        strategy = make_strategy(AlignmentConfig(strategy=name, max_experts=2,
                                                 desirability=DesirabilityConfig(beta=beta)))
        for r in range(8):
            result = strategy.assign(RoundState(r, np.arange(200), fitness, load, profiles))
            fitness.update(result.clients, result.experts, np.full(len(result), 1.0))
            load.update(result.experts, profiles.samples[result.clients])
        cv[name, beta] = load.stats().cv
    assert cv["greedy", 1.0] > 1.0
    assert cv["load-balanced", 1.0] < 0.2 and cv["optimal", 1.0] < 0.2
    assert cv["load-balanced", 1.0] < cv["load-balanced", 0.2] < cv["greedy", 1.0]


def test_optimal_is_the_exact_optimum_of_its_scores():
    fitness, load, profiles = world(n=40, e=10)
    strategy = make_strategy(AlignmentConfig(strategy="optimal", max_experts=3, expert_slack=1.0))
    result = strategy.assign(round_state(fitness, load, profiles))
    reference = assign_linprog(result.scores, result.experts_per_client, result.clients_per_expert)
    assert len(result) == reference.clients.size
    assert float(result.pair_scores.astype(np.float64).sum()) == pytest.approx(reference.objective, abs=1e-4)
    total = int(result.experts_per_client.sum())
    np.testing.assert_array_equal(result.clients_per_expert, np.full(10, -(-total // 10)))


def test_optimal_warm_start_keeps_relative_prices(monkeypatch):
    """The next round's warm start is last round's prices shifted by the change of each expert's load term,
    then by one constant to a minimum of 0 (clipping would flatten every price the shift took below 0)."""
    seen, real = [], fedmoe_kernels.assign

    def spy(scores, c, u, warm_start=None, **kw):
        solution = real(scores, c, u, warm_start=warm_start, **kw)
        seen.append((warm_start, solution.certificate.expert_price))
        return solution

    monkeypatch.setattr(strategies.fedmoe_kernels, "assign", spy)
    fitness, load, profiles = world(n=60, e=8, contested=True)
    strategy = make_strategy(AlignmentConfig(strategy="optimal", max_experts=2))
    columns = []
    for r in range(3):
        columns.append(strategy.desirability.load_term(load.load))
        result = strategy.assign(round_state(fitness, load, profiles, r))
        load.update(result.experts, profiles.samples[result.clients])
    assert seen[0][0] is None
    for r in (1, 2):
        warm, (_, before) = seen[r][0], seen[r - 1]
        expected = before + columns[r - 1] - columns[r]
        assert warm.min() == 0.0
        np.testing.assert_allclose(warm - warm[0], expected - expected[0], atol=1e-6)


def test_deadline_aware_respects_the_deadline():
    fitness, load, profiles = world(n=120)
    state = round_state(fitness, load, profiles, deadline=25.0)
    result = make_strategy(AlignmentConfig(strategy="deadline-aware", max_experts=6)).assign(state)
    clients, counts = np.unique(result.clients, return_counts=True)
    assert np.all(profiles.round_time(counts, clients) * 1.2 <= 25.0)
    unconstrained = make_strategy(AlignmentConfig(strategy="optimal", max_experts=6)).assign(state)
    assert len(result) < len(unconstrained)
    with pytest.raises(ValueError, match="deadline"):
        make_strategy("deadline-aware").assign(round_state(fitness, load, profiles, deadline=None))


def test_fair_guarantees_a_share_of_participation():
    n, e, w = 12, 6, 6
    fitness, load, _ = world(n=n, e=e)
    bandwidth = np.where(np.arange(n) < 4, 1e6, 1e8)  # clients 0-3: even one expert misses the deadline
    profiles = profiles_with_fit(np.full(n, 3), bandwidth=bandwidth)
    deadline = 60.0
    assert np.all(profiles.experts_within(deadline, np.arange(4)) == 0)
    fair = make_strategy(AlignmentConfig(strategy="fair", min_share=0.5, window=w))
    aware = make_strategy(AlignmentConfig(strategy="deadline-aware"))
    took_part, aware_took_part = [], []
    for r in range(30):
        available = np.arange(n) if r % 5 else np.arange(2, n)  # clients 0 and 1 miss every fifth round
        state = RoundState(r, available, fitness, load, profiles, deadline=deadline)
        took_part.append(np.isin(np.arange(n), fair.assign(state).clients))
        aware_took_part.append(np.isin(np.arange(n), aware.assign(state).clients))
    took_part = np.array(took_part)
    assert not np.any(np.array(aware_took_part)[:, :4])
    for end in range(w, 31):  # every window: at least half of the rounds each slow client was available
        part = took_part[end - w:end, :4].sum(0)
        avail = np.array([[r % 5 != 0 or c >= 2 for c in range(4)] for r in range(end - w, end)]).sum(0)
        assert np.all(part >= np.floor(0.5 * avail))
    assert np.all(took_part[:, 4:])  # fast clients are never pushed out


def test_strategy_state_round_trip():
    for name in ("fair", "optimal"):
        fitness, load, profiles = world()
        a = make_strategy(AlignmentConfig(strategy=name, window=4))
        for r in range(3):
            a.assign(round_state(fitness, load, profiles, r))
        b = make_strategy(AlignmentConfig(strategy=name, window=4))
        b.load_state_dict(a.state_dict())
        state = round_state(fitness, load, profiles, 3)
        np.testing.assert_array_equal(a.assign(state).experts, b.assign(state).experts)
    with pytest.raises(ValueError, match="was_available"):
        make_strategy(AlignmentConfig(strategy="fair", window=5)).load_state_dict(a.state_dict() | {
            "was_available": np.zeros((4, 80), bool)})
    with pytest.raises(ValueError, match="no state"):
        make_strategy("greedy").load_state_dict({"prices": np.zeros(3)})


def test_lean_and_dense_fitness_give_the_same_assignment():
    results = []
    for form in ("dense", "lean"):
        fitness, load, profiles = world(form=form, seed=9)
        results.append(make_strategy("load-balanced").assign(round_state(fitness, load, profiles)))
    np.testing.assert_array_equal(results[0].experts, results[1].experts)
    np.testing.assert_allclose(results[0].scores, results[1].scores, atol=1e-6)


def test_bad_strategy_configuration_is_rejected():
    with pytest.raises(ValueError, match="strategy must be one of"):
        AlignmentConfig(strategy="best")
    with pytest.raises(ValueError, match="expert_slack"):
        AlignmentConfig(strategy="optimal", expert_slack=0.5)
    with pytest.raises(ValueError, match="min_share"):
        AlignmentConfig(strategy="fair", min_share=1.5)
    with pytest.raises(TypeError, match="max_experts"):
        AlignmentConfig(max_experts=2.0)
    with pytest.raises(ValueError, match="alpha"):
        make_strategy({"strategy": "optimal", "desirability": {"alpha": -1.0}})
    with pytest.raises(TypeError, match="unexpected keyword"):
        make_strategy({"strategy": "optimal", "gamma": 0.5})
    with pytest.raises(TypeError, match="config"):
        make_strategy(3)
    with pytest.raises(ValueError, match=r"config\.strategy"):
        STRATEGIES["greedy"](AlignmentConfig(strategy="random"))
    fair = make_strategy({"strategy": "fair", "desirability": {"fairness": 2.0}})
    assert fair.config.desirability == DesirabilityConfig(fairness=2.0)


def test_bad_round_state_is_rejected():
    fitness, load, profiles = world()
    with pytest.raises(ValueError, match="repeat"):
        RoundState(0, [1, 1], fitness, load, profiles)
    with pytest.raises(ValueError, match="available"):
        RoundState(0, [80], fitness, load, profiles)
    with pytest.raises(ValueError, match="deadline"):
        RoundState(0, [1], fitness, load, profiles, deadline=-1.0)
    with pytest.raises(ValueError, match="load has"):
        RoundState(0, [1], fitness, ExpertLoad(3), profiles)
    with pytest.raises(ValueError, match="profiles has"):
        RoundState(0, [1], fitness, load, profiles_with_fit(np.ones(3, int)))
    with pytest.raises(ValueError, match="forbidden"):
        RoundState(0, [1], fitness, load, profiles, forbidden=(np.array([1]), np.array([1, 2])))
    with pytest.raises(TypeError, match="fitness"):
        RoundState(0, [1], None, load, profiles)
    with pytest.raises(TypeError, match="state"):
        make_strategy("greedy").assign(None)
