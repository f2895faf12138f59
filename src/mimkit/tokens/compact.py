"""mimkit's compact token format: a folder that codes each record on its own with an entropy coder, in
shards that can be written in parallel, resumed shard by shard, read at random and streamed in order.

Folder::

    mimkit-tokens.json     header, written last: format, version, grid, vocab_size, shard_size, records,
                           labels, classes, meta (the tokenizer), codec (+ sha256), codebook (+ sha256),
                           shards
    codec.npz              the coder's tables, fitted on a sample of records before any shard is written
    codebook.safetensors   the codebook ("codebook": float32 [K, D]), when there is one
    shard-00000.mtok ...   records
    mimkit-tokens.writing.json   only while unfinished: the writer's grid, vocab_size, shard_size and
                           codebook sha256, so that resuming with other parameters is refused

A shard is ``[records][footer][trailer]``: the records' bytes back to back; a zstd-compressed footer of
each record's byte length and CRC-32 (and int64 label); a fixed 40-byte trailer (magic, record count,
payload and footer sizes, the footer's CRC-32, flags). A damaged byte fails its record's CRC-32 and a
cut shard loses its trailer, so damage is reported (file and record named), never decoded into ids.

The codec, "rank-ans", is hierarchical and vectorised. A grid is split into its four 2x2 phases; phase
(0,0) - the grid at half resolution - is coded the same way, recursively, down to a grid of at most 4
cells a side whose ids are coded order-0. Each of the other phases is coded given a neighbour that the
decoder already has: (0,1) its left neighbour, (1,0) the one above, (1,1) its left neighbour (a (1,0)
cell). An id is replaced by its rank in a list that depends on that neighbour: the ids seen most often
after it in the fitting sample (at most ``top``, each seen at least ``min_count`` times), then every id
by overall frequency. Each level has a "left" list table (for (0,1) and (1,1) cells) and an "up" one.
Ranks are small when the data are predictable; they are entropy-coded by ``constriction``'s ANS coder
with one static distribution per level. Decoding a record is a handful of vectorised calls: one ANS
decode per level, then two table lookups per level.

Bytes per record: the ANS words (without the zero high bytes of the last one), plus about 5 in the
footer (CRC-32: 4, length and label: about 1 after zstd). The tables cost a fixed ~30-100 KB per
dataset (a few hundred codes), which large datasets amortise.

Reading for training goes through a decoded cache (:class:`CompactTokens`, ``cache=True``): the
entropy decoding is paid once per dataset and machine, and ``read(i)`` is then a copy of H*W bytes out
of a memory-mapped file.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
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

import constriction
import numpy as np
import torch
import zstandard
from safetensors.torch import save

from mimkit.tokens.base import (
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
from mimkit.tokens.codebook import load_codebook as read_codebook

FORMAT = "mimkit-tokens"
VERSION = 1
HEADER = "mimkit-tokens.json"
CODEC = "codec.npz"
# the writer's parameters, written by fit() with the codec and removed by finish() (the header then holds
# them): a writer opened on an unfinished folder checks it is continuing the same dataset
WRITING = "mimkit-tokens.writing.json"
CODEBOOK = "codebook.safetensors"
SHARD_SIZE = 10_000
SHARD_RE = re.compile(r"shard-(\d{5,})\.mtok")
CODEC_NAME = "rank-ans"
TOP = 32  # ids kept per context in the fitted rank lists
MIN_COUNT = 2  # ... each seen at least this often after that context
BASE_SIDE = 4  # the recursion stops at a grid of at most this many cells a side
# above this vocabulary the rank tables (int32 [K, K], two per level, in every reading process) would
# take too much memory: ids are then coded order-0 (levels = 0)
MAX_TABLE_VOCAB = 1024
SMOOTHING = 0.5  # added to every count of the static distributions (unseen symbols stay codable)
TRAILER = struct.Struct("<8sQQQII")  # magic, records, payload bytes, footer bytes, footer crc32, flags
MAGIC = b"MTOKSHD1"
FLAG_LABELS = 1
ZSTD_LEVEL = 19
BAD_CHECKSUM = "checksum mismatch (the bytes are damaged)"
BAD_DECODE = "does not decode to one grid (damaged, or written by another codec)"
CACHE_LAYOUT = "ids-npy-2"  # part of the cache key: a new cache layout never reads an old file
CACHE_CHUNK = 4096  # records decoded and written to the cache at a time (bounded memory)
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


def constriction_version() -> str:
    return importlib.metadata.version("constriction")


# ----------------------------------------------------------------------------------------------------
# the codec


def auto_levels(grid: tuple[int, int], vocab_size: int) -> int:
    """Halve the grid until no side exceeds BASE_SIDE (none at all for very large vocabularies)."""
    if vocab_size > MAX_TABLE_VOCAB:
        return 0
    levels, (h, w) = 0, grid
    while max(h, w) > BASE_SIDE and min(h, w) > 1:
        levels, h, w = levels + 1, (h + 1) // 2, (w + 1) // 2
    return levels


class Plan:
    """Where each cell of an [H, W] grid sits in the coded stream, and which decoded cell is its context.

    Stream order: the base grid (the full grid subsampled by 2**levels), then for each level, coarse to
    fine, its (0,1) cells, (1,0) cells and (1,1) cells, each row-major. Slots are positions in that
    order; ``steps[l]`` gives, for level l's (0,1)+(1,0) cells and then its (1,1) cells, the slots of
    their context cells (left, above, left) - all of them earlier in the stream."""

    def __init__(self, grid: tuple[int, int], levels: int) -> None:
        H, W = grid
        pos_of_slot: list[np.ndarray] = []
        slot_of = np.full(H * W, -1, dtype=np.int64)
        filled = 0

        def add(rows: np.ndarray, cols: np.ndarray) -> tuple[int, int]:
            nonlocal filled
            p = (rows[:, None] * W + cols[None, :]).ravel()
            slot_of[p] = np.arange(filled, filled + len(p))
            pos_of_slot.append(p)
            filled += len(p)
            return filled - len(p), filled

        s = 2**levels
        self.base = add(np.arange(0, H, s), np.arange(0, W, s))
        # per level (coarse to fine): (start, stop, ctx slots, is_up) of the (0,1)+(1,0) step, then of (1,1)
        self.steps: list[tuple[tuple[int, int, np.ndarray, np.ndarray], tuple[int, int, np.ndarray]]] = []
        self.level_counts: list[int] = []
        for level in reversed(range(levels)):
            s = 2**level
            even_r, odd_r = np.arange(0, H, 2 * s), np.arange(s, H, 2 * s)
            even_c, odd_c = np.arange(0, W, 2 * s), np.arange(s, W, 2 * s)
            a01 = add(even_r, odd_c)
            ctx01 = slot_of[(even_r[:, None] * W + (odd_c - s)[None, :]).ravel()]
            a10 = add(odd_r, even_c)
            ctx10 = slot_of[((odd_r - s)[:, None] * W + even_c[None, :]).ravel()]
            a11 = add(odd_r, odd_c)
            ctx11 = slot_of[(odd_r[:, None] * W + (odd_c - s)[None, :]).ravel()]
            is_up = np.concatenate([np.zeros(a01[1] - a01[0], bool), np.ones(a10[1] - a10[0], bool)])
            self.steps.append(
                ((a01[0], a10[1], np.concatenate([ctx01, ctx10]), is_up), (a11[0], a11[1], ctx11))
            )
            self.level_counts.append(a11[1] - a01[0])
        self.size = filled
        self.pos_of_slot = np.concatenate(pos_of_slot)
        self.slot_of = slot_of
        assert filled == H * W and (slot_of >= 0).all()


def _probabilities(counts: np.ndarray) -> np.ndarray:
    p = counts.astype(np.float64) + SMOOTHING
    return (p / p.sum()).astype(np.float32)


def _order_table(lengths: np.ndarray, ids: np.ndarray, global_order: np.ndarray) -> np.ndarray:
    """[K, K] int64: row c = c's fitted list, then every other id by overall frequency."""
    K = len(global_order)
    lengths = lengths.astype(np.int64)
    rows = np.repeat(np.arange(K), lengths)
    listed = np.zeros((K, K), dtype=bool)
    listed[rows, ids.astype(np.int64)] = True
    rest = np.broadcast_to(global_order, (K, K))[~listed[:, global_order]]
    table = np.empty((K, K), dtype=np.int64)
    table[rows, np.arange(len(ids)) - np.repeat(np.cumsum(lengths) - lengths, lengths)] = ids
    n_rest = K - lengths
    rest_rows = np.repeat(np.arange(K), n_rest)
    rest_pos = np.arange(len(rest)) - np.repeat(np.cumsum(n_rest) - n_rest, n_rest)
    table[rest_rows, lengths[rest_rows] + rest_pos] = rest
    return table


