"""What both token formats share: the reading interface (:class:`TokenDataset`), the error a damaged
record raises, where decoded caches live, atomic writes, and the checks of ids, labels and codebooks that
both writers make."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import shutil
import sys
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

# records read at once by convert/info/verify and chunks(): bounded memory on datasets of any size
CHUNK = 4096


class TokenRecordError(ValueError):
    """A damaged token record or file. The message starts with the file's path and, where one record is
    at fault, names its index: ``PATH: record 17: checksum mismatch (the bytes are damaged)``."""


class TokenDataset(ABC):
    """A token dataset opened for reading. ``read(i)`` gives record i as a fresh int64 [H, W] array;
    ``dataset[i]`` gives ``(ids, label)`` (label -1 when the dataset has none), so a dataset can be fed to
    a DataLoader as it is. Instances pickle without their memory maps and reopen them lazily in the
    process that reads, so loader workers (fork or spawn) share the page cache rather than copies."""

    path: Path
    name: str
    format: str
    grid: tuple[int, int]
    vocab_size: int
    labels: np.ndarray | None
    classes: tuple[str, ...]
    codebook: torch.Tensor | None
    meta: dict[str, Any]

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def read(self, index: int) -> np.ndarray:
        """Record ``index`` as int64 [H, W]. A damaged record raises :class:`TokenRecordError`; an index
        outside [-N, N) raises IndexError."""

    def read_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Several records as int64 [n, H, W] (formats override this with a faster path)."""
        out = np.empty((len(indices), *self.grid), dtype=np.int64)
        for row, index in enumerate(indices):
            out[row] = self.read(int(index))
        return out

    @abstractmethod
    def files(self) -> list[Path]:
        """Every file of the dataset on disk except the codebook."""

    def stored_bytes(self) -> int:
        """Bytes on disk of :meth:`files` (the codebook is excluded: it belongs to the tokenizer)."""
        return sum(p.stat().st_size for p in self.files())

    @abstractmethod
    def close(self) -> None:
        """Release the memory maps; reading again reopens them."""

    @abstractmethod
    def drop_cache(self) -> None:
        """Delete the decoded cache file this dataset reads from, if any (see :func:`open_tokens`)."""

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        ids = self.read(index)
        return ids, int(self.labels[index]) if self.labels is not None else -1

    def __getitems__(self, indices: Sequence[int]) -> list[tuple[np.ndarray, int]]:
        """A whole batch at once (DataLoader uses it when present): :meth:`read_many`'s fast path."""
        ids = self.read_many(indices)
        labels = self.labels
        return [(ids[k], int(labels[i]) if labels is not None else -1) for k, i in enumerate(indices)]

    def __iter__(self) -> Iterator[tuple[np.ndarray, int]]:
        for index in range(len(self)):
            yield self[index]

    def __enter__(self) -> TokenDataset:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}('{self.path}', records={len(self)}, grid={self.grid}, "
            f"vocab_size={self.vocab_size})"
        )

    def _position(self, index: int) -> int:
        """``index`` as a position in [0, N), Python-style negatives allowed."""
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"{self.path}: record {index} is out of range (the dataset holds {n} records)")
        return index + n if index < 0 else index

    def chunks(self, size: int = CHUNK) -> Iterator[tuple[int, np.ndarray]]:
        """(start, ids [n, H, W]) over the whole dataset in order, ``size`` records at a time."""
        for start in range(0, len(self), size):
            yield start, self.read_many(np.arange(start, min(start + size, len(self))))


# ----------------------------------------------------------------------------------------------------
# small shared pieces


