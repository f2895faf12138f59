"""SeiT's token dataset files, byte for byte as the official release (naver-ai/seit, ``datasets.py``):

- ``NAME-token.data.bin.gz``: one gzip stream; decompressed, the records back to back in dataset order.
  A record is its ids row-major, escape-coded: id v < 255 is the byte v, id v >= 255 the two bytes
  0xFF, v - 255. The official reader takes every 0xFF byte for an escape marker, so the second byte must
  not be 0xFF: ids 0..509 fit (SeiT's own have 391 codes, 0..390), and a stream holding two 0xFF bytes in
  a row, or ending a record in one, is damaged.
- ``NAME-token.index.npy.gz``: a gzip of a .npy holding N + 1 int64 byte offsets (record i is bytes
  [offsets[i], offsets[i+1]) of the decompressed stream). Its path is the data path with "data.bin"
  replaced by "index.npy".
- ``NAME-label.txt``: one integer label per line. The official reader takes the number of lines as the
  dataset's length, so a label file with fewer lines than records would silently drop the last records
  there: here a label file whose line count differs from the record count is an error.
- ``codebook.ckpt`` beside them: a bare float [K, D] tensor saved with ``torch.save``. A folder holds one
  codebook for all its SeiT datasets (train and val): writing a dataset with another codebook into it is
  refused before anything is written (:func:`check_seit_target`).
- optional ``NAME-class-to-id.json`` ({class name: id}, as the release's imagenet1k-class-to-id.json).
- optional ``NAME-meta.json``, ours: the grid, vocabulary size, tokenizer description and a digest of the
  codebook the ids index. The official reader never opens it; we read it when present so that no
  information is lost in a conversion, and so that a ``codebook.ckpt`` lost or replaced beside the
  dataset is refused rather than read.

The writer refuses an existing ``NAME-token.data.bin.gz`` (as a mimkit folder that already holds a dataset
is refused) unless it is given ``overwrite=True``, and renames the data file into place last, after the
index and the small files, so that a new dataset appears under its final name only once it is whole.

Reading decompresses the stream once into a cache file (``$MIMKIT_CACHE/tokens``, default
``~/.cache/mimkit/tokens``) keyed by the .gz file's absolute path, size and mtime, written through a
temporary file and a rename, with its size and CRC-32 beside it (checked whenever it is opened, so a
cache damaged on disk is decoded again, never read); every process (loader workers included)
memory-maps that one file, so the page cache holds one copy rather than one per worker as the
reference's in-memory bytes object does.
With ``cache=False`` the stream is decompressed into the process's memory instead (no file is made).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import math
import mmap
import os
import re
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mimkit.tokens.codebook import load_codebook as read_codebook
from mimkit.tokens.records import (
    TokenDataset,
    TokenRecordError,
    cache_dir,
    check_codebook,
    check_ids,
    check_labels,
    codebook_digest,
    read_cache,
    read_labels,
    remove_cache,
    write_atomic,
    write_cache,
)

DATA_SUFFIX = "-token.data.bin.gz"
INDEX_SUFFIX = "-token.index.npy.gz"
LABEL_SUFFIX = "-label.txt"
LABEL_LINE = re.compile(r"-?[0-9]+")
CLASSES_SUFFIX = "-class-to-id.json"
META_SUFFIX = "-meta.json"
CODEBOOK = "codebook.ckpt"
ESCAPE = 0xFF
# the largest id the escape coding can hold: 0xFF then 254 (a second 0xFF would be read as a marker)
MAX_ID = 2 * ESCAPE - 1
# ids a SeiT dataset may hold when neither a codebook nor vocab_size says: the format's limit
DEFAULT_VOCAB = MAX_ID + 1
GZIP_LEVEL = 9  # what Python's gzip writes by default
READ_CHUNK = 1 << 16  # compressed bytes fed to zlib at a time (a damaged one is fed again byte by byte)


# ----------------------------------------------------------------------------------------------------
# escape coding


def encode_records(ids: np.ndarray) -> tuple[bytes, np.ndarray]:
    """Escape-code int [n, H, W] id grids: (the concatenated bytes, each record's byte length). Ids must
    lie in 0..509 (the caller checks)."""
    n = len(ids)
    flat = ids.reshape(n, math.prod(ids.shape[1:])).astype(np.int64, copy=False)
    big = flat >= ESCAPE
    # each id's first byte sits after its own index plus one extra byte per earlier escaped id
    escaped_before = np.cumsum(big.ravel()) - big.ravel()
    pos = np.arange(flat.size) + escaped_before
    out = np.empty(flat.size + int(big.sum()), dtype=np.uint8)
    values = flat.ravel()
    out[pos] = np.where(big.ravel(), ESCAPE, values)
    out[pos[big.ravel()] + 1] = values[big.ravel()] - ESCAPE
    return out.tobytes(), flat.shape[1] + big.sum(axis=1)


def decode_record(rec: np.ndarray) -> np.ndarray:
    """The ids (int64, flat) of one escape-coded record (uint8 array), vectorised: every 0xFF byte is a
    marker that adds 255 to the byte after it and is dropped. Raises ValueError for a record ending in a
    marker or holding two markers in a row (which the official reader would decode differently)."""
    marker = rec == ESCAPE
    ids = rec.astype(np.int64)
    if not marker.any():
        return ids
    if marker[-1]:
        raise ValueError("ends in a dangling 0xFF escape byte")
    double = np.flatnonzero(marker[1:] & marker[:-1])
    if len(double):
        raise ValueError(
            f"holds two 0xFF escape bytes in a row at byte {int(double[0])} of the record (an escaped "
            f"id's second byte is at most {MAX_ID - ESCAPE})"
        )
    ids[1:][marker[:-1]] += ESCAPE
    return ids[~marker]


# ----------------------------------------------------------------------------------------------------
# paths


def split_name(data_path: Path) -> tuple[Path, str]:
    """(folder, NAME) of ``.../NAME-token.data.bin.gz``."""
    return data_path.parent, data_path.name[: -len(DATA_SUFFIX)]


def index_path(data_path: Path) -> Path:
    return data_path.with_name(data_path.name.replace("data.bin", "index.npy"))


def sibling(data_path: Path, suffix: str) -> Path:
    folder, name = split_name(data_path)
    return folder / f"{name}{suffix}"


def data_path_for(dst: str | os.PathLike[str]) -> Path:
    """``NAME-token.data.bin.gz`` as given, or for a folder ``FOLDER/<folder name>-token.data.bin.gz``."""
    p = Path(dst).expanduser()
    if p.name.endswith(DATA_SUFFIX):
        return p
    if p.suffix:
        raise ValueError(f"a SeiT dataset is named NAME{DATA_SUFFIX} (or give a folder); got '{dst}'")
    return p / f"{p.name}{DATA_SUFFIX}"


def cache_path(gz: Path) -> Path:
    """The decompressed stream's cache file: a new .gz (other path, size or mtime) gets a new one."""
    st = gz.stat()
    key = hashlib.sha256(f"{gz.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    return cache_dir() / f"{split_name(gz)[1]}-{key}.bin"


# ----------------------------------------------------------------------------------------------------
# reading the small files


def load_index(path: Path) -> np.ndarray:
    """The N + 1 offsets of an index file (pickles refused), as int64."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the index of a SeiT token file is missing")
    try:
        arr = np.load(io.BytesIO(gzip.decompress(path.read_bytes())), allow_pickle=False)
    except (OSError, EOFError, zlib.error, ValueError) as err:
        raise TokenRecordError(f"{path}: not a gzip-compressed .npy array ({err})") from err
    if arr.ndim != 1 or arr.dtype.kind not in "iu" or len(arr) < 1:
        raise TokenRecordError(
            f"{path}: expected a 1-D integer array of N + 1 offsets; got {arr.dtype} {tuple(arr.shape)}"
        )
    return arr.astype(np.int64)


def load_labels(path: Path) -> np.ndarray | None:
    if not path.is_file():
        return None
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise TokenRecordError(f"{path}: not text ({err})") from err
    for i, line in enumerate(lines):  # ASCII digits only: int() would take '٣' or ' 3 ' and hide a damage
        if not LABEL_LINE.fullmatch(line.strip()):
            raise TokenRecordError(f"{path}: line {i + 1} (record {i}) is {line!r}, not an integer label")
    return np.array([int(line) for line in lines], dtype=np.int64)


def load_codebook(path: Path) -> torch.Tensor | None:
    """The folder's ``codebook.ckpt`` (a bare float [K, D] tensor), None when there is none."""
    if not path.is_file():
        return None
    try:
        return read_codebook(path)
    except ValueError as err:
        raise TokenRecordError(str(err)) from err


def load_classes(path: Path) -> tuple[str, ...]:
    if not path.is_file():
        return ()
    try:
        mapping = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenRecordError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(mapping, dict) or not all(type(v) is int for v in mapping.values()):
        raise TokenRecordError(f"{path}: expected a JSON object of class name -> integer id")
    ids = sorted(mapping.values())
    if ids != list(range(len(ids))):
        raise TokenRecordError(f"{path}: class ids must be 0..{len(ids) - 1}, each once")
    return tuple(name for name, _ in sorted(mapping.items(), key=lambda kv: kv[1]))


def index_problems(offsets: np.ndarray, stream_bytes: int | None) -> list[tuple[int | None, str]]:
    """What is wrong with an index: [(first record concerned, why)], empty when it fits the stream."""
    problems: list[tuple[int | None, str]] = []
    if offsets[0] != 0:
        problems.append((0, f"record 0 starts at byte {offsets[0]}, not 0"))
    back = np.flatnonzero(np.diff(offsets) < 0)
    if len(back):
        i = int(back[0])
        problems.append(
            (i, f"not monotone: record {i} ends at byte {offsets[i + 1]}, before it starts ({offsets[i]})")
        )
    if stream_bytes is not None and offsets[-1] != stream_bytes:
        if offsets[-1] > stream_bytes:
            i = int(np.flatnonzero(offsets[1:] > stream_bytes)[0])
            why = (
                f"records from {i} on end past the stream's {stream_bytes} bytes "
                f"(its last offset is {offsets[-1]})"
            )
        else:
            i = len(offsets) - 2
            why = (
                f"its last offset is {offsets[-1]} but the stream holds {stream_bytes} bytes "
                f"(record {i} is the last indexed)"
            )
        problems.append((i, f"does not match the stream: {why}"))
    return problems


class StreamDamage(Exception):
    """A gzip stream that does not decompress whole. ``written``: the decompressed bytes passed on before
    the failure (everything before the damage, to within one compressed byte's output); ``kind``:
    "truncated" (it ends before its end-of-stream marker), "checksum" (a member's CRC-32 or length does
    not match the bytes it gave) or "damaged" (undecodable deflate data or header)."""

    def __init__(self, kind: str, why: str, written: int) -> None:
        super().__init__(why)
        self.kind, self.why, self.written = kind, why, written


class _Inflater:
    """One gzip member after another, fed in pieces (``gzip`` concatenates members)."""

    def __init__(self) -> None:
        self.member, self.started = zlib.decompressobj(31), False

    def copy(self) -> _Inflater:
        other = _Inflater.__new__(_Inflater)
        other.member, other.started = self.member.copy(), self.started
        return other

    def feed(self, data: bytes, write: Callable[[bytes], Any]) -> int:
        """Decompress ``data``, passing the output to ``write``; the bytes passed. Raises zlib.error."""
        total = 0
        while data:
            self.started = True
            piece = self.member.decompress(data)
            write(piece)
            total += len(piece)
            if self.member.eof:  # the next member, if any, starts in its unused data
                data, self.member, self.started = self.member.unused_data, zlib.decompressobj(31), False
            else:
                data = b""
        return total


def _decompress_to(gz: Path, out: IO[bytes]) -> int:
    """Stream-decompress ``gz`` (one or more gzip members) into ``out``; returns the bytes written.
    Raises :class:`StreamDamage` after writing everything that precedes the damage, so the caller knows
    where the stream fails: a piece whose decompression fails is fed again a byte at a time from the state
    before it."""
    total, inflater = 0, _Inflater()
    with open(gz, "rb") as f:
        while chunk := f.read(READ_CHUNK):
            before, pieces = inflater.copy(), []
            try:
                inflater.feed(chunk, pieces.append)
            except zlib.error:
                inflater = before
                for k in range(len(chunk)):
                    try:
                        total += inflater.feed(chunk[k : k + 1], out.write)
                    except zlib.error as err:
                        why = str(err)
                        checksum = "incorrect data check" in why or "incorrect length check" in why
                        raise StreamDamage("checksum" if checksum else "damaged", why, total) from err
                raise AssertionError("zlib failed on a piece it then decompressed byte by byte") from None
            for piece in pieces:
                out.write(piece)
                total += len(piece)
    if inflater.started and not inflater.member.eof:
        raise StreamDamage("truncated", "the gzip stream ends before its end-of-stream marker", total)
    return total


def _record_at(offsets: np.ndarray, byte: int) -> str:
    """Which record a decompressed byte position falls in, in words."""
    inside = int(np.searchsorted(offsets, byte, side="right")) - 1
    if 0 <= inside < len(offsets) - 1:
        return f"inside record {inside} of {len(offsets) - 1}"
    return f"the index expects {offsets[-1]}"


def _stream_error(gz: Path, damage: StreamDamage, offsets: np.ndarray) -> TokenRecordError:
    at = damage.written
    if damage.kind == "truncated":
        return TokenRecordError(
            f"{gz}: truncated: the gzip stream ends after {at} decompressed bytes ({_record_at(offsets, at)})"
        )
    if damage.kind == "checksum":
        return TokenRecordError(
            f"{gz}: the checksum of the gzip member that ends at decompressed byte {at} does not match "
            f"({damage.why}): bytes before it are damaged, which record cannot be told"
        )
    return TokenRecordError(
        f"{gz}: a damaged gzip stream ({damage.why}): it fails after decompressed byte {at} "
        f"({_record_at(offsets, at)})"
    )


def cached_stream(gz: Path, offsets: np.ndarray) -> Path:
    """The decompressed stream of ``gz`` in the cache, made once (atomically) and reused after."""
    target = cache_path(gz)
    if read_cache(target) is not None:
        return target

    def fill(f: IO[bytes]) -> None:
        try:
            _decompress_to(gz, f)
        except StreamDamage as damage:
            raise _stream_error(gz, damage, offsets) from None

    write_cache(target, fill, size=int(offsets[-1]))  # the stream's length: the index's last offset
    return target


def stream_in_memory(gz: Path, offsets: np.ndarray) -> np.ndarray:
    """The decompressed stream of ``gz`` as an in-memory uint8 array (``cache=False``)."""
    buf = io.BytesIO()
    try:
        _decompress_to(gz, buf)
    except StreamDamage as damage:
        raise _stream_error(gz, damage, offsets) from None
    return np.frombuffer(buf.getbuffer(), dtype=np.uint8)


def _map(path: Path) -> np.ndarray:
    """A read-only memory map of a file as uint8 (an empty array for an empty file)."""
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------
# reader


class SeitTokens(TokenDataset):
    """A SeiT token dataset. ``grid``: given, else from ``NAME-meta.json``, else record 0's length, which
    must then be a square. ``vocab_size``: the codebook's rows when ``codebook.ckpt`` is present, else
    given, else ``NAME-meta.json``'s, else 510 (the most the escape coding holds). ``cache``: the
    decompressed stream as a shared cache file (True) or in this process's memory (False)."""

    format = "seit"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        grid: tuple[int, int] | None = None,
        vocab_size: int | None = None,
        cache: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such SeiT token file")
        self.folder, self.name = split_name(self.path)
        self.index_path = index_path(self.path)
        self.label_path = sibling(self.path, LABEL_SUFFIX)
        self.offsets = load_index(self.index_path)
        self.labels = load_labels(self.label_path)
        if self.labels is not None and len(self.labels) + 1 != len(self.offsets):
            first = min(len(self.labels), len(self.offsets) - 1)
            raise TokenRecordError(
                f"{self.index_path}: holds {len(self.offsets)} offsets but {self.label_path.name} has "
                f"{len(self.labels)} labels (expected {len(self.labels) + 1} offsets); record {first} is the "
                "first without a counterpart"
            )
        saved = self._saved_meta()
        self.codebook = self._recorded_codebook(saved.get("codebook_sha256"))
        self.classes = load_classes(sibling(self.path, CLASSES_SUFFIX))
        self.labels = read_labels(self.labels, self.classes, str(self.label_path))
        self.meta = saved.get("meta", {})
        self._buf: np.ndarray | None = None
        self._memory: np.ndarray | None = None  # the stream held in memory when cache=False
        if cache:
            self.cache: Path | None = cached_stream(self.path, self.offsets)
            stream_bytes = self.cache.stat().st_size
        else:
            self.cache = None
            self._memory = stream_in_memory(self.path, self.offsets)
            stream_bytes = len(self._memory)
        problems = index_problems(self.offsets, stream_bytes)
        if problems:
            record, why = problems[0]
            raise TokenRecordError(f"{self.index_path}: record {record}: {why}")
        self.vocab_size = self._vocab(vocab_size, saved)
        self.grid = self._grid(grid, saved)
        self._cells = self.grid[0] * self.grid[1]
        self._check_vocab = self.vocab_size < DEFAULT_VOCAB and self._cells > 0

    def _saved_meta(self) -> dict[str, Any]:
        path = sibling(self.path, META_SUFFIX)
        if not path.is_file():
            return {}
        try:
            saved = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise TokenRecordError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(saved, dict):
            raise TokenRecordError(f"{path}: expected a JSON object")
        grid, vocab = saved.get("grid"), saved.get("vocab_size")
        if grid is not None and not (
            isinstance(grid, list) and len(grid) == 2 and all(type(v) is int and v >= 0 for v in grid)
        ):
            raise TokenRecordError(f"{path}: 'grid' must be [H, W] (integers); got {grid!r}")
        if vocab is not None and not (type(vocab) is int and 1 <= vocab <= DEFAULT_VOCAB):
            raise TokenRecordError(
                f"{path}: 'vocab_size' must be an integer in 1..{DEFAULT_VOCAB}; got {vocab!r}"
            )
        if saved.get("grid") == [0, 0]:  # what an empty dataset records
            saved.pop("grid")
        return saved

    def _recorded_codebook(self, digest: str | None) -> torch.Tensor | None:
        """The folder's ``codebook.ckpt``, checked against the digest our ``NAME-meta.json`` records of the
        codebook the dataset was written with (SeiT's own files record none: nothing to check there)."""
        path = self.folder / CODEBOOK
        codebook = load_codebook(path)
        if digest is None:
            return codebook
        meta = sibling(self.path, META_SUFFIX).name
        if codebook is None:
            raise TokenRecordError(
                f"{path}: missing; {meta} says this dataset's ids index a codebook (sha256 {digest[:12]}...) "
                "that belongs beside it"
            )
        if codebook_digest(codebook) != digest:
            raise TokenRecordError(
                f"{path}: not the codebook this dataset was written with ({meta} records sha256 "
                f"{digest[:12]}..., the file holds {codebook_digest(codebook)[:12]}...): damaged or replaced"
            )
        return codebook

    def _vocab(self, given: int | None, saved: dict[str, Any]) -> int:
        if self.codebook is not None:
            rows = int(self.codebook.shape[0])
            if given is not None and given != rows:
                raise ValueError(f"{self.path}: vocab_size={given} but {CODEBOOK} has {rows} rows")
            return rows
        vocab = given or saved.get("vocab_size") or DEFAULT_VOCAB
        if not 1 <= vocab <= DEFAULT_VOCAB:
            raise ValueError(
                f"{self.path}: vocab_size must be 1..{DEFAULT_VOCAB} in SeiT's format; got {vocab}"
            )
        return int(vocab)

    def _grid(self, given: tuple[int, int] | None, saved: dict[str, Any]) -> tuple[int, int]:
        if given is not None:
            return (int(given[0]), int(given[1]))
        if saved.get("grid"):
            return (int(saved["grid"][0]), int(saved["grid"][1]))
        if len(self) == 0:
            return (0, 0)
        n = len(self._decode(0))
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"{self.path}: record 0 holds {n} ids, not a square grid; pass grid=(H, W) to open it"
            )
        return (side, side)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_buf"] = None  # reopened lazily in the process that reads
        return state

    def _stream(self) -> np.ndarray:
        if self._buf is None:
            if self.cache is not None:
                self._buf = _map(self.cache)
            else:
                if self._memory is None:  # the cache was dropped: read into memory from now on
                    self._memory = stream_in_memory(self.path, self.offsets)
                self._buf = self._memory
        return self._buf

    def _decode(self, i: int) -> np.ndarray:
        buf = self._buf if self._buf is not None else self._stream()
        try:
            return decode_record(buf[self.offsets[i] : self.offsets[i + 1]])
        except ValueError as err:
            raise TokenRecordError(f"{self.path}: record {i}: {err}") from None

    def read(self, index: int) -> np.ndarray:
        i = self._position(index)
        buf = self._buf if self._buf is not None else self._stream()
        rec = buf[self.offsets[i] : self.offsets[i + 1]]
        # fast path: exact for a sound record (H*W ids, no marker at its end or next to another);
        # anything else is decoded again by decode_record, which names the damage
        marker = rec == ESCAPE
        ids = rec.astype(np.int64)
        ids[1:][marker[:-1]] += ESCAPE
        ids = ids[~marker]
        if len(ids) != self._cells or (len(rec) and marker[-1]) or (marker[1:] & marker[:-1]).any():
            ids = self._decode(i)
            if len(ids) != self._cells:
                raise TokenRecordError(
                    f"{self.path}: record {i}: decodes to {len(ids)} ids, expected {self._cells} "
                    f"(grid {self.grid[0]}x{self.grid[1]})"
                )
        if self._check_vocab and ids.max() >= self.vocab_size:
            raise TokenRecordError(
                f"{self.path}: record {i}: holds id {int(ids.max())}, outside the vocabulary "
                f"[0, {self.vocab_size})"
            )
        return ids.reshape(self.grid)

    def read_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Records as int64 [n, H, W], decoded in one NumPy pass over their gathered bytes (every 0xFF a
        marker, with no carry from one record into the next). A record that does not yield H*W ids, ends
        in a marker, holds two markers in a row or an id outside the vocabulary is decoded again on its
        own by :meth:`read`, which names the damage."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and not ((idx >= -n) & (idx < n)).all():
            self._position(int(idx[(idx < -n) | (idx >= n)][0]))  # raises IndexError naming it
        idx = np.where(idx < 0, idx + n, idx)
        out = np.empty((len(idx), *self.grid), dtype=np.int64)
        if not len(idx):
            return out
        buf = self._buf if self._buf is not None else self._stream()
        starts = self.offsets[idx]
        lengths = self.offsets[idx + 1] - starts
        sound = lengths >= max(self._cells, 1)  # a sound record has at least H*W bytes
        if sound.any():
            lengths = np.where(sound, lengths, 0)
            # byte k of the gather is starts[r] + (k - where record r begins in the gather)
            begins = np.cumsum(lengths) - lengths
            raw = buf[np.repeat(starts - begins, lengths) + np.arange(int(lengths.sum()))]
            marker = raw == ESCAPE
            first_bytes = begins[(lengths > 0) & (begins > 0)]  # bytes that begin a record (but the first)
            double = marker[1:] & marker[:-1]
            double[first_bytes - 1] = False  # a marker ending one record next to the following record's
            if double.any():
                sound[np.searchsorted(begins + lengths, np.flatnonzero(double), side="right")] = False
            ids_before = np.concatenate([[0], np.cumsum(~marker)])  # ids kept before each byte
            per_record = ids_before[begins + lengths] - ids_before[begins]
            ends_in_marker = marker[np.maximum(begins + lengths - 1, 0)]
            sound &= (per_record == self._cells) & ~ends_in_marker
            # uint16 values, a marker's 255 added to the next byte unless that byte begins a record
            carry = marker[:-1].view(np.uint8) * np.uint8(ESCAPE)
            carry[first_bytes - 1] = 0
            values = raw.astype(np.uint16)
            values[1:] += carry
            keep = ~marker if sound.all() else ~marker & np.repeat(sound, lengths)
            out[sound] = values.take(np.flatnonzero(keep)).reshape(-1, *self.grid)
            if self._check_vocab and sound.any():
                sound &= out.reshape(len(idx), -1).max(axis=1) < self.vocab_size
        for row in np.flatnonzero(~sound):  # the careful path, naming any damaged record
            out[row] = self.read(int(idx[row]))
        return out

    def files(self) -> list[Path]:
        names = [
            self.path,
            self.index_path,
            self.label_path,
            sibling(self.path, CLASSES_SUFFIX),
            sibling(self.path, META_SUFFIX),
        ]
        return [p for p in names if p.is_file()]

    def close(self) -> None:
        self._buf = None

    def drop_cache(self) -> None:
        """Close and delete the decompressed cache file (for a dataset that is itself temporary: the
        cache is otherwise kept, keyed by the .gz file's path, size and mtime, and never cleaned).
        Reading again decompresses the stream into memory."""
        self.close()
        if self.cache is not None:
            remove_cache(self.cache)
            self.cache = None  # reading again decompresses into memory


# ----------------------------------------------------------------------------------------------------
# writer


def _same_codebook(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a, b)


def _folder_codebook(path: Path, codebook: torch.Tensor | None, vocab_size: int | None) -> int | None:
    """Check the ``codebook.ckpt`` already beside ``path`` (shared by every SeiT dataset of the folder)
    against a dataset to be written there with ``codebook`` / ``vocab_size``; returns the vocabulary the
    dataset then has (the folder's codebook rows when it brings none, since readers will use those)."""
    there = path.parent / CODEBOOK
    existing = load_codebook(there)
    if existing is None:
        return vocab_size
    if codebook is not None:
        if not _same_codebook(existing, codebook):
            shapes = f"{tuple(existing.shape)} there, {tuple(codebook.shape)} here"
            what = "other values" if existing.shape == codebook.shape else shapes
            raise ValueError(
                f"{path.parent}: its {CODEBOOK} differs from this dataset's codebook ({what}); a folder "
                "holds one codebook for all its SeiT datasets: write to another folder"
            )
        return vocab_size
    rows = int(existing.shape[0])
    if vocab_size is not None and vocab_size > rows:
        raise ValueError(
            f"{path.parent}: its {CODEBOOK} has {rows} rows (the codebook of every SeiT dataset in this "
            f"folder); a dataset of {vocab_size} codes does not fit it: write to another folder"
        )
    return rows


def _target(
    dst: str | os.PathLike[str],
    codebook: torch.Tensor | None,
    vocab_size: int | None,
    overwrite: bool,
) -> tuple[Path, int]:
    """(data path, vocabulary) of a SeiT dataset about to be written, or the error the writer gives."""
    path = data_path_for(dst)
    if codebook is not None:
        rows = int(codebook.shape[0])
        if vocab_size is not None and vocab_size != rows:
            raise ValueError(f"{path}: vocab_size={vocab_size} but the codebook has {rows} rows")
        vocab_size = rows
    if vocab_size is not None and not 1 <= vocab_size <= DEFAULT_VOCAB:
        raise ValueError(
            f"{path}: SeiT's escape coding holds ids 0..{MAX_ID}; a vocabulary of {vocab_size} does not fit "
            "(use the mimkit format)"
        )
    vocab_size = _folder_codebook(path, codebook, vocab_size)
    if not overwrite and path.exists():
        raise ValueError(
            f"{path}: already exists and is not overwritten; remove it (and its {index_path(path).name}) "
            "first, or write to another name"
        )
    return path, vocab_size or DEFAULT_VOCAB


def check_seit_target(
    dst: str | os.PathLike[str],
    codebook: torch.Tensor | np.ndarray | None = None,
    vocab_size: int | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Check, before any expensive work, that :class:`SeitWriter` could write a dataset with this
    codebook / vocabulary at ``dst``: a ``NAME-token.data.bin.gz`` name (or a folder), a vocabulary the
    escape coding holds (at most 510), no different ``codebook.ckpt`` in the folder, and no existing data
    file unless ``overwrite``. Raises the writer's ValueError; returns the data file's path."""
    path = data_path_for(dst)
    return _target(path, check_codebook(codebook, str(path)), vocab_size, overwrite)[0]


class SeitWriter:
    """Writes a SeiT dataset in chunks (``append``), then the codebook, the small files and, last, the data
    file at ``finish``. Every file is written through a temporary and renamed, and gzip's header carries no
    timestamp, so the same records give the same bytes. ``dst``: ``NAME-token.data.bin.gz`` or a folder.
    The checks of :func:`check_seit_target` run before anything is written and again before the files are
    renamed into place. A failed ``finish`` removes what it wrote; ``abort`` drops an unfinished one."""

    def __init__(
        self,
        dst: str | os.PathLike[str],
        *,
        grid: tuple[int, int] | None = None,
        vocab_size: int | None = None,
        codebook: torch.Tensor | np.ndarray | None = None,
        classes: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
        overwrite: bool = False,
    ) -> None:
        path = data_path_for(dst)
        self.codebook = check_codebook(codebook, str(path))
        self.overwrite = overwrite
        self.path, self.vocab_size = _target(path, self.codebook, vocab_size, overwrite)
        self.grid = tuple(grid) if grid is not None else None
        self.classes, self.meta = tuple(classes), dict(meta or {})
        # folders this writer makes, deepest first: removed again (when empty) if it does not finish
        self._made_dirs = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        self._raw = open(self._tmp, "wb")  # noqa: SIM115 - stays open across append() calls
        self._gz = gzip.GzipFile(filename="", mode="wb", fileobj=self._raw, compresslevel=GZIP_LEVEL, mtime=0)
        self._offsets = [0]
        self._labels: list[np.ndarray] = []
        self._has_labels: bool | None = None

    def append(self, ids: np.ndarray, labels: np.ndarray | Sequence[int] | None = None) -> None:
        """Add records: ids int [n, H, W] in 0..509 (and below the vocabulary size)."""
        arr = np.asarray(ids)
        n_before = len(self._offsets) - 1
        if arr.ndim == 3 and arr.size and arr.dtype.kind in "iu" and (arr.max() > MAX_ID):
            rec = int(np.flatnonzero((arr.reshape(len(arr), -1) > MAX_ID).any(axis=1))[0])
            raise ValueError(
                f"{self.path}: record {n_before + rec} holds id {int(arr[rec].max())}; SeiT's escape coding "
                f"holds ids 0..{MAX_ID} only (use the mimkit format)"
            )
        arr = check_ids(arr, self.vocab_size, str(self.path), first_record=n_before)
        if self.grid is None:
            self.grid = (arr.shape[1], arr.shape[2])
        elif (arr.shape[1], arr.shape[2]) != self.grid:
            raise ValueError(f"{self.path}: records of grid {arr.shape[1:]} added to a {self.grid} dataset")
        lab = check_labels(labels, len(arr), str(self.path), self.classes)
        if self._has_labels is None:
            self._has_labels = lab is not None
        elif self._has_labels != (lab is not None) and len(arr):
            raise ValueError(f"{self.path}: either every record has a label or none has")
        data, lengths = encode_records(arr)
        try:
            self._gz.write(data)
        except OSError as err:  # a full disk: named by the dataset being written
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        self._offsets.extend((self._offsets[-1] + np.cumsum(lengths)).tolist())
        if lab is not None:
            self._labels.append(lab)

    def finish(self) -> SeitTokens:
        made: list[Path] = []  # files this call creates, removed again if it fails
        try:
            self._gz.close()
            self._raw.flush()
            os.fsync(self._raw.fileno())
            self._raw.close()
            # the folder may have changed while the records were written: check again before any rename
            _target(self.path, self.codebook, self.vocab_size, self.overwrite)
            self._write_small_files(made)
            os.replace(self._tmp, self.path)  # last: the dataset appears whole
        except BaseException as err:
            for path in made:
                path.unlink(missing_ok=True)
            self.abort()
            if isinstance(err, OSError) and err.filename is None:  # a full disk, named by the dataset
                raise OSError(err.errno, err.strerror, str(self.path)) from err
            raise
        return SeitTokens(self.path, grid=self.grid)  # its cache is made here, once

    def _write_small_files(self, made: list[Path]) -> None:
        """The codebook (when the folder has none yet), index, labels, class names and meta."""

        def write(path: Path, fill: Callable[[IO[bytes]], Any]) -> None:
            if not path.exists():
                made.append(path)
            write_atomic(path, fill)

        if self.codebook is not None and not (self.path.parent / CODEBOOK).is_file():
            codebook = self.codebook
            write(self.path.parent / CODEBOOK, lambda f: torch.save(codebook, f))
        offsets = np.asarray(self._offsets, dtype=np.int64)

        def index(f: IO[bytes]) -> None:
            buf = io.BytesIO()
            np.save(buf, offsets, allow_pickle=False)
            f.write(gzip.compress(buf.getvalue(), compresslevel=GZIP_LEVEL, mtime=0))

        write(index_path(self.path), index)
        label_path = sibling(self.path, LABEL_SUFFIX)
        if self._has_labels:
            labels = np.concatenate(self._labels) if self._labels else np.zeros(0, np.int64)
            text = "".join(f"{int(v)}\n" for v in labels)
            write(label_path, lambda f: f.write(text.encode()))
        else:
            label_path.unlink(missing_ok=True)
        classes_path = sibling(self.path, CLASSES_SUFFIX)
        if self.classes:
            mapping = json.dumps({c: i for i, c in enumerate(self.classes)}, indent=1, ensure_ascii=False)
            write(classes_path, lambda f: f.write(mapping.encode()))
        else:
            classes_path.unlink(missing_ok=True)
        saved: dict[str, Any] = {
            "grid": list(self.grid or (0, 0)),
            "vocab_size": self.vocab_size,
            "meta": self.meta,
        }
        written_with = (
            self.codebook if self.codebook is not None else load_codebook(self.path.parent / CODEBOOK)
        )
        if written_with is not None:  # readers check the folder's codebook.ckpt against it
            saved["codebook_sha256"] = codebook_digest(written_with)
        meta_text = json.dumps(saved, indent=1, sort_keys=True, default=str)
        write(sibling(self.path, META_SUFFIX), lambda f: f.write(meta_text.encode()))

    def abort(self) -> None:
        """Drop an unfinished dataset: its temporary stream file, and the folders made for it if empty. On a
        full disk closing the streams fails again; the temporary goes all the same."""
        for stream in (self._gz, self._raw):
            with contextlib.suppress(OSError):
                stream.close()
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            self._tmp.unlink()
        for folder in self._made_dirs:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): leave it and the folders above


def write_seit(
    dst: str | os.PathLike[str],
    ids: np.ndarray,
    labels: np.ndarray | Sequence[int] | None = None,
    *,
    vocab_size: int | None = None,
    codebook: torch.Tensor | np.ndarray | None = None,
    classes: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> SeitTokens:
    """All of ``ids`` (int [N, H, W]) as a SeiT dataset at ``dst`` in one call."""
    writer = SeitWriter(
        dst, vocab_size=vocab_size, codebook=codebook, classes=classes, meta=meta, overwrite=overwrite
    )
    try:
        writer.append(ids, labels)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()
