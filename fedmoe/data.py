"""Data for federated experiments: datasets (digits, CIFAR-10, any ``.npz``) and client partitions.

Datasets come back as :class:`Dataset`: float32 images ``[N, C, H, W]`` standardised per channel with the
training set's mean and std (computed in float64), int64 labels in ``[0, num_classes)``. Flat feature
vectors ``[N, D]`` become ``[N, 1, 1, D]`` (one channel, one row), images ``[N, H, W]`` become
``[N, 1, H, W]``. Labels are integers in ``[0, MAX_CLASSES)`` (``num_classes`` is the largest plus one; a
warning says when it exceeds the number of samples, a sign of labels that are not class indices); values
must be finite. A bad file is a ValueError (TypeError for a wrong dtype) naming the file and the array.

:class:`DataConfig` is the ``[data]`` section of an experiment's configuration; :func:`load_dataset` reads
what it names. A node's own samples travel as :class:`Samples` (inputs and targets as tensors);
:class:`DataSpec` is what a model must know of the data to be built.

Partitions split the training indices among clients: ``dirichlet`` (per class, client shares drawn from
Dirichlet(alpha); small alpha = few classes per client), ``shards`` (sorted by label, cut into equal shards,
``shards_per_client`` random shards each) and ``iid``; ``natural`` keeps the clients a file names
(:meth:`Dataset.client_indices`).

An ``.npz`` holding ``client`` or ``tokens`` is in the natural format (:mod:`fedmoe.natural`): samples with
their clients, images or text (int64 token ids ``[N, L]`` with a ``vocab``; ``y`` the next token).
"""

from __future__ import annotations

import contextlib
import functools
import pickle
import warnings
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from fedmoe.alignment import _checks
from fedmoe.text import TokenWindows

__all__ = ["MAX_CLASSES", "PARTITIONS", "DataConfig", "DataSpec", "Dataset", "Samples", "load_cifar10",
           "load_dataset", "load_digits", "load_npz", "partition"]

PARTITIONS = ("dirichlet", "shards", "iid", "natural")
MAX_CLASSES = 100_000  # labels must be below it: the model's head has a row per class
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST = "test_batch"
_READ_ERRORS = (EOFError, OSError, ValueError, zipfile.BadZipFile, zlib.error)  # of a damaged .npz
_ARRAYS = {"x", "y", "x_test", "y_test", "client", "client_test", "vocab", "tokens", "client_offsets",
           "tokens_test", "client_offsets_test", "window"}  # what load_npz reads; other arrays are ignored


@dataclass(frozen=True)
class DataConfig:
    """The ``[data]`` section: ``source`` ("digits", a CIFAR-10 python directory or an ``.npz`` file),
    ``test_fraction`` (random test split where the data has none), ``partition`` (dirichlet | shards | iid
    | natural: the file's own clients) with ``dirichlet_alpha`` and ``shards_per_client``, ``min_samples``
    per client (not for natural)."""

    source: str = "digits"
    test_fraction: float = 0.2
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    shards_per_client: int = 2
    min_samples: int = 8

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise TypeError(f"source must be a non-empty str, got {self.source!r}")
        _checks.real("test_fraction", self.test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
        if self.partition not in PARTITIONS:
            raise ValueError(f"partition must be one of {list(PARTITIONS)}, got {self.partition!r}")
        _checks.real("dirichlet_alpha", self.dirichlet_alpha, 0.0, lo_open=True)
        _checks.integer("shards_per_client", self.shards_per_client, 1)
        _checks.integer("min_samples", self.min_samples, 0)


@dataclass(frozen=True)
class DataSpec:
    """What a model must know of its data: the ``input_shape`` of one sample and ``num_classes``. Text:
    ``input_shape`` is ``(L,)`` (a window of L token ids), ``vocab`` the symbol of each token id and
    ``num_classes == len(vocab)`` (the target is the next token); ``vocab`` is None for images."""

    input_shape: tuple[int, ...]
    num_classes: int
    vocab: tuple[str, ...] | None = None

    def __post_init__(self):
        shape = tuple(self.input_shape) if isinstance(self.input_shape, list | tuple) else None
        if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape):
            raise ValueError(f"input_shape must be a non-empty sequence of positive ints, got "
                             f"{self.input_shape!r}")
        object.__setattr__(self, "input_shape", shape)
        _checks.integer("num_classes", self.num_classes, 2)
        if self.num_classes > MAX_CLASSES:
            raise ValueError(f"num_classes must be at most {MAX_CLASSES}, got {self.num_classes}")
        if self.vocab is not None:
            vocab = tuple(self.vocab) if isinstance(self.vocab, list | tuple) else None
            if vocab is None or not all(isinstance(v, str) for v in vocab) or len(set(vocab)) != len(vocab):
                raise ValueError(f"vocab must be a sequence of distinct str, got {self.vocab!r}")
            if len(vocab) != self.num_classes:
                raise ValueError(f"vocab has {len(vocab)} symbols but num_classes is {self.num_classes}: a "
                                 "text model predicts the next token")
            object.__setattr__(self, "vocab", vocab)


