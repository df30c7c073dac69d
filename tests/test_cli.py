"""The ``fedmoe`` command: run, compare, TOML configs, errors, and resuming a killed run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmoe.cli import main
from fedmoe.federated import FederationConfig, load_checkpoint
from fedmoe.federated.compare import write_json
from fedmoe.models import ModelConfig

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--num-experts", "4", "--model.d_model", "8", "--model.d_hidden", "16", "--model.channels", "4",
         "--alignment.max_experts", "2", "--quiet"]
# the killed process sleeps in round 2 (after the checkpoint of rounds 0 and 1) until it is killed
SLEEP_IN_ROUND_2 = """
import sys, time
from fedmoe.cli import main
from fedmoe.federated.runner import FederatedRun
step = FederatedRun.step
def step_or_sleep(self):
    if self.server.round == 2:
        time.sleep(600)
    return step(self)
FederatedRun.step = step_or_sleep
main(sys.argv[1:])
"""



@pytest.fixture
def tiny(small_npz) -> list[str]:
    return ["--data", small_npz, "--federation.num_clients", "4", "--federation.clients_per_round", "3",
            *MODEL]


@pytest.fixture(autouse=True)
def _restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "wall_seconds"}


def test_run_writes_a_results_json_with_config_and_rounds_and_plots(tmp_path, capsys, tiny, small_npz):
    out = tmp_path / "run"
    main(["run", "--out", str(out), "--rounds", "2", "--federation.deadline", "none",
          "--no-fitness.cold_start", *tiny])
    result = json.loads((out / "result.json").read_text())
    config = result["config"]
    assert config["federation"]["rounds"] == 2 and config["federation"]["deadline"] == "none"
    assert config["model"]["channels"] == [4]
    assert config["fitness"]["cold_start"] is False and config["data"]["source"] == small_npz
    assert result["dataset"] == {"name": "digits400", "train": 320, "test": 80, "classes": 10,
                                 "input_shape": [1, 8, 8]}
    assert len(result["rounds"]) == 2
    for key in ("accuracy", "loss", "load_cv", "bytes_sent", "bytes_received", "sim_time", "load",
                "expert_samples", "accepted", "dropped", "late", "invalid"):
        assert key in result["rounds"][0]
    assert result["rounds"][1]["sim_time"] >= result["rounds"][0]["sim_time"] > 0
    assert result["bytes_sent"] == sum(r["bytes_sent"] for r in result["rounds"]) > 0
    assert _is_png(out / "accuracy.png") and _is_png(out / "load_heatmap.png")
    assert len(load_checkpoint(out / "checkpoint.pt")["history"]) == 2
    assert "final accuracy" in capsys.readouterr().out


def test_toml_config_with_flags_on_top(tmp_path, tiny):
    toml = tmp_path / "exp.toml"
    toml.write_text('[federation]\nrounds = 1\ndeadline = "none"\n[train]\nlr = 0.02\n'
                    '[model]\nchannels = [4]\n'
                    '[alignment]\nstrategy = "greedy"\n')
    main(["run", "--config", str(toml), "--rounds", "2", "--out", str(tmp_path / "o"), *tiny])
    config = json.loads((tmp_path / "o" / "result.json").read_text())["config"]
    assert config["federation"]["rounds"] == 2 and config["train"]["lr"] == 0.02
    assert config["alignment"]["strategy"] == "greedy" and config["federation"]["deadline"] == "none"


def test_a_fair_toml_runs_and_its_results_show_strategy_and_fairness(tmp_path, tiny):
    toml = tmp_path / "fair.toml"
    toml.write_text('[alignment]\nstrategy = "fair"\n\n[alignment.desirability]\nfairness = 0.5\n')
    main(["run", "--config", str(toml), "--rounds", "1", "--out", str(tmp_path / "o"), *tiny])
    result = json.loads((tmp_path / "o" / "result.json").read_text())
    assert result["config"]["alignment"]["strategy"] == "fair"
    assert result["config"]["alignment"]["desirability"]["fairness"] == 0.5
    assert len(result["rounds"]) == 1


def test_every_option_has_a_dotted_flag_and_the_everyday_ones_a_short_one(tmp_path):
    out = tmp_path / "o"
    main(["run", "--out", str(out), "--rounds", "1", "--alignment.desirability.fairness", "0.25",
          "--alignment.strategy", "fair", "--federation.num_clients", "4",
          "--federation.clients_per_round", "0",
          "--drift.threshold", "1", "--drift.rescore", "--alignment.window", "3", *MODEL])
    config = json.loads((out / "result.json").read_text())["config"]
    assert config["alignment"]["desirability"]["fairness"] == 0.25 and config["alignment"]["window"] == 3
    assert config["drift"]["rescore"] is True and config["alignment"]["strategy"] == "fair"


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "--rounds", "abc"], "--rounds"),
        (["run", "--federation.rounds", "abc"], "federation.rounds must be an int"),
        (["run", "--drift.rescore"], "rescore needs the drift detector"),
        (["run", "--federation.clients_per_round", "30"], "clients_per_round"),
        (["run", "--data.dirichlet_alpha", "-1"], "dirichlet_alpha"),
        (["run", "--data", "/nonexistent.npz"], "--data"),
        (["compare", "--strategies", "random,nope"], "strategy"),
        (["compare", "--strategies", "random,random"], "--strategies"),
        (["compare", "--seeds", "0"], "--seeds"),
        (["compare", "--seed", "3"], "--seed"),  # compare sets seeds with --seeds
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_the_option(tmp_path, capsys, argv, needle):
    argv = [*argv, "--out", str(tmp_path)] if argv[0] in ("run", "compare") else argv
    assert needle in _error(argv, capsys)


def test_unknown_toml_keys_are_named(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("[federation]\nrounds = 1\nbogus = 3\n")
    with pytest.raises(SystemExit):
        main(["run", "--config", str(toml), "--out", str(tmp_path)])
    assert "['bogus'] in [federation]" in capsys.readouterr().err
    toml.write_text("rounds = 1\n")
    with pytest.raises(SystemExit):
        main(["run", "--config", str(toml), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert "unknown section ['rounds']" in err and "'federation'" in err


def test_compare_writes_a_summary_per_strategy_on_shared_partitions(tmp_path, capsys, tiny):
    out = tmp_path / "cmp"
    argv = ["compare", "--strategies", "random,greedy", "--seeds", "2", "--rounds", "2", "--out", str(out),
            "--evaluation.target_accuracy", "0.0", "--workers", "2", *tiny]
    main(argv)
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary) == ["random", "greedy"]
    runs = {(s, seed): json.loads((out / "runs" / f"{s}-seed{seed}.json").read_text())
            for s in summary for seed in (0, 1)}
    for s, entry in summary.items():
        assert entry["final_accuracy"] == [runs[s, seed]["final_accuracy"] for seed in (0, 1)]
        assert entry["rounds_to_target"] == [1, 1]  # a target of 0 is reached in round 1
        assert entry["seeds"] == [0, 1]
    for seed in (0, 1):  # same seed: same partition and profiles for every strategy
        assert runs["random", seed]["clients"] == runs["greedy", seed]["clients"]
        assert runs["random", seed]["config"]["alignment"]["strategy"] == "random"
    assert runs["random", 0]["clients"]["samples"] != runs["random", 1]["clients"]["samples"]
    assert _is_png(out / "accuracy.png") and _is_png(out / "load_heatmap.png")
    table = capsys.readouterr().out
    assert "random" in table and "greedy" in table and "rounds to 0" in table

    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")}
    main([*argv, "--resume", "--workers", "1"])  # finished runs with the same config are kept
    assert {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*.json")} == stamps
    main(["compare", "--strategies", "random", "--seeds", "1", "--rounds", "2", "--out", str(out / "never"),
          "--evaluation.target_accuracy", "1.0", "--workers", "1", *tiny])
    assert json.loads((out / "never" / "summary.json").read_text())["random"]["rounds_to_target"] == [None]


def test_a_killed_run_resumes_to_the_same_result(tmp_path, tiny):
    args = ["run", "--rounds", "4", "--simulation.dropout", "--federation.deadline", "3", "--strategy",
            "optimal",
            *tiny]
    main([*args, "--out", str(tmp_path / "whole")])
    whole = json.loads((tmp_path / "whole" / "result.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-c", SLEEP_IN_ROUND_2, *args, "--out", str(out)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            ck = out / "checkpoint.pt"
            if ck.exists() and len(load_checkpoint(ck)["history"]) == 2:
                break
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert len(load_checkpoint(out / "checkpoint.pt")["history"]) == 2
    assert not (out / "result.json").exists()
    main([*args, "--out", str(out), "--resume"])
    assert _strip(json.loads((out / "result.json").read_text())) == _strip(whole)


def _error(argv: list[str], capsys) -> str:
    """The message of a command that must fail argparse-style: exit status 2, one ``fedmoe: error:`` line,
    no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("fedmoe: error: ")
    return last.removeprefix("fedmoe: error: ")


