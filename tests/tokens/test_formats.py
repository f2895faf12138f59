"""Token dataset formats: SeiT's files byte for byte, our compact folder, conversion, inspection and
damage reports."""

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
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.data.sources import DEMO_FILE
from mimkit.tokens import compact, compact_shards
from mimkit.tokens.compact_shards import decode_chunk, encode_chunk, id_dtype
from mimkit.tokens.compact_writer import CompactWriter
from mimkit.tokens.dataset import (
    TokenRecordError,
    convert,
    info,
    is_token_dataset,
    open_tokens,
    verify,
    write_tokens,
)
from mimkit.tokens.records import cache_dir
from mimkit.tokens.seit_writer import SeitWriter, check_seit_target

CLASSES = ("cat", "dog", "ship")


@pytest.fixture(autouse=True)
def token_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test decompresses SeiT streams into its own cache folder."""
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "tokens"


def assert_refused_by_all(path: Path, match: str) -> None:
    """A dataset every reader refuses whole, and verify with the same words (one check, not two)."""
    for cache in (True, False):
        with pytest.raises((TokenRecordError, ValueError, OSError), match=match):
            open_tokens(path, cache=cache).read_many(range(1))
    with pytest.raises((TokenRecordError, ValueError, OSError), match=match):
        info(path)
    report = verify(path)
    assert (report["records"], report["ok"], report["sound"]) == (None, 0, False), report
    (only,) = report["bad_records"]
    assert only["record"] is None and re.search(match, only["error"]), only


def random_tokens(n: int, grid: tuple[int, int] = (6, 6), vocab: int = 300, seed: int = 0) -> np.ndarray:
    """Ids with neighbours that often repeat (so the rank coder has something to learn)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, (n, *grid))
    repeat = rng.random((n, *grid)) < 0.4
    ids[:, :, 1:] = np.where(repeat[:, :, 1:], ids[:, :, :-1], ids[:, :, 1:])
    return ids