def cache_dir() -> Path:
    """Where both formats keep their decoded caches: ``$MIMKIT_CACHE/tokens``, by default
    ``~/.cache/mimkit/tokens``."""
    root = os.environ.get("MIMKIT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "mimkit") / "tokens"


def cache_sidecar(cache: Path) -> Path:
    """The small JSON file beside a decoded cache: its size and CRC-32, and what its format keeps there."""
    return cache.with_name(cache.name + ".json")


class _Summing:
    """A file object that keeps the size and CRC-32 of what is written through it."""

    def __init__(self, f: IO[bytes]) -> None:
        self.f, self.size, self.crc = f, 0, 0

    def write(self, data: bytes | memoryview) -> int:
        self.crc = zlib.crc32(data, self.crc)
        self.size += len(data)
        return self.f.write(data)


def file_crc32(path: Path, block: int = 1 << 24) -> int:
    crc = 0
    with open(path, "rb") as f:
        while data := f.read(block):
            crc = zlib.crc32(data, crc)
    return crc


def _size(n: int) -> str:
    return f"{n} bytes" if n < 2**20 else f"{n / 2**20:.1f} MiB"


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse, before the first byte, a file of ``need`` bytes that the disk holding ``path`` has no room
    for: the same error a full disk gives, naming the file and both sizes."""
    folder = next((p for p in (path.parent, *path.parent.parents) if p.exists()), Path("/"))
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return  # unknown: the write itself will tell
    if need > free:
        raise OSError(
            errno.ENOSPC,
            f"No space left on device: {what} needs {_size(need)}, its disk has {_size(free)} free",
            str(path),
        )


def write_cache(
    cache: Path, fill: Callable[[IO[bytes]], dict[str, Any] | None], size: int | None = None
) -> dict[str, Any]:
    """Write a decoded cache through :func:`write_atomic`, ``fill`` writing its bytes and returning what
    the format keeps beside them; ``size``, the bytes it will take where the format knows it, is checked
    against the disk's free space first. The sidecar (size, CRC-32 and that) is in place before the
    cache is renamed into place, so a cache is never seen without it. Returns the sidecar's contents."""
    if size is not None:
        check_free_space(cache, size, "the decoded cache of this token dataset")
    saved: dict[str, Any] = {}

    def write(f: IO[bytes]) -> None:
        summed = _Summing(f)
        saved.update(fill(summed) or {})  # type: ignore[arg-type]
        saved.update(bytes=summed.size, crc32=summed.crc)
        text = json.dumps(saved)
        write_atomic(cache_sidecar(cache), lambda g: g.write(text.encode()))

    write_atomic(cache, write)
    return saved


def read_cache(cache: Path) -> dict[str, Any] | None:
    """The sidecar of a sound cache file (its size and CRC-32 match the sidecar's), None when there is no
    cache. A damaged cache - a byte changed on disk, a sidecar lost - is removed with a note, and None
    returned, so the caller decodes it again: a cache is read only when it holds what was decoded."""
    if not cache.is_file():
        return None
    why = "does not match its checksum (damaged on disk)"
    try:
        saved = json.loads(cache_sidecar(cache).read_text(encoding="utf-8"))
        if saved["bytes"] == cache.stat().st_size and saved["crc32"] == file_crc32(cache):
            return dict(saved)
    except FileNotFoundError:
        why = f"has lost its checksum file {cache_sidecar(cache).name}"
    except (OSError, ValueError, KeyError, TypeError):
        why = f"has an unreadable checksum file {cache_sidecar(cache).name}"
    print(f"note: {cache}: this decoded cache {why}; decoding it again", file=sys.stderr)
    remove_cache(cache)
    return None


def remove_cache(cache: Path) -> None:
    cache.unlink(missing_ok=True)
    cache_sidecar(cache).unlink(missing_ok=True)


def missing_dirs(folder: Path) -> list[Path]:
    """``folder`` and the folders above it that do not exist yet, deepest first: what a writer about to
    make ``folder`` creates, so that a write that fails can take exactly those away again."""
    return [d for d in (folder, *folder.parents) if not d.exists()]


def remove_empty_dirs(made: list[Path]) -> None:
    """Remove the folders :func:`missing_dirs` listed, deepest first, while they are empty."""
    for folder in made:
        try:
            folder.rmdir()
        except OSError:
            break  # not empty (or gone): leave it and the folders above


def map_readonly(path: Path) -> np.ndarray:
    """A file as a read-only uint8 memory map: pages are read on demand and shared with forked loader
    workers, where a map stays valid (an empty array for an empty file, which mmap refuses)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def write_atomic(path: Path, write: Callable[[IO[bytes]], None]) -> Path:
    """Write ``path`` through a temporary file beside it, flushed to disk, then renamed into place, so a
    crash (or a second writer) never leaves a half-written file under the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink()
        if isinstance(err, OSError) and err.filename in (None, str(tmp)):  # named by the file it was for
            raise OSError(err.errno, err.strerror, str(path)) from err
        raise
    return path


def check_ids(ids: np.ndarray, vocab_size: int, what: str, *, first_record: int = 0) -> np.ndarray:
    """``ids`` as int64 [n, H, W] with every id in [0, vocab_size); the error names the first record out
    of range."""
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"{what}: ids must be an [N, H, W] array of integers; got shape {tuple(ids.shape)}")
    if ids.dtype.kind not in "iu":
        raise ValueError(f"{what}: ids must be integers; got {ids.dtype}")
    ids = ids.astype(np.int64, copy=False)
    if ids.size:
        bad = (ids < 0) | (ids >= vocab_size)
        if bad.any():
            record = int(np.flatnonzero(bad.reshape(len(ids), -1).any(axis=1))[0])
            values = ids[record][bad[record]]
            raise ValueError(
                f"{what}: record {first_record + record} holds id {int(values[0])}, outside [0, {vocab_size})"
            )
    return ids


