"""fedmoe.data: the loaders (digits, .npz, CIFAR-10 python format) and the client partitions."""

from __future__ import annotations

import io
import pickle
import re
import zipfile

import numpy as np
import pytest

from fedmoe.data import MAX_CLASSES, DataSpec, load_cifar10, load_dataset, load_digits, load_npz, partition

# ---------------------------------------------------------------------------------------------- loaders


def test_digits_are_standardised_images_with_a_disjoint_seeded_split():
    a, b, c = load_digits(seed=0), load_digits(seed=0), load_digits(seed=1)
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    assert a.x_train.dtype == np.float32 and a.y_train.dtype == np.int64
    assert len(a.y_train) + len(a.y_test) == 1797 and len(a.y_test) == round(0.2 * 1797)
    assert abs(a.x_train.mean()) < 1e-5 and abs(a.x_train.std() - 1) < 1e-4
    np.testing.assert_array_equal(a.x_test, b.x_test)
    assert not np.array_equal(a.y_test, c.y_test)
    # no test image appears in the training set
    train_rows = {row.tobytes() for row in a.x_train.reshape(len(a.x_train), -1)}
    assert sum(row.tobytes() in train_rows for row in a.x_test.reshape(len(a.x_test), -1)) < 5  # duplicates


def test_npz_flat_features_become_one_row_images_and_keep_the_given_test_set(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.normal(3, 2, (50, 7)), rng.integers(0, 3, 50)
    xt, yt = rng.normal(3, 2, (10, 7)), rng.integers(0, 3, 10)
    np.savez(tmp_path / "flat.npz", x=x, y=y, x_test=xt, y_test=yt)
    data = load_dataset(str(tmp_path / "flat.npz"))
    assert data.name == "flat" and data.input_shape == (1, 1, 7) and data.num_classes == 3
    mean, std = x.mean(), x.std()  # one channel: one mean and std over all features
    np.testing.assert_allclose(data.x_test[:, 0, 0], (xt - mean) / std, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(data.y_test, yt)


def test_npz_channels_last_images_are_transposed_and_split_when_no_test_set(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (40, 5, 6, 3)).astype(np.uint8)
    np.savez(tmp_path / "img.npz", x=x, y=np.arange(40) % 4)
    data = load_npz(tmp_path / "img.npz", test_fraction=0.25, seed=3)
    assert data.input_shape == (3, 5, 6) and len(data.y_test) == 10 and len(data.y_train) == 30
    # channel 2 of the training images, standardised with its own training mean and std
    train = x.transpose(0, 3, 1, 2).astype(np.float64)[np.random.default_rng(3).permutation(40)[10:], 2]
    expected = (train - train.mean()) / train.std()
    np.testing.assert_allclose(data.x_train[:, 2], expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("arrays", "error", "match"),
    [
        ({"x": np.zeros((4, 3))}, ValueError, "'y'"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, int), "x_test": np.zeros((2, 3))}, ValueError, "y_test"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4)}, TypeError, "y must hold integer"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(5, int)}, ValueError, "y must be 1-D with 4"),
        ({"x": np.zeros((4, 3)), "y": np.array([0, 1, -1, 0])}, ValueError, "y must be >= 0"),
        ({"x": np.zeros((4, 3, 3, 5, 2)), "y": np.zeros(4, int)}, ValueError, "x must be"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, int)}, ValueError, "at least 2 classes"),
        ({"x": np.full((4, 3), np.nan), "y": np.arange(4) % 2}, ValueError, "finite"),
    ],
)
def test_npz_rejects_malformed_arrays(tmp_path, arrays, error, match):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(error, match=match):
        load_npz(tmp_path / "bad.npz")


def test_npz_object_arrays_are_not_unpickled(tmp_path):
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 4, dtype=object), y=np.arange(4) % 2)
    with pytest.raises(ValueError, match="pickle"):
        load_npz(tmp_path / "obj.npz")


