"""SeiT's token datasets opened for reading (:class:`SeitTokens`): the gzip stream decompressed once into
a cache file that every process memory-maps (or, with ``cache=False``, into this process's memory), each
record decoded from it with any damage named. The files and their bytes are
:mod:`mimkit.tokens.seit_files`; writing them is :mod:`mimkit.tokens.seit_writer`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.tokens.records import (
    TokenDataset,
    TokenRecordError,
    codebook_digest,
    map_readonly,
    read_labels,
    remove_cache,
)
from mimkit.tokens.seit_files import (
    CLASSES_SUFFIX,
    CODEBOOK,
    DEFAULT_VOCAB,
    ESCAPE,
    LABEL_SUFFIX,
    META_SUFFIX,
    cached_stream,
    decode_record,
    index_path,
    index_problems,
    load_classes,
    load_codebook,
    load_index,
    load_labels,
    sibling,
    split_name,
    stream_in_memory,
)


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
                self._buf = map_readonly(self.cache)
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
