"""Token datasets: N records, each an [H, W] grid of codebook ids in [0, K), with optional labels, class
names, the codebook itself and a description of the tokenizer that made them.

Two on-disk layouts share one reading interface, :class:`TokenDataset`:

- ``seit``: SeiT's release files, exactly (:mod:`mimkit.tokens.seit_files`): ``NAME-token.data.bin.gz``,
  ``NAME-token.index.npy.gz``, ``NAME-label.txt`` and ``codebook.ckpt`` beside them;
- ``mimkit``: our compact folder (:mod:`mimkit.tokens.compact`): a JSON header, checksummed shards that
  can be written in parallel and resumed, and the codebook as safetensors.

:func:`open_tokens` tells them apart; :func:`write_tokens`, :func:`convert`, :func:`info` and
:func:`verify` work on either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.tokens import compact, compact_shards, compact_writer, seit, seit_files, seit_writer
from mimkit.tokens.records import (
    CHUNK,
    TokenDataset,
    TokenRecordError,
    check_codebook,
    check_labels,
    missing_dirs,
    remove_empty_dirs,
)

__all__ = [
    "TokenDataset",
    "TokenRecordError",
    "convert",
    "info",
    "is_token_dataset",
    "open_tokens",
    "verify",
    "write_tokens",
]

FORMATS = ("seit", "mimkit")
TOKENIZE_RECORD = "tokenize.json"  # written by `mimkit tokenize` into the folder it writes (what resumes)
# verify lists at most this many damaged records (their total count is always given)
MAX_LISTED = 1000


def order0_stats(counts: np.ndarray) -> tuple[int, float]:
    """(codes used, perplexity = 2 ** entropy in bits) of an id histogram."""
    total = counts.sum()
    if total == 0:
        return 0, 0.0
    p = counts[counts > 0] / total
    return int((counts > 0).sum()), float(2.0 ** (-(p * np.log2(p)).sum()))


# ----------------------------------------------------------------------------------------------------
# detection and opening


def _layout(path: Path) -> tuple[str, Path] | None:
    """("seit", data file) | ("mimkit", folder) | ("mimkit-incomplete", folder) | None."""

    if path.name.endswith(seit_files.DATA_SUFFIX):
        return ("seit", path) if path.is_file() else None
    if path.is_dir():
        if (path / compact.HEADER).is_file():
            return "mimkit", path
        found = sorted(path.glob(f"*{seit_files.DATA_SUFFIX}"))
        if len(found) == 1:
            return "seit", found[0]
        if len(found) > 1:
            names = ", ".join(p.name for p in found)
            raise ValueError(f"{path}: holds {len(found)} SeiT token files ({names}); name one of them")
        if (
            compact_shards.shard_files(path)
            or (path / compact.WRITING).is_file()
            or (path / compact.OLD_CODEC).is_file()
        ):
            return "mimkit-incomplete", path
        return None
    prefixed = path.with_name(path.name + seit_files.DATA_SUFFIX)
    if prefixed.is_file():
        return "seit", prefixed
    return None


def is_token_dataset(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` looks like a token dataset of either format (file names only, nothing is read)."""
    try:
        return _layout(Path(path)) is not None
    except ValueError:
        return True  # a folder of several SeiT datasets: a token dataset, though an ambiguous one


