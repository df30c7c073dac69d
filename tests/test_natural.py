"""The natural format (fedmoe.natural): samples with their clients, dense (images or text) or as token
streams cut into windows on the fly (fedmoe.text); its errors; and ``[data] partition = "natural"``."""

from __future__ import annotations

import itertools
import re

import numpy as np
import pytest
import torch

from fedmoe.cli import main
from fedmoe.data import DataSpec, load_dataset, load_digits, partition
from fedmoe.federated import FederatedConfig, FederatedRun, partition_clients, run_experiment
from fedmoe.text import TokenWindows, stream_windows

VOCAB = np.array(list("abcdefgh"))
RNG = np.random.default_rng(0)
# three clients' streams (13, 6 and 9 tokens) and their test streams (5, 3 and 4 tokens); window 4
TOKENS = RNG.integers(0, 8, 28)
OFFSETS = np.array([0, 13, 19, 28])
TOKENS_TEST = RNG.integers(0, 8, 12)
OFFSETS_TEST = np.array([0, 5, 8, 12])
STREAMS = {"tokens": TOKENS.astype(np.uint8), "client_offsets": OFFSETS, "tokens_test": TOKENS_TEST,
           "client_offsets_test": OFFSETS_TEST, "vocab": VOCAB, "window": np.int64(4)}


def _windows(tokens, offsets, length):
    """Brute force: (windows, targets, client) of every stream, position by position."""
    x, y, c = [], [], []
    for client, (lo, hi) in enumerate(itertools.pairwise(offsets)):
        for s in range(lo, hi - length):
            x.append(tokens[s:s + length])
            y.append(tokens[s + length])
            c.append(client)
    return np.array(x).reshape(-1, length), np.array(y, dtype=np.int64), np.array(c, dtype=np.int64)


def _save(tmp_path, name="nat", **arrays) -> str:
    path = tmp_path / f"{name}.npz"
    np.savez(path, **arrays)
    return str(path)


# ---------------------------------------------------------------------------------------------- windows


def test_stream_windows_start_at_each_streams_first_token_and_target_the_next():
    windows, targets, client = stream_windows(TOKENS, OFFSETS, 4)
    x, y, c = _windows(TOKENS, OFFSETS, 4)
    assert windows.shape == (9 + 2 + 5, 4) == x.shape and len(windows) == 16
    np.testing.assert_array_equal(windows[:], x)
    np.testing.assert_array_equal(targets, y)
    np.testing.assert_array_equal(client, c)
    _, _, short = stream_windows(TOKENS[:4], np.array([0, 4]), 4)  # a stream of L tokens has no window
    assert short.size == 0


def test_token_windows_index_like_an_array_and_as_tensors_view_consecutive_rows():
    windows, _, _ = stream_windows(TOKENS, OFFSETS, 4)
    x, _, _ = _windows(TOKENS, OFFSETS, 4)
    for idx in (3, slice(2, 11), np.array([0, 15, 7]), x[:, 0] > 3, torch.tensor([5, 1])):
        rows = windows[idx]
        assert isinstance(rows, np.ndarray) and rows.dtype == np.int64
        np.testing.assert_array_equal(rows, x[idx.numpy() if isinstance(idx, torch.Tensor) else idx])
    tensors = windows.tensors()
    view, gathered = tensors[0:9], tensors[np.array([0, 15, 7])]
    assert view.dtype == torch.int64 and view.shape == (9, 4)
    assert view.untyped_storage().data_ptr() == torch.from_numpy(windows.tokens).untyped_storage().data_ptr()
    np.testing.assert_array_equal(view.numpy(), x[0:9])
    np.testing.assert_array_equal(gathered.numpy(), x[[0, 15, 7]])
    assert len(windows.select(slice(9, None))) == 7 and windows.select([3, 4, 5]).consecutive()
    assert not windows.select([3, 5]).consecutive()


# ---------------------------------------------------------------------------------------------- round trips