def _no_runs(monkeypatch) -> None:
    def never(*args, **kwargs):
        raise AssertionError("a run started")
    monkeypatch.setattr("fedmoe.cli.run_to_file", never)
    monkeypatch.setattr("fedmoe.federated.compare.run_to_file", never)


def test_an_unusable_out_directory_fails_before_any_run(tmp_path, capsys, monkeypatch, tiny):
    # before: a file as --out failed after round 1 (the checkpoint), or at the very end
    _no_runs(monkeypatch)
    (tmp_path / "file").touch()
    (tmp_path / "cmp").mkdir()
    (tmp_path / "cmp" / "runs").touch()
    cases = [(["run", "--out", str(tmp_path / "file")], f"--out {tmp_path / 'file'} is not a writable"),
             (["run", "--out", str(tmp_path / "file" / "sub")], "file/sub is not a writable directory"),
             (["compare", "--out", str(tmp_path / "cmp")], f"{tmp_path / 'cmp' / 'runs'} is not a writable"),
             (["sweep", "--grid", "train.lr=0.1", "--out", str(tmp_path / "file")], "is not a writable")]
    if Path("/sys").is_dir():  # not writable even by root
        cases.append((["run", "--out", "/sys"], "--out /sys is not a writable directory"))
    for argv, message in cases:
        assert message in _error([*argv, "--rounds", "1", *tiny], capsys)