def open_tokens(
    path: str | os.PathLike[str],
    *,
    grid: tuple[int, int] | None = None,
    vocab_size: int | None = None,
    cache: bool = True,
) -> TokenDataset:
    """Open a token dataset of either format. ``path``: SeiT's ``NAME-token.data.bin.gz`` (or its folder
    when it holds exactly one, or the ``.../NAME`` prefix), or a folder in mimkit's format. ``grid`` and
    ``vocab_size`` are needed only where SeiT's files cannot tell them (see :class:`SeitTokens`); for a
    mimkit folder they are checked against its header. ``cache``: decode the dataset once into a cache
    file under :func:`cache_dir` that every reading process memory-maps (the fast way to train on it);
    False reads the stored files directly (mimkit: each record decoded on demand; SeiT: the stream
    decompressed into this process's memory) - for one pass over the data."""

    p = Path(path).expanduser()
    layout = _layout(p)
    if layout is None:
        raise ValueError(
            f"'{path}' is not a token dataset: expected SeiT's files (NAME{seit_files.DATA_SUFFIX} with "
            f"NAME{seit_files.INDEX_SUFFIX} beside it) or a mimkit token folder (with {compact.HEADER})"
        )
    kind, where = layout
    if kind == "seit":
        return seit.SeitTokens(where, grid=grid, vocab_size=vocab_size, cache=cache)
    if kind == "mimkit-incomplete":
        n = len(compact_shards.shard_files(where))
        if (where / TOKENIZE_RECORD).is_file():  # what `mimkit tokenize` keeps in a folder it writes
            finish = (
                "`mimkit tokenize` stopped while writing it: run it again with the same arguments to resume"
            )
        else:
            finish = (
                "it was being written by a conversion, which does not resume: remove it and convert again"
            )
        what = f"an incomplete mimkit token dataset: {n} shard file(s) but no {compact.HEADER}"
        raise ValueError(f"{where}: {what}; {finish}")
    return compact.CompactTokens(where, grid=grid, vocab_size=vocab_size, cache=cache)


# ----------------------------------------------------------------------------------------------------
# writing and converting


def _check_to(to: str) -> None:
    if to not in FORMATS:
        raise ValueError(f"unknown token format {to!r}; expected one of {FORMATS}")


def _write_seit(writer: seit_writer.SeitWriter, parts: Iterable[tuple[np.ndarray, Any]]) -> TokenDataset:
    """Append (ids, labels) parts and finish; on any failure no half-written stream is left behind."""
    try:
        for ids, labels in parts:
            writer.append(ids, labels)
    except BaseException:
        writer.abort()
        raise
    return writer.finish()


def _fresh_folder(dst: str | os.PathLike[str]) -> None:
    """convert/write_tokens start a new mimkit dataset: one already there (finished or not) would be
    resumed or mixed with the new records, so it is refused."""

    p = Path(dst).expanduser()
    if p.is_dir() and (
        (p / compact.HEADER).exists() or (p / compact.WRITING).exists() or compact_shards.shard_files(p)
    ):
        raise ValueError(
            f"{p}: already holds a mimkit token dataset (or part of one); remove it or choose another folder"
        )


class _Undo:
    """What a new mimkit dataset's writing creates at ``dst`` (the folder and the folders above it that do
    not exist yet, the writer's files in it), so that a write that fails removes exactly that and a
    rerun starts clean. Files that were there before are never touched."""

    def __init__(self, dst: str | os.PathLike[str]) -> None:
        self.folder = Path(dst).expanduser()
        self.made_dirs = missing_dirs(self.folder)
        self.before = set(self.folder.iterdir()) if self.folder.is_dir() else set()

    def __call__(self) -> None:

        ours = {compact.HEADER, compact.WRITING, compact.CODEBOOK}
        if self.folder.is_dir():
            for p in set(self.folder.iterdir()) - self.before:
                if p.is_file() and (p.name in ours or compact_shards.SHARD_RE.fullmatch(p.name)):
                    p.unlink(missing_ok=True)
        remove_empty_dirs(self.made_dirs)


