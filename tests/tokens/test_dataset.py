"""Token datasets whatever their format (mimkit.tokens.dataset): detection and open errors, conversion
both ways, info and verify, loader workers, and every damage the readers refuse, in their words."""

from __future__ import annotations

import gzip
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mimkit.cli import main
from mimkit.data.sources import DEMO_FILE
from mimkit.tokens import compact
from mimkit.tokens.dataset import (
    TokenRecordError,
    convert,
    info,
    is_token_dataset,
    open_tokens,
    verify,
    write_tokens,
)

CLASSES = ("cat", "dog", "ship")


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