def test_write_json_leaves_no_temporary_file_when_it_fails(tmp_path):
    (tmp_path / "result.json").mkdir()  # os.replace cannot put a file there
    with pytest.raises(OSError):
        write_json(tmp_path / "result.json", {"a": 1})
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_bad_data_files_are_command_line_errors_naming_the_file(tmp_path, capsys, monkeypatch):
    _no_runs(monkeypatch)
    (tmp_path / "renamed.npz").write_text("x,y\n1,2\n")
    np.savez(tmp_path / "labels.npz", x=np.zeros((20, 3)), y=np.r_[np.arange(19) % 2, 10**9])
    assert _error(["run", "--data", str(tmp_path / "renamed.npz"), "--out", str(tmp_path / "o")], capsys) == \
        f"--data: {tmp_path / 'renamed.npz'} is not an .npz file (a zip archive of .npy arrays)"
    assert f"labels.npz: y must be class indices below MAX_CLASSES = 100000, got {10**9}" in \
        _error(["compare", "--data", str(tmp_path / "labels.npz"), "--out", str(tmp_path / "o")], capsys)


def test_out_of_range_options_and_a_non_utf8_config_are_named(tmp_path, capsys, monkeypatch):
    _no_runs(monkeypatch)
    out = ["--out", str(tmp_path / "o")]
    # before: a traceback from torch.manual_seed ("Overflow when unpacking long long"), and from route in
    # the first forward pass
    assert "federation: seed must be < 2**64" in _error(["run", "--seed", str(2**64), *out], capsys)
    assert "model: num_experts must be at most 4096, got 4097" in \
        _error(["run", "--num-experts", "4097", *out], capsys)
    with pytest.raises(ValueError, match="seed must be < 2"):
        FederationConfig(seed=2**64)
    FederationConfig(seed=2**64 - 1)
    with pytest.raises(ValueError, match="num_experts must be at most 4096"):
        ModelConfig(num_experts=4097)
    # before: "bad experiment option: 'utf-8' codec can't decode ..."
    toml = tmp_path / "latin1.toml"
    toml.write_bytes("[train]\n# débit\nlr = 0.1\n".encode("latin-1"))
    assert _error(["run", "--config", str(toml), *out], capsys) == \
        f"--config {toml}: not UTF-8 text (invalid continuation byte at byte 11)"
