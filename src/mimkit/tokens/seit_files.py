"""SeiT's token dataset files below the dataset object: their names, the escape coding of the records,
the small files beside the data file, and the gzip stream decompressed into a cache file or memory. The
reader (:mod:`mimkit.tokens.seit`) and the writer (:mod:`mimkit.tokens.seit_writer`) share these.

The files, byte for byte as the official release (naver-ai/seit, ``datasets.py``):

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
  refused before anything is written (:func:`~mimkit.tokens.seit_writer.check_seit_target`).
- optional ``NAME-class-to-id.json`` ({class name: id}, as the release's imagenet1k-class-to-id.json).
- optional ``NAME-meta.json``, ours: the grid, vocabulary size, tokenizer description and a digest of the
  codebook the ids index. The official reader never opens it; we read it when present so that no
  information is lost in a conversion, and so that a ``codebook.ckpt`` lost or replaced beside the
  dataset is refused rather than read.

Reading decompresses the stream once into a cache file (``$MIMKIT_CACHE/tokens``, default
``~/.cache/mimkit/tokens``) keyed by the .gz file's absolute path, size and mtime, written through a
temporary file and a rename, with its size and CRC-32 beside it (checked whenever it is opened, so a
cache damaged on disk is decoded again, never read); every process (loader workers included)
memory-maps that one file, so the page cache holds one copy rather than one per worker as the
reference's in-memory bytes object does.
With ``cache=False`` the stream is decompressed into the process's memory instead (no file is made).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mimkit.tokens.codebook import load_codebook as read_codebook
from mimkit.tokens.records import TokenRecordError, cache_dir, read_cache, write_cache

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


# ----------------------------------------------------------------------------------------------------
# the gzip stream


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
