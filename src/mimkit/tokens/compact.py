"""mimkit's token format: a folder of shards that can be written in parallel, resumed shard by shard and
read at random, each holding zstd-compressed chunks of fixed-width ids with a CRC-32 per chunk.

Folder::

    mimkit-tokens.json     header, written last: format, version, grid, vocab_size, shard_size, records,
                           labels, classes, meta (the tokenizer), codec (its name, level and chunk size),
                           codebook (+ sha256), shards
    codebook.safetensors   the codebook ("codebook": float32 [K, D]), when there is one
    shard-00000.mtok ...   records
    mimkit-tokens.writing.json   only while unfinished: the writer's grid, vocab_size, shard_size and
                           codebook sha256, so that resuming with other parameters is refused

A shard is ``[chunks][footer][trailer]``. A chunk holds up to ``chunk_records`` consecutive records (about
1 MiB of ids): their ids at the narrowest width that holds the vocabulary (uint8 up to 256 codes, uint16
up to 65,536, else uint32), laid out as byte planes (every id's low byte, then every id's next byte),
compressed as one zstd frame. Byte planes compress about 4% better than interleaved uint16 (CIFAR ids of
384 codes), which brings the format to SeiT's .gz size (``bench/storage.py``) while decoding some 30
times faster than gunzip. The footer (zstd) holds each chunk's byte length, CRC-32 and record count and
each record's int64 label; a fixed 40-byte trailer (magic, records, payload and footer sizes, the
footer's CRC-32, flags) ends the file. A damaged byte fails its chunk's CRC-32 and a cut shard loses its
trailer, so damage is reported (file, chunk and records named), never decoded into ids.

Reading for training goes through a decoded cache (:class:`CompactTokens`, ``cache=True``): the
decompression is paid once per dataset and machine, and ``read(i)`` is then a copy of H*W ids out of a
memory-mapped file.

Format version 1 (a rank-ANS entropy coder with fitted tables, ``codec.npz``) saved 3.5% against SeiT's
.gz on CIFAR tokens but needed a library of its own; its folders are refused with one line saying how to
remake them.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
import zstandard
from safetensors.torch import save

from mimkit.tokens.codebook import load_codebook as read_codebook
from mimkit.tokens.records import (
    TokenDataset,
    TokenRecordError,
    cache_dir,
    check_codebook,
    check_ids,
    check_labels,
    read_cache,
    read_labels,
    remove_cache,
    write_atomic,
    write_cache,
)

FORMAT = "mimkit-tokens"
VERSION = 2
HEADER = "mimkit-tokens.json"
# the writer's parameters, written when a folder is started and removed by finish() (the header then
# holds them): a writer opened on an unfinished folder checks it is continuing the same dataset
WRITING = "mimkit-tokens.writing.json"
CODEBOOK = "codebook.safetensors"
OLD_CODEC = "codec.npz"  # format version 1's coder tables: such a folder is refused with its own line
SHARD_SIZE = 10_000
SHARD_RE = re.compile(r"shard-(\d{5,})\.mtok")
CODEC_NAME = "zstd-planes"
ZSTD_LEVEL = 19  # 4 MB/s of raw ids per core to write; within 1.5% of SeiT's gzip -9 on CIFAR tokens
CHUNK_BYTES = 1 << 20  # raw ids per chunk: the unit of compression, checksum and random access
TRAILER = struct.Struct("<8sQQQII")  # magic, records, payload bytes, footer bytes, footer crc32, flags
MAGIC = b"MTOKSHD2"
FLAG_LABELS = 1
BAD_CHECKSUM = "checksum mismatch (the bytes are damaged)"
CACHE_LAYOUT = "ids-npy-3"  # part of the cache key: a new cache layout never reads an old file
CACHE_NOTICE_S = 2.0  # building the cache says so on stderr when it takes longer than this


def shard_name(k: int) -> str:
    return f"shard-{k:05d}.mtok"


def shard_files(folder: Path) -> dict[int, Path]:
    """The shard files of a folder by shard number (temporaries of unfinished writes excluded)."""
    if not folder.is_dir():
        return {}
    found = {}
    for p in folder.iterdir():
        m = SHARD_RE.fullmatch(p.name)
        if m:
            found[int(m.group(1))] = p
    return dict(sorted(found.items()))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned integer that holds ids 0..vocab_size-1."""
    return np.dtype("<u1" if vocab_size <= 1 << 8 else "<u2" if vocab_size <= 1 << 16 else "<u4")