def write_tokens(
    dst: str | os.PathLike[str],
    ids: np.ndarray,
    labels: np.ndarray | Sequence[int] | None = None,
    *,
    to: str = "mimkit",
    vocab_size: int | None = None,
    codebook: torch.Tensor | np.ndarray | None = None,
    classes: Sequence[str] = (),
    meta: dict[str, Any] | None = None,
    shard_size: int | None = None,
) -> TokenDataset:
    """Write the id grids ``ids`` (int [N, H, W]) as a token dataset in format ``to``. ``vocab_size``:
    the codebook's rows when a codebook is given, else this, else max id + 1. For SeiT, ``dst`` is
    ``NAME-token.data.bin.gz`` or a folder (NAME = the folder's name)."""

    _check_to(to)
    ids = np.asarray(ids)
    if ids.ndim != 3:
        raise ValueError(f"{dst}: ids must be an [N, H, W] array of integers; got shape {tuple(ids.shape)}")
    cb = check_codebook(codebook, str(dst))
    if cb is not None:
        if vocab_size is not None and vocab_size != cb.shape[0]:
            raise ValueError(f"{dst}: vocab_size={vocab_size} but the codebook has {cb.shape[0]} rows")
        vocab_size = cb.shape[0]
    if vocab_size is None:
        vocab_size = int(ids.max()) + 1 if ids.size else 1
        if to == "seit" and vocab_size > seit_files.DEFAULT_VOCAB:
            vocab_size = None  # the writer then names the first record its escape coding cannot hold
    grid = (int(ids.shape[1]), int(ids.shape[2]))
    if to == "seit":
        swriter = seit_writer.SeitWriter(
            dst, grid=grid, vocab_size=vocab_size, codebook=cb, classes=classes, meta=meta
        )
        return _write_seit(swriter, [(ids, labels)])
    _fresh_folder(dst)
    labels = check_labels(labels, len(ids), str(dst), classes or ())
    undo = _Undo(dst)
    try:
        writer = compact_writer.CompactWriter(
            dst,
            grid=grid,
            vocab_size=vocab_size,
            codebook=cb,
            classes=classes,
            meta=meta,
            shard_size=shard_size or compact.SHARD_SIZE,
        )
        for k, start in enumerate(range(0, len(ids), writer.shard_size)):
            stop = start + writer.shard_size
            writer.write_shard(k, ids[start:stop], None if labels is None else labels[start:stop])
        return writer.finish()
    except BaseException:
        undo()  # a rerun would otherwise find a partial dataset and refuse it
        raise


def convert(
    src: str | os.PathLike[str] | TokenDataset,
    dst: str | os.PathLike[str],
    *,
    to: str,
    shard_size: int | None = None,
) -> TokenDataset:
    """Copy a token dataset into format ``to`` at ``dst``, keeping ids, labels, class names, codebook and
    the tokenizer description; reads in chunks, so memory stays bounded on datasets of any size."""

    _check_to(to)
    # one pass over the records: decoded directly, no cache file made for it
    source = src if isinstance(src, TokenDataset) else open_tokens(src, cache=False)
    target = Path(dst)
    if target.exists() and os.path.samefile(target, source.path):
        raise ValueError(f"'{dst}' is the dataset being converted: writing it would destroy it; give another")
    common = {
        "grid": source.grid,
        "vocab_size": source.vocab_size,
        "codebook": source.codebook,
        "classes": source.classes,
        "meta": source.meta,
    }
    if to == "seit":
        parts = (
            (ids, None if source.labels is None else source.labels[start : start + len(ids)])
            for start, ids in source.chunks()
        )
        return _write_seit(seit_writer.SeitWriter(dst, **common), parts)
    _fresh_folder(dst)
    undo = _Undo(dst)
    try:
        cwriter = compact_writer.CompactWriter(dst, shard_size=shard_size or compact.SHARD_SIZE, **common)
        size = cwriter.shard_size
        for k, start in enumerate(range(0, len(source), size)):
            stop = min(start + size, len(source))
            cwriter.write_shard(
                k,
                source.read_many(np.arange(start, stop)),
                None if source.labels is None else source.labels[start:stop],
            )
        return cwriter.finish()
    except BaseException:
        undo()  # a rerun would otherwise find a partial dataset and refuse it
        raise