def check_labels(
    labels: np.ndarray | Sequence[int] | None, n: int, what: str, classes: Sequence[str] = ()
) -> np.ndarray | None:
    if labels is None:
        return None
    arr = np.asarray(labels)
    if arr.ndim != 1 or len(arr) != n:
        raise ValueError(f"{what}: {n} records need {n} labels; got shape {tuple(arr.shape)}")
    if n and arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: labels must be integers; got {arr.dtype}")
    arr = arr.astype(np.int64)
    check_label_range(arr, classes, what)
    return arr


MAX_UNNAMED_CLASSES = 1_000_000  # labels without class names are numbered: more would be a damaged file


def read_labels(labels: np.ndarray | None, classes: Sequence[str], what: str) -> np.ndarray | None:
    """The labels a token dataset holds, as its reader keeps them: a column of -1 only (what earlier
    versions wrote for images without labels) is no labels; any other label outside the classes is a
    :class:`TokenRecordError` naming it."""
    if labels is not None and len(labels) and bool((np.asarray(labels) == -1).all()):
        return None
    try:
        check_label_range(labels, classes, what)
    except ValueError as err:
        raise TokenRecordError(str(err)) from err
    return labels


def check_label_range(labels: np.ndarray | None, classes: Sequence[str], what: str) -> None:
    """Labels are class indices: each at least 0 and, when the classes are named, below their count. The
    one check every source makes when it is opened (a -1 would index the last class, a 99 crash a
    classifier head mid-run)."""
    if labels is None or not len(labels):
        return
    labels = np.asarray(labels)
    top = len(classes) if classes else MAX_UNNAMED_CLASSES
    bad = np.flatnonzero((labels < 0) | (labels >= top))
    if len(bad):
        i = int(bad[0])
        allowed = f"0..{top - 1} (its {top} classes)" if classes else f"0..{top - 1} (unnamed classes)"
        raise ValueError(
            f"{what}: label {int(labels[i])} of record {i} is not a class index ({len(bad)} such labels); "
            f"labels must be {allowed}"
        )


SIGNATURE_TOLERANCE = 1e-4  # the same codebook normalised on two devices differs by ~1e-7


def codebook_signature(codebook: torch.Tensor | np.ndarray) -> tuple[float, ...]:
    """The identity of a tokenizer's ids, robust to the last bits a GPU or another CPU changes when it
    normalises the table: each code's projection on one fixed direction (in float64), one number per code.
    Two tokenizers' tables give different numbers; one table on two devices, the same to ~1e-7."""
    table = torch.as_tensor(codebook).detach().to("cpu", torch.float64)
    direction = torch.linspace(-1.0, 1.0, table.shape[1], dtype=torch.float64)
    direction = direction / direction.norm().clamp_min(1e-12)
    return tuple(round(float(v), 6) for v in table @ direction)


def same_codebook(a: Sequence[float], b: Sequence[float]) -> bool:
    return len(a) == len(b) and all(abs(x - y) <= SIGNATURE_TOLERANCE for x, y in zip(a, b, strict=True))


def codebook_digest(codebook: torch.Tensor) -> str:
    """sha256 of a codebook's float32 values and shape: what a dataset records of the table its ids index,
    so that a table lost or replaced beside it is told (whatever file layout holds it)."""
    table = codebook.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha256(f"{tuple(table.shape)}".encode() + table.numpy().tobytes()).hexdigest()


def check_codebook(codebook: torch.Tensor | np.ndarray | None, what: str) -> torch.Tensor | None:
    """The codebook as a contiguous float32 [K, D] CPU tensor (both formats store float32)."""
    if codebook is None:
        return None
    cb = torch.as_tensor(codebook)
    if cb.ndim != 2 or not cb.is_floating_point():
        raise ValueError(
            f"{what}: the codebook must be a float [K, D] tensor; got {cb.dtype} {tuple(cb.shape)}"
        )
    return cb.detach().to("cpu", torch.float32).contiguous().clone()