def fit_lists(
    ctx: np.ndarray, x: np.ndarray, global_counts: np.ndarray, top: int, min_count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per context id: the ids seen after it at least ``min_count`` times, most frequent first (ties:
    the more frequent id overall, then the smaller id), at most ``top``. Returns (lengths [K], ids)."""
    K = len(global_counts)
    pairs, counts = np.unique(ctx.astype(np.int64) * K + x, return_counts=True)
    keep = counts >= min_count
    pairs, counts = pairs[keep], counts[keep]
    c, ids = pairs // K, pairs % K
    order = np.lexsort((ids, -global_counts[ids], -counts, c))
    c, ids = c[order], ids[order]
    rank = np.arange(len(c)) - np.searchsorted(c, np.arange(K))[c]
    c, ids = c[rank < top], ids[rank < top]
    return np.bincount(c, minlength=K).astype(np.uint16), ids.astype(np.uint16)


def _trim(data: bytes) -> bytes:
    """Drop up to 3 zero bytes at the end (the high bytes of the coder's last word, 1.5 on average)."""
    end = len(data)
    while end > len(data) - 3 and end > 0 and data[end - 1] == 0:
        end -= 1
    return data[:end]


def words(rec: np.ndarray) -> np.ndarray:
    """A stored record (uint8) back as the coder's 32-bit words: zero-padded to a whole word, copied
    so the words are aligned."""
    out = np.zeros((len(rec) + 3) // 4, dtype="<u4")
    out.view(np.uint8)[: len(rec)] = rec
    return out


class RankCoder:
    """The fitted "rank-ans" codec for one grid shape and vocabulary (see the module doc).

    Stored: ``global_counts`` (ids in the fitting sample), per level a "left" and an "up" list table
    (``lists[2 * level]`` and ``lists[2 * level + 1]``: (lengths [K], ids), see :func:`fit_lists`) and
    ``rank_counts[level]`` (the ranks the sample's cells get at that level). The [K, K] rank tables and
    the ANS models are derived from these, the same way by the writer and every reader."""

    def __init__(
        self,
        grid: tuple[int, int],
        vocab_size: int,
        levels: int,
        global_counts: np.ndarray,
        lists: list[tuple[np.ndarray, np.ndarray]],
        rank_counts: np.ndarray,
        *,
        top: int = TOP,
        min_count: int = MIN_COUNT,
    ) -> None:
        self.grid, self.vocab_size, self.levels = (int(grid[0]), int(grid[1])), int(vocab_size), int(levels)
        self.top, self.min_count = int(top), int(min_count)
        K = self.vocab_size
        self.global_counts = np.asarray(global_counts, dtype=np.int64)
        if self.global_counts.shape != (K,) or len(lists) != 2 * self.levels:
            raise ValueError(f"tables for {len(lists)} contexts and {self.global_counts.shape} counts")
        self.lists = lists
        self.rank_counts = np.asarray(rank_counts, dtype=np.int64).reshape(self.levels, K)
        self.plan = Plan(self.grid, self.levels)
        global_order = np.argsort(-self.global_counts, kind="stable")
        # [left_0, up_0, left_1, up_1, ...] flattened into one table of ids scaled by K: a cell's value in
        # the decoding buffer is id * K, so "row of context c, column r" is the flat index value + r + base
        orders = [_order_table(lengths, ids, global_order).ravel() * K for lengths, ids in lists]
        self._flat = (np.concatenate(orders) if orders else np.zeros(0)).astype(np.int32)
        family = constriction.stream.model.Categorical
        self.base_model = family(_probabilities(self.global_counts), perfect=False)
        self.rank_models = [family(_probabilities(c), perfect=False) for c in self.rank_counts]
        # the decoding program, coarse level first: (model, count), then per step the slots and bases
        b0, b1 = self.plan.base
        self._calls = [(self.base_model, b1 - b0)] + [
            (self.rank_models[lv], n)
            for lv, n in zip(reversed(range(self.levels)), self.plan.level_counts, strict=True)
        ]
        # per level: the table base of each of its cells ((0,1) and (1,1) cells read the level's "left"
        # table, (1,0) cells its "up" table), added once to the decoded ranks; then the two lookup steps
        self._scale = np.arange(K, dtype=np.int64) * K
        self._program = []
        for lv, ((a0, a1, ctx_a, is_up), (c0, c1, ctx_c)) in zip(
            reversed(range(self.levels)), self.plan.steps, strict=True
        ):
            left, up = 2 * lv * K * K, (2 * lv + 1) * K * K
            base = np.concatenate([np.where(is_up, up, left), np.full(c1 - c0, left)]).astype(np.int64)
            self._program.append((base, a0, a1, ctx_a, c0, c1, ctx_c, a1 - a0))
        self._inverses: list[np.ndarray] | None = None

    def __reduce__(self) -> tuple[Any, tuple[dict[str, np.ndarray]]]:
        """Pickled as its stored arrays (the ANS models do not pickle): a spawned loader worker rebuilds
        the tables from them."""
        return RankCoder.from_arrays, (self.to_arrays(),)

    @property
    def inverses(self) -> list[np.ndarray]:
        """[K, K] rank of id x after context c, per table (the writer's side only)."""
        if self._inverses is None:
            K = self.vocab_size
            self._inverses = []
            for t in range(2 * self.levels):
                table = self._flat[t * K * K : (t + 1) * K * K].reshape(K, K).astype(np.int64) // K
                r = np.empty_like(table)
                np.put_along_axis(r, table, np.broadcast_to(np.arange(K), (K, K)), axis=1)
                self._inverses.append(r)
        return self._inverses

    # -- fitting ------------------------------------------------------------------------------------

    @classmethod
    def fit(
        cls,
        sample: np.ndarray,
        vocab_size: int,
        *,
        levels: int | None = None,
        top: int = TOP,
        min_count: int = MIN_COUNT,
    ) -> RankCoder:
        """Fit the lists and distributions on ``sample`` (int [n, H, W], ids < vocab_size)."""
        sample = np.asarray(sample, dtype=np.int64)
        K, grid = int(vocab_size), (int(sample.shape[1]), int(sample.shape[2]))
        levels = auto_levels(grid, K) if levels is None else int(levels)
        plan = Plan(grid, levels)
        stream = sample.reshape(len(sample), -1)[:, plan.pos_of_slot]
        global_counts = np.bincount(sample.ravel(), minlength=K)[:K]
        lists = []
        for (a0, a1, ctx_a, is_up), (c0, c1, ctx_c) in reversed(plan.steps):  # finest level first
            ctx_ids, cells = stream[:, ctx_a], stream[:, a0:a1]
            left_ctx = np.concatenate([ctx_ids[:, ~is_up].ravel(), stream[:, ctx_c].ravel()])
            left_x = np.concatenate([cells[:, ~is_up].ravel(), stream[:, c0:c1].ravel()])
            lists.append(fit_lists(left_ctx, left_x, global_counts, top, min_count))
            lists.append(
                fit_lists(ctx_ids[:, is_up].ravel(), cells[:, is_up].ravel(), global_counts, top, min_count)
            )
        empty = np.zeros((levels, K), np.int64)
        coder = cls(grid, K, levels, global_counts, lists, empty, top=top, min_count=min_count)
        ranks = coder.symbols(sample)[1:]  # coarse level first
        rank_counts = (
            np.stack([np.bincount(r.ravel(), minlength=K) for r in reversed(ranks)]) if ranks else empty
        )
        return cls(grid, K, levels, global_counts, lists, rank_counts, top=top, min_count=min_count)

    # -- coding -------------------------------------------------------------------------------------

    def symbols(self, ids: np.ndarray) -> list[np.ndarray]:
        """The coded symbols of records ids [n, H, W]: the base ids, then each level's ranks (coarse
        level first), as int32 [n, count] arrays."""
        stream = np.asarray(ids, dtype=np.int64).reshape(len(ids), -1)[:, self.plan.pos_of_slot]
        b0, b1 = self.plan.base
        out = [stream[:, b0:b1]]
        inv = self.inverses
        for lv, ((a0, a1, ctx_a, is_up), (c0, c1, ctx_c)) in zip(
            reversed(range(self.levels)), self.plan.steps, strict=True
        ):
            left, up = inv[2 * lv], inv[2 * lv + 1]
            ranks_a = np.where(
                is_up, up[stream[:, ctx_a], stream[:, a0:a1]], left[stream[:, ctx_a], stream[:, a0:a1]]
            )
            out.append(np.concatenate([ranks_a, left[stream[:, ctx_c], stream[:, c0:c1]]], axis=1))
        return [s.astype(np.int32) for s in out]

    def encode(self, ids: np.ndarray) -> list[bytes]:
        """Each record of ids [n, H, W] coded on its own: its ANS words, little-endian, without the
        zero bytes at the top of the last word (see :func:`words`)."""
        steps = self.symbols(ids)
        out = []
        for r in range(len(ids)):
            coder = constriction.stream.stack.AnsCoder()
            for (model, _), syms in zip(reversed(self._calls), reversed(steps), strict=True):
                coder.encode_reverse(syms[r], model)
            out.append(_trim(coder.get_compressed().astype("<u4").tobytes()))
        return out

    def decode_symbols(self, words: np.ndarray) -> list[np.ndarray] | None:
        """The symbol arrays of one record, or None when the words hold more or fewer symbols."""
        coder = constriction.stream.stack.AnsCoder(words)
        syms = [coder.decode(model, count) for model, count in self._calls]
        return syms if coder.is_empty() else None

    def assemble(self, syms: list[np.ndarray]) -> np.ndarray:
        """Ids [..., H, W] from decoded symbols (one record: 1-D arrays; n records: [n, count] arrays).
        The buffer holds ids scaled by K, so that context value + rank + table base is directly the flat
        index of the next id (same-dtype in-place adds: mixed int32/int64 arithmetic costs twice as
        much at these sizes)."""
        flat = self._flat
        lead = syms[0].shape[:-1]
        buf = np.empty((*lead, self.plan.size), dtype=np.int64)
        b0, b1 = self.plan.base
        buf[..., b0:b1] = self._scale.take(syms[0])
        for ranks, (base, a0, a1, ctx_a, c0, c1, ctx_c, na) in zip(syms[1:], self._program, strict=True):
            r = base + ranks
            idx = buf.take(ctx_a, axis=-1)
            idx += r[..., :na]
            buf[..., a0:a1] = flat.take(idx)
            idx = buf.take(ctx_c, axis=-1)
            idx += r[..., na:]
            buf[..., c0:c1] = flat.take(idx)
        out = buf.take(self.plan.slot_of, axis=-1)
        out //= self.vocab_size
        return out.reshape(*lead, *self.grid)

    # -- storage ------------------------------------------------------------------------------------

    def to_arrays(self) -> dict[str, np.ndarray]:
        K = self.vocab_size
        lengths = (
            np.stack([lengths for lengths, _ in self.lists]) if self.lists else np.zeros((0, K), np.uint16)
        )
        ids = np.concatenate([i for _, i in self.lists]) if self.lists else np.zeros(0, np.uint16)
        return {
            "grid": np.array(self.grid, np.int64),
            "vocab_size": np.array(K, np.int64),
            "levels": np.array(self.levels, np.int64),
            "top": np.array(self.top, np.int64),
            "min_count": np.array(self.min_count, np.int64),
            "global_counts": self.global_counts,
            "list_lengths": lengths.astype(np.uint16),
            "list_ids": ids.astype(np.uint16),
            "rank_counts": self.rank_counts,
        }

    @classmethod
    def from_arrays(cls, a: dict[str, np.ndarray]) -> RankCoder:
        levels, K = int(a["levels"]), int(a["vocab_size"])
        lengths = a["list_lengths"].reshape(2 * levels, K)
        ends = np.cumsum(lengths.sum(axis=1, dtype=np.int64))
        ids = np.split(a["list_ids"], ends[:-1]) if levels else []
        return cls(
            tuple(a["grid"].tolist()),
            K,
            levels,
            a["global_counts"],
            [(lengths[t], ids[t]) for t in range(2 * levels)],
            a["rank_counts"],
            top=int(a["top"]),
            min_count=int(a["min_count"]),
        )

    def save(self, path: Path, probe: np.ndarray) -> None:
        """The tables, plus a probe record and its coded bytes: a reader whose constriction would code
        differently finds out at once instead of decoding wrong ids."""
        arrays = self.to_arrays()
        arrays["probe_ids"] = probe.astype(np.int64)
        arrays["probe_bytes"] = np.frombuffer(self.encode(probe[None])[0], dtype=np.uint8).copy()
        write_atomic(path, lambda f: np.savez_compressed(f, **arrays))

    @classmethod
    def load(cls, path: Path) -> RankCoder:
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, zlib.error, EOFError) as err:
            raise TokenRecordError(f"{path}: not a readable codec file ({err})") from err
        try:
            coder = cls.from_arrays(arrays)
        except (KeyError, ValueError, IndexError) as err:
            raise TokenRecordError(
                f"{path}: not a rank-ans codec file ({type(err).__name__}: {err})"
            ) from err
        probe = arrays.get("probe_ids")
        if probe is not None and coder.encode(probe[None])[0] != arrays["probe_bytes"].tobytes():
            raise TokenRecordError(
                f"{path}: the installed constriction {constriction_version()} codes differently from the one "
                "that wrote this dataset; install the version named in the header's codec.library"
            )
        return coder


# ----------------------------------------------------------------------------------------------------
# shards


def build_shard(records: Sequence[bytes], labels: np.ndarray | None) -> bytes:
    lengths = np.fromiter((len(r) for r in records), dtype="<u4", count=len(records))
    crcs = np.fromiter((zlib.crc32(r) for r in records), dtype="<u4", count=len(records))
    parts = [lengths.tobytes(), crcs.tobytes()]
    if labels is not None:
        parts.append(labels.astype("<i8").tobytes())
    footer = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(b"".join(parts))
    payload = b"".join(records)
    flags = FLAG_LABELS if labels is not None else 0
    trailer = TRAILER.pack(MAGIC, len(records), len(payload), len(footer), zlib.crc32(footer), flags)
    return payload + footer + trailer


class ShardIndex:
    """What a shard's footer says: each record's [start, end) in the file, CRC-32 and label."""

    def __init__(
        self, path: Path, starts: np.ndarray, ends: np.ndarray, crcs: np.ndarray, labels: np.ndarray | None
    ):
        self.path, self.starts, self.ends, self.crcs, self.labels = path, starts, ends, crcs, labels

    def __len__(self) -> int:
        return len(self.starts)


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
        raise TokenRecordError(f"{path}: footer checksum mismatch (the record table is damaged)")
    try:
        raw = zstandard.ZstdDecompressor().decompress(footer)
    except zstandard.ZstdError as err:
        raise TokenRecordError(f"{path}: footer does not decompress ({err})") from err
    has_labels = bool(flags & FLAG_LABELS)
    if len(raw) != n * (16 if has_labels else 8):
        raise TokenRecordError(f"{path}: footer holds {len(raw)} bytes, not the table of {n} records")
    lengths = np.frombuffer(raw, "<u4", n, 0).astype(np.int64)
    crcs = np.frombuffer(raw, "<u4", n, 4 * n).astype(np.int64)
    labels = np.frombuffer(raw, "<i8", n, 8 * n).astype(np.int64) if has_labels else None
    ends = np.cumsum(lengths)
    if n and ends[-1] != payload:
        raise TokenRecordError(
            f"{path}: record lengths add up to {ends[-1]} bytes, not the payload's {payload}"
        )
    return ShardIndex(path, ends - lengths, ends, crcs, labels)


def _map(path: Path) -> np.ndarray:
    """A shard as a read-only uint8 memory map (a shared read-only map stays valid in forked children)."""
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


def read_header(folder: Path) -> dict[str, Any]:
    path = folder / HEADER
    try:
        header = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise TokenRecordError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TokenRecordError(f"{path}: not a {FORMAT} header")
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


def _file_entry(entry: Any) -> bool:
    """A {"file": plain name in the folder, "sha256": hex} entry."""
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("file"), str)
        and entry["file"] == Path(entry["file"]).name
        and isinstance(entry.get("sha256"), str)
    )


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
    if not _file_entry(h["codec"]):
        return f"'codec' must name its file and sha256; got {h['codec']!r}"
    if h.get("codebook") and not _file_entry(h["codebook"]):
        return f"'codebook' must name its file and sha256; got {h['codebook']!r}"
    return None