# ----------------------------------------------------------------------------------------------------
# inspection


def _open(src: str | os.PathLike[str] | TokenDataset) -> TokenDataset:
    return src if isinstance(src, TokenDataset) else open_tokens(src, cache=False)


def info(src: str | os.PathLike[str] | TokenDataset) -> dict[str, Any]:
    """What a token dataset holds: format, records, grid, vocabulary, codebook shape, labels and classes,
    bytes per image as stored, codes used and perplexity over all records, and its header/tokenizer
    description."""
    ds = _open(src)
    counts = np.zeros(ds.vocab_size, dtype=np.int64)
    for _, ids in ds.chunks():
        counts += np.bincount(ids.ravel(), minlength=ds.vocab_size)
    used, perplexity = order0_stats(counts)
    n = len(ds)
    stored = ds.stored_bytes()
    result: dict[str, Any] = {
        "format": ds.format,
        "path": str(ds.path),
        "name": ds.name,
        "records": n,
        "grid": list(ds.grid),
        "vocab_size": ds.vocab_size,
        "codebook": None if ds.codebook is None else list(ds.codebook.shape),
        "labels": ds.labels is not None,
        "classes": len(ds.classes),
        "stored_bytes": stored,
        "bytes_per_image": stored / n if n else 0.0,
        "bits_per_token": 8 * stored / (n * math.prod(ds.grid)) if n and math.prod(ds.grid) else 0.0,
        "codes_used": used,
        "perplexity": perplexity,
        "files": [p.name for p in ds.files()],
        "meta": ds.meta,
    }
    header = getattr(ds, "header", None)
    if header is not None:
        result["codec"] = header.get("codec", {})
    return result


def verify(src: str | os.PathLike[str]) -> dict[str, Any]:
    """Check a token dataset the way training reads it, without stopping at the first damaged record: the
    check is the readers' own (one check, not two). The dataset is opened as every reader opens it -
    each file's checks: header, index, codec, codebook, labels, the whole SeiT stream - and what that
    refuses makes the whole dataset unsound; then every record is read, each damaged one listed. Returns
    ``{format, path, records, ok, bad, sound, bad_records: [{record, error}, ...]}``: ``sound`` is False
    whenever a reader would refuse anything; ``records`` is None when the dataset cannot be opened at all
    (then ``ok`` is 0); ``bad_records`` lists the problem of the whole dataset first (``record`` None) and
    then the damaged records, at most MAX_LISTED in all."""

    p = Path(src).expanduser()
    layout = _layout(p)
    if layout is None:
        open_tokens(p)  # raises the detection error with its explanation
    kind, where = layout  # type: ignore[misc]
    result: dict[str, Any] = {"format": kind.replace("-incomplete", ""), "path": str(where)}
    try:
        ds = open_tokens(where, cache=False)
    except (TokenRecordError, ValueError, OSError) as err:
        folder = where if where.is_dir() else where.parent
        error = str(err) if str(folder) in str(err) else f"{where}: {err}"  # named by its file
        return {
            **result,
            "records": None,
            "ok": 0,
            "bad": None,
            "sound": False,
            "bad_records": [{"record": None, "error": error}],
        }
    listed: list[dict[str, Any]] = []
    bad = 0
    with ds:
        for start in range(0, len(ds), CHUNK):
            chunk = range(start, min(start + CHUNK, len(ds)))
            try:
                ds.read_many(np.asarray(chunk))
                continue
            except TokenRecordError:
                pass
            for i in chunk:  # the chunk holds a damaged record: each read on its own
                try:
                    ds.read(i)
                except TokenRecordError as err:
                    bad += 1
                    if len(listed) < MAX_LISTED:
                        listed.append({"record": i, "error": str(err)})
    n = len(ds)
    return {**result, "records": n, "ok": n - bad, "bad": bad, "sound": bad == 0, "bad_records": listed}
