"""Writing SeiT's token datasets (:class:`SeitWriter`, :func:`write_seit`), and the check that a
dataset could be written somewhere before any expensive work (:func:`check_seit_target`).

The writer refuses an existing ``NAME-token.data.bin.gz`` (as a mimkit folder that already holds a dataset
is refused) unless it is given ``overwrite=True``, and renames the data file into place last, after the
index and the small files, so that a new dataset appears under its final name only once it is whole.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from mimkit.tokens.records import (
    check_codebook,
    check_ids,
    check_labels,
    codebook_digest,
    missing_dirs,
    remove_empty_dirs,
    write_atomic,
)
from mimkit.tokens.seit import SeitTokens
from mimkit.tokens.seit_files import (
    CLASSES_SUFFIX,
    CODEBOOK,
    DEFAULT_VOCAB,
    LABEL_SUFFIX,
    MAX_ID,
    META_SUFFIX,
    data_path_for,
    encode_records,
    index_path,
    load_codebook,
    sibling,
)

GZIP_LEVEL = 9  # what Python's gzip writes by default


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
        self._made_dirs = missing_dirs(self.path.parent)
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
        remove_empty_dirs(self._made_dirs)


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