def chunk_records(grid: tuple[int, int], dtype: np.dtype) -> int:
    return max(1, CHUNK_BYTES // (math.prod(grid) * dtype.itemsize))


# ----------------------------------------------------------------------------------------------------
# chunks and shards


def encode_chunk(ids: np.ndarray, dtype: np.dtype, level: int = ZSTD_LEVEL) -> bytes:
    """ids [n, H, W] as byte planes, compressed as one zstd frame (with zstd's own content checksum)."""
    planes = np.ascontiguousarray(ids, dtype=dtype).view(np.uint8).reshape(-1, dtype.itemsize).T
    return zstandard.ZstdCompressor(level=level, write_checksum=True).compress(planes.tobytes())


def decode_chunk(data: bytes | np.ndarray, n: int, grid: tuple[int, int], dtype: np.dtype) -> np.ndarray:
    """The ids [n, H, W] (``dtype``) of a chunk; ValueError when it does not decompress to them."""
    try:
        raw = zstandard.ZstdDecompressor().decompress(bytes(data))
    except zstandard.ZstdError as err:
        raise ValueError(f"does not decompress ({err})") from None
    cells = n * math.prod(grid)
    if len(raw) != cells * dtype.itemsize:
        raise ValueError(f"decompresses to {len(raw)} bytes, not the {cells} ids of its {n} records")
    planes = np.frombuffer(raw, np.uint8).reshape(dtype.itemsize, cells)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(n, *grid)


def build_shard(ids: np.ndarray, labels: np.ndarray | None, dtype: np.dtype, per_chunk: int) -> bytes:
    chunks = [encode_chunk(ids[s : s + per_chunk], dtype) for s in range(0, len(ids), per_chunk)]
    counts = [min(per_chunk, len(ids) - s) for s in range(0, len(ids), per_chunk)]
    parts = [
        np.array([len(c) for c in chunks], "<u8").tobytes(),
        np.array([zlib.crc32(c) for c in chunks], "<u4").tobytes(),
        np.array(counts, "<u4").tobytes(),
    ]
    if labels is not None:
        parts.append(labels.astype("<i8").tobytes())
    footer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(parts))
    payload = b"".join(chunks)
    flags = FLAG_LABELS if labels is not None else 0
    trailer = TRAILER.pack(MAGIC, len(ids), len(payload), len(footer), zlib.crc32(footer), flags)
    return payload + footer + trailer


class ShardIndex:
    """What a shard's footer says: each chunk's [start, end) in the file, CRC-32 and record count, and
    each record's label."""

    def __init__(
        self,
        starts: np.ndarray,
        ends: np.ndarray,
        crcs: np.ndarray,
        counts: np.ndarray,
        labels: np.ndarray | None,
    ) -> None:
        self.starts, self.ends, self.crcs, self.counts, self.labels = starts, ends, crcs, counts, labels

    def __len__(self) -> int:
        """Records in the shard."""
        return int(self.counts.sum())


def read_trailer(path: Path) -> tuple[int, int, int, int, int]:
    """(records, payload bytes, footer bytes, footer crc, flags); TokenRecordError when the file is cut
    or is not a shard."""
    size = path.stat().st_size
    if size < TRAILER.size:
        raise TokenRecordError(f"{path}: truncated: {size} bytes, shorter than a shard's trailer")
    with open(path, "rb") as f:
        f.seek(size - TRAILER.size)
        magic, n, payload, footer, crc, flags = TRAILER.unpack(f.read(TRAILER.size))
    if magic != MAGIC:
        raise TokenRecordError(f"{path}: truncated or not a shard (no shard trailer at its end)")
    if payload + footer + TRAILER.size != size:
        raise TokenRecordError(
            f"{path}: truncated or padded: {size} bytes, but its trailer accounts for "
            f"{payload + footer + TRAILER.size}"
        )
    return n, payload, footer, crc, flags


