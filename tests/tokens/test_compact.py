"""mimkit's token format (mimkit.tokens.compact, compact_shards, compact_writer): chunks at every id width,
the stored layout, damage never decoded, the header against the shards, resumable writing, size."""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.tokens import compact, compact_shards
from mimkit.tokens.compact_shards import decode_chunk, encode_chunk, id_dtype
from mimkit.tokens.compact_writer import CompactWriter
from mimkit.tokens.dataset import (
    TokenRecordError,
    open_tokens,
    verify,
    write_tokens,
)
from mimkit.tokens.records import cache_dir
from tests.tokens.test_dataset import (
    CLASSES,
    assert_refused_by_all,
    codebook,
    proxy_tokens,
    random_tokens,
)


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
