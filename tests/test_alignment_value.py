"""benchmarks/alignment_value.py (docs/experiments/alignment-value.md): which arms run where, and the paired
differences its verdict rests on."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import alignment_value as av

from fedmoe.federated import FederatedConfig

sys.path.pop(0)


def test_the_ablations_change_only_the_remedies_they_name():
    keys = set(av.REMEDIES)
    assert set(av.PLAIN) == set(av.ROUTE_ONLY) == set(av.FULL_LOAD) == keys
    assert {k for k in keys if av.ROUTE_ONLY[k] != av.PLAIN[k]} == {"train.route_loss"}
    assert {k for k in keys if av.FULL_LOAD[k] != av.REMEDIES[k]} == {"alignment.desirability.beta"}
    defaults = FederatedConfig().to_dict()  # the library's defaults are the remedies
    for key, value in av.REMEDIES.items():
        section, *rest = key.split(".")
        node = defaults[section]
        for part in rest[:-1]:
            node = node[part]
        assert node[rest[-1]] == value, key


def test_arms_per_setting():
    digits = av.settings(None, 50)["a0.1-e32-weak"]
    with_ablation = av.arms("a0.1-e32-weak", digits, True)
    without = av.arms("a0.1-e32-weak", digits, False)
    ablations = {f"{s}-{v}" for s in av.STRATEGIES for v in ("plain", "route-only")}
    assert set(with_ablation) - set(without) == ablations and ablations.isdisjoint(without)
    full_load = {a for a in without if a.endswith("-full-load")}
    assert full_load == {"load-balanced-full-load", "optimal-full-load"}
    assert without["oracle"][1] == "oracle" and without["shared-expert"][1] == "shared-expert"
    dense = without["dense"][0]  # one expert as wide as the experts a client downloads
    assert dense["model.num_experts"] == 1 and dense["alignment.max_experts"] == 1
    assert dense["model.d_hidden"] == FederatedConfig().model.d_hidden * digits["alignment.max_experts"]
    for changes, _ in without.values():
        FederatedConfig().replace({**digits, **changes})  # every arm is a valid configuration


def _run(accuracy: list[float], aligned: float | None = None) -> dict:
    evaluation = {} if aligned is None else {"aligned": {"mean": aligned}}
    return {"rounds": [{"accuracy": a, "accepted": [0, 1]} for a in accuracy], "bytes_sent": 2e6,
            "bytes_received": 2e6, "client_evaluation": evaluation}


def test_summary_pairs_each_seed_with_the_references_own_seed():
    random = [_run([0.1] * 5 + [0.5] * 5, 0.6), _run([0.1] * 5 + [0.7] * 5, 0.8)]
    greedy = [_run([0.1] * 5 + [0.6] * 5, 0.5), _run([0.1] * 5 + [0.6] * 5, None)]
    arm = [_run([0.2] * 5 + [0.6] * 5, 0.7), _run([0.9] * 10, 0.9)]  # +0.1 and +0.2 on random, per seed
    row = av.summary(arm, {"random": random, "greedy": greedy}, target=0.55)
    assert row["final"] == pytest.approx([0.75, 0.2121320])
    assert row["vs_random"]["final"] == pytest.approx([0.15, 0.0707107])
    assert row["vs_greedy"]["final"] == pytest.approx([0.15, 0.2121320])
    assert row["vs_random"]["personal_aligned"] == pytest.approx([0.1, 0.0], abs=1e-12)
    assert row["vs_greedy"]["personal_aligned"] == pytest.approx([0.2, 0.0])  # greedy's seed 1 has none
    assert row["rounds_to_target"] == [6, 1]
    assert row["mb_per_client_round"] == pytest.approx([0.2, 0.0])  # 4 MB over 10 rounds x 2 clients


def test_ablations_pair_each_variant_by_seed_and_skip_those_that_did_not_run():
    runs = {"greedy": [_run([0.9] * 5), _run([0.8] * 5)],
            "greedy-route-only": [_run([0.7] * 5), _run([0.7] * 5)],
            "greedy-plain": [_run([0.5] * 5), _run([0.6] * 5)], "random": [_run([0.5] * 5)] * 2}
    out = av.ablations(runs)
    assert set(out) == {"greedy"} and set(out["greedy"]) == {"route-only - plain", "remedies - route-only"}
    assert out["greedy"]["route-only - plain"] == pytest.approx([0.15, 0.0707107])
    assert out["greedy"]["remedies - route-only"] == pytest.approx([0.15, 0.0707107])