def read_shard_index(path: Path) -> ShardIndex:
    n, payload, footer_size, crc, flags = read_trailer(path)
    with open(path, "rb") as f:
        f.seek(payload)
        footer = f.read(footer_size)
    if zlib.crc32(footer) != crc:
        raise TokenRecordError(f"{path}: footer checksum mismatch (the chunk table is damaged)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(footer)
    except zstandard.ZstdError as err:
        raise TokenRecordError(f"{path}: footer does not decompress ({err})") from err
    has_labels = bool(flags & FLAG_LABELS)
    table = len(raw) - (8 * n if has_labels else 0)
    if table < 0 or table % 16:
        raise TokenRecordError(f"{path}: footer holds {len(raw)} bytes, not a chunk table and {n} labels")
    c = table // 16
    lengths = np.frombuffer(raw, "<u8", c, 0).astype(np.int64)
    crcs = np.frombuffer(raw, "<u4", c, 8 * c).astype(np.int64)
    counts = np.frombuffer(raw, "<u4", c, 12 * c).astype(np.int64)
    labels = np.frombuffer(raw, "<i8", n, 16 * c).astype(np.int64) if has_labels else None
    ends = np.cumsum(lengths)
    if counts.sum() != n or (c and ends[-1] != payload) or (not c and payload):
        raise TokenRecordError(
            f"{path}: its chunk table ({c} chunks, {int(counts.sum())} records, {int(lengths.sum())} bytes) "
            f"does not match its trailer ({n} records, {payload} bytes)"
        )
    return ShardIndex(ends - lengths, ends, crcs, counts, labels)


def _map(path: Path) -> np.ndarray:
    """A shard as a read-only uint8 memory map (a shared read-only map stays valid in forked children)."""
    if path.stat().st_size == 0:
        return np.zeros(0, np.uint8)
    with open(path, "rb") as f:
        return np.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), dtype=np.uint8)


def cache_path(key: str, name: str) -> Path:
    """The decoded cache of a dataset: ``key`` (see ``CompactTokens._cache_key``) says what it was decoded
    from, ``name`` (the folder's name) makes it recognisable."""
    return cache_dir() / f"{name}-{key}.npy"


def _npy_layout(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-ordered .npy file whose size matches its header."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        if version != (1, 0):
            raise ValueError(f"{path}: .npy version {version}")
        shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        offset = f.tell()
    if fortran or path.stat().st_size != offset + math.prod(shape) * dtype.itemsize:
        raise ValueError(f"{path}: not a whole C-ordered array")
    return offset, tuple(shape), dtype


def _map_npy(path: Path) -> np.ndarray:
    """A .npy file as a read-only memory-mapped array: a plain ndarray over an mmap (cheaper to index
    than np.memmap, whose every slice is a memmap object; still one shared page-cache copy)."""
    offset, shape, dtype = _npy_layout(path)
    if math.prod(shape) == 0:
        return np.zeros(shape, dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    return np.frombuffer(mm, dtype=dtype, count=math.prod(shape), offset=offset).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# header, codebook


def old_layout_error(folder: Path) -> TokenRecordError:
    return TokenRecordError(
        f"{folder}: a mimkit token folder of format version 1 (rank-ANS codec, {OLD_CODEC}), which this "
        f"mimkit no longer reads (it reads version {VERSION}): convert it with the mimkit that wrote it "
        f"(`mimkit tokens convert {folder} OUT-token.data.bin.gz --to seit`, which this one reads), or "
        "tokenize its images again"
    )


def read_header(folder: Path) -> dict[str, Any]:
    path = folder / HEADER
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TokenRecordError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TokenRecordError(f"{path}: not a {FORMAT} header")
    if header.get("version") == 1:
        raise old_layout_error(folder)
    if header.get("version") != VERSION:
        raise TokenRecordError(
            f"{path}: format version {header.get('version')}; this mimkit reads version {VERSION}"
        )
    for key in ("grid", "vocab_size", "records", "shards", "codec"):
        if key not in header:
            raise TokenRecordError(f"{path}: the header lacks '{key}'")
    why = _header_shape_problem(header)
    if why:
        raise TokenRecordError(f"{path}: {why}")
    return header


def _count(value: Any, least: int = 0) -> bool:
    return type(value) is int and value >= least


def _header_shape_problem(h: dict[str, Any]) -> str | None:
    """What in a header has the wrong type or range (so that every later use of it is safe), or None."""
    grid = h["grid"]
    if not (isinstance(grid, list) and len(grid) == 2 and all(_count(v, 1) for v in grid)):
        return f"'grid' must be [H, W] of positive integers; got {grid!r}"
    if not _count(h["vocab_size"], 1):
        return f"'vocab_size' must be a positive integer; got {h['vocab_size']!r}"
    if not _count(h["records"]):
        return f"'records' must be a non-negative integer; got {h['records']!r}"
    shards = h["shards"]
    if not isinstance(shards, list):
        return f"'shards' must be a list; got {type(shards).__name__}"
    for k, entry in enumerate(shards):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("file"), str)
            and SHARD_RE.fullmatch(entry["file"])
            and _count(entry.get("records"))
            and _count(entry.get("bytes"))
        ):
            return f"shard entry {k} must be {{file: shard-NNNNN.mtok, records, bytes}}; got {entry!r}"
    codec = h["codec"]
    if not (isinstance(codec, dict) and codec.get("name") == CODEC_NAME):
        name = codec.get("name") if isinstance(codec, dict) else codec
        return f"unknown codec {name!r}; expected {CODEC_NAME}"
    cb = h.get("codebook")
    if cb and not (isinstance(cb, dict) and cb.get("file") == CODEBOOK and isinstance(cb.get("sha256"), str)):
        return f"'codebook' must name {CODEBOOK} and its sha256; got {cb!r}"
    return None