@dataclass(frozen=True, eq=False)
class Samples:
    """Samples of one client or of a test set: ``inputs`` [n, ...] and ``targets`` [n] (tensors).
    ``samples[idx]`` is ``(inputs[idx], targets[idx])``.

    Images: float32 inputs [n, C, H, W], int64 class targets. Text: int64 token ids [n, L] and the int64
    next token; the inputs of a natural client are a strided view of its token stream (``reshape``, not
    ``view``), and those of a set of scattered windows (the global test set) are a lazy
    :class:`~fedmoe.text.TokenWindows` that indexes into int64 tensors the same way."""

    inputs: torch.Tensor | TokenWindows
    targets: torch.Tensor

    def __post_init__(self):
        if self.inputs.shape[:1] != self.targets.shape[:1]:
            raise ValueError(f"inputs and targets must hold the same number of samples, got "
                             f"{tuple(self.inputs.shape)} and {tuple(self.targets.shape)}")

    def __len__(self) -> int:
        return int(self.targets.shape[0])

    def __getitem__(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[idx], self.targets[idx]

    @classmethod
    def from_numpy(cls, inputs: np.ndarray, targets: np.ndarray) -> Samples:
        return cls(torch.from_numpy(inputs), torch.from_numpy(targets))


@dataclass(frozen=True)
class Dataset:
    """``x_train`` [N, ...], ``y_train`` int64 [N], ``x_test`` [M, ...], ``y_test`` int64 [M]; labels in
    ``[0, num_classes)``.

    Images: x float32 [N, C, H, W]. Text (``vocab`` set, ``num_classes == len(vocab)``): x int64 token ids
    [N, L], dense or a lazy :class:`~fedmoe.text.TokenWindows` (indexing it gives int64 numpy rows), y the
    next token. Natural clients (None where the data has none): ``client_train`` int64 [N] and
    ``client_test`` int64 [M], the client of each sample, in ``[0, num_clients)``; every client has a
    training sample, a client may have no test sample."""

    name: str
    x_train: np.ndarray | TokenWindows
    y_train: np.ndarray
    x_test: np.ndarray | TokenWindows
    y_test: np.ndarray
    num_classes: int
    client_train: np.ndarray | None = None
    client_test: np.ndarray | None = None
    vocab: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(s) for s in self.x_train.shape[1:])

    @property
    def spec(self) -> DataSpec:
        return DataSpec(self.input_shape, self.num_classes, self.vocab)

    @property
    def num_clients(self) -> int | None:
        """The number of natural clients; None where the data has none."""
        return None if self.client_train is None else len(self.client_indices())

    def client_indices(self, split: str = "train") -> list[np.ndarray]:
        """Sorted int64 indices of each natural client's samples in the ``"train"`` or ``"test"`` split:
        one array per client (the natural partition). ValueError where the data has no clients."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if self.client_train is None:
            raise ValueError(f"{self.name} has no natural clients (an .npz in the natural format has them)")
        return self._client_parts[split]

    @functools.cached_property
    def _client_parts(self) -> dict[str, list[np.ndarray]]:
        clients = int(self.client_train.max()) + 1
        parts = {}
        for split, owner in (("train", self.client_train), ("test", self.client_test)):
            order = np.argsort(owner, kind="stable")
            parts[split] = np.split(order, np.cumsum(np.bincount(owner, minlength=clients))[:-1])
        return parts

    def train_samples(self, idx: np.ndarray | None = None) -> Samples:
        """The training samples (those at ``idx`` if given) as tensors."""
        return _samples(self.x_train, self.y_train, idx)

    def test_samples(self) -> Samples:
        """The test samples (of every client) as tensors."""
        return _samples(self.x_test, self.y_test, None)

    def client_test_samples(self, client: int) -> Samples:
        """Natural client ``client``'s test samples (possibly none) as tensors."""
        return _samples(self.x_test, self.y_test, self.client_indices("test")[client])