def header_codec_problem(folder: Path, header: dict[str, Any], coder: RankCoder) -> str | None:
    """Where a (well-formed) header disagrees with the codec its records are coded with, or None: an
    edited header would otherwise give grids of another shape or ids outside its vocabulary."""
    grid = tuple(header["grid"])
    if coder.grid != grid or coder.vocab_size != header["vocab_size"]:
        return (
            f"{folder / HEADER}: says grid {grid[0]}x{grid[1]} and vocab_size {header['vocab_size']}, but "
            f"{header['codec']['file']} codes grid {coder.grid[0]}x{coder.grid[1]} and {coder.vocab_size} "
            "ids: the header does not belong to these records (edited or replaced)"
        )
    return None


def _checked(folder: Path, entry: dict[str, Any], what: str) -> Path:
    path = folder / entry["file"]
    if not path.is_file():
        raise TokenRecordError(f"{path}: the {what} named in {HEADER} is missing")
    if sha256(path) != entry["sha256"]:
        raise TokenRecordError(
            f"{path}: sha256 differs from the header's (the {what} is damaged or replaced)"
        )
    return path


def load_codebook(folder: Path, entry: dict[str, Any] | None) -> torch.Tensor | None:
    """The dataset's ``codebook.safetensors`` once its sha256 matches the header's; None without one."""
    if not entry:
        return None
    path = _checked(folder, entry, "codebook")
    try:
        return read_codebook(path)
    except ValueError as err:
        raise TokenRecordError(str(err)) from err