def proxy_tokens(n: int = 300) -> np.ndarray:
    """Realistic-ish tokens: k-means (255 clusters) of the 2x2x3 pixel patches of CIFAR-10 demo
    images, one id per patch on a 16x16 grid."""
    from sklearn.cluster import MiniBatchKMeans

    x = np.load(DEMO_FILE)["x_train"][:n].astype(np.float32) / 255
    patches = x.reshape(n, 16, 2, 16, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(-1, 12)
    km = MiniBatchKMeans(255, random_state=0, n_init=1, batch_size=4096, max_iter=10).fit(patches)
    return km.predict(patches).reshape(n, 16, 16).astype(np.int64)


def codebook(k: int, d: int = 4) -> torch.Tensor:
    return torch.randn(k, d, generator=torch.Generator().manual_seed(k))


# ----------------------------------------------------------------------------------------------------
# SeiT's format


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


@pytest.mark.parametrize(("vocab", "dtype"), [(256, np.uint8), (300, np.uint16)])
def test_compact_cache_is_decoded_once_and_shared(
    tmp_path: Path, token_cache: Path, capsys: pytest.CaptureFixture[str], vocab: int, dtype: type
) -> None:
    ids = random_tokens(50, vocab=vocab, seed=15)
    write_tokens(tmp_path / "c", ids, np.arange(50), vocab_size=vocab, shard_size=16)
    assert capsys.readouterr().out == ""  # building the cache prints nothing on stdout
    (cached,) = token_cache.glob("*.npy")
    assert sorted(p.name for p in token_cache.iterdir()) == [cached.name, cached.name + ".json"]
    stored = np.load(cached)
    assert stored.dtype == dtype and stored.shape == (50, 6, 6) and np.array_equal(stored, ids)
    before = cached.stat()
    ds = open_tokens(tmp_path / "c")
    assert ds.cache == cached and (ds.cache.stat().st_ino, ds.cache.stat().st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )  # reused, not rewritten
    got = ds.read(17)
    assert got.dtype == np.int64 and np.array_equal(got, ids[17]) and np.array_equal(ds.read(-1), ids[-1])
    assert np.array_equal(ds.read_many(np.array([49, 3, -50, 3])), ids[[49, 3, 0, 3]])
    assert np.array_equal(pickle.loads(pickle.dumps(ds)).read(40), ids[40])
    with pytest.raises(IndexError, match="record 50 is out of range"):
        ds.read_many([0, 50])
    ds.drop_cache()
    assert list(token_cache.iterdir()) == [] and np.array_equal(ds.read(17), ids[17])


def test_compact_cache_follows_a_changed_dataset(tmp_path: Path, token_cache: Path) -> None:
    first, second = random_tokens(20, seed=16), random_tokens(20, seed=17)
    old = write_tokens(tmp_path / "c", first)
    shutil.rmtree(tmp_path / "c")
    new = write_tokens(tmp_path / "c", second)
    assert new.cache != old.cache and np.array_equal(open_tokens(tmp_path / "c").read_many(range(20)), second)
    assert len(list(token_cache.glob("*.npy"))) == 2


def test_chunks_round_trip_at_every_width() -> None:
    for vocab, width in ((256, 1), (257, 2), (65536, 2), (70000, 4)):
        dtype = id_dtype(vocab)
        assert dtype.itemsize == width
        ids = random_tokens(9, grid=(5, 7), vocab=vocab, seed=4)
        ids[0, 0, 0] = vocab - 1
        back = decode_chunk(encode_chunk(ids, dtype), 9, (5, 7), dtype)
        assert back.dtype == dtype and np.array_equal(back, ids), vocab
    with pytest.raises(ValueError, match=r"decompresses to 1260 bytes, not the 350 ids of its 10 records"):
        decode_chunk(encode_chunk(ids, id_dtype(70000))[:], 10, (5, 7), id_dtype(70000))


def test_chunk_bytes_are_stable() -> None:
    """A dataset written today must read the same tomorrow: the byte planes of a fixed example (zstd's own
    output may change between versions; what it decompresses to may not)."""
    ids = (np.arange(2 * 2 * 3).reshape(2, 2, 3) * 37) % 300
    frame = encode_chunk(ids, id_dtype(300))
    import zstandard

    planes = zstandard.ZstdDecompressor().decompress(frame)
    # the low bytes of 0, 37, ..., 259, 296, 333 % 300, ..., then their high bytes
    assert planes.hex() == "00254a6f94b9de032821466b" + "000000000000000101000000"
    assert np.array_equal(decode_chunk(frame, 2, (2, 3), id_dtype(300)), ids)


def test_compact_round_trip_and_stored_layout(tmp_path: Path) -> None:
    ids = random_tokens(70, seed=5)
    labels = np.arange(70) % 3
    cb = codebook(300)
    ds = write_tokens(
        tmp_path / "c", ids, labels, codebook=cb, classes=CLASSES, meta={"tok": "x"}, shard_size=32
    )
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "codebook.safetensors",
        "mimkit-tokens.json",
        "shard-00000.mtok",
        "shard-00001.mtok",
        "shard-00002.mtok",
    ]
    header = json.loads((tmp_path / "c" / "mimkit-tokens.json").read_text())
    assert header["format"] == "mimkit-tokens" and header["records"] == 70
    assert [s["records"] for s in header["shards"]] == [32, 32, 6]
    assert header["version"] == 2 and header["codec"]["name"] == "zstd-planes"
    assert header["codec"]["ids"] == "uint16" and header["codec"]["library"].startswith("zstandard")
    assert all(np.array_equal(ds.read(i), ids[i]) for i in range(70))
    assert np.array_equal(ds.read(-1), ids[-1])
    assert np.array_equal(ds.read_many([69, 3, 33, 3]), ids[[69, 3, 33, 3]])
    assert np.array_equal(ds.labels, labels) and ds.classes == CLASSES and ds.meta == {"tok": "x"}
    assert torch.equal(ds.codebook, cb)
    assert (
        ds.stored_bytes()
        == sum(p.stat().st_size for p in (tmp_path / "c").iterdir())
        - (tmp_path / "c" / "codebook.safetensors").stat().st_size
    )
    again = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(again.read(40), ids[40])


