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

The shards (chunk codec, footer, trailer) are :mod:`mimkit.tokens.compact_shards`; the writer is
:mod:`mimkit.tokens.compact_writer`. This module holds the folder's header and codebook checks and the
reader.

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
import sys
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from safetensors.torch import save

from mimkit.tokens.codebook import load_codebook as read_codebook
from mimkit.tokens.compact_shards import (
    CODEC_NAME,
    SHARD_RE,
    ShardIndex,
    decode_chunk,
    id_dtype,
    read_shard_index,
)
from mimkit.tokens.records import (
    TokenDataset,
    TokenRecordError,
    cache_dir,
    map_readonly,
    read_cache,
    read_labels,
    remove_cache,
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
BAD_CHECKSUM = "checksum mismatch (the bytes are damaged)"
CACHE_LAYOUT = "ids-npy-3"  # part of the cache key: a new cache layout never reads an old file
CACHE_NOTICE_S = 2.0  # building the cache says so on stderr when it takes longer than this


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------
# the decoded cache


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


def codebook_bytes(cb: torch.Tensor) -> bytes:
    return save({"codebook": cb})


def codebook_sha256(cb: torch.Tensor | None) -> str | None:
    """The sha256 that ``codebook.safetensors`` holding ``cb`` has (None without a codebook)."""
    return None if cb is None else hashlib.sha256(codebook_bytes(cb)).hexdigest()


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
            buf = self._maps[shard] = map_readonly(self.shard_paths[shard])
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