def load_codebook(folder: Path, entry: dict[str, Any] | None) -> torch.Tensor | None:
    """The dataset's ``codebook.safetensors`` once its sha256 matches the header's; None without one."""
    if not entry:
        return None
    path = folder / entry["file"]
    if not path.is_file():
        raise TokenRecordError(f"{path}: the codebook named in {HEADER} is missing")
    if sha256(path) != entry["sha256"]:
        raise TokenRecordError(
            f"{path}: sha256 differs from the header's (the codebook is damaged or replaced)"
        )
    try:
        return read_codebook(path)
    except ValueError as err:
        raise TokenRecordError(str(err)) from err


def _codebook_bytes(cb: torch.Tensor) -> bytes:
    return save({"codebook": cb})


def codebook_sha256(cb: torch.Tensor | None) -> str | None:
    """The sha256 that ``codebook.safetensors`` holding ``cb`` has (None without a codebook)."""
    return None if cb is None else hashlib.sha256(_codebook_bytes(cb)).hexdigest()


def _show(value: Any) -> str:
    """A parameter in an error message: grids as tuples, hashes shortened, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return str(tuple(value))
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    return str(value)


# ----------------------------------------------------------------------------------------------------
# writer


class CompactWriter:
    """Writes a mimkit token folder shard by shard: ``write_shard(k, ids, labels)`` for each k - in any
    order, from any number of processes, each shard written to a temporary, flushed and renamed - and
    ``finish()`` once all shards 0..S-1 exist, which writes the codebook and the header. ``done_shards()``
    lists the shards already complete, so a stopped job resumes at the first missing one; a writer opened
    on a folder started with other parameters is refused."""

    def __init__(
        self,
        dst: str | os.PathLike[str],
        *,
        grid: tuple[int, int],
        vocab_size: int,
        codebook: torch.Tensor | np.ndarray | None = None,
        classes: Sequence[str] = (),
        meta: dict[str, Any] | None = None,
        shard_size: int = SHARD_SIZE,
    ) -> None:
        self.path = Path(dst).expanduser()
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"{self.path}: a mimkit token dataset is a folder; this is a file")
        self.grid = (int(grid[0]), int(grid[1]))
        if min(self.grid) < 1:
            raise ValueError(f"{self.path}: grid must be at least 1x1; got {self.grid}")
        self.codebook = check_codebook(codebook, str(self.path))
        if self.codebook is not None and self.codebook.shape[0] != vocab_size:
            raise ValueError(
                f"{self.path}: vocab_size={vocab_size} but the codebook has {self.codebook.shape[0]} rows"
            )
        self.vocab_size = int(vocab_size)
        if shard_size < 1:
            raise ValueError(f"{self.path}: shard_size must be at least 1; got {shard_size}")
        self.shard_size = int(shard_size)
        self.classes, self.meta = tuple(classes), dict(meta or {})
        self.dtype = id_dtype(self.vocab_size)
        self.per_chunk = chunk_records(self.grid, self.dtype)
        if (self.path / OLD_CODEC).is_file():
            raise old_layout_error(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if (self.path / HEADER).is_file() or (self.path / WRITING).is_file():
            self._check_same_dataset()
        elif shard_files(self.path):
            raise ValueError(
                f"{self.path}: holds shard files but no {WRITING} saying how they were written; remove "
                "the shards to start over"
            )
        else:
            text = json.dumps(self.parameters(), indent=1)
            write_atomic(self.path / WRITING, lambda f: f.write(text.encode()))

    def parameters(self) -> dict[str, Any]:
        """What a resumed writer must share with the one that started the folder."""
        return {
            "grid": list(self.grid),
            "vocab_size": self.vocab_size,
            "shard_size": self.shard_size,
            "codebook_sha256": codebook_sha256(self.codebook),
        }

    def _started_with(self) -> dict[str, Any]:
        """The parameters the folder was started with: its header (finished), else the writer's file."""
        if (self.path / HEADER).is_file():
            h = read_header(self.path)
            return {
                "grid": list(h["grid"]),
                "vocab_size": h["vocab_size"],
                "shard_size": h.get("shard_size"),
                "codebook_sha256": (h.get("codebook") or {}).get("sha256"),
            }
        try:
            return dict(json.loads((self.path / WRITING).read_text(encoding="utf-8")))
        except (json.JSONDecodeError, TypeError, ValueError) as err:
            raise ValueError(f"{self.path / WRITING}: not readable ({err}); remove the folder") from err

    def _check_same_dataset(self) -> None:
        """A folder already started (perhaps holding shards, or finished) is resumed only by a writer with
        the same grid, vocabulary, shard size and codebook: anything else would mix two datasets."""
        here, there = self.parameters(), self._started_with()
        differ = [
            f"{key} {_show(there[key])} there, {_show(here[key])} here"
            for key in here
            if key in there and there[key] != here[key]
        ]
        if differ:
            raise ValueError(
                f"{self.path}: holds a token dataset (or part of one) written with other parameters: "
                f"{'; '.join(differ)}. Resuming it would mix two datasets: remove the folder or write to "
                "another"
            )

    def done_shards(self) -> list[int]:
        """Shards whose file is complete (a sound trailer)."""
        done = []
        for k, p in shard_files(self.path).items():
            try:
                read_trailer(p)
            except (TokenRecordError, OSError):
                continue
            done.append(k)
        return done

    def write_shard(self, k: int, ids: np.ndarray, labels: np.ndarray | Sequence[int] | None = None) -> Path:
        what = f"{self.path / shard_name(k)}"
        ids = check_ids(ids, self.vocab_size, what)
        if ids.shape[1:] != self.grid:
            raise ValueError(f"{what}: records of grid {ids.shape[1:]} in a {self.grid} dataset")
        lab = check_labels(labels, len(ids), what, self.classes)
        data = build_shard(ids, lab, self.dtype, self.per_chunk)
        return write_atomic(self.path / shard_name(k), lambda f: f.write(data))

    def finish(self) -> CompactTokens:
        """Write the codebook and the header (last), after checking shards 0..S-1 are all there."""
        found = shard_files(self.path)
        if found and sorted(found) != list(range(len(found))):
            missing = sorted(set(range(max(found) + 1)) - set(found))
            raise ValueError(f"{self.path}: shards {missing} are missing; write them before finish()")
        shards, total, has_labels = [], 0, set()
        for p in found.values():
            n, _, _, _, flags = read_trailer(p)
            if n:
                has_labels.add(bool(flags & FLAG_LABELS))
            shards.append({"file": p.name, "records": n, "bytes": p.stat().st_size})
            total += n
        if len(has_labels) > 1:
            raise ValueError(f"{self.path}: some shards have labels and some do not")
        codebook_entry = None
        if self.codebook is not None:
            data = _codebook_bytes(self.codebook)
            write_atomic(self.path / CODEBOOK, lambda f: f.write(data))
            codebook_entry = {
                "file": CODEBOOK,
                "sha256": hashlib.sha256(data).hexdigest(),
                "shape": list(self.codebook.shape),
            }
        header = {
            "format": FORMAT,
            "version": VERSION,
            "grid": list(self.grid),
            "vocab_size": self.vocab_size,
            "shard_size": self.shard_size,
            "records": total,
            "labels": has_labels == {True},
            "classes": list(self.classes),
            "meta": self.meta,
            "codec": {
                "name": CODEC_NAME,
                "ids": self.dtype.name,
                "level": ZSTD_LEVEL,
                "chunk_records": self.per_chunk,
                "library": f"zstandard {zstandard.__version__}",
            },
            "codebook": codebook_entry,
            "shards": shards,
        }
        text = json.dumps(header, indent=1, default=str)
        write_atomic(self.path / HEADER, lambda f: f.write(text.encode()))
        (self.path / WRITING).unlink(missing_ok=True)  # the header holds the parameters now
        return CompactTokens(self.path)