def test_compact_flipped_byte_is_reported_never_decoded(
    tmp_path: Path, token_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(compact_shards, "CHUNK_BYTES", 10 * 36 * 2)  # chunks of 10 records
    ids = random_tokens(40, seed=6)
    ds = write_tokens(tmp_path / "c", ids, shard_size=25)
    assert ds._chunks[:, 4].tolist() == [10, 10, 5, 10, 5]
    ds.drop_cache()  # the cache made from the sound shards is gone: the next one is decoded from damage
    shard = tmp_path / "c" / "shard-00001.mtok"
    start, end = ds._chunks[3, 1], ds._chunks[3, 2]  # records 25..34 = chunk 0 of shard 1
    raw = bytearray(shard.read_bytes())
    raw[(start + end) // 2] ^= 0x10
    shard.write_bytes(bytes(raw))
    where = r"shard-00001\.mtok: record 30 \(in chunk 0 of this shard, records 25\.\.34\)"
    for cache in (True, False):
        ds = open_tokens(tmp_path / "c", cache=cache)
        assert (ds.cache is not None) == cache
        with pytest.raises(TokenRecordError, match=where + ": checksum mismatch"):
            ds.read(30)
        with pytest.raises(TokenRecordError, match=where):
            ds.read_many([2, 30])
        assert np.array_equal(ds.read(35), ids[35]) and np.array_equal(ds.read_many([24, 0]), ids[[24, 0]])
    (sidecar,) = token_cache.glob("*.npy.json")
    assert list(json.loads(sidecar.read_text())["bad"]) == ["3"]
    report = verify(tmp_path / "c")
    assert (report["records"], report["ok"], report["bad"], report["sound"]) == (40, 30, 10, False)
    assert [b["record"] for b in report["bad_records"]] == list(range(25, 35))


def test_compact_truncated_shard(tmp_path: Path) -> None:
    write_tokens(tmp_path / "c", random_tokens(30, seed=7), shard_size=20)
    shard = tmp_path / "c" / "shard-00000.mtok"
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(
        TokenRecordError, match=r"shard-00000\.mtok: truncated: \d+ bytes, the header says \d+"
    ):
        open_tokens(tmp_path / "c")
    assert_refused_by_all(tmp_path / "c", r"shard-00000\.mtok: truncated: \d+ bytes, the header says \d+")


def _edit_header(folder: Path, **changes: object) -> None:
    path = folder / "mimkit-tokens.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_compact_header_must_agree_with_the_shards(tmp_path: Path) -> None:
    ids = random_tokens(30, seed=24)
    write_tokens(tmp_path / "c", ids, vocab_size=300, shard_size=20)
    for changes, why in (
        (
            {"vocab_size": 200},  # ids of one byte: the chunk holds twice as many bytes
            r"record 0 \(in chunk 0 .*\): decompresses to 1440 bytes, not the 720 ids of its 20 records",
        ),
        (
            {"vocab_size": 290},
            r"\.mtok: record 0 \(in chunk 0 .*\): holds id 29\d, outside the vocabulary \[0, 290\)",
        ),
        (
            {"grid": [4, 16]},
            r"record 0 \(in chunk 0 .*\): decompresses to 1440 bytes, not the 1280 ids of its 20 records",
        ),
    ):
        shutil.copytree(tmp_path / "c", tmp_path / "e", dirs_exist_ok=True)
        _edit_header(tmp_path / "e", **changes)
        with pytest.raises(TokenRecordError, match=why):
            open_tokens(tmp_path / "e", cache=False).read(0)
        report = verify(tmp_path / "e")
        assert report["sound"] is False and re.search(why, report["bad_records"][0]["error"])
    shutil.copytree(tmp_path / "c", tmp_path / "e", dirs_exist_ok=True)
    _edit_header(tmp_path / "e", records=29)
    assert_refused_by_all(tmp_path / "e", r"mimkit-tokens\.json: says 29 records; the shards hold 30")
    _edit_header(tmp_path / "e", records=30, grid="6x6")
    assert_refused_by_all(tmp_path / "e", r"'grid' must be \[H, W\] of positive integers; got '6x6'")
    _edit_header(tmp_path / "e", grid=[6, 6], codec={"name": "rank-ans"})
    assert_refused_by_all(tmp_path / "e", r"unknown codec 'rank-ans'; expected zstd-planes")


def test_a_folder_of_the_old_layout_gets_one_line(tmp_path: Path) -> None:
    write_tokens(tmp_path / "c", random_tokens(30, seed=25), shard_size=20)
    (tmp_path / "c" / "codec.npz").write_bytes(b"old tables")
    _edit_header(tmp_path / "c", version=1)
    line = (
        r"c: a mimkit token folder of format version 1 \(rank-ANS codec, codec\.npz\), which this mimkit "
        r"no longer reads"
    )
    assert_refused_by_all(tmp_path / "c", line)
    with pytest.raises(TokenRecordError, match=line):
        CompactWriter(tmp_path / "c", grid=(6, 6), vocab_size=300)


def test_compact_cache_path_is_keyed_by_content_and_name(tmp_path: Path, token_cache: Path) -> None:
    ds = write_tokens(tmp_path / "c", random_tokens(5, seed=26))
    assert ds.cache == compact.cache_path(ds._cache_key(), "c") == cache_dir() / f"c-{ds._cache_key()}.npy"


def test_compact_resume_by_shard_equals_one_go(tmp_path: Path) -> None:
    ids, labels = random_tokens(50, seed=8), np.arange(50) % 3
    common = {"grid": (6, 6), "vocab_size": 300, "classes": CLASSES, "shard_size": 20}

    def write(folder: Path, stop_after: int | None) -> None:
        writer = CompactWriter(folder, **common)
        done = set(writer.done_shards())
        for k in range(3):
            if k not in done:
                writer.write_shard(k, ids[20 * k : 20 * k + 20], labels[20 * k : 20 * k + 20])
            if k == stop_after:
                return  # killed: no header
        writer.finish()

    write(tmp_path / "one", None)
    write(tmp_path / "resumed", stop_after=1)
    with pytest.raises(
        ValueError, match=r"incomplete mimkit token dataset: 2 shard file\(s\) but no mimkit-tokens"
    ):
        open_tokens(tmp_path / "resumed")
    (tmp_path / "resumed" / ".shard-00002.mtok.tmp99").write_bytes(b"half")  # a crashed write's leftover
    assert CompactWriter(tmp_path / "resumed", **common).done_shards() == [0, 1]
    before = (tmp_path / "resumed" / "shard-00000.mtok").stat().st_mtime_ns
    write(tmp_path / "resumed", None)
    assert (tmp_path / "resumed" / "shard-00000.mtok").stat().st_mtime_ns == before  # not rewritten
    for name in (
        "mimkit-tokens.json",
        "shard-00000.mtok",
        "shard-00001.mtok",
        "shard-00002.mtok",
    ):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    ds = open_tokens(tmp_path / "resumed")
    assert np.array_equal(ds.read_many(range(50)), ids) and np.array_equal(ds.labels, labels)


def test_compact_writer_guards(tmp_path: Path) -> None:
    writer = CompactWriter(tmp_path / "c", grid=(6, 6), vocab_size=300)
    with pytest.raises(ValueError, match=r"shard-00000\.mtok: record 2 holds id 300, outside \[0, 300\)"):
        writer.write_shard(0, np.full((3, 6, 6), 2) + (np.arange(3) == 2)[:, None, None] * 298)
    writer.write_shard(1, random_tokens(3))
    with pytest.raises(ValueError, match=r"shards \[0\] are missing; write them before finish\(\)"):
        writer.finish()
    with pytest.raises(ValueError, match="already holds a mimkit token dataset"):
        write_tokens(tmp_path / "c", random_tokens(3))
    (tmp_path / "c" / "mimkit-tokens.writing.json").unlink()
    with pytest.raises(ValueError, match=r"holds shard files but no mimkit-tokens\.writing\.json"):
        CompactWriter(tmp_path / "c", grid=(6, 6), vocab_size=300)


def test_compact_writer_refuses_to_resume_another_dataset(tmp_path: Path) -> None:
    ids, cb = random_tokens(30, seed=12), codebook(300)
    same = {"grid": (6, 6), "vocab_size": 300, "codebook": cb, "shard_size": 20}
    writer = CompactWriter(tmp_path / "c", **same)
    writer.write_shard(0, ids[:20])
    other_cb = compact.codebook_sha256(codebook(300) * 2)[:12]
    folder = str(tmp_path / "c").replace("/", "\\/")
    for changed, why in (
        (
            {"grid": (8, 8), "codebook": None},
            r"grid \(6, 6\) there, \(8, 8\) here; codebook_sha256 \w{12}\.\.\. there, none here",
        ),
        ({"vocab_size": 301, "codebook": codebook(301)}, r"vocab_size 300 there, 301 here"),
        ({"shard_size": 10}, r"shard_size 20 there, 10 here\. Resuming it would mix two datasets"),
        ({"codebook": codebook(300) * 2}, rf"codebook_sha256 \w{{12}}\.\.\. there, {other_cb}\.\.\. here"),
    ):
        with pytest.raises(ValueError, match=rf"^{folder}: holds a token dataset .* other parameters: {why}"):
            CompactWriter(tmp_path / "c", **{**same, **changed})
    resumed = CompactWriter(tmp_path / "c", **same)  # the same parameters continue it
    assert resumed.done_shards() == [0]
    resumed.write_shard(1, ids[20:])
    ds = resumed.finish()
    assert not (tmp_path / "c" / compact.WRITING).exists() and ds.header["shard_size"] == 20
    assert np.array_equal(ds.read_many(range(30)), ids)
    # a finished folder: the header tells the parameters
    with pytest.raises(ValueError, match=r"other parameters: shard_size 20 there, 10 here"):
        CompactWriter(tmp_path / "c", **{**same, "shard_size": 10})
    with pytest.raises(ValueError, match=r"other parameters: codebook_sha256 \w{12}\.\.\. there, none here"):
        CompactWriter(tmp_path / "c", **{**same, "codebook": None})
    assert CompactWriter(tmp_path / "c", **same).done_shards() == [0, 1]


@pytest.mark.slow
def test_compact_is_as_small_as_seit_on_proxy_tokens(tmp_path: Path) -> None:
    ids = proxy_tokens(300)
    write_tokens(tmp_path / "s" / "p-token.data.bin.gz", ids, to="seit")
    c = write_tokens(tmp_path / "c", ids)
    shards = sum(p.stat().st_size for p in c.files() if p.name.startswith("shard-"))
    seit_stream = (tmp_path / "s" / "p-token.data.bin.gz").stat().st_size
    assert shards < 1.05 * seit_stream  # byte planes under zstd: within 5% of SeiT's gzip stream
    assert all(np.array_equal(c.read(i), ids[i]) for i in range(0, 300, 7))


# ----------------------------------------------------------------------------------------------------
# both: detection, conversion, inspection, loaders


def test_detection_and_open_errors(tmp_path: Path) -> None:
    write_tokens(tmp_path / "s" / "x-token.data.bin.gz", random_tokens(4), to="seit")
    write_tokens(tmp_path / "c", random_tokens(4))
    assert is_token_dataset(tmp_path / "s" / "x-token.data.bin.gz") and is_token_dataset(tmp_path / "s")
    assert is_token_dataset(tmp_path / "s" / "x") and is_token_dataset(tmp_path / "c")
    assert open_tokens(tmp_path / "s").format == "seit" and open_tokens(tmp_path / "c").format == "mimkit"
    (tmp_path / "other").mkdir()
    assert not is_token_dataset(tmp_path / "other")
    with pytest.raises(
        ValueError, match=r"'.*other' is not a token dataset: expected SeiT's files .* mimkit"
    ):
        open_tokens(tmp_path / "other")
    # a convert killed before its header: the error says which command finishes it, and verify fails
    write_tokens(tmp_path / "k", random_tokens(4))
    (tmp_path / "k" / compact.HEADER).unlink()
    match = (
        r"k: an incomplete mimkit token dataset: 1 shard file\(s\) but no mimkit-tokens\.json; it was being "
        r"written by a conversion, which does not resume: remove it and convert again"
    )
    assert_refused_by_all(tmp_path / "k", match)
    (tmp_path / "k" / "tokenize.json").write_text("{}")  # a folder `mimkit tokenize` writes
    assert_refused_by_all(
        tmp_path / "k", r"`mimkit tokenize` stopped while writing it: run it again with the same"
    )


def test_convert_both_ways_keeps_everything(tmp_path: Path) -> None:
    ids, labels, cb = random_tokens(45, vocab=300, seed=9), np.arange(45) % 3, codebook(300)
    meta = {"tokenizer": {"patch": 2}}
    c = write_tokens(tmp_path / "c", ids, labels, codebook=cb, classes=CLASSES, meta=meta, shard_size=16)
    s = convert(tmp_path / "c", tmp_path / "s" / "cifar-token.data.bin.gz", to="seit")
    back = convert(s.path, tmp_path / "back", to="mimkit")
    for ds in (c, s, back):
        assert np.array_equal(ds.read_many(range(45)), ids), ds.format
        assert np.array_equal(ds.labels, labels) and ds.classes == CLASSES and ds.meta == meta
        assert torch.equal(ds.codebook, cb) and ds.grid == (6, 6) and ds.vocab_size == 300
    unlabelled = convert(
        write_tokens(tmp_path / "u" / "u-token.data.bin.gz", ids, to="seit"), tmp_path / "u2", to="mimkit"
    )
    assert unlabelled.labels is None and unlabelled[3][1] == -1


def test_info_and_verify(tmp_path: Path) -> None:
    ids = np.array([[[0, 1], [1, 1]], [[2, 2], [2, 2]]])
    c = write_tokens(tmp_path / "c", ids, [0, 1], vocab_size=4)
    s = write_tokens(tmp_path / "s-token.data.bin.gz", ids, [0, 1], to="seit", vocab_size=4)
    for ds in (c, s):
        got = info(ds.path)
        assert (got["format"], got["records"], got["grid"], got["vocab_size"]) == (ds.format, 2, [2, 2], 4)
        assert got["codes_used"] == 3 and got["labels"] is True and got["codebook"] is None
        # counts 1, 3, 4 of 8: perplexity 2 ** H
        p = np.array([1, 3, 4]) / 8
        assert got["perplexity"] == pytest.approx(2 ** -(p * np.log2(p)).sum())
        assert got["bytes_per_image"] == pytest.approx(ds.stored_bytes() / 2)
        report = verify(ds.path)
        assert (report["records"], report["ok"], report["bad"], report["bad_records"]) == (2, 2, 0, [])
        assert report["sound"] is True


@pytest.mark.parametrize(("to", "cache"), [("seit", True), ("mimkit", True), ("mimkit", False)])
def test_dataloader_workers_read_the_right_records(tmp_path: Path, to: str, cache: bool) -> None:
    ids, labels = random_tokens(24, seed=10), np.arange(24) % 3
    dst = tmp_path / ("t-token.data.bin.gz" if to == "seit" else "c")
    write_tokens(dst, ids, labels, to=to, shard_size=10)
    ds = open_tokens(dst, cache=cache)
    ds.read(0)  # maps opened in the parent: the workers must still read correctly after fork
    loader = DataLoader(ds, batch_size=5, num_workers=2, multiprocessing_context="fork")
    got = [(x, y) for x, y in loader]
    assert torch.equal(torch.cat([x for x, _ in got]), torch.from_numpy(ids))
    assert torch.equal(torch.cat([y for _, y in got]), torch.from_numpy(labels))


# ----------------------------------------------------------------------------------------------------
# verify and the readers: one check


def _gz_crc(folder: Path) -> None:  # two ids changed in the stream, the gzip trailer's CRC-32 kept
    data = folder / "t-token.data.bin.gz"
    raw = bytearray(gzip.decompress(data.read_bytes()))
    raw[40] ^= 1
    raw[41] ^= 1
    trailer = data.read_bytes()[-8:]
    data.write_bytes(gzip.compress(bytes(raw), mtime=0)[:-8] + trailer)


def _rewrite_index(folder: Path, offsets: np.ndarray) -> None:
    buf = io.BytesIO()
    np.save(buf, offsets)
    (folder / "t-token.index.npy.gz").write_bytes(gzip.compress(buf.getvalue()))


def _extra_offset(folder: Path) -> None:  # 33 offsets for 32 records: one record too many is indexed
    offsets = np.load(io.BytesIO(gzip.decompress((folder / "t-token.index.npy.gz").read_bytes())))
    _rewrite_index(folder, np.append(offsets, offsets[-1] + 36))


def _edit_json(path: Path, **changes: object) -> None:
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


SEIT_DAMAGE = {
    "gzip CRC": (_gz_crc, r"t-token\.data\.bin\.gz: the checksum of the gzip member .* does not match"),
    "header cut in half": (
        lambda f: (f / "t-token.data.bin.gz").write_bytes((f / "t-token.data.bin.gz").read_bytes()[:5]),
        r"t-token\.data\.bin\.gz: truncated: the gzip stream ends after 0 decompressed bytes",
    ),
    "33 offsets for 32 records": (_extra_offset, r"holds 34 offsets but t-label\.txt has 32 labels"),
    "missing index": (
        lambda f: (f / "t-token.index.npy.gz").unlink(),
        r"t-token\.index\.npy\.gz: the index of a SeiT token file is missing",
    ),
    "label count": (
        lambda f: (f / "t-label.txt").write_text("0\n" * 31),
        r"holds 33 offsets but t-label\.txt has 31 labels",
    ),
    "missing codebook": (
        lambda f: (f / "codebook.ckpt").unlink(),
        r"codebook\.ckpt: missing; t-meta\.json says this dataset's ids index a codebook",
    ),
    "flipped codebook": (
        lambda f: torch.save(torch.load(f / "codebook.ckpt").flip(0), f / "codebook.ckpt"),
        r"codebook\.ckpt: not the codebook this dataset was written with .*: damaged or replaced",
    ),
    "meta grid": (
        lambda f: _edit_json(f / "t-meta.json", grid="6x6"),
        r"t-meta\.json: 'grid' must be \[H, W\] \(integers\); got '6x6'",
    ),
}
COMPACT_DAMAGE = {
    "header cut in half": (
        lambda f: (f / compact.HEADER).write_text((f / compact.HEADER).read_text()[:200]),
        r"mimkit-tokens\.json: not valid JSON",
    ),
    "path-traversal shard name": (
        lambda f: _edit_json(
            f / compact.HEADER,
            shards=[
                {**s, "file": "../" + s["file"]}
                for s in json.loads((f / compact.HEADER).read_text())["shards"]
            ],
        ),
        r"shard entry 0 must be \{file: shard-NNNNN\.mtok, records, bytes\}",
    ),
    "labels: false": (
        lambda f: _edit_json(f / compact.HEADER, labels=False),
        r"shard-00000\.mtok: labels unexpected in this shard",
    ),
    "missing codebook": (
        lambda f: (f / compact.CODEBOOK).unlink(),
        r"codebook\.safetensors: the codebook named in mimkit-tokens\.json is missing",
    ),
    "flipped codebook": (
        lambda f: (f / compact.CODEBOOK).write_bytes((f / compact.CODEBOOK).read_bytes()[:-4] + bytes(4)),
        r"codebook\.safetensors: sha256 differs from the header's \(the codebook is damaged or replaced\)",
    ),
    "records count": (
        lambda f: _edit_json(f / compact.HEADER, records=31),
        r"mimkit-tokens\.json: says 31 records; the shards hold 32",
    ),
}


@pytest.mark.parametrize(
    ("to", "case"),
    [("seit", case) for case in SEIT_DAMAGE] + [("mimkit", case) for case in COMPACT_DAMAGE],
)
def test_verify_fails_on_every_damage_readers_refuse_with_their_words(
    tmp_path: Path, token_cache: Path, capsys: pytest.CaptureFixture[str], to: str, case: str
) -> None:
    damage, match = (SEIT_DAMAGE if to == "seit" else COMPACT_DAMAGE)[case]
    folder = tmp_path / "d"
    dst = folder / "t-token.data.bin.gz" if to == "seit" else folder
    write_tokens(dst, random_tokens(32, vocab=64, seed=30), np.arange(32) % 3, to=to, codebook=codebook(64))
    assert verify(dst)["sound"] and main(["tokens", "verify", str(dst)]) == 0
    damage(folder)
    assert_refused_by_all(dst, match)
    capsys.readouterr()
    assert main(["tokens", "verify", str(dst)]) == 1
    out = capsys.readouterr().out
    assert out.startswith("unreadable: ") and re.search(match, out)