def test_token_streams_round_trip_as_lazy_windows_with_per_client_test_splits(tmp_path):
    data = load_dataset(_save(tmp_path, **STREAMS))
    x, y, c = _windows(TOKENS, OFFSETS, 4)
    xt, yt, ct = _windows(TOKENS_TEST, OFFSETS_TEST, 4)
    assert isinstance(data.x_train, TokenWindows) and isinstance(data.x_test, TokenWindows)
    np.testing.assert_array_equal(data.x_train[:], x)
    np.testing.assert_array_equal(data.y_train, y)
    np.testing.assert_array_equal(data.client_train, c)
    np.testing.assert_array_equal(data.client_test, ct)
    assert data.spec == DataSpec((4,), 8, tuple("abcdefgh")) and data.num_clients == 3
    parts = data.client_indices()
    assert [p.tolist() for p in parts] == [list(range(9)), [9, 10], list(range(11, 16))]
    config = FederatedConfig.from_dict({"data": {"source": "streams.npz", "partition": "natural"},
                                        "federation": {"num_clients": 3, "clients_per_round": 0}})
    assert [p.size for p in partition_clients(config, data)] == [9, 2, 5]
    client = data.train_samples(parts[2])  # one client's windows: an int64 tensor viewing the stream
    assert isinstance(client.inputs, torch.Tensor) and client.inputs.dtype == torch.int64
    np.testing.assert_array_equal(client.inputs.numpy(), x[11:])
    np.testing.assert_array_equal(client.targets.numpy(), y[11:])
    test = data.test_samples()  # scattered windows stay lazy and index into int64 tensors
    inputs, targets = test[0:len(test)]
    np.testing.assert_array_equal(inputs.numpy(), xt)
    np.testing.assert_array_equal(targets.numpy(), yt)
    assert [len(data.client_test_samples(k)) for k in range(3)] == [1, 0, 0]  # short test streams: none
    np.testing.assert_array_equal(data.client_test_samples(0).inputs.numpy(), TOKENS_TEST[None, :4])


def test_dense_text_round_trips_with_its_vocabulary_and_clients(tmp_path):
    x, y, c = _windows(TOKENS, OFFSETS, 4)
    xt, yt, ct = _windows(TOKENS_TEST, OFFSETS_TEST, 4)
    data = load_dataset(_save(tmp_path, x=x.astype(np.int32), y=y, client=c, x_test=xt, y_test=yt,
                              client_test=ct, vocab=VOCAB))
    assert data.x_train.dtype == np.int64 and data.input_shape == (4,)
    assert data.spec.vocab == tuple("abcdefgh") and data.num_classes == 8
    np.testing.assert_array_equal(data.x_train, x)
    samples = data.train_samples(data.client_indices()[1])
    assert samples.inputs.dtype == torch.int64 and samples.inputs.tolist() == x[9:11].tolist()
    assert len(data.client_test_samples(0)) == 1 and data.client_indices("test")[2].size == 0


def test_image_like_natural_files_are_standardised_images_with_clients(tmp_path):
    digits = load_digits()
    x, y = digits.x_train[:60, 0], digits.y_train[:60]
    client = np.arange(60) % 3
    data = load_dataset(_save(tmp_path, x=x[:45], y=y[:45], client=client[:45], x_test=x[45:], y_test=y[45:],
                              client_test=client[45:]))
    assert data.input_shape == (1, 8, 8) and data.spec.vocab is None and data.num_clients == 3
    assert abs(data.x_train.mean()) < 1e-5
    assert [p.tolist() for p in data.client_indices("test")] == [list(range(k, 15, 3)) for k in range(3)]


# ---------------------------------------------------------------------------------------------- errors

DENSE = {"x": np.zeros((4, 3), np.int64), "y": np.array([0, 1, 2, 3]), "client": np.array([0, 0, 1, 1]),
         "x_test": np.zeros((2, 3), np.int64), "y_test": np.array([1, 2]), "client_test": np.array([0, 1]),
         "vocab": VOCAB}


