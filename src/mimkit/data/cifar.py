"""The CIFAR-10 and CIFAR-100 downloads as users have them, read without torchvision's dataset class:

- the python version (``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``; CIFAR-100's ``train``, ``test``, ``meta``), the files torchvision's ``CIFAR10`` reads.
  They are pickles, and a pickle can run any code: :class:`_ArraysOnly` admits only integer arrays and
  plain containers, through stand-ins that check an array's shape, dtype and buffer before numpy copies it,
  so a hostile file is refused, never run, and cannot ask for more memory than its own size;
- the binary version (``cifar-10-batches-bin/``: ``data_batch_N.bin``, ``test_batch.bin``,
  ``batches.meta.txt``; CIFAR-100's ``train.bin`` / ``test.bin`` with two label bytes, coarse then fine).

A source names the folder (its training batches), the folder that holds it (where torchvision downloads),
or batch files (``cifar-10-batches-py/test_batch`` for the test split).
"""

from __future__ import annotations

import math
import pickle
from pathlib import Path
from typing import ClassVar

import numpy as np

SIDE = 32
PIXELS = 3 * SIDE * SIDE
TRAIN_FILES = {
    "py": [f"data_batch_{i}" for i in range(1, 6)],
    "bin": [f"data_batch_{i}.bin" for i in range(1, 6)],
    "py100": ["train"],
    "bin100": ["train.bin"],
}
FOLDERS = ("cifar-10-batches-py", "cifar-10-batches-bin", "cifar-100-python", "cifar-100-binary")


MAX_ELEMENTS = 10**9  # no CIFAR batch holds more values than this (one holds 30.7 million)
ARRAY_DTYPES = ("u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8")  # what a batch's arrays may hold


class _DType:
    """Stands for ``numpy.dtype`` in a pickle: a name from :data:`ARRAY_DTYPES` and a byte order."""

    def __init__(self, name: object = "", align: object = False, copy: object = True) -> None:
        name = name.decode("latin-1") if isinstance(name, bytes) else name
        if name not in ARRAY_DTYPES:
            raise pickle.UnpicklingError(f"refused dtype {name!r}: a CIFAR batch holds integer arrays")
        self.name, self.order = name, "|"

    def __setstate__(self, state: object) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        order = order.decode("latin-1") if isinstance(order, bytes) else order
        if order not in ("|", "<", ">", "="):
            raise pickle.UnpicklingError(f"refused byte order {order!r}")
        self.order = order

    def numpy(self) -> np.dtype:
        dtype = np.dtype(self.name)
        return dtype.newbyteorder(self.order) if self.order in "<>" else dtype


class _Array:
    """Stands for a pickled ``numpy.ndarray``: its state is checked (an integer dtype, at most 2 dims, a
    buffer of exactly the size the shape and dtype say) and only then copied out of the file's bytes, so a
    crafted file cannot reach numpy's own unpickling of objects nor ask for more memory than it holds."""

    def __init__(self, *args: object) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: object) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError("refused an array state that is not numpy's (version, shape, ...)")
        _, shape, dtype, fortran, raw = state
        ints = isinstance(shape, tuple) and all(type(n) is int for n in shape)
        if not ints or len(shape) > 2:
            raise pickle.UnpicklingError(f"refused an array of shape {shape!r}: a batch's are 1-D or 2-D")
        if any(n < 0 for n in shape) or math.prod(shape) > MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"refused an array of shape {shape!r}")
        if not isinstance(dtype, _DType) or not isinstance(raw, bytes | str):
            raise pickle.UnpicklingError("refused an array without an integer dtype and a byte buffer")
        raw = raw.encode("latin-1") if isinstance(raw, str) else raw
        kind = dtype.numpy()
        if len(raw) != math.prod(shape) * kind.itemsize:
            raise pickle.UnpicklingError(
                f"refused an array of shape {shape} whose buffer holds {len(raw)} bytes, not "
                f"{math.prod(shape) * kind.itemsize}"
            )
        self.array = np.frombuffer(raw, kind).reshape(shape, order="F" if fortran else "C").copy()