def _samples(x: np.ndarray | TokenWindows, y: np.ndarray, idx: np.ndarray | None) -> Samples:
    """Samples of ``x`` and ``y`` (at ``idx`` if given); windows stay lazy unless they are consecutive (one
    natural client's: a zero-copy view) or fewer than two."""
    if not isinstance(x, TokenWindows):
        return Samples.from_numpy(x, y) if idx is None else Samples.from_numpy(x[idx], y[idx])
    windows = x.tensors() if idx is None else x.tensors().select(idx)
    targets = torch.from_numpy(y if idx is None else y[idx])
    return Samples(windows[:] if windows.consecutive() else windows, targets)


def _images(x: np.ndarray, name: str) -> np.ndarray:
    """``x`` as [N, C, H, W]: flat [N, D] -> [N, 1, 1, D]; [N, H, W] -> [N, 1, H, W]; [N, H, W, C] with
    C in (1, 3, 4) and the second axis not -> channels first."""
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x) or x.dtype == np.bool_:
        raise TypeError(f"{name} must hold real numbers, got dtype {x.dtype}")
    if x.ndim == 2:
        return x[:, None, None, :]
    if x.ndim == 3:
        return x[:, None]
    if x.ndim == 4:
        if x.shape[1] in (1, 3, 4):
            return x
        if x.shape[3] in (1, 3, 4):
            return x.transpose(0, 3, 1, 2)
        raise ValueError(f"{name} [N, A, B, C] must have channels (1, 3 or 4) in axis 1 or 3, got {x.shape}")
    raise ValueError(f"{name} must be [N, D], [N, H, W] or [N, C, H, W] (or NHWC), got shape {x.shape}")


def _labels(y: np.ndarray, n: int, name: str) -> np.ndarray:
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with {n} entries (one per sample), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise TypeError(f"{name} must hold integer class labels, got dtype {y.dtype}")
    if n and y.min() < 0:
        raise ValueError(f"{name} must be >= 0, got {y.min()}")
    if n and y.max() >= MAX_CLASSES:
        raise ValueError(f"{name} must be class indices below MAX_CLASSES = {MAX_CLASSES}, got {y.max()}")
    return y.astype(np.int64)


