"""Tests for nonsingular.data: built-in sets, IDX and CIFAR-10 parsing, errors, subsetting."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from nonsingular import data
from nonsingular.data import NAMES, Dataset, load
from nonsingular.errors import DataError


def _rows(x: torch.Tensor) -> set[bytes]:
    return {r.tobytes() for r in x.reshape(len(x), -1).numpy()}


# ---------------------------------------------------------------- mnist5k / digits


@pytest.fixture(scope="module")
def mnist() -> Dataset:
    return load("mnist5k")


def test_mnist5k_shapes_dtypes_range(mnist: Dataset) -> None:
    assert mnist.x_train.shape == (4000, 1, 28, 28)
    assert mnist.x_test.shape == (1000, 1, 28, 28)
    assert mnist.y_train.shape == (4000,) and mnist.y_test.shape == (1000,)
    assert mnist.x_train.dtype == torch.float32 and mnist.y_train.dtype == torch.int64
    assert mnist.x_train.min() == 0.0 and mnist.x_train.max() == 1.0
    assert mnist.x_test.min() >= 0.0 and mnist.x_test.max() <= 1.0
    assert mnist.classes == 10 and mnist.in_shape == (1, 28, 28)
    assert repr(mnist) == "Dataset('mnist5k', train=4000, test=1000, shape=(1, 28, 28), classes=10)"


def test_mnist5k_values_are_raw_pixels_over_255(mnist: Dataset) -> None:
    raw, _ = data._mnist5k_raw()
    raw_rows = {(r / 255).astype(np.float32).tobytes() for r in raw}
    assert _rows(mnist.x_test) <= raw_rows


def test_mnist5k_stratified_and_disjoint(mnist: Dataset) -> None:
    assert torch.bincount(mnist.y_train, minlength=10).tolist() == [400] * 10
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == [100] * 10
    # the raw 5,000 digits are all distinct, so shared rows would mean a leaked example
    assert len(_rows(mnist.x_train)) == 4000 and len(_rows(mnist.x_test)) == 1000
    assert not _rows(mnist.x_train) & _rows(mnist.x_test)


def test_stratified_split_indices_partition() -> None:
    y = np.repeat(np.arange(3), [10, 20, 30])
    tr, te = data._stratified_split(y, 0.2, np.random.default_rng(0))
    assert sorted(np.concatenate([tr, te]).tolist()) == list(range(60))
    assert np.bincount(y[te]).tolist() == [2, 4, 6]


def test_mnist5k_seeded_and_shuffled(mnist: Dataset) -> None:
    again, other = load("mnist5k", seed=0), load("mnist5k", seed=1)
    assert torch.equal(again.x_train, mnist.x_train) and torch.equal(again.y_test, mnist.y_test)
    assert not torch.equal(other.y_train, mnist.y_train)
    assert _rows(other.x_test) != _rows(mnist.x_test)  # a different test set, not just reordered
    for y in (mnist.y_train, mnist.y_test):  # not sorted by label: many label changes
        assert (y[1:] != y[:-1]).sum() > len(y) // 2


def test_loads_return_fresh_tensors(mnist: Dataset) -> None:
    first = load("digits")
    first.x_train.fill_(7.0)
    first.y_train.fill_(3)
    second = load("digits")
    assert second.x_train.max() <= 1.0 and (second.y_train != 3).any()


def test_digits_shapes_and_range() -> None:
    d = load("digits")
    assert d.x_train.shape[1:] == (1, 8, 8) and d.in_shape == (1, 8, 8)
    assert len(d.x_train) + len(d.x_test) == 1797
    assert 1430 <= len(d.x_train) <= 1445 and len(d.y_test) == len(d.x_test)
    assert d.x_train.dtype == torch.float32 and d.y_test.dtype == torch.int64
    assert d.x_train.min() == 0.0 and d.x_train.max() == 1.0
    assert set(d.y_test.tolist()) == set(range(10)) and d.classes == 10


# ---------------------------------------------------------------- IDX


def _idx(array: np.ndarray) -> bytes:
    magic = 0x800 | array.ndim
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def _write_idx(root: Path, arrays: dict[str, np.ndarray], gz: bool = False) -> None:
    root.mkdir(exist_ok=True)
    for name, array in arrays.items():
        blob = _idx(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(blob))
        else:
            (root / name).write_bytes(blob)


def _idx_arrays(seed: int = 0, n_train: int = 12, n_test: int = 5) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        # every class appears in training (a gap means damaged labels, see test_hostile)
        "train-labels-idx1-ubyte": rng.permutation(np.arange(n_train) % 10).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = _idx_arrays()
    _write_idx(tmp_path / "d", arrays, gz=gz)
    d = load(f"idx:{tmp_path / 'd'}")
    x = torch.from_numpy(arrays["train-images-idx3-ubyte"]).float().unsqueeze(1) / 255
    assert d.x_train.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert torch.equal(d.x_train, x)
    assert torch.equal(d.x_test[:, 0] * 255, torch.from_numpy(arrays["t10k-images-idx3-ubyte"]))
    assert d.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert d.y_test.dtype == torch.int64
    assert d.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    assert d.classes == 10


def test_idx_classes_beyond_ten(tmp_path: Path) -> None:
    arrays = _idx_arrays(n_train=15)
    arrays["train-labels-idx1-ubyte"] = np.arange(15, dtype=np.uint8)
    _write_idx(tmp_path, arrays)
    assert load(f"idx:{tmp_path}").classes == 15


def test_idx_missing_file(tmp_path: Path) -> None:
    arrays = _idx_arrays()
    del arrays["t10k-labels-idx1-ubyte"]
    _write_idx(tmp_path, arrays)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*train-images-idx3-ubyte"):
        load(f"idx:{tmp_path}")


def test_idx_bad_magic(tmp_path: Path) -> None:
    _write_idx(tmp_path, _idx_arrays())
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(b"\x00\x00\x08\x03" + labels.read_bytes()[4:])
    with pytest.raises(DataError, match="magic 0x00000801"):
        load(f"idx:{tmp_path}")


@pytest.mark.parametrize("cut", [1, 100, 3 * 28 * 28])
def test_idx_truncated(tmp_path: Path, cut: int) -> None:
    _write_idx(tmp_path, _idx_arrays())
    images = tmp_path / "t10k-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-cut])
    with pytest.raises(DataError, match="t10k-images.*expected 3920 bytes"):
        load(f"idx:{tmp_path}")


def test_idx_truncated_gzip(tmp_path: Path) -> None:
    _write_idx(tmp_path, _idx_arrays(), gz=True)
    images = tmp_path / "train-images-idx3-ubyte.gz"
    images.write_bytes(images.read_bytes()[:50])
    with pytest.raises(DataError, match="gzip"):
        load(f"idx:{tmp_path}")


def test_idx_count_mismatch(tmp_path: Path) -> None:
    arrays = _idx_arrays()
    arrays["train-labels-idx1-ubyte"] = arrays["train-labels-idx1-ubyte"][:11]
    _write_idx(tmp_path, arrays)
    with pytest.raises(DataError, match="one label per image"):
        load(f"idx:{tmp_path}")


# ---------------------------------------------------------------- CIFAR-10


def _cifar_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    return rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n)


def _write_cifar(root: Path, binary: bool, sizes: tuple[int, ...] = (4, 3), n_test: int = 2):
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i + 1}": _cifar_batch(rng, n) for i, n in enumerate(sizes)}
    batches["test_batch"] = _cifar_batch(rng, n_test)
    for name, (x, y) in batches.items():
        if binary:
            records = np.concatenate([y.astype(np.uint8)[:, None], x], axis=1)
            (root / f"{name}.bin").write_bytes(records.tobytes())
        else:
            with (root / name).open("wb") as f:
                pickle.dump({b"data": x, b"labels": y.tolist(), b"batch_label": b"x"}, f)
    return batches


@pytest.mark.parametrize("binary", [False, True])
def test_cifar10_round_trip_and_layout(tmp_path: Path, binary: bool) -> None:
    batches = _write_cifar(tmp_path, binary)
    d = load(f"cifar10:{tmp_path}")
    assert d.x_train.shape == (7, 3, 32, 32) and d.x_test.shape == (2, 3, 32, 32)
    assert d.in_shape == (3, 32, 32) and d.classes == 10
    x = np.concatenate([batches["data_batch_1"][0], batches["data_batch_2"][0]])
    assert torch.equal(d.x_train * 255, torch.from_numpy(x).float().reshape(7, 3, 32, 32))
    # channel-major: the first 1024 bytes of a record are the red plane, row by row
    assert torch.equal(
        d.x_test[1, 0].flatten() * 255, torch.from_numpy(batches["test_batch"][0][1, :1024]).float()
    )
    assert d.x_test[0, 2, 0, 1] * 255 == batches["test_batch"][0][0, 2048 + 1]
    y = np.concatenate([batches["data_batch_1"][1], batches["data_batch_2"][1]])
    assert d.y_train.tolist() == y.tolist() and d.y_test.dtype == torch.int64


@pytest.mark.parametrize("protocol", [2, 5, "numpy1"])
def test_cifar10_pickle_protocols(tmp_path: Path, protocol: int | str) -> None:
    x = np.arange(3072, dtype=np.uint8)[None].repeat(2, 0)
    blob = pickle.dumps({b"data": x, b"labels": [3, 4]}, 2 if protocol == "numpy1" else protocol)
    if protocol == "numpy1":  # as the real CIFAR-10 files name numpy's internals
        assert b"numpy._core.multiarray" in blob
        blob = blob.replace(b"numpy._core.", b"numpy.core.")
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / name).write_bytes(blob)
    d = load(f"cifar10:{tmp_path}")
    assert torch.equal(d.x_test.reshape(2, -1) * 255, torch.from_numpy(x).float())
    assert d.y_train.tolist() == [3, 4]


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"echo pwned > {self.marker}",))


def test_cifar10_pickle_refuses_foreign_globals(tmp_path: Path) -> None:
    _write_cifar(tmp_path, binary=False)
    marker = tmp_path.parent / f"{tmp_path.name}-pwned"
    with (tmp_path / "data_batch_2").open("wb") as f:
        pickle.dump({b"data": _Exploit(marker), b"labels": [0]}, f)
    with pytest.raises(DataError, match=r"refused to unpickle global '(posix|nt)\.system'"):
        load(f"cifar10:{tmp_path}")
    assert not marker.exists()


def test_cifar10_missing_and_bad_files(tmp_path: Path) -> None:
    _write_cifar(tmp_path, binary=True)
    (tmp_path / "test_batch.bin").unlink()
    with pytest.raises(DataError, match="'test_batch.bin'.*found: data_batch_1.bin"):
        load(f"cifar10:{tmp_path}")
    (tmp_path / "test_batch.bin").write_bytes(bytes(3073 * 2 - 5))
    with pytest.raises(DataError, match="multiple of 3073 bytes, found 6141"):
        load(f"cifar10:{tmp_path}")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="'data_batch_1'"):
        load(f"cifar10:{empty}")


def test_cifar10_pickle_wrong_content(tmp_path: Path) -> None:
    _write_cifar(tmp_path, binary=False)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": np.zeros((2, 5), np.uint8)}))
    with pytest.raises(DataError, match="b'labels'"):
        load(f"cifar10:{tmp_path}")
    (tmp_path / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="expected a CIFAR-10 python batch"):
        load(f"cifar10:{tmp_path}")


# ---------------------------------------------------------------- names, sizes


@pytest.mark.parametrize("name", ["mnist", "MNIST5K", "idx:", "cifar100:/tmp", "mnist5k:x"])
def test_unknown_name(name: str) -> None:
    with pytest.raises(ValueError, match="expected one of mnist5k, digits, idx:PATH") as info:
        load(name)
    assert isinstance(info.value, DataError)
    assert set(NAMES) == {"mnist5k", "digits", "idx:PATH", "cifar10:PATH"}


@pytest.mark.parametrize("kind", ["idx", "cifar10"])
def test_missing_directory(tmp_path: Path, kind: str) -> None:
    with pytest.raises(DataError, match="expected a directory") as info:
        load(f"{kind}:{tmp_path / 'nope'}")
    assert isinstance(info.value, ValueError)


def test_subsets_are_seeded(tmp_path: Path) -> None:
    a = load("digits", train_size=100, test_size=20, seed=3)
    b = load("digits", train_size=100, test_size=20, seed=3)
    c = load("digits", train_size=100, test_size=20, seed=4)
    assert len(a.x_train) == 100 and len(a.y_train) == 100 and len(a.x_test) == 20
    assert torch.equal(a.x_train, b.x_train) and not torch.equal(a.y_train, c.y_train)
    full = load("digits", seed=3)
    assert _rows(a.x_train) <= _rows(full.x_train) and _rows(a.x_test) <= _rows(full.x_test)
    arrays = _idx_arrays()
    _write_idx(tmp_path, arrays)
    d = load(f"idx:{tmp_path}", train_size=12, test_size=3)
    assert len(d.x_train) == 12 and len(d.y_test) == 3
    assert _rows(d.x_train) == _rows(load(f"idx:{tmp_path}").x_train)  # a permutation of all 12


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"train_size": 1439}, "at most the 1438"),
        ({"test_size": 360}, "at most the 359"),
        ({"train_size": 0}, "positive"),
        ({"test_size": -1}, "positive"),
        ({"train_size": 2.5}, "positive"),
        ({"train_size": True}, "positive"),
    ],
)
def test_bad_sizes(kwargs: dict, match: str) -> None:
    with pytest.raises(DataError, match=match):
        load("digits", **kwargs)
