"""Writing mimkit's token format (:mod:`mimkit.tokens.compact`): :class:`CompactWriter` writes a folder
shard by shard, from any number of processes, resumes a stopped job at its first missing shard and refuses
to mix two datasets in one folder.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard

from mimkit.tokens.compact import (
    CODEBOOK,
    FORMAT,
    HEADER,
    OLD_CODEC,
    SHARD_SIZE,
    VERSION,
    WRITING,
    CompactTokens,
    codebook_bytes,
    codebook_sha256,
    old_layout_error,
    read_header,
)
from mimkit.tokens.compact_shards import (
    CODEC_NAME,
    FLAG_LABELS,
    ZSTD_LEVEL,
    build_shard,
    chunk_records,
    id_dtype,
    read_trailer,
    shard_files,
    shard_name,
)
from mimkit.tokens.records import TokenRecordError, check_codebook, check_ids, check_labels, write_atomic


def _show(value: Any) -> str:
    """A parameter in an error message: grids as tuples, hashes shortened, None as 'none'."""
    if value is None:
        return "none"
    if isinstance(value, list):
        return str(tuple(value))
    if isinstance(value, str) and len(value) == 64:
        return value[:12] + "..."
    return str(value)


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
            data = codebook_bytes(self.codebook)
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
