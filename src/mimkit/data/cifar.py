"""The CIFAR-10 and CIFAR-100 downloads as users have them, read without torchvision's dataset class:

- the python version (``cifar-10-batches-py/``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``,
  ``batches.meta``; CIFAR-100's ``train``, ``test``, ``meta``), the files torchvision's ``CIFAR10`` reads.
  They are pickles, and a pickle can run any code: :class:`_ArraysOnly` admits only numpy arrays and plain
  containers, so a hostile file is refused, never run;
- the binary version (``cifar-10-batches-bin/``: ``data_batch_N.bin``, ``test_batch.bin``,
  ``batches.meta.txt``; CIFAR-100's ``train.bin`` / ``test.bin`` with two label bytes, coarse then fine).

A source names the folder (its training batches), the folder that holds it (where torchvision downloads),
or batch files (``cifar-10-batches-py/test_batch`` for the test split).
"""

from __future__ import annotations

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


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays, dicts, lists, strings and numbers; any other global is refused."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2 (a re-pickled batch)
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused '{module}.{name}': a CIFAR batch holds only arrays and lists")


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            value = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(f"{path}: not a CIFAR python batch ({err})") from err
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