def _npz_bytes(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


GOOD = _npz_bytes(x=np.zeros((10, 3)), y=np.arange(10) % 2)
NPY = io.BytesIO()
np.save(NPY, np.zeros((10, 3)))
NOT_NPY = io.BytesIO()
with zipfile.ZipFile(NOT_NPY, "w") as _zip:
    _zip.writestr("x.npy", b"not an array")
    _zip.writestr("y.npy", b"nor this")
# before: EOFError, a "pickled data" ValueError, TypeError, BadZipFile, AttributeError, IndexError, ...
BAD_FILES = {
    "empty": (b"", "is not an .npz file"),
    "garbage": (b"just some text, renamed" * 10, "is not an .npz file"),
    "renamed .npy": (NPY.getvalue(), "is not an .npz file"),
    "truncated": (GOOD[: len(GOOD) // 2], "is not an .npz file"),
    "zip without arrays": (NOT_NPY.getvalue(), "'x' is not an .npy array"),
    "0-d x": (_npz_bytes(x=np.float64(3.0), y=np.arange(3)), r"x must be .* got shape \(\)"),
    "no y": (_npz_bytes(x=np.zeros((10, 3))), "must contain arrays 'x' and 'y'"),
    "lengths differ": (_npz_bytes(x=np.zeros((10, 3)), y=np.arange(9) % 2), "y must be 1-D with 10 entries"),
}


@pytest.mark.parametrize("case", BAD_FILES)
def test_an_unreadable_npz_is_a_value_error_naming_the_file_and_the_array(tmp_path, case):
    content, match = BAD_FILES[case]
    path = tmp_path / "data.npz"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*" + match):
        load_npz(path)


@pytest.mark.parametrize(("arrays", "match"), [
    ({"y": np.array([0, 1] * 4 + [10**9, 1])},
     f"y must be class indices below MAX_CLASSES = 100000, got {10**9}$"),
    ({"y": np.array([0, 1] * 4 + [200_000, 1])}, "y must be class indices below .* got 200000"),
    ({"y": np.array([0, 1] * 4 + [2**64 - 1, 1], np.uint64)}, "y must be class indices below .* got 1844"),
    ({"y": np.arange(10) % 2, "x_test": np.zeros((2, 3)), "y_test": np.array([1, 10**6])},
     "y_test must be class"),
])
def test_labels_must_be_class_indices_below_max_classes(tmp_path, arrays, match):
    # before: a 1e9-class (or 200001-class) dataset, and 2**64 - 1 wrapped to -1
    np.savez(tmp_path / "labels.npz", x=np.random.default_rng(0).random((10, 3)), **arrays)
    with pytest.raises(ValueError, match=r"labels\.npz: " + match):
        load_npz(tmp_path / "labels.npz")
    with pytest.raises(ValueError, match="num_classes must be at most 100000"):
        DataSpec((1, 1, 3), MAX_CLASSES + 1)


def test_more_classes_than_samples_warns_that_labels_are_not_class_indices(tmp_path):
    np.savez(tmp_path / "sparse.npz", x=np.random.default_rng(0).random((20, 3)), y=np.arange(20) * 50)
    with pytest.warns(UserWarning, match="largest label, 950, implies 951 classes for 20 samples"):
        assert load_npz(tmp_path / "sparse.npz").num_classes == 951


def test_huge_values_standardise_in_float64_and_overflow_is_named(tmp_path):
    # float32 pixels near 3e38 became NaN (float32 statistics overflowed)
    rng = np.random.default_rng(0)
    x = (rng.random((40, 2, 3)) * 3e38).astype(np.float32)
    np.savez(tmp_path / "huge.npz", x=x, y=np.arange(40) % 2)
    data = load_npz(tmp_path / "huge.npz", seed=1)
    train = x.astype(np.float64)[np.random.default_rng(1).permutation(40)[8:]]
    np.testing.assert_allclose(data.x_train[:, 0], (train - train.mean()) / train.std(), rtol=1e-5, atol=1e-5)
    # a test value so far beyond the training range that its standardised value exceeds float32
    np.savez(tmp_path / "far.npz", x=rng.random((10, 3)), y=np.arange(10) % 2, x_test=np.full((2, 3), 1e300),
             y_test=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"far\.npz: x_test standardised .* exceeds the float32 range"):
        load_npz(tmp_path / "far.npz")
    np.savez(tmp_path / "inf.npz", x=np.full((10, 3), np.inf), y=np.arange(10) % 2)
    with pytest.raises(ValueError, match=r"inf\.npz: x must be finite, got inf in channel 0"):
        load_npz(tmp_path / "inf.npz")


def test_load_dataset_names_what_it_accepts(tmp_path):
    with pytest.raises(ValueError, match="digits"):
        load_dataset(str(tmp_path / "missing.npz"))
    with pytest.raises(TypeError, match="source"):
        load_dataset(3)


def _write_cifar(root, per_batch=4, seed=0):
    """CIFAR-10 python format: pickled dicts with bytes keys, b'data' uint8 [n, 3072] (R, G, B planes of
    32x32 row-major), b'labels' a list of ints."""
    rng = np.random.default_rng(seed)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(root / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
        batches[name] = (data, labels)
    return batches


def test_cifar10_python_format_loads_in_channel_planes(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = _write_cifar(root)
    data = load_cifar10(tmp_path)  # the parent directory works too
    assert data.name == "cifar10" and data.input_shape == (3, 32, 32)
    assert len(data.y_train) == 20 and len(data.y_test) == 4
    raw = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)]).astype(np.float64) / 255
    green = raw[:, 1024:2048].reshape(-1, 32, 32)  # plane 1, row-major
    np.testing.assert_allclose(data.x_train[:, 1], (green - green.mean()) / green.std(), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][1])
    assert load_dataset(str(root)).y_train.tolist() == data.y_train.tolist()


def test_cifar10_refuses_pickled_code_and_incomplete_directories(tmp_path):
    _write_cifar(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to load .*print"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path)


# ---------------------------------------------------------------------------------------------- partitions

LABELS = np.repeat(np.arange(10), 60)


@pytest.mark.parametrize("scheme", ["dirichlet", "shards", "iid"])
def test_partitions_are_disjoint_covering_seeded_and_respect_min_samples(scheme):
    parts = partition(LABELS, 12, scheme, alpha=0.3, min_samples=10, seed=5)
    assert len(parts) == 12 and all(p.dtype == np.int64 for p in parts)
    everything = np.concatenate(parts)
    np.testing.assert_array_equal(np.sort(everything), np.arange(LABELS.size))
    assert min(p.size for p in parts) >= 10
    assert all(np.all(np.diff(p) > 0) for p in parts)
    again = partition(LABELS, 12, scheme, alpha=0.3, min_samples=10, seed=5)
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))
    other = partition(LABELS, 12, scheme, alpha=0.3, min_samples=10, seed=6)
    assert not all(np.array_equal(p, q) for p, q in zip(parts, other, strict=True))


