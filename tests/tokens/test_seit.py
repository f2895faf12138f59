"""SeiT's token files (mimkit.tokens.seit, seit_files, seit_writer): the official bytes, exact round trips,
the writer's refusals, damaged streams and indexes named by file and record, and the decoded cache."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.tokens.dataset import (
    TokenRecordError,
    convert,
    open_tokens,
    verify,
    write_tokens,
)
from mimkit.tokens.seit_writer import SeitWriter, check_seit_target
from tests.tokens.test_dataset import CLASSES, codebook, random_tokens


def test_seit_bytes_are_the_official_layout(tmp_path: Path) -> None:
    ids = np.array([[[0, 254], [255, 390]]])
    cb = codebook(391)
    ds = write_tokens(tmp_path / "x-token.data.bin.gz", ids, [2], to="seit", codebook=cb, classes=CLASSES)
    assert gzip.decompress((tmp_path / "x-token.data.bin.gz").read_bytes()) == b"\x00\xfe\xff\x00\xff\x87"
    index = np.load(io.BytesIO(gzip.decompress((tmp_path / "x-token.index.npy.gz").read_bytes())))
    assert index.dtype == np.int64 and index.tolist() == [0, 6]
    assert (tmp_path / "x-label.txt").read_text() == "2\n"
    assert json.loads((tmp_path / "x-class-to-id.json").read_text()) == {"cat": 0, "dog": 1, "ship": 2}
    saved = torch.load(tmp_path / "codebook.ckpt", weights_only=True)
    assert isinstance(saved, torch.Tensor) and torch.equal(saved, cb)
    assert ds.read(0).tolist() == [[0, 254], [255, 390]] and ds.read(0).dtype == np.int64
    assert ds.labels.tolist() == [2] and ds.classes == CLASSES and ds.vocab_size == 391


def test_seit_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    ids = random_tokens(40, vocab=510, seed=1)
    ids[0, 0, :4] = [509, 509, 255, 254]  # the largest id: 0xFF 0xFE, never a second 0xFF
    ids[1, -1, -1] = 509  # a record ending in an escaped id
    labels = np.arange(40) % 3
    a = write_tokens(tmp_path / "a" / "t-token.data.bin.gz", ids, labels, to="seit")
    write_tokens(tmp_path / "b" / "t-token.data.bin.gz", ids, labels, to="seit")
    raw = gzip.decompress((tmp_path / "a" / "t-token.data.bin.gz").read_bytes())
    assert raw[:7] == b"\xff\xfe\xff\xfe\xff\x00\xfe" and b"\xff\xff" not in raw
    assert all(np.array_equal(a.read(i), ids[i]) for i in range(40))
    assert np.array_equal(a.read_many([5, 0, 1]), ids[[5, 0, 1]])
    assert np.array_equal(a.labels, labels) and a.grid == (6, 6) and a.vocab_size == 510
    for name in ("t-token.data.bin.gz", "t-token.index.npy.gz", "t-label.txt"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_seit_writer_refuses_ids_the_escape_coding_cannot_hold(tmp_path: Path) -> None:
    ids = np.zeros((3, 2, 2), np.int64)
    ids[1, 1, 0] = 510  # 0xFF 0xFF: the official reader would take both bytes for markers
    with pytest.raises(ValueError, match=r"record 1 holds id 510; SeiT's escape coding holds ids 0\.\.509"):
        write_tokens(tmp_path / "t-token.data.bin.gz", ids, to="seit")
    with pytest.raises(ValueError, match=r"holds ids 0\.\.509; a vocabulary of 511 does not fit"):
        write_tokens(tmp_path / "t-token.data.bin.gz", ids, to="seit", vocab_size=511)
    assert list(tmp_path.iterdir()) == []


def test_seit_folder_holds_one_codebook(tmp_path: Path) -> None:
    """A different codebook.ckpt in the folder is refused before anything is written, and again if it
    appears while the records are written: never a finished-looking dataset beside the wrong codebook."""
    ids = random_tokens(6, vocab=50, seed=20)
    write_tokens(tmp_path / "train-token.data.bin.gz", ids, to="seit", codebook=codebook(50))
    before = sorted(p.name for p in tmp_path.iterdir())
    clash = r"its codebook\.ckpt differs from this dataset's codebook \(other values\); a folder holds one"
    with pytest.raises(ValueError, match=clash):
        SeitWriter(tmp_path / "val-token.data.bin.gz", codebook=codebook(50) * 2)
    with pytest.raises(ValueError, match=clash):
        check_seit_target(tmp_path / "val-token.data.bin.gz", codebook(50) * 2, 50)
    with pytest.raises(ValueError, match=r"\(\(50, 4\) there, \(60, 4\) here\)"):
        check_seit_target(tmp_path / "val-token.data.bin.gz", codebook(60))
    # without a codebook of its own a dataset uses the folder's, so its ids must fit that one
    with pytest.raises(
        ValueError, match=r"codebook\.ckpt has 50 rows .* a dataset of 300 codes does not fit"
    ):
        check_seit_target(tmp_path / "val-token.data.bin.gz", None, 300)
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    same = write_tokens(tmp_path / "val-token.data.bin.gz", ids, to="seit", codebook=codebook(50))
    assert torch.equal(same.codebook, codebook(50)) and same.vocab_size == 50
    # a codebook written into the folder while a dataset is being written
    other = tmp_path / "other"
    writer = SeitWriter(other / "val-token.data.bin.gz", codebook=codebook(50))
    writer.append(ids, np.arange(6))
    other.mkdir(exist_ok=True)
    torch.save(codebook(50) * 3, other / "codebook.ckpt")
    with pytest.raises(ValueError, match=clash):
        writer.finish()
    assert [p.name for p in other.iterdir()] == ["codebook.ckpt"]


def test_check_seit_target_gives_the_writers_errors(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"a SeiT dataset is named NAME-token\.data\.bin\.gz .*got '.*x\.gz'"
    ):
        check_seit_target(tmp_path / "x.gz", codebook(391), 391)
    with pytest.raises(ValueError, match=r"holds ids 0\.\.509; a vocabulary of 600 does not fit"):
        check_seit_target(tmp_path / "t-token.data.bin.gz", codebook(600))
    with pytest.raises(ValueError, match=r"vocab_size=300 but the codebook has 391 rows"):
        check_seit_target(tmp_path / "t-token.data.bin.gz", codebook(391), 300)
    assert check_seit_target(tmp_path / "d", codebook(391), 391) == tmp_path / "d" / "d-token.data.bin.gz"
    assert list(tmp_path.iterdir()) == []  # a check writes nothing


def test_seit_refuses_an_existing_dataset_unless_overwrite(tmp_path: Path) -> None:
    data = tmp_path / "t-token.data.bin.gz"
    write_tokens(data, random_tokens(4, seed=21), [0, 1, 2, 0], to="seit")
    exists = (
        r"t-token\.data\.bin\.gz: already exists and is not overwritten; remove it \(and its "
        r"t-token\.index\.npy\.gz\) first, or write to another name"
    )
    with pytest.raises(ValueError, match=exists):
        write_tokens(data, random_tokens(3, seed=22), to="seit")
    with pytest.raises(ValueError, match=exists):
        check_seit_target(data)
    with pytest.raises(
        ValueError, match=r"t-token\.data\.bin\.gz' is the dataset being converted: writing it"
    ):
        convert(data, data, to="seit")
    assert check_seit_target(data, overwrite=True) == data
    writer = SeitWriter(data, overwrite=True)
    writer.append(random_tokens(3, seed=22))
    ds = writer.finish()
    assert len(ds) == 3 and ds.labels is None and not (tmp_path / "t-label.txt").exists()
    assert np.array_equal(ds.read_many(range(3)), random_tokens(3, seed=22))


def test_failed_writes_leave_nothing_behind(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = random_tokens(30, seed=23)
    with pytest.raises(ValueError, match=r"30 records need 30 labels; got shape \(29,\)"):
        write_tokens(tmp_path / "new" / "t-token.data.bin.gz", ids, np.arange(29), to="seit")
    assert not (tmp_path / "new").exists()  # neither the temporary stream nor the folder made for it
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="30 records need 30 labels"):
        write_tokens(tmp_path / "kept" / "t-token.data.bin.gz", ids, np.arange(29), to="seit")
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    # a conversion to mimkit that fails after its codec and first shard are written
    source = write_tokens(tmp_path / "s-token.data.bin.gz", ids, to="seit")
    calls = {"n": 0}
    read_many = source.read_many

    def failing(indices: np.ndarray) -> np.ndarray:
        calls["n"] += 1
        if calls["n"] == 3:  # the fit sample, shard 0, then shard 1 fails
            raise TokenRecordError("s-token.data.bin.gz: record 12: damaged")
        return read_many(indices)

    monkeypatch.setattr(source, "read_many", failing)
    for dst in (tmp_path / "a" / "c", tmp_path / "kept"):
        calls["n"] = 0
        with pytest.raises(TokenRecordError, match="record 12: damaged"):
            convert(source, dst, to="mimkit", shard_size=10)
    assert not (tmp_path / "a").exists()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["notes.txt"]
    monkeypatch.setattr(source, "read_many", read_many)
    assert np.array_equal(convert(source, tmp_path / "a" / "c", to="mimkit").read_many(range(30)), ids)


def test_seit_flipped_byte_is_reported_once_where_the_stream_fails(tmp_path: Path) -> None:
    ids = random_tokens(50, vocab=300, seed=2)
    source = write_tokens(tmp_path / "good" / "t-token.data.bin.gz", ids, to="seit", vocab_size=300)
    offsets = source.offsets
    good = source.path.read_bytes()
    data = tmp_path / "t-token.data.bin.gz"
    shutil.copy(source.path.with_name("t-token.index.npy.gz"), tmp_path)
    # the first flip from the middle on that breaks the deflate data (most only break the CRC-32)
    for pos in range(len(good) // 2, len(good) - 8):
        raw = bytearray(good)
        raw[pos] ^= 0x10
        data.write_bytes(bytes(raw))
        report = verify(data)
        if "a damaged gzip stream" in report["bad_records"][0]["error"]:
            break
    stream_error = report["bad_records"][0]
    found = re.search(
        r"t-token\.data\.bin\.gz: a damaged gzip stream \(.*\): it fails after decompressed "
        r"byte (\d+) \(inside record (\d+) of 50\)",
        stream_error["error"],
    )
    assert stream_error["record"] is None and found, stream_error
    fails_at, inside = int(found.group(1)), int(found.group(2))
    assert 0 < fails_at < offsets[-1] and offsets[inside] <= fails_at < offsets[inside + 1]
    # a reader cannot use a stream that fails: the whole dataset is unsound, as every reader says
    assert (report["records"], report["ok"], report["sound"], len(report["bad_records"])) == (
        None,
        0,
        False,
        1,
    )
    for cache in (True, False):
        with pytest.raises(TokenRecordError, match=re.escape(stream_error["error"])):
            open_tokens(data, cache=cache)
    # a damaged CRC-32 at the very end: every record decodes, yet readers refuse the stream, and so verify
    raw = bytearray(good)
    raw[-8] ^= 0x01
    data.write_bytes(bytes(raw))
    report = verify(data)
    (only,) = report["bad_records"]
    assert (
        report["sound"] is False
        and only["record"] is None
        and re.search(
            rf"checksum of the gzip member that ends at decompressed byte {offsets[-1]} does not match",
            only["error"],
        )
    )
    with pytest.raises(TokenRecordError, match=re.escape(only["error"])):
        open_tokens(data)


def _seit_files(folder: Path, stream: bytes, offsets: list[int], labels: list[int] | None = None) -> Path:
    """Hand-made SeiT files (to hold what our writer never writes)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "h-token.data.bin.gz"
    data.write_bytes(gzip.compress(stream))
    buf = io.BytesIO()
    np.save(buf, np.array(offsets, np.int64))
    (folder / "h-token.index.npy.gz").write_bytes(gzip.compress(buf.getvalue()))
    if labels is not None:
        (folder / "h-label.txt").write_text("".join(f"{v}\n" for v in labels))
    return data