def _standardise(x_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float32 ``x_train`` and ``x_test`` standardised per channel with the training mean and std, in float64
    on values divided by the channel's largest training magnitude (so that no statistic overflows)."""
    out = np.empty(x_train.shape, np.float32), np.empty(x_test.shape, np.float32)
    for c in range(x_train.shape[1]):
        train, test = x_train[:, c].astype(np.float64), x_test[:, c].astype(np.float64)
        for name, values in (("x", train), ("x_test", test)):
            if not np.isfinite(values).all():
                bad = values[~np.isfinite(values)][0]
                raise ValueError(f"{name} must be finite, got {bad} in channel {c}")
        scale = max(train.max(), -train.min()) or 1.0
        with np.errstate(over="ignore"):  # test values far beyond the training range: caught below
            train /= scale
            test /= scale
            mean, std = train.mean(), train.std() or 1.0
            for name, values, dest in (("x", train, out[0]), ("x_test", test, out[1])):
                values -= mean
                values /= std
                if max(values.max(), -values.min()) > np.finfo(np.float32).max:
                    raise ValueError(f"{name} standardised with the mean and std of x exceeds the float32 "
                                     f"range in channel {c}")
                dest[:, c] = values
    return out


@contextlib.contextmanager
def _naming(path):
    """Raise a ValueError or TypeError from inside with ``path`` in front of its message."""
    try:
        yield
    except (TypeError, ValueError) as exc:
        raise (TypeError if isinstance(exc, TypeError) else ValueError)(f"{path}: {exc}") from None


def _build(name, x_train, y_train, x_test, y_test) -> Dataset:
    """Checked, channel-standardised :class:`Dataset` from raw arrays."""
    x_train, x_test = _images(x_train, "x"), _images(x_test, "x_test")
    y_train, y_test = _labels(y_train, x_train.shape[0], "y"), _labels(y_test, x_test.shape[0], "y_test")
    if x_train.shape[0] < 2 or x_test.shape[0] < 1:
        raise ValueError(f"need >= 2 training and >= 1 test samples, got {x_train.shape[0]} and "
                         f"{x_test.shape[0]}")
    if x_test.shape[1:] != x_train.shape[1:]:
        raise ValueError(f"x_test samples have shape {x_test.shape[1:]}, x has {x_train.shape[1:]}")
    if 0 in x_train.shape[1:]:
        raise ValueError(f"x samples must not be empty, got shape {x_train.shape[1:]}")
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    if num_classes < 2:
        raise ValueError("labels must cover at least 2 classes")
    samples = y_train.size + y_test.size
    if num_classes > samples:
        warnings.warn(f"the largest label, {num_classes - 1}, implies {num_classes} classes for {samples} "
                      "samples: labels should be class indices 0..num_classes-1", stacklevel=3)
    x_train, x_test = _standardise(x_train, x_test)
    return Dataset(name, x_train, y_train, x_test, y_test, num_classes)


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int):
    """Seeded random split into (x_train, y_train, x_test, y_test)."""
    _checks.real("test_fraction", test_fraction, 0.0, 1.0, lo_open=True, hi_open=True)
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = max(1, round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def load_digits(*, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits (1,797 images, bundled: nothing is downloaded), split at random."""
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    x = bunch.images.astype(np.float32)
    return _build("digits", *_split(x, bunch.target, test_fraction, seed))


def load_npz(path, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """Arrays ``x`` and ``y`` (and optionally ``x_test`` and ``y_test``; else a random split) from an
    ``.npz`` file, loaded without pickle; a file holding ``client`` or ``tokens`` is in the natural format
    (:func:`fedmoe.natural.load_natural`). Errors name the file (and the array)."""
    path = Path(path)
    arrays = _read_npz(path)
    if "client" in arrays or "tokens" in arrays:
        from fedmoe.natural import load_natural  # it builds on this module

        return load_natural(path, arrays)
    keys = set(arrays)
    if not {"x", "y"} <= keys:
        raise ValueError(f"{path} must contain arrays 'x' and 'y', found {sorted(keys)}")
    if ("x_test" in keys) != ("y_test" in keys):
        raise ValueError(f"{path} must contain both or neither of 'x_test' and 'y_test'")
    with _naming(path):
        if "x_test" in arrays:
            return _build(path.stem, arrays["x"], arrays["y"], arrays["x_test"], arrays["y_test"])
        x, y = arrays["x"], arrays["y"]
        _labels(y, _images(x, "x").shape[0], "y")
        return _build(path.stem, *_split(x, y, test_fraction, seed))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` file that a loader reads (:data:`_ARRAYS`), by name, read without pickle."""
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(f"{path} is not an .npz file (a zip archive of .npy arrays)")
    try:
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise ValueError(f"{path} is not a readable .npz file: {exc}") from None
    with npz:
        arrays = {}
        for name in (n for n in npz.files if n in _ARRAYS):
            try:
                arrays[name] = npz[name]
            except _READ_ERRORS as exc:
                raise ValueError(f"{path}: cannot read array {name!r}: {exc}") from None
            if not isinstance(arrays[name], np.ndarray):
                raise ValueError(f"{path}: {name!r} is not an .npy array")
    return arrays


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles only dicts, lists, bytes, numbers and numpy arrays (what CIFAR-10 batches hold)."""

    _ALLOWED: ClassVar[dict[tuple[str, str], tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"): ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"): ("numpy", "ndarray"),
        ("numpy", "dtype"): ("numpy", "dtype"),
        ("_codecs", "encode"): ("_codecs", "encode"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")
        return super().find_class(*self._ALLOWED[module, name])


def _cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with open(path, "rb") as f:
        batch = _ArrayUnpickler(f, encoding="bytes").load()
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch (a dict with b'data' and b'labels')")
    data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072 or labels.shape != data.shape[:1]:
        raise ValueError(f"{path}: b'data' must be uint8 [N, 3072] with N labels, got {data.dtype} "
                         f"{data.shape} and {labels.shape} labels")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar10(root) -> Dataset:
    """CIFAR-10 in its python format (``data_batch_1..5`` and ``test_batch``) from ``root`` or
    ``root/cifar-10-batches-py``; the batches are unpickled with only numpy arrays allowed."""
    root = Path(root)
    if (root / "cifar-10-batches-py").is_dir():
        root = root / "cifar-10-batches-py"
    missing = [n for n in (*_CIFAR_TRAIN, _CIFAR_TEST) if not (root / n).is_file()]
    if missing:
        raise ValueError(f"{root} is not a CIFAR-10 python directory: missing {missing}")
    train = [_cifar_batch(root / n) for n in _CIFAR_TRAIN]
    x_test, y_test = _cifar_batch(root / _CIFAR_TEST)
    x = np.concatenate([b[0] for b in train])
    y = np.concatenate([b[1] for b in train])
    with _naming(root):
        return _build("cifar10", x / np.float32(255), y, x_test / np.float32(255), y_test)


def load_dataset(source: str, *, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """``"digits"``, a CIFAR-10 python directory, or a ``.npz`` file. ``test_fraction`` and ``seed`` set the
    random test split where the data has no test set of its own."""
    if not isinstance(source, str | Path):
        raise TypeError(f"source must be a str or path, got {type(source).__name__}")
    if str(source) == "digits":
        return load_digits(test_fraction=test_fraction, seed=seed)
    path = Path(source)
    if path.is_dir():
        return load_cifar10(path)
    if path.suffix == ".npz" and path.is_file():
        return load_npz(path, test_fraction=test_fraction, seed=seed)
    raise ValueError(f"source must be 'digits', a CIFAR-10 directory or an existing .npz file, got "
                     f"{source!r}")


def partition(labels, num_clients: int, scheme: str = "dirichlet", *, alpha: float = 0.5,
              shards_per_client: int = 2, min_samples: int = 8, seed: int = 0,
              max_tries: int = 1000) -> list[np.ndarray]:
    """Split sample indices ``0..len(labels)-1`` among ``num_clients`` clients.

    Args:
        labels: int [N] class labels.
        scheme: ``dirichlet``, ``shards`` or ``iid`` (module docstring).
        alpha: Dirichlet concentration (> 0).
        shards_per_client: shards per client (``shards``).
        min_samples: every client gets at least this many samples (``dirichlet`` redraws until it holds,
            at most ``max_tries`` times; the others check it).
        seed: same seed, same partition.

    Returns:
        ``num_clients`` sorted int64 index arrays, disjoint, covering all samples.
    """
    labels = np.asarray(labels)
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    num_clients = _checks.integer("num_clients", num_clients, 1)
    min_samples = _checks.integer("min_samples", min_samples, 0)
    n = labels.size
    if num_clients * max(min_samples, 1) > n:
        raise ValueError(f"num_clients={num_clients} with min_samples={min_samples} needs more than the "
                         f"{n} samples")
    rng = np.random.default_rng(seed)
    if scheme == "natural":
        raise ValueError("scheme 'natural' keeps a dataset's own clients: use Dataset.client_indices()")
    if scheme == "iid":
        parts = np.array_split(rng.permutation(n), num_clients)
    elif scheme == "shards":
        shards_per_client = _checks.integer("shards_per_client", shards_per_client, 1)
        if num_clients * shards_per_client > n:
            raise ValueError(f"num_clients * shards_per_client = {num_clients * shards_per_client} exceeds "
                             f"the {n} samples")
        by_label = np.lexsort((rng.random(n), labels))  # by label, random order within a label
        shards = np.array_split(by_label, num_clients * shards_per_client)
        owner = rng.permutation(len(shards)).reshape(num_clients, shards_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in owner]
    elif scheme == "dirichlet":
        alpha = _checks.real("alpha", alpha, 0.0, lo_open=True)
        parts = _dirichlet(labels, num_clients, alpha, min_samples, rng, max_tries)
    else:
        raise ValueError(f"scheme must be 'dirichlet', 'shards' or 'iid', got {scheme!r}")
    parts = [np.sort(p).astype(np.int64) for p in parts]
    smallest = min(p.size for p in parts)
    if smallest < min_samples:
        raise ValueError(f"a client got {smallest} samples, fewer than min_samples={min_samples}")
    return parts


def _dirichlet(labels, num_clients, alpha, min_samples, rng, max_tries) -> list[np.ndarray]:
    """Per class, Dirichlet(alpha) client shares (a client already holding more than N / num_clients
    samples takes no more); redrawn until every client has ``min_samples``."""
    n = labels.size
    classes = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
        sizes = np.zeros(num_clients, dtype=np.int64)
        for idx in classes:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_clients, alpha)) * (sizes < n / num_clients)
            cuts = (np.cumsum(share / share.sum()) * idx.size).astype(np.int64)[:-1]
            for client, piece in enumerate(np.split(idx, cuts)):
                parts[client].append(piece)
                sizes[client] += piece.size
        if sizes.min() >= min_samples:
            return [np.concatenate(p) for p in parts]
    raise ValueError(f"no Dirichlet(alpha={alpha}) partition gave every one of {num_clients} clients "
                     f"min_samples={min_samples} samples in {max_tries} tries; raise alpha or lower "
                     f"num_clients / min_samples")