def _codebook_bytes(cb: torch.Tensor) -> bytes:
    return save({"codebook": cb})


def codebook_sha256(cb: torch.Tensor | None) -> str | None:
    """The sha256 that ``codebook.safetensors`` holding ``cb`` has (None without a codebook)."""
    return None if cb is None else hashlib.sha256(_codebook_bytes(cb)).hexdigest()


def _save_codebook(path: Path, cb: torch.Tensor) -> None:
    data = _codebook_bytes(cb)
    write_atomic(path, lambda f: f.write(data))


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
    """Writes a mimkit token folder shard by shard. ``fit(sample)`` first (it saves the codec, so a
    resumed writer reuses it), then ``write_shard(k, ids, labels)`` for each k - in any order, from any
    number of processes, each shard written to a temporary, flushed and renamed - and ``finish()``
    once all shards 0..S-1 exist, which writes the header. ``done_shards()`` lists the shards already
    complete, so a stopped job resumes at the first missing one."""

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
        levels: int | None = None,
        top: int = TOP,
        min_count: int = MIN_COUNT,
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
        self.levels, self.top, self.min_count = levels, int(top), int(min_count)
        self.coder: RankCoder | None = None
        self.path.mkdir(parents=True, exist_ok=True)
        codec = self.path / CODEC
        if codec.is_file():
            self._check_same_dataset()
            self.coder = RankCoder.load(codec)
        elif shard_files(self.path):
            raise ValueError(
                f"{self.path}: holds shard files but no {CODEC} to read them with; remove the shards "
                "to start over"
            )

    @property
    def fitted(self) -> bool:
        return self.coder is not None

    def parameters(self) -> dict[str, Any]:
        """What a resumed writer must share with the one that started the folder."""
        return {
            "grid": list(self.grid),
            "vocab_size": self.vocab_size,
            "shard_size": self.shard_size,
            "codebook_sha256": codebook_sha256(self.codebook),
        }

    def _started_with(self) -> dict[str, Any]:
        """The parameters the folder was started with, as far as it tells: its header (finished), else
        the writer's file, else (a folder from before that file existed) the codec's grid and size."""
        if (self.path / HEADER).is_file():
            h = read_header(self.path)
            found = {
                "grid": list(h["grid"]),
                "vocab_size": h["vocab_size"],
                "codebook_sha256": (h.get("codebook") or {}).get("sha256"),
            }
            if "shard_size" in h:
                found["shard_size"] = h["shard_size"]
            return found
        if (self.path / WRITING).is_file():
            try:
                return dict(json.loads((self.path / WRITING).read_text(encoding="utf-8")))
            except (json.JSONDecodeError, TypeError, ValueError) as err:
                raise ValueError(f"{self.path / WRITING}: not readable ({err}); remove the folder") from err
        coder = RankCoder.load(self.path / CODEC)
        return {"grid": list(coder.grid), "vocab_size": coder.vocab_size}

    def _check_same_dataset(self) -> None:
        """A folder already fitted (and perhaps holding shards or finished) is resumed only by a writer
        with the same grid, vocabulary, shard size and codebook: anything else would mix two datasets."""
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

    def fit(self, sample: np.ndarray) -> None:
        """Fit the codec on ``sample`` (int [n, H, W]; a few thousand records spread over the data is
        plenty) and save it."""
        if shard_files(self.path):
            raise ValueError(
                f"{self.path}: shards are already coded with its {CODEC}; fitting again would make them "
                "unreadable (remove the shards to start over)"
            )
        sample = check_ids(sample, self.vocab_size, f"{self.path} (fit sample)")
        if sample.shape[1:] != self.grid:
            raise ValueError(f"{self.path}: fit sample has grid {sample.shape[1:]}, the dataset {self.grid}")
        if not len(sample):
            sample = np.zeros((1, *self.grid), np.int64)
        coder = RankCoder.fit(
            sample, self.vocab_size, levels=self.levels, top=self.top, min_count=self.min_count
        )
        text = json.dumps(self.parameters(), indent=1)
        write_atomic(self.path / WRITING, lambda f: f.write(text.encode()))  # before the codec: see WRITING
        coder.save(self.path / CODEC, sample[0])
        self.coder = coder

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
        if self.coder is None:
            raise ValueError(f"{self.path}: call fit(sample) before writing shards")
        what = f"{self.path / shard_name(k)}"
        ids = check_ids(ids, self.vocab_size, what)
        if ids.shape[1:] != self.grid:
            raise ValueError(f"{what}: records of grid {ids.shape[1:]} in a {self.grid} dataset")
        lab = check_labels(labels, len(ids), what, self.classes)
        data = build_shard(self.coder.encode(ids), lab)
        return write_atomic(self.path / shard_name(k), lambda f: f.write(data))

    def finish(self) -> CompactTokens:
        """Write the codebook and the header (last), after checking shards 0..S-1 are all there."""
        if self.coder is None:
            raise ValueError(f"{self.path}: nothing written yet (call fit and write_shard first)")
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
            _save_codebook(self.path / CODEBOOK, self.codebook)
            codebook_entry = {
                "file": CODEBOOK,
                "sha256": sha256(self.path / CODEBOOK),
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
                "file": CODEC,
                "sha256": sha256(self.path / CODEC),
                "levels": self.coder.levels,
                "top": self.coder.top,
                "min_count": self.coder.min_count,
                "library": f"constriction {constriction_version()}",
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
    """A mimkit token folder opened for reading: header, codec and codebook checked against their
    sha256, every shard's footer read (record table and labels).

    ``cache=True`` (the default, for training): every record is decoded once - each checksum verified -
    into a cache file under ``$MIMKIT_CACHE/tokens`` (see :func:`cache_dir`), the ids as uint8 (at most
    256 codes) or uint16, [N, H, W], in .npy layout; every reading process memory-maps that one file, so
    ``read(i)`` is a copy out of the page cache. The file is keyed by the folder's absolute path, the
    header's sha256 and the size and mtime of the header, codec and every shard, so a changed dataset
    gets a new one; it is written through a temporary and a rename. Its sidecar (``.npy.json``, written
    before the cache itself, so a cache is never seen without it) holds the cache's size and CRC-32,
    checked whenever it is opened (a cache damaged on disk is decoded again), and the records that
    failed their checksum, which still raise :class:`TokenRecordError` naming the shard file and record.
    ``cache=False``: each ``read(i)`` decodes its record from the memory-mapped shards (random access,
    no cache file; what ``info`` and ``verify`` use)."""

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
        self.header = read_header(self.path)
        h = self.header
        self.grid = (int(h["grid"][0]), int(h["grid"][1]))
        self.vocab_size = int(h["vocab_size"])
        if grid is not None and tuple(grid) != self.grid:
            raise ValueError(f"{self.path}: holds {self.grid[0]}x{self.grid[1]} grids, not {tuple(grid)}")
        if vocab_size is not None and vocab_size != self.vocab_size:
            raise ValueError(f"{self.path}: has {self.vocab_size} codes, not {vocab_size}")
        self.classes = tuple(h.get("classes", ()))
        self.meta = h.get("meta", {})
        if h["codec"].get("name") != CODEC_NAME:
            raise TokenRecordError(f"{self.path / HEADER}: unknown codec {h['codec'].get('name')!r}")
        self.coder = RankCoder.load(_checked(self.path, h["codec"], "codec"))
        mismatch = header_codec_problem(self.path, h, self.coder)
        if mismatch:
            raise TokenRecordError(mismatch)
        self.codebook = load_codebook(self.path, h.get("codebook"))
        if self.codebook is not None and self.codebook.shape[0] != self.vocab_size:
            raise TokenRecordError(
                f"{self.path / h['codebook']['file']}: has {self.codebook.shape[0]} rows; {HEADER} says "
                f"vocab_size {self.vocab_size}"
            )
        self.shard_paths = [self.path / s["file"] for s in h["shards"]]
        indexes = [self._shard_index(k) for k in range(len(self.shard_paths))]
        counts = [len(ix) for ix in indexes]
        self._shard = np.repeat(np.arange(len(indexes), dtype=np.int64), counts)
        self._local = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, np.int64)
        # one row per record: start, end, crc, shard (a single lookup per read)
        self._rows = np.stack(
            [
                np.concatenate([ix.starts for ix in indexes]) if indexes else np.zeros(0, np.int64),
                np.concatenate([ix.ends for ix in indexes]) if indexes else np.zeros(0, np.int64),
                np.concatenate([ix.crcs for ix in indexes]) if indexes else np.zeros(0, np.int64),
                self._shard,
            ],
            axis=1,
        )
        if sum(counts) != h["records"]:
            raise TokenRecordError(
                f"{self.path / HEADER}: says {h['records']} records; the shards hold {sum(counts)}"
            )
        self.labels = np.concatenate([ix.labels for ix in indexes]) if h.get("labels") and indexes else None
        self.labels = read_labels(self.labels, self.classes, str(self.path))
        self._maps: list[np.ndarray | None] = [None] * len(self.shard_paths)
        self.dtype = np.dtype(np.uint8 if self.vocab_size <= 256 else np.uint16)
        self.cache: Path | None = None
        self._ids: np.ndarray | None = None  # the cache, memory-mapped lazily per process
        self._bad: dict[int, str] = {}  # damaged records (from the cache's sidecar): index -> why
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
        return len(self._rows)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = [None] * len(self.shard_paths)  # reopened lazily in the process that reads
        state["_ids"] = None
        return state

    # -- the cache ------------------------------------------------------------------------------------

    def _cache_key(self) -> str:
        """What the cache was decoded from: the folder, its header's bytes and the size, mtime and inode
        of every file the records come from (a shard replaced or rewritten in place changes them)."""
        h = hashlib.sha256(f"{self.path.resolve()}\0{CACHE_LAYOUT}\0".encode())
        h.update(hashlib.sha256((self.path / HEADER).read_bytes()).digest())
        for p in (self.path / HEADER, self.path / CODEC, *self.shard_paths):
            st = p.stat()
            h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0".encode())
        return h.hexdigest()[:32]

    def _cached(self) -> dict[int, str]:
        """The damaged records listed beside a sound cache file, building both first when needed."""
        assert self.cache is not None
        saved = read_cache(self.cache)
        if saved is not None:
            try:
                _, shape, dtype = _npy_layout(self.cache)
                if shape == (len(self), *self.grid) and dtype == self.dtype:
                    return {int(i): str(why) for i, why in saved["bad"].items()}
            except (OSError, ValueError, KeyError, AttributeError):
                pass  # unreadable: made again below
        return self._build_cache()

    def _build_cache(self) -> dict[int, str]:
        """Decode every record (checksums verified) into the cache, a chunk of records at a time:
        entropy-decoded one by one, their ids looked up together, written straight to the temporary. A
        record that fails is written as zeros and listed in the sidecar, which is in place before the
        cache file is renamed into place. One line on stderr when it takes more than a moment."""
        assert self.cache is not None
        n, started, told = len(self), time.perf_counter(), False
        bad: dict[int, str] = {}

        def fill(f: IO[bytes]) -> dict[str, Any]:
            nonlocal told
            header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False}
            np.lib.format.write_array_header_1_0(f, {**header, "shape": (n, *self.grid)})
            for lo in range(0, n, CACHE_CHUNK):
                hi = min(lo + CACHE_CHUNK, n)
                ids, why = self._decode_range(lo, hi)
                bad.update(why)
                f.write(ids.astype(self.dtype).tobytes())
                if not told and hi < n and time.perf_counter() - started > CACHE_NOTICE_S:
                    print(
                        f"mimkit tokens: decoding {n} records of {self.path} once into {self.cache}",
                        file=sys.stderr,
                    )
                    told = True
            return {"records": n, "bad": {str(i): w for i, w in sorted(bad.items())}}

        write_cache(self.cache, fill, size=n * math.prod(self.grid) * self.dtype.itemsize)
        return bad

    def _decode_range(self, lo: int, hi: int) -> tuple[np.ndarray, dict[int, str]]:
        """Records lo..hi-1 decoded from the shards: (ids [n, H, W], {record: why} for those that fail,
        whose rows are zeros)."""
        syms = [np.zeros((hi - lo, count), dtype=np.int32) for _, count in self.coder._calls]
        bad: dict[int, str] = {}
        for row, i in enumerate(range(lo, hi)):
            decoded = self._try_symbols(i)
            if isinstance(decoded, str):
                bad[i] = decoded
                continue
            for out, d in zip(syms, decoded, strict=True):
                out[row] = d
        ids = self.coder.assemble(syms)
        for i in bad:
            ids[i - lo] = 0
        return ids, bad

    def _cached_ids(self) -> np.ndarray:
        if self._ids is None:
            assert self.cache is not None
            self._ids = _map_npy(self.cache)
        return self._ids

    def drop_cache(self) -> None:
        """Close and delete the cache file and its sidecar (for a dataset that is itself temporary: a
        cache is otherwise kept and never cleaned). Reading again decodes from the shards."""
        self.close()
        if self.cache is not None:
            remove_cache(self.cache)
            self.cache = None
        self._bad = {}

    # -- reading --------------------------------------------------------------------------------------

    def _map(self, shard: int) -> np.ndarray:
        buf = self._maps[shard]
        if buf is None:
            buf = self._maps[shard] = _map(self.shard_paths[shard])
        return buf

    def _record_error(self, i: int, why: str) -> TokenRecordError:
        shard = int(self._shard[i])
        return TokenRecordError(
            f"{self.shard_paths[shard]}: record {i} ({int(self._local[i])} of this shard): {why}"
        )

    def _try_symbols(self, i: int) -> list[np.ndarray] | str:
        """Record i's decoded symbol arrays, or why it cannot be decoded."""
        start, end, crc, shard = self._rows[i].tolist()
        rec = self._map(shard)[start:end]
        if zlib.crc32(rec) != crc:
            return BAD_CHECKSUM
        syms = self.coder.decode_symbols(words(rec))
        return BAD_DECODE if syms is None else syms

    def _symbols(self, i: int) -> list[np.ndarray]:
        syms = self._try_symbols(i)
        if isinstance(syms, str):
            raise self._record_error(i, syms)
        return syms

    def read(self, index: int) -> np.ndarray:
        i = self._position(index)
        if self.cache is None:
            return self.coder.assemble(self._symbols(i))
        if i in self._bad:
            raise self._record_error(i, self._bad[i])
        ids = self._ids if self._ids is not None else self._cached_ids()
        return ids[i].astype(np.int64)

    def read_many(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Several records as int64 [n, H, W]: one fancy index of the cache; without a cache, entropy-
        decoded one by one and their ids looked up all together."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        n = len(self)
        if len(idx) and not ((idx >= -n) & (idx < n)).all():
            self._position(int(idx[(idx < -n) | (idx >= n)][0]))  # raises IndexError naming it
        idx = np.where(idx < 0, idx + n, idx)
        if self.cache is not None:
            if self._bad:
                damaged = [int(i) for i in idx if int(i) in self._bad]
                if damaged:
                    raise self._record_error(damaged[0], self._bad[damaged[0]])
            ids = self._ids if self._ids is not None else self._cached_ids()
            return ids[idx].astype(np.int64)
        calls = self.coder._calls
        syms = [np.empty((len(idx), count), dtype=np.int32) for _, count in calls]
        for row, i in enumerate(idx.tolist()):
            for out, decoded in zip(syms, self._symbols(i), strict=True):
                out[row] = decoded
        return self.coder.assemble(syms)

    def files(self) -> list[Path]:
        names = [self.path / HEADER, self.path / CODEC, *self.shard_paths]
        return [p for p in names if p.is_file()]

    def close(self) -> None:
        self._maps = [None] * len(self.shard_paths)
        self._ids = None