# ----------------------------------------------------------------------------------------------------
# reader


class CompactTokens(TokenDataset):
    """A mimkit token folder opened for reading: header and codebook checked (the codebook against its
    sha256), every shard's footer read (chunk table and labels).

    ``cache=True`` (the default, for training): every chunk is decompressed once - its CRC-32 checked -
    into a cache file under ``$MIMKIT_CACHE/tokens`` (see :func:`cache_dir`), [N, H, W] ids at the
    dataset's width in .npy layout; every reading process memory-maps that one file, so ``read(i)`` is a
    copy out of the page cache. The file is keyed by the folder's absolute path, the header's sha256 and
    the size, mtime and inode of the header and every shard, so a changed dataset gets a new one. Its
    sidecar (size and CRC-32, checked whenever it is opened, and the damaged chunks) is written before
    the cache, so a cache is never seen without it; a damaged chunk's records still raise
    :class:`TokenRecordError` naming the shard file, the chunk and the record. ``cache=False``: a read
    decompresses its chunk from the memory-mapped shard (the last chunk is kept, so reading in order
    decompresses each chunk once; what ``info``, ``verify`` and ``convert`` use)."""

    format = "mimkit"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        grid: tuple[int, int] | None = None,
        vocab_size: int | None = None,
        cache: bool = True,
    ) -> None:
        self.path = Path(path).expanduser()
        self.name = self.path.name
        if (self.path / OLD_CODEC).is_file():
            raise old_layout_error(self.path)
        self.header = h = read_header(self.path)
        self.grid = (int(h["grid"][0]), int(h["grid"][1]))
        self.vocab_size = int(h["vocab_size"])
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"{self.path}: holds {self.grid[0]}x{self.grid[1]} grids, not {tuple(grid)}")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"{self.path}: has {self.vocab_size} codes, not {vocab_size}")
        self.classes = tuple(h.get("classes", ()))
        self.meta = h.get("meta", {})
        self.dtype = id_dtype(self.vocab_size)
        self.codebook = load_codebook(self.path, h.get("codebook"))
        if self.codebook is not None and self.codebook.shape[0] != self.vocab_size:
            raise TokenRecordError(
                f"{self.path / CODEBOOK}: has {self.codebook.shape[0]} rows; {HEADER} says vocab_size "
                f"{self.vocab_size}"
            )
        self.shard_paths = [self.path / s["file"] for s in h["shards"]]
        indexes = [self._shard_index(k) for k in range(len(self.shard_paths))]
        # one row per chunk: shard, start, end, crc, first record, records
        rows = [
            (k, ix.starts[c], ix.ends[c], ix.crcs[c], ix.counts[c])
            for k, ix in enumerate(indexes)
            for c in range(len(ix.counts))
        ]
        self._chunks = np.array(rows, dtype=np.int64).reshape(-1, 5)
        counts = self._chunks[:, 4]
        self._first = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._chunk_in_shard = (
            np.concatenate([np.arange(len(ix.counts)) for ix in indexes])
            if indexes
            else np.zeros(0, np.int64)
        )
        total = int(self._first[-1])
        if total != h["records"]:
            raise TokenRecordError(
                f"{self.path / HEADER}: says {h['records']} records; the shards hold {total}"
            )
        self.labels = np.concatenate([ix.labels for ix in indexes]) if h.get("labels") and indexes else None
        self.labels = read_labels(self.labels, self.classes, str(self.path))
        self._maps: list[np.ndarray | None] = [None] * len(self.shard_paths)
        self._last: tuple[int, np.ndarray | str] | None = None  # the last chunk decoded (cache=False)
        self.cache: Path | None = None
        self._ids: np.ndarray | None = None  # the cache, memory-mapped lazily per process
        self._bad: dict[int, str] = {}  # damaged chunks (from the cache's sidecar): chunk -> why
        if cache:
            self.cache = cache_path(self._cache_key(), self.name)
            self._bad = self._cached()

    def _shard_index(self, k: int) -> ShardIndex:
        entry, path = self.header["shards"][k], self.shard_paths[k]
        if not path.is_file():
            raise TokenRecordError(f"{path}: shard {k} named in {HEADER} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            state = "truncated" if size < entry["bytes"] else "longer than written"
            raise TokenRecordError(f"{path}: {state}: {size} bytes, the header says {entry['bytes']}")
        ix = read_shard_index(path)
        if len(ix) != entry["records"]:
            raise TokenRecordError(f"{path}: holds {len(ix)} records, the header says {entry['records']}")
        if bool(self.header.get("labels")) != (ix.labels is not None) and len(ix):
            raise TokenRecordError(
                f"{path}: labels {'missing' if ix.labels is None else 'unexpected'} in this shard"
            )
        return ix

    def __len__(self) -> int:
        return int(self._first[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.shard_paths)  # reopened lazily in the process that reads
        state["_ids"] = None
        state["_last"] = None
        return state

    # -- chunks ---------------------------------------------------------------------------------------

    def _chunk_of(self, i: int) -> int:
        return int(np.searchsorted(self._first, i, side="right")) - 1

    def _decode(self, c: int) -> np.ndarray | str:
        """Chunk c's ids [n, H, W], or why they cannot be had."""
        shard, start, end, crc, n = self._chunks[c].tolist()
        buf = self._maps[shard]
        if buf is None:
            buf = self._maps[shard] = _map(self.shard_paths[shard])
        data = buf[start:end]
        if zlib.crc32(data) != crc:
            return BAD_CHECKSUM
        try:
            ids = decode_chunk(data, n, self.grid, self.dtype)
        except ValueError as err:
            return str(err)
        if ids.size and int(ids.max()) >= self.vocab_size:
            return f"holds id {int(ids.max())}, outside the vocabulary [0, {self.vocab_size})"
        return ids

    def _chunk_error(self, c: int, i: int, why: str) -> TokenRecordError:
        shard, lo, n = int(self._chunks[c, 0]), int(self._first[c]), int(self._chunks[c, 4])
        return TokenRecordError(
            f"{self.shard_paths[shard]}: record {i} (in chunk {int(self._chunk_in_shard[c])} of this shard, "
            f"records {lo}..{lo + n - 1}): {why}"
        )

    def _chunk_ids(self, c: int) -> np.ndarray | str:
        if self._last is None or self._last[0] != c:
            self._last = (c, self._decode(c))
        return self._last[1]

    # -- the cache ------------------------------------------------------------------------------------

    def _cache_key(self) -> str:
        """What the cache was decoded from: the folder, its header's bytes and the size, mtime and inode
        of every file the records come from (a shard replaced or rewritten in place changes them)."""
        h = hashlib.sha256(f"{self.path.resolve()}\0{CACHE_LAYOUT}\0".encode())
        h.update(hashlib.sha256((self.path / HEADER).read_bytes()).digest())
        for p in (self.path / HEADER, *self.shard_paths):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
        return h.hexdigest()[:32]

    def _cached(self) -> dict[int, str]:
        """The damaged chunks listed beside a sound cache file, building both first when needed."""
        assert self.cache is not None
        saved = read_cache(self.cache)
        if saved is not None:
            try:
                _, shape, dtype = _npy_layout(self.cache)
                if shape == (len(self), *self.grid) and dtype == self.dtype:
                    return {int(c): str(why) for c, why in saved["bad"].items()}
            except (OSError, ValueError, KeyError, AttributeError):
                pass  # unreadable: made again below
        return self._build_cache()

    def _build_cache(self) -> dict[int, str]:
        """Decompress every chunk (checksums verified) straight into the cache's temporary; a chunk that
        fails is written as zeros and listed in the sidecar. One line on stderr when it takes more than a
        moment."""
        assert self.cache is not None
        n, started, told = len(self), time.perf_counter(), False
        bad: dict[int, str] = {}

        def fill(f: IO[bytes]) -> dict[str, Any]:
            nonlocal told
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (n, *self.grid)})
            for c in range(len(self._chunks)):
                ids = self._decode(c)
                if isinstance(ids, str):
                    bad[c] = ids
                    ids = np.zeros((int(self._chunks[c, 4]), *self.grid), self.dtype)
                f.write(ids.tobytes())
                if not told and c + 1 < len(self._chunks) and time.perf_counter() - started > CACHE_NOTICE_S:
                    print(
                        f"mimkit tokens: decoding {n} records of {self.path} once into {self.cache}",
                        file=sys.stderr,
                    )
                    told = True
            return {"records": n, "bad": {str(c): why for c, why in sorted(bad.items())}}

        write_cache(self.cache, fill, size=n * math.prod(self.grid) * self.dtype.itemsize + 128)
        self._maps = [None] * len(self.shard_paths)
        return bad

    def drop_cache(self) -> None:
        """Close and delete the cache file and its sidecar (for a dataset that is itself temporary: a
        cache is otherwise kept and never cleaned). Reading again decodes from the shards."""
        self.close()
        if self.cache is not None:
            remove_cache(self.cache)
            self.cache = None
        self._bad = {}

    # -- reading --------------------------------------------------------------------------------------

    def read(self, index: int) -> np.ndarray:
        i = self._position(index)
        c = self._chunk_of(i)
        if self.cache is not None:
            if c in self._bad:
                raise self._chunk_error(c, i, self._bad[c])
            if self._ids is None:
                self._ids = _map_npy(self.cache)
            return self._ids[i].astype(np.int64)
        ids = self._chunk_ids(c)
        if isinstance(ids, str):
            raise self._chunk_error(c, i, ids)
        return ids[i - self._first[c]].astype(np.int64)

    def read_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Several records as int64 [n, H, W]: one fancy index of the cache; without a cache, each chunk
        they fall in decompressed once."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and not ((idx >= -n) & (idx < n)).all():
            self._position(int(idx[(idx < -n) | (idx >= n)][0]))  # raises IndexError naming it
        idx = np.where(idx < 0, idx + n, idx)
        chunks = np.searchsorted(self._first, idx, side="right") - 1
        if self.cache is not None:
            if self._bad:
                for row in np.flatnonzero(np.isin(chunks, list(self._bad))):
                    raise self._chunk_error(int(chunks[row]), int(idx[row]), self._bad[int(chunks[row])])
            if self._ids is None:
                self._ids = _map_npy(self.cache)
            return self._ids[idx].astype(np.int64)
        out = np.empty((len(idx), *self.grid), dtype=np.int64)
        for c in np.unique(chunks).tolist():
            rows = np.flatnonzero(chunks == c)
            ids = self._chunk_ids(c)
            if isinstance(ids, str):
                raise self._chunk_error(c, int(idx[rows[0]]), ids)
            out[rows] = ids[idx[rows] - self._first[c]]
        return out

    def files(self) -> list[Path]:
        names = [self.path / HEADER, *self.shard_paths]
        return [p for p in names if p.is_file()]

    def close(self) -> None:
        self._maps = [None] * len(self.shard_paths)
        self._ids = None
        self._last = None