def _reconstruct(cls: object, shape: object, dtype: object) -> _Array:
    if cls is not _Array:
        raise pickle.UnpicklingError("refused an array of a class other than numpy.ndarray")
    return _Array()


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """How Python 3 writes bytes in protocol 2 (``_codecs.encode(str, 'latin1')``): only that."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError("refused _codecs.encode other than of text to latin-1 bytes")
    return text.encode("latin-1")


class _ArraysOnly(pickle.Unpickler):
    """Unpickles integer arrays, dicts, lists, strings and numbers, through stand-ins for numpy's
    classes; any other global is refused. Nothing in the file reaches numpy's own ``__setstate__``."""

    STANDINS: ClassVar[dict[tuple[str, str], object]] = {
        ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
        ("numpy", "ndarray"): _Array,
        ("numpy", "dtype"): _DType,
        ("_codecs", "encode"): _latin1,
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.STANDINS:
            return self.STANDINS[(module, name)]
        raise pickle.UnpicklingError(f"refused '{module}.{name}': a CIFAR batch holds only arrays and lists")


def _arrays(value: object) -> object:
    """The loaded value with every stand-in array replaced by its numpy array."""
    if isinstance(value, _Array):
        if value.array is None:
            raise pickle.UnpicklingError("refused an array that the file never filled")
        return value.array
    if isinstance(value, dict):
        return {k: _arrays(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_arrays(v) for v in value]
    return value


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            value = _arrays(_ArraysOnly(f, encoding="bytes").load())
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({err})") from err
    except (MemoryError, RecursionError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({type(err).__name__})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: not a CIFAR python batch (a {type(value).__name__}, not a dict)")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in value.items()}


def layout(folder: Path) -> str | None:
    """Which CIFAR download a folder is ("py", "bin", "py100", "bin100"), or None."""
    if (folder / "data_batch_1").is_file() or (folder / "batches.meta").is_file():
        return "py"
    if (folder / "data_batch_1.bin").is_file() or (folder / "batches.meta.txt").is_file():
        return "bin"
    if (folder / "meta").is_file() and (folder / "train").is_file():
        return "py100"
    if (folder / "fine_label_names.txt").is_file():
        return "bin100"
    return None


def find_folder(path: Path) -> Path | None:
    """The CIFAR folder a path names: itself, or the one inside it (torchvision's download root)."""
    if not path.is_dir():
        return None
    if layout(path):
        return path
    inside = [path / name for name in FOLDERS if (path / name).is_dir() and layout(path / name)]
    if len(inside) > 1:
        raise ValueError(f"'{path}' holds {' and '.join(p.name for p in inside)}: name the one to read")
    return inside[0] if inside else None


def is_batch_file(path: Path) -> bool:
    """A file of a CIFAR download: a batch inside a folder that is one."""
    return path.is_file() and layout(path.parent) is not None and path.name in _batch_names(path.parent)


def _batch_names(folder: Path) -> set[str]:
    kind = layout(folder)
    names = set(TRAIN_FILES.get(kind or "", []))
    names |= {"test_batch", "test_batch.bin", "test", "test.bin"}
    return names


def class_names(folder: Path) -> tuple[str, ...]:
    kind = layout(folder)
    try:
        if kind == "py":
            names = _unpickle(folder / "batches.meta")["label_names"]
        elif kind == "py100":
            names = _unpickle(folder / "meta")["fine_label_names"]
        elif kind == "bin":
            names = (folder / "batches.meta.txt").read_text().split()
        else:
            names = (folder / "fine_label_names.txt").read_text().split()
    except FileNotFoundError as err:
        raise ValueError(f"{folder}: a CIFAR download without its class names ({err.filename})") from err
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in names)


def read_batches(files: list[Path]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images uint8 [N, 32, 32, 3], labels int64 [N] and class names of CIFAR batch files (all of one
    download)."""
    folders = {f.parent for f in files}
    if len(folders) != 1:
        where = ", ".join(sorted(map(str, folders)))
        raise ValueError(f"CIFAR batches are read from one download at a time; got files in {where}")
    folder = folders.pop()
    kind = layout(folder)
    xs, ys = [], []
    for path in files:
        if kind in ("py", "py100"):
            batch = _unpickle(path)
            key = "labels" if kind == "py" else "fine_labels"
            data, labels = batch.get("data"), batch.get(key)
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or labels is None:
                raise ValueError(f"{path}: expected 'data' uint8 [N, {PIXELS}] and '{key}'")
            x, y = data, np.asarray(labels, dtype=np.int64)
        else:
            label_bytes = 1 if kind == "bin" else 2  # CIFAR-100: coarse, then fine
            raw = np.fromfile(path, dtype=np.uint8)
            record = label_bytes + PIXELS
            if raw.size % record:
                raise ValueError(f"{path}: {raw.size} bytes is not a whole number of {record}-byte records")
            rows = raw.reshape(-1, record)
            x, y = rows[:, label_bytes:], rows[:, label_bytes - 1].astype(np.int64)
        if x.shape[1] != PIXELS or len(x) != len(y):
            raise ValueError(f"{path}: expected {PIXELS} bytes per image and one label per image")
        xs.append(x.reshape(-1, 3, SIDE, SIDE).transpose(0, 2, 3, 1))
        ys.append(y)
    classes = class_names(folder)
    y = np.concatenate(ys)
    if len(y) and (y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"{folder}: labels outside the {len(classes)} classes of its class names")
    return np.ascontiguousarray(np.concatenate(xs)), y, classes


def training_files(folder: Path) -> list[Path]:
    kind = layout(folder)
    files = [folder / name for name in TRAIN_FILES.get(kind or "", [])]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ValueError(f"{folder}: a CIFAR download without {', '.join(missing)}")
    return files
