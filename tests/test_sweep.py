"""Sensitivity sweeps: axis parsing, the grid run over seeds, its table and heatmaps, and ``fedmoe sweep``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedmoe.cli import main
from fedmoe.federated import FederatedConfig
from fedmoe.federated.sweep import METRICS, Axis, format_sweep, parse_axis, run_sweep
from fedmoe.plots import plot_sweep

TINY = FederatedConfig().replace({"federation.num_clients": 4, "federation.clients_per_round": 3,
                                  "federation.rounds": 2, "model.num_experts": 4, "model.d_model": 8,
                                  "model.d_hidden": 16, "model.channels": (4,), "alignment.max_experts": 2,
                                  "data.dirichlet_alpha": 1.0, "federation.deadline": None,
                                  "simulation.dropout": False})


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)



def test_parse_axis_types_values_and_joins_options():
    axis = parse_axis("fitness.ema=0.7,0.9,0.99")
    assert axis == Axis(("fitness.ema",), ((0.7,), (0.9,), (0.99,)))
    joint = parse_axis("alignment.desirability.alpha/alignment.desirability.beta=0.3/0.7, 0.7/0.3")
    assert joint.label == "alignment.desirability.alpha/alignment.desirability.beta"
    assert joint.values == ((0.3, 0.7), (0.7, 0.3))
    assert joint.format(joint.values[0]) == "0.3/0.7"
    assert parse_axis("fitness.cold_start=true,false").values == ((True,), (False,))
    assert parse_axis("alignment.strategy=greedy,random").values == (("greedy",), ("random",))


@pytest.mark.parametrize(("text", "match"), [
    ("fitness.ema", "name=v1"), ("fitness.emaa=0.7", "fitness.emaa"), ("federation.seed=1,2", "seed"),
    ("federation.rounds=2.5", "rounds"), ("fitness.ema/load.decay=0.3", "2 part"),
    ("train.lr=0.1,0.1", "repeats"),
    ("fitness.ema/fitness.ema=1/2", "twice"), ("fitness.cold_start=yes", "cold_start"),
    ("model.channels=4,8", "model.channels")])
def test_parse_axis_names_what_is_wrong(text, match):
    with pytest.raises(ValueError, match=match):
        parse_axis(text)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.floats(0.0, 0.99, allow_nan=False).map(lambda v: round(v, 3)), min_size=1, max_size=6,
                unique=True))
def test_parse_axis_round_trips_any_float_values(values):
    axis = parse_axis("fitness.ema=" + ",".join(repr(v) for v in values))
    assert [v for (v,) in axis.values] == values


def test_run_sweep_checks_every_point_before_running(tmp_path):
    with pytest.raises(ValueError, match=r"fitness.ema.*1\.0"):
        run_sweep(TINY, [parse_axis("fitness.ema=0.5,1.0")], [0], tmp_path, progress=False)
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ValueError, match="twice"):
        run_sweep(TINY, [parse_axis("train.lr=0.1"), parse_axis("train.lr/train.momentum=0.2/0.5")], [0],
                  tmp_path, progress=False)


def test_fedmoe_sweep_runs_a_grid_over_seeds_and_writes_table_and_heatmaps(small_npz, tmp_path, capsys):
    out = tmp_path / "sweep"
    weights = "alignment.desirability.alpha/alignment.desirability.beta"
    args = ["sweep", "--data", small_npz, "--federation.num_clients", "4",
            "--federation.clients_per_round", "2",
            "--rounds", "1", "--num-experts", "4", "--model.d_model", "8", "--model.d_hidden", "16",
            "--model.channels", "4", "--alignment.max_experts", "2", "--federation.deadline", "none",
            "--grid",
            "fitness.ema=0.99", "--grid", f"{weights}=0.3/0.7,0.7/0.3", "--seeds", "2", "--workers", "1",
            "--quiet", "--out", str(out)]
    main(args)
    summary = json.loads((out / "sweep.json").read_text())
    assert [a["label"] for a in summary["axes"]] == ["fitness.ema", weights]
    assert len(summary["points"]) == 2 and summary["seeds"] == [0, 1]
    for point in summary["points"]:
        for metric in METRICS:
            assert len(point[metric]["values"]) == 2
    assert [p["values"] for p in summary["points"]] == [
        {"fitness.ema": "0.99", weights: "0.3/0.7"}, {"fitness.ema": "0.99", weights: "0.7/0.3"}]
    assert len(list((out / "runs").glob("*.json"))) == 4
    printed = capsys.readouterr().out
    assert printed.count("0.3/0.7") == 1 and (out / "table.txt").read_text().strip() in printed
    for metric in METRICS:
        assert (out / f"heatmap_{metric}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    main([*args, "--resume"])  # every run is kept: nothing reruns, same summary
    assert json.loads((out / "sweep.json").read_text()) == summary
    with pytest.raises(SystemExit):
        main([*args[:-2], "--grid", "fitness.ema=2.0", "--out", str(tmp_path / "bad")])
    assert "fitness.ema" in capsys.readouterr().err


def test_a_failing_run_is_named_with_its_grid_point_not_blamed_on_grid(small_npz, tmp_path, capsys):
    # before: "fedmoe: error: --grid: num_clients=4 with min_samples=200 needs more than the 320 samples"
    args = ["sweep", "--data", small_npz, "--federation.num_clients", "4", "--federation.clients_per_round",
            "2", "--rounds", "1", "--num-experts", "4", "--model.d_model", "8", "--model.d_hidden", "16",
            "--model.channels", "4", "--alignment.max_experts", "2", "--seeds", "1", "--quiet",
            "--grid", "data.min_samples=200,8"]
    for workers in ("1", "2"):
        with pytest.raises(SystemExit) as exc:
            main([*args, "--workers", workers, "--out", str(tmp_path / workers)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err and "--grid" not in err
        assert err.strip().splitlines()[-1] == (
            "fedmoe: error: run point000-seed0 (grid point {'data.min_samples': 200}): num_clients=4 with "
            "min_samples=200 needs more than the 320 samples")


def _summary(shape: tuple[int, ...], seeds: int = 2) -> dict:
    rng = np.random.default_rng(0)
    axes = [{"label": f"a{i}", "names": [f"a{i}"], "values": [str(v) for v in range(n)]}
            for i, n in enumerate(shape)]

    def values(metric: str) -> list:  # the first seed never reaches the target
        return [None if metric == "rounds_to_target" and s == 0 else float(rng.random())
                for s in range(seeds)]

    points = [{"values": {}, **{m: {"values": values(m)} for m in METRICS}}
              for _ in range(int(np.prod(shape)))]
    return {"base": {"federation": {"rounds": 10}}, "seeds": list(range(seeds)), "axes": axes,
            "points": points}


@pytest.mark.parametrize("shape", [(3,), (2, 3), (3, 2, 2)])
def test_plot_sweep_draws_one_panel_per_pair_of_axes(tmp_path, shape):
    path = plot_sweep(_summary(shape), "rounds_to_target", tmp_path / "h.png")
    assert Path(path).read_bytes()[:4] == b"\x89PNG"


def test_format_sweep_puts_the_best_point_first():
    summary = _summary((3,))
    for i, p in enumerate(summary["points"]):
        p["values"] = {"a0": str(i)}
        p["final_accuracy"] = {"values": [0.1 * i], "mean": 0.1 * i, "std": 0.0, "min": 0.1 * i}
        for m in ("last5_accuracy", "load_cv", "rounds_to_target"):
            p[m] = {"values": [None], "mean": None, "std": 0.0, "min": None}
    lines = format_sweep(summary).splitlines()
    assert lines[2].startswith("2") and lines[-1].startswith("0") and "(0/1)" in lines[2]