@pytest.mark.parametrize(("arrays", "error", "match"), [
    # ids out of range
    ({**DENSE, "client": np.array([0, 0, -1, 1])}, ValueError, "client holds client id -1, out of range"),
    ({**DENSE, "client": np.array([0, 0, 9, 1])}, ValueError, "client holds client id 9, out of range"),
    ({**DENSE, "client_test": np.array([0, 2])}, ValueError, "client_test holds client id 2, out of range"),
    # lengths that disagree
    ({**DENSE, "client": np.array([0, 0, 1])}, ValueError, "client must have 4 entries"),
    ({**DENSE, "y_test": np.array([1])}, ValueError, "y_test must have 2 entries"),
    ({**DENSE, "x_test": np.zeros((2, 5), np.int64)}, ValueError, "x_test windows have length 5, x has 3"),
    ({**STREAMS, "client_offsets_test": np.array([0, 5, 12])}, ValueError, "client_offsets_test has 3"),
    ({**STREAMS, "client_offsets": np.array([0, 13, 19, 27])}, ValueError, "client_offsets must run from 0"),
    ({**STREAMS, "client_offsets": np.array([0, 19, 13, 28])}, ValueError, "non-decreasing"),
    # tokens outside the vocabulary
    ({**DENSE, "x": np.full((4, 3), 8)}, ValueError, "x holds token id 8 .* outside the vocabulary of 8"),
    ({**DENSE, "y": np.array([0, 1, -2, 3])}, ValueError, "y holds token id -2"),
    ({**STREAMS, "tokens": np.r_[TOKENS[:-1], 99]}, ValueError, "tokens holds token id 99 .*flat index 27"),
    ({**STREAMS, "tokens_test": np.r_[TOKENS_TEST[:-1], 8]}, ValueError, "tokens_test holds token id 8"),
    # a client with no samples
    ({**DENSE, "client": np.array([0, 0, 2, 2])}, ValueError, "client 1 has no training samples"),
    ({**STREAMS, "client_offsets": np.array([0, 13, 17, 28])}, ValueError,
     "client 1 has no training samples: its stream in tokens has 4 tokens"),
    ({**STREAMS, "client_offsets_test": np.array([0, 4, 8, 12])}, ValueError, "tokens_test gives no test"),
    # the format itself
    ({k: v for k, v in DENSE.items() if k != "client_test"}, ValueError, r"missing \['client_test'\]"),
    ({k: v for k, v in STREAMS.items() if k != "window"}, ValueError, r"missing \['window'\]"),
    ({**STREAMS, "x": DENSE["x"]}, ValueError, "both 'x' and 'tokens'"),
    ({**DENSE, "vocab": np.arange(8)}, TypeError, "vocab must be a 1-D unicode array"),
    ({**DENSE, "vocab": np.array(list("abcdefga"))}, ValueError, "vocab symbols must be distinct"),
    ({**DENSE, "client": np.zeros(4)}, TypeError, "client must hold integers"),
    ({**STREAMS, "window": np.int64(0)}, ValueError, "window must be one integer >= 1"),
    ({**STREAMS, "window": np.array([4, 4])}, ValueError, "window must be one integer >= 1"),
])
def test_bad_natural_files_are_errors_naming_the_file_and_the_array(tmp_path, arrays, error, match):
    path = _save(tmp_path, "bad", **arrays)
    with pytest.raises(error, match=re.escape(path) + ": .*" + match):
        load_dataset(path)


def test_a_spec_vocab_is_one_symbol_per_class():
    assert DataSpec([4], 3, ["a", "b", "c"]).vocab == ("a", "b", "c")
    with pytest.raises(ValueError, match="vocab has 2 symbols but num_classes is 3"):
        DataSpec((4,), 3, ("a", "b"))
    with pytest.raises(ValueError, match="distinct"):
        DataSpec((4,), 2, ("a", "a"))


# ---------------------------------------------------------------------------------------------- federated


@pytest.fixture
def natural_digits(tmp_path) -> str:
    """240 training and 60 test digits of 3 clients, each client holding two classes."""
    digits = load_digits(seed=0)
    x = np.concatenate([digits.x_train[:, 0], digits.x_test[:, 0]])[:300]
    y = np.concatenate([digits.y_train, digits.y_test])[:300]
    client = y % 3  # classes 0, 3, 6, 9 -> client 0, ...
    return _save(tmp_path, "digits3", x=x[:240], y=y[:240], client=client[:240], x_test=x[240:],
                 y_test=y[240:], client_test=client[240:])


def test_a_natural_partition_federates_the_files_own_clients(natural_digits, one_thread):
    config = FederatedConfig.from_dict({
        "data": {"source": natural_digits, "partition": "natural"},
        "federation": {"num_clients": 3, "clients_per_round": 0, "rounds": 1, "deadline": "none"},
        "model": {"num_experts": 4, "d_model": 8, "d_hidden": 16, "channels": [4]},
        "alignment": {"max_experts": 2}})
    run = FederatedRun(config)
    y = run.dataset.y_train
    assert [set(np.unique(y[p] % 3)) for p in run.parts] == [{0}, {1}, {2}]
    assert [len(node.data) for node in run.nodes] == [p.size for p in run.dataset.client_indices()]
    result = run_experiment(config, dataset=run.dataset)
    assert result["clients"]["samples"] == [p.size for p in run.parts] and len(result["rounds"]) == 1
    with pytest.raises(ValueError, match=r"holds 3 clients; set federation.num_clients = 3 \(got 4\)"):
        FederatedRun(config.replace({"federation.num_clients": 4}))
    with pytest.raises(ValueError, match="'digits' has none"):
        FederatedRun(config.replace({"data.source": "digits"}))
    with pytest.raises(ValueError, match=r"Dataset\.client_indices"):
        partition(y, 3, "natural")


def test_the_command_names_a_client_count_that_disagrees_before_any_run(natural_digits, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--data", natural_digits, "--data.partition", "natural", "--out", str(tmp_path / "run")])
    assert exc.value.code == 2
    assert "--data: partition 'natural'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