def _classes_per_client(parts, share=0.05):
    """Classes making up more than ``share`` of each client's samples."""
    out = []
    for p in parts:
        counts = np.bincount(LABELS[p], minlength=10)
        out.append(int(np.sum(counts > share * p.size)))
    return np.array(out)


def test_dirichlet_concentration_controls_label_skew():
    skewed = _classes_per_client(partition(LABELS, 20, "dirichlet", alpha=0.1, seed=0))
    mild = _classes_per_client(partition(LABELS, 20, "dirichlet", alpha=100.0, seed=0))
    assert skewed.mean() < 4 and mild.mean() > 9


def test_shards_give_each_client_few_labels_and_iid_equal_sizes():
    shards = partition(LABELS, 20, "shards", shards_per_client=2, seed=0)
    assert max(np.unique(LABELS[p]).size for p in shards) <= 4  # a shard straddles at most 2 labels
    assert {p.size for p in shards} == {30}
    iid = partition(LABELS, 7, "iid", seed=0)
    assert max(p.size for p in iid) - min(p.size for p in iid) <= 1


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"scheme": "zipf"}, ValueError, "scheme"),
        ({"alpha": 0.0}, ValueError, "alpha"),
        ({"num_clients": 0}, ValueError, "num_clients"),
        ({"num_clients": 2.5}, TypeError, "num_clients"),
        ({"num_clients": 100, "min_samples": 10}, ValueError, "num_clients=100"),
        ({"scheme": "shards", "shards_per_client": 0}, ValueError, "shards_per_client"),
        ({"alpha": 0.01, "num_clients": 50, "min_samples": 11, "max_tries": 3}, ValueError, "raise alpha"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs, error, match):
    kwargs = {"num_clients": 10, **kwargs}
    with pytest.raises(error, match=match):
        partition(LABELS, **kwargs)