def test_seit_truncated_stream_names_the_file_and_record(tmp_path: Path) -> None:
    ids = random_tokens(50, vocab=500, seed=2)
    write_tokens(tmp_path / "t-token.data.bin.gz", ids, to="seit")
    data = tmp_path / "t-token.data.bin.gz"
    raw = gzip.decompress(data.read_bytes())
    data.write_bytes(gzip.compress(raw)[: len(gzip.compress(raw)) // 2])
    with pytest.raises(
        TokenRecordError, match=r"t-token\.data\.bin\.gz: truncated: .*\(inside record \d+ of 50\)"
    ):
        open_tokens(data)
    report = verify(data)
    assert report["sound"] is False and report["records"] is None
    assert "truncated: the gzip stream ends after" in report["bad_records"][0]["error"]


def test_seit_index_that_does_not_match_the_stream(tmp_path: Path) -> None:
    stream = bytes([1, 2, 3, 4, 5, 6, 7, 8])  # two 2x2 records
    data = _seit_files(tmp_path / "long", stream, [0, 4, 9])
    with pytest.raises(
        TokenRecordError, match=r"h-token\.index\.npy\.gz: record 1: does not match the stream"
    ):
        open_tokens(data)
    data = _seit_files(tmp_path / "back", stream, [0, 5, 4, 8])
    with pytest.raises(TokenRecordError, match=r"h-token\.index\.npy\.gz: record 1: not monotone"):
        open_tokens(data)
    data = _seit_files(tmp_path / "labels", stream, [0, 4, 8], labels=[1, 2, 3])
    with pytest.raises(
        TokenRecordError, match=r"index\.npy\.gz: holds 3 offsets but h-label\.txt has 3 labels"
    ):
        open_tokens(data)


def test_seit_damaged_records_name_the_record(tmp_path: Path) -> None:
    # record 0: 4 ids; record 1: 3 ids (a 2x2 grid needs 4); record 2 ends in a dangling escape byte
    stream = bytes([1, 2, 3, 4]) + bytes([1, 2, 3]) + bytes([1, 2, 3, 0xFF])
    data = _seit_files(tmp_path, stream, [0, 4, 7, 11])
    ds = open_tokens(data)
    assert ds.grid == (2, 2) and ds.read(0).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(
        TokenRecordError, match=r"h-token\.data\.bin\.gz: record 1: decodes to 3 ids, expected 4"
    ):
        ds.read(1)
    with pytest.raises(TokenRecordError, match=r"record 2: ends in a dangling 0xFF escape byte"):
        ds.read(2)
    with pytest.raises(IndexError, match="record 3 is out of range"):
        ds.read(3)
    report = verify(data)
    assert (report["records"], report["ok"], report["bad"], report["sound"]) == (3, 1, 2, False)
    assert [b["record"] for b in report["bad_records"]] == [1, 2]
    assert "record 1: decodes to 3 ids, expected 4" in report["bad_records"][0]["error"]


def test_seit_grid_and_vocabulary_checks(tmp_path: Path) -> None:
    data = _seit_files(tmp_path / "a", bytes([1, 2, 3, 4, 5, 6]), [0, 6])
    with pytest.raises(ValueError, match=r"record 0 holds 6 ids, not a square grid; pass grid=\(H, W\)"):
        open_tokens(data)
    assert open_tokens(data, grid=(2, 3)).read(0).tolist() == [[1, 2, 3], [4, 5, 6]]
    data = _seit_files(tmp_path / "b", bytes([1, 2, 3, 9]), [0, 4])
    torch.save(codebook(5), tmp_path / "b" / "codebook.ckpt")
    with pytest.raises(TokenRecordError, match=r"record 0: holds id 9, outside the vocabulary \[0, 5\)"):
        open_tokens(data).read(0)
    torch.save({"not": "a tensor"}, tmp_path / "b" / "codebook.ckpt")
    with pytest.raises(TokenRecordError, match=r"codebook\.ckpt: expected a codebook tensor \[K, D\]"):
        open_tokens(data)


def test_seit_cache_is_made_once_and_reused(tmp_path: Path, token_cache: Path) -> None:
    ids = random_tokens(20, seed=3)
    write_tokens(tmp_path / "t-token.data.bin.gz", ids, to="seit")
    first = open_tokens(tmp_path / "t-token.data.bin.gz")
    cached = list(token_cache.glob("*.bin"))
    assert len(cached) == 1 and first.cache == cached[0]
    before = cached[0].stat()
    second = open_tokens(tmp_path / "t-token.data.bin.gz")
    after = second.cache.stat()
    assert second.cache == cached[0]
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert np.array_equal(second.read(7), ids[7])
    assert not any(p.name.startswith(".") for p in token_cache.iterdir())  # no temporaries left
    first.read(0)  # mapped
    second.drop_cache()
    assert not cached[0].exists() and np.array_equal(first.read(7), ids[7])  # a live map outlives unlink
    assert second.cache is None and np.array_equal(second.read_many([7, 1]), ids[[7, 1]])


@pytest.mark.parametrize("to", ["seit", "mimkit"])
def test_a_cache_damaged_on_disk_is_decoded_again_never_read(
    tmp_path: Path, token_cache: Path, capsys: pytest.CaptureFixture[str], to: str
) -> None:
    ids = random_tokens(80, vocab=300, seed=21)
    dst = tmp_path / ("t-token.data.bin.gz" if to == "seit" else "c")
    write_tokens(dst, ids, to=to, vocab_size=300)
    cache = open_tokens(dst).cache
    assert cache is not None and cache.is_file()
    stat = cache.stat()
    raw = bytearray(cache.read_bytes())
    raw[-5] ^= 0x01  # one byte of the last record's ids, the file's size and times kept
    cache.write_bytes(bytes(raw))
    os.utime(cache, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    capsys.readouterr()
    again = open_tokens(dst)
    assert again.cache == cache and np.array_equal(again.read_many(range(80)), ids)
    assert f"note: {cache}: this decoded cache does not match its checksum" in capsys.readouterr().err
    cache.with_name(cache.name + ".json").unlink()  # a cache without its sidecar is not trusted either
    assert np.array_equal(open_tokens(dst).read(79), ids[79])
    assert "this decoded cache has lost its checksum file" in capsys.readouterr().err


@pytest.mark.parametrize("to", ["seit", "mimkit"])
def test_a_cache_the_disk_has_no_room_for_is_refused_before_its_first_byte(
    tmp_path: Path, token_cache: Path, monkeypatch: pytest.MonkeyPatch, to: str
) -> None:
    dst = tmp_path / ("t-token.data.bin.gz" if to == "seit" else "c")
    write_tokens(dst, random_tokens(30, vocab=300, seed=22), to=to, vocab_size=300).drop_cache()
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr("mimkit.tokens.records.shutil.disk_usage", lambda p: usage._replace(free=1000))
    with pytest.raises(
        OSError, match=r"this token dataset needs \d+ bytes, its disk has 1000 bytes free"
    ) as err:
        open_tokens(dst)
    assert Path(err.value.filename).parent == token_cache
    assert list(token_cache.iterdir()) == []  # nothing begun
    monkeypatch.undo()
    assert open_tokens(dst).read(3).shape == (6, 6)


def test_seit_read_many_is_one_pass_and_falls_back_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = random_tokens(30, vocab=400, seed=13)  # escapes, but no 0xFF value byte (id 510)
    ds = write_tokens(tmp_path / "a" / "t-token.data.bin.gz", ids, to="seit", vocab_size=400)
    order = [29, 0, -1, 7, 7]
    with monkeypatch.context() as m:
        m.setattr(ds, "read", lambda i: pytest.fail("read_many fell back to records one by one"))
        assert np.array_equal(ds.read_many(order), ids[order])
        assert ds.read_many([]).shape == (0, 6, 6)
    with pytest.raises(IndexError, match="record 30 is out of range"):
        ds.read_many([1, 30])
    ids[3, 2, :3] = [509, 255, 509]  # escapes back to back: 0xFF 0xFE 0xFF 0x00 0xFF 0xFE
    ids[4, -1, -1] = 509  # ends in an escaped id, next to record 5's first byte
    ids[5, 0, 0] = 300
    ds = write_tokens(tmp_path / "b" / "t-token.data.bin.gz", ids, to="seit", vocab_size=510)
    with monkeypatch.context() as m:
        m.setattr(ds, "read", lambda i: pytest.fail("read_many fell back to records one by one"))
        assert np.array_equal(ds.read_many(range(30)), ids)
    damaged = open_tokens(
        _seit_files(tmp_path / "c", bytes([1, 2, 3, 4, 1, 2, 3, 0xFF, 5, 6, 7, 8]), [0, 4, 8, 12])
    )
    # record 1 ends in a dangling escape byte: never carried into record 2's first id
    with pytest.raises(TokenRecordError, match=r"h-token\.data\.bin\.gz: record 1: ends in a dangling 0xFF"):
        damaged.read_many([0, 1, 2])
    assert np.array_equal(damaged.read_many([2, 0]), [[[5, 6], [7, 8]], [[1, 2], [3, 4]]])


def test_seit_two_escape_bytes_in_a_row_are_damage(tmp_path: Path) -> None:
    """0xFF 0xFF (an id 510 by the old rule) decodes differently in the official reader, which takes every
    0xFF for a marker: it is damage, even where the record still yields H*W ids."""
    # record 1 = FF FF 01 02 03 04: four ids if the second 0xFF were a value; record 2 ends 0xFF, record 3
    # starts with 0xFF 0x00 (a marker ending one record is never paired with the next record's)
    stream = bytes([1, 2, 3, 4, 0xFF, 0xFF, 1, 2, 3, 4, 5, 6, 7, 0xFF, 0xFF, 0, 1, 2, 3])
    ds = open_tokens(_seit_files(tmp_path, stream, [0, 4, 10, 14, 19]), grid=(2, 2))
    for read in (lambda: ds.read(1), lambda: ds.read_many([0, 1])):
        with pytest.raises(
            TokenRecordError,
            match=r"h-token\.data\.bin\.gz: record 1: holds two 0xFF escape bytes in a row at byte 0 "
            r"of the record \(an escaped id's second byte is at most 254\)",
        ):
            read()
    with pytest.raises(TokenRecordError, match=r"record 2: ends in a dangling 0xFF escape byte"):
        ds.read_many([2])
    assert np.array_equal(ds.read_many([3, 0]), [[[255, 1], [2, 3]], [[1, 2], [3, 4]]])
    report = verify(ds.path)
    assert (report["records"], report["ok"], report["bad"]) == (4, 2, 2)
    assert "record 1: holds two 0xFF escape bytes in a row" in report["bad_records"][0]["error"]


def test_seit_without_cache_reads_from_memory(tmp_path: Path, token_cache: Path) -> None:
    ids = random_tokens(12, seed=14)
    write_tokens(tmp_path / "t-token.data.bin.gz", ids, to="seit")
    for p in token_cache.glob("*"):
        p.unlink()
    ds = open_tokens(tmp_path / "t-token.data.bin.gz", cache=False)
    assert ds.cache is None and np.array_equal(ds.read_many(range(12)), ids)
    assert np.array_equal(pickle.loads(pickle.dumps(ds)).read(5), ids[5])
    assert list(token_cache.glob("*")) == []


# ----------------------------------------------------------------------------------------------------
# our compact format
