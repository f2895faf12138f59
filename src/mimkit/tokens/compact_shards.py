"""The shard files of mimkit's token format (:mod:`mimkit.tokens.compact`): the chunk codec, the footer
and trailer that end a shard, the index read back from them, and the shards' names. The folder's reader
(:mod:`mimkit.tokens.compact`) and writer (:mod:`mimkit.tokens.compact_writer`) build on these.

A shard is ``[chunks][footer][trailer]``. A chunk holds up to ``chunk_records`` consecutive records (about
1 MiB of ids): their ids at the narrowest width that holds the vocabulary (uint8 up to 256 codes, uint16
up to 65,536, else uint32), laid out as byte planes (every id's low byte, then every id's next byte),
compressed as one zstd frame. Byte planes compress about 4% better than interleaved uint16 (CIFAR ids of
384 codes), which brings the format to SeiT's .gz size (``bench/storage.py``) while decoding some 30
times faster than gunzip. The footer (zstd) holds each chunk's byte length, CRC-32 and record count and
each record's int64 label; a fixed 40-byte trailer (magic, records, payload and footer sizes, the
footer's CRC-32, flags) ends the file. A damaged byte fails its chunk's CRC-32 and a cut shard loses its
trailer, so damage is reported (file, chunk and records named), never decoded into ids.
"""

from __future__ import annotations

import math
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import zstandard

from mimkit.tokens.records import TokenRecordError

SHARD_RE = re.compile(r"shard-(\d{5,})\.mtok")
CODEC_NAME = "zstd-planes"
ZSTD_LEVEL = 19  # 4 MB/s of raw ids per core to write; within 1.5% of SeiT's gzip -9 on CIFAR tokens
CHUNK_BYTES = 1 << 20  # raw ids per chunk: the unit of compression, checksum and random access
TRAILER = struct.Struct("<8sQQQII")  # magic, records, payload bytes, footer bytes, footer crc32, flags
MAGIC = b"MTOKSHD2"
FLAG_LABELS = 1


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
