"""The VQ tokenizer: it learns on real images, resumes exactly, prunes to the codes it uses, and
`mimkit tokenize` writes datasets that the token source reads back as the tokenizer encoded them."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data.sources import TokenSource, build_source, check_input, demo_source, tokenized_for
from mimkit.data.transforms import eval_view
from mimkit.distributed import init_distributed
from mimkit.eval.knn import knn_evaluate
from mimkit.interop.vitvqgan import to_vitvqgan
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, load_tokenizer, save_tokenizer
from mimkit.models.vit import ViTEncoder, build_encoder
from mimkit.runs.tokenize import decode_grid, import_vitvqgan, tokenize, tokenizer_view, train_tokenizer
from mimkit.tokens.compact import CompactWriter
from mimkit.tokens.dataset import open_tokens
from tests.conftest import straight_and_resumed

TOKENIZER = [
    "method=vq_tokenizer",
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=4",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "method.codebook_size=128",
    "data.train=demo:train",
    "data.max_images=256",
    "data.mean=[0,0,0]",
    "data.std=[1,1,1]",
    "data.num_workers=0",
    "data.crop_pct=1.0",
    "optim.batch_size=32",
    "optim.lr=2e-3",
    "optim.warmup_epochs=0",
    "optim.weight_decay=0",
    "run.progress=false",
    "run.log_every=1",
    "eval.knn=false",
    "eval.batch_size=128",
]


def small_tokenizer(codebook: int = 64, seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    shape = TokenizerShape(
        img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=codebook
    )
    return VQTokenizer(shape, kmeans_init=False).eval()


@pytest.mark.slow
def test_tokenizer_learns_on_real_images_and_is_pruned(tmp_path: Path) -> None:
    cfg = build_config(None, [*TOKENIZER, "optim.epochs=4", f"run.out={tmp_path / 'tok'}"])
    summary = train_tokenizer(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss_l2"], np.mean([r["loss_l2"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 3
    report = summary["tokenizer"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.model.pruned and loaded.model.vocab_size == report["codes_used"] <= 128
    assert loaded.mean == (0.0, 0.0, 0.0)
    # compact ids: every kept code is used by the training images, and they cover 0..K'-1
    source = build_source("demo:train", max_images=256)
    images = torch.stack(
        [tokenizer_view(32, loaded.mean, loaded.std)(source.load(i)[0])["image"] for i in range(256)]
    )
    ids = loaded.model.encode(images)
    assert ids.shape == (256, 8, 8) and int(ids.max()) < loaded.model.vocab_size
    assert torch.equal(torch.unique(ids), torch.arange(loaded.model.vocab_size))
    assert (tmp_path / "tok" / "reconstructions.png").stat().st_size > 1000
    spec = checkpoint.load(tmp_path / "tok" / "last.pt")["input_spec"]  # what it takes: [0, 1] pixels
    assert spec["kind"] == "pixels" and spec["mean"] == [0.0] * 3 and spec["patch_size"] == 4
    # a tokenizer run has no encoder to analyse: one line, and no report folder left behind
    assert main(["analyze", str(tmp_path / "tok"), "--images", "4"]) == 2
    assert not (tmp_path / "tok" / "analysis").exists()


@pytest.mark.slow
def test_tokenizer_resumes_exactly(tmp_path: Path) -> None:
    a, b, _ = straight_and_resumed([*TOKENIZER, "optim.epochs=2", "data.max_images=128"], tmp_path, stop_at=5)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert any("_codebook.embed" in k for k in a)  # the EMA codebook is part of what resumed


def test_pruned_codes_map_back_to_their_ids_and_decode(tmp_path: Path) -> None:
    tok = small_tokenizer()
    counts = torch.zeros(64, dtype=torch.long)
    counts[[3, 7, 20, 63]] = torch.tensor([5, 1, 9, 2])
    kept = tok.prune(counts)
    assert kept.tolist() == [3, 7, 20, 63] and tok.vocab_size == 4
    assert torch.equal(tok.codebook(), tok.full_codebook()[[3, 7, 20, 63]])
    ids = tok.encode(torch.rand(5, 3, 32, 32))
    assert ids.shape == (5, 8, 8) and ids.dtype == torch.long and int(ids.max()) < 4
    assert tok.decode(ids).shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4\); got 0\.\.4"):
        tok.decode(torch.full((1, 8, 8), 4).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="already pruned"):
        tok.prune(counts)
    save_tokenizer(tok, tmp_path / "t.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    again = load_tokenizer(tmp_path / "t.pt")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(again.model.encode(x), tok.encode(x))
    assert torch.equal(again.model.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_load_tokenizer_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"expected a tokenizer\.pt written by `mimkit tokenizer train`"
    ):
        load_tokenizer(tmp_path)
    checkpoint.save_atomic({"kind": "something", "model": {}}, tmp_path / "x.pt")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"x.pt: not a mimkit tokenizer \(kind 'something'\)"
    ):
        load_tokenizer(tmp_path / "x.pt")


@pytest.mark.parametrize("to", ["mimkit", "seit"])
def test_tokenize_demo_set_reads_back_the_encoded_ids_and_labels(tmp_path: Path, to: str) -> None:
    tok = small_tokenizer(seed=1)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    out = tmp_path / ("demo" if to == "mimkit" else "demo-token.data.bin.gz")
    report = tokenize(
        str(tmp_path / "tokenizer.pt"),
        "demo:val",
        str(out),
        to=to,
        shard_size=200,
        batch_size=64,
        num_workers=0,
        max_images=300,
        progress=False,
    )
    assert report["images"] == 300 and report["skipped_images"] == 0
    assert report["bytes_per_image"]["mimkit"] > 0 and report["bytes_per_image"]["seit"] > 0
    source = build_source(f"tokens:{out}")
    assert isinstance(source, TokenSource) and len(source) == 300 and source.grid == (8, 8)
    images = demo_source("val")
    view = tokenizer_view(32, (0.0,) * 3, (1.0,) * 3)
    expected = tok.encode(torch.stack([view(images.load(i)[0])["image"] for i in range(300)]))
    got = torch.stack([source.load(i)[0] for i in range(300)])
    assert torch.equal(got, expected)
    assert [source.load(i)[1] for i in range(300)] == [images.load(i)[1] for i in range(300)]
    assert source.classes == images.classes
    # a token dataset is recognised without the prefix, too
    assert len(build_source(str(out))) == 300


@pytest.mark.slow
def test_tokenize_resumes_at_the_first_missing_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tok = small_tokenizer(seed=2)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    args = {"shard_size": 100, "batch_size": 50, "num_workers": 0, "max_images": 250, "progress": False}
    tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "full"), **args)
    full = open_tokens(tmp_path / "full")
    write_shard = CompactWriter.write_shard

    def killed_in_shard_1(self: CompactWriter, k: int, *rest: object) -> Path:
        if k == 1:
            raise KeyboardInterrupt  # a run stopped after its first shard
        return write_shard(self, k, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(CompactWriter, "write_shard", killed_in_shard_1)
    with pytest.raises(KeyboardInterrupt):
        tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "a"), **args)
    monkeypatch.undo()
    shards = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name.startswith("shard-"))
    assert shards == ["shard-00000.mtok"] and not (tmp_path / "a" / "mimkit-tokens.json").exists()
    before = (tmp_path / "a" / "shard-00000.mtok").stat().st_mtime_ns
    report = tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "a"), **args)
    assert (tmp_path / "a" / "shard-00000.mtok").stat().st_mtime_ns == before  # not rewritten
    assert report["tokenized_now"] == 150
    again = open_tokens(tmp_path / "a")
    assert len(again) == len(full) == 250
    assert all(np.array_equal(again.read(i), full.read(i)) for i in range(250))


def test_tokenize_to_seit_killed_after_the_rename_finishes_on_rerun(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    tok = small_tokenizer(seed=11)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    args = {"to": "seit", "num_workers": 0, "max_images": 40, "progress": False}
    out = tmp_path / "d" / "val-token.data.bin.gz"
    shards = tmp_path / "d" / "val-token.shards"

    rmtree = shutil.rmtree

    def killed(path: Path, *args: object, **kwargs: object) -> None:
        if str(path).endswith("-token.shards"):
            raise KeyboardInterrupt  # stopped between the data file's rename and the shards' removal
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("mimkit.runs.tokenize.shutil.rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(out), **args)
    monkeypatch.undo()
    written = open_tokens(out).read_many(range(40))
    assert out.is_file() and shards.is_dir()
    capsys.readouterr()
    report = tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(out), **args)
    assert f"note: {out} was written before the last run stopped" in capsys.readouterr().err
    assert report["tokenized_now"] == 0 and not shards.exists()
    assert np.array_equal(open_tokens(out).read_many(range(40)), written)
    # a SeiT file that is not these shards' is never taken for done
    with pytest.raises(KeyboardInterrupt):
        monkeypatch.setattr("mimkit.runs.tokenize.shutil.rmtree", killed)
        tokenize(
            str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "e" / "val-token.data.bin.gz"), **args
        )
    monkeypatch.undo()
    shutil.copy(tmp_path / "e" / "val-label.txt", tmp_path / "e" / "kept.txt")
    (tmp_path / "e" / "val-label.txt").write_text("".join(f"{(i + 1) % 10}\n" for i in range(40)))
    with pytest.raises(
        ValueError, match=r"val-token\.data\.bin\.gz' already exists and is not what these shards"
    ):
        tokenize(
            str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "e" / "val-token.data.bin.gz"), **args
        )


class FillingDisk:
    """``open`` for mimkit's atomic writer on a disk with ``room`` bytes left: a write past it fails with
    ENOSPC, as a full disk does, and freeing it (``room = None``) lets writes through again."""

    def __init__(self, room: int | None) -> None:
        self.room = room
        self.writes: list[tuple[str, int]] = []  # (file name, bytes) of every write, in order

    def __call__(self, path: object, mode: str = "r", *args: object, **kwargs: object) -> object:
        f = open(path, mode, *args, **kwargs)  # type: ignore[call-overload]  # noqa: SIM115
        if "w" not in mode:
            return f
        disk, write = self, f.write

        def limited(data: bytes) -> int:
            disk.writes.append((Path(str(path)).name, len(data)))
            if disk.room is not None:
                if len(data) > disk.room:
                    raise OSError(errno.ENOSPC, "No space left on device")
                disk.room -= len(data)
            return write(data)

        f.write = limited
        return f


def test_a_full_disk_mid_tokenize_names_the_file_leaves_nothing_partial_and_the_rerun_completes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = small_tokenizer(seed=12)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    args = {"shard_size": 10, "num_workers": 0, "max_images": 40, "progress": False}
    disk = FillingDisk(room=None)
    monkeypatch.setattr("mimkit.tokens.records.open", disk, raising=False)
    tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "straight"), **args)
    third = next(k for k, (name, _) in enumerate(disk.writes) if "shard-00002" in name)
    # the codec, its parameters and two shards fit; the disk is full in the third
    disk.room = sum(size for _, size in disk.writes[:third]) + 10
    with pytest.raises(OSError) as err:
        tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "t"), **args)
    assert err.value.errno == errno.ENOSPC and Path(err.value.filename).parent == tmp_path / "t"
    left = sorted(p.name for p in (tmp_path / "t").iterdir())
    assert (
        not [n for n in left if ".tmp" in n] and "mimkit-tokens.json" not in left
    )  # no temporary, no header
    shards = [n for n in left if n.startswith("shard-")]
    assert Path(err.value.filename).name == "shard-00002.mtok" and shards == [
        "shard-00000.mtok",
        "shard-00001.mtok",
    ]
    disk.room = None  # space freed: the rerun resumes after the shards that were written whole
    tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "t"), **args)
    straight, resumed = open_tokens(tmp_path / "straight"), open_tokens(tmp_path / "t")
    assert np.array_equal(straight.read_many(range(40)), resumed.read_many(range(40)))
    assert np.array_equal(straight.labels, resumed.labels)


def test_input_spec_and_source_must_agree(tmp_path: Path) -> None:
    tok = small_tokenizer(seed=3)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    tokenize(
        str(tmp_path / "tokenizer.pt"),
        "demo:val",
        str(tmp_path / "t"),
        num_workers=0,
        max_images=20,
        progress=False,
    )
    tokens = build_source(f"tokens:{tmp_path / 't'}")
    pixels = InputSpec(kind="pixels", channels=3, mean=(0.5,) * 3, std=(0.5,) * 3, img_size=32, patch_size=4)
    with pytest.raises(ValueError, match=r"this encoder takes pixels, but 'tokens:.*' is a token dataset"):
        check_input(pixels, tokens)

    def ids(vocab: int, size: int) -> InputSpec:
        return InputSpec(kind="token_ids", channels=1, img_size=size, patch_size=1, vocab_size=vocab)

    check_input(ids(64, 8), tokens)
    check_input(ids(64, 6), tokens)  # a centre crop of the grid
    with pytest.raises(ValueError, match="has 64 codes but the encoder embeds 391"):
        check_input(ids(391, 8), tokens)
    with pytest.raises(ValueError, match="has 8x8 id grids, smaller than the encoder's 16x16 input"):
        check_input(ids(64, 16), tokens)
    with pytest.raises(ValueError, match="holds images and no tokenizer is known for it"):
        check_input(ids(64, 8), build_source("demo:val"))


def test_cli_tokenize_info_verify_and_decode(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tok = small_tokenizer(seed=4)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    t = str(tmp_path / "tokenizer.pt")
    assert (
        main(["tokenize", t, "demo:val", str(tmp_path / "d"), "--max-images", "40", "--num-workers", "0"])
        == 0
    )
    capsys.readouterr()
    assert main(["tokens", "info", str(tmp_path / "d"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["records"] == 40
    assert main(["tokens", "verify", str(tmp_path / "d")]) == 0
    png = tmp_path / "grid.png"
    assert (
        main(["tokenizer", "decode", t, str(tmp_path / "d"), "--out", str(png), "--images", "demo:val"]) == 0
    )
    assert png.stat().st_size > 500 and "PSNR" in capsys.readouterr().out
    assert (
        main(
            ["tokens", "convert", str(tmp_path / "d"), str(tmp_path / "s-token.data.bin.gz"), "--to", "seit"]
        )
        == 0
    )
    assert main(["tokenize", t, "demo:val", str(tmp_path / "x.gz"), "--to", "seit"]) == 2
    assert "a SeiT dataset is named NAME-token.data.bin.gz" in capsys.readouterr().err


def small_token_encoder() -> ViTEncoder:
    """A one-block encoder of the centre 6 x 6 cells of small_tokenizer's 8 x 8 grids, two cells a patch."""
    return build_encoder(
        "vit_tiny",
        img_size=6,
        patch_size=2,
        embed_dim=32,
        depth=1,
        num_heads=2,
        stem="token_ids",
        vocab_size=64,
    )


def tokenized_demo(tmp_path: Path, train: int, val: int) -> None:
    """A 64-code tokenizer (all kept) in tmp_path, and the tokens of the first images of demo:train and
    demo:val under tmp_path/train and tmp_path/val."""
    tok = small_tokenizer(seed=5)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    for split, n in (("train", train), ("val", val)):
        tokenize(
            str(tmp_path / "tokenizer.pt"),
            f"demo:{split}",
            str(tmp_path / split),
            num_workers=0,
            max_images=n,
            progress=False,
        )


def test_knn_of_a_token_encoder_on_token_datasets(tmp_path: Path) -> None:
    tokenized_demo(tmp_path, train=120, val=60)
    train, val = (build_source(str(tmp_path / split)) for split in ("train", "val"))
    torch.manual_seed(0)
    encoder = small_token_encoder()
    env = init_distributed("cpu")
    view = eval_view(6, encoder.input_spec)  # the centre 6x6 cells of the 8x8 grids
    result = knn_evaluate(encoder, train, val, view, env, k=5, pool="mean")
    assert result["val_images"] == 60 and 0 <= result["top1"] <= 100
    pixel = build_encoder("vit_tiny", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="this encoder takes pixels, but 'tokens:"):
        knn_evaluate(pixel, train, val, eval_view(32, pixel.input_spec), env)


def test_tokenize_refuses_to_mix_two_runs_in_one_folder(tmp_path: Path) -> None:
    tok = small_tokenizer(seed=6)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    args = {"num_workers": 0, "max_images": 30, "progress": False}
    tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "t"), **args)
    tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "t"), **args)  # the same: fine
    with pytest.raises(ValueError, match=r"holds tokens of another run \(source 'demo:val\[:30\]' there"):
        tokenize(str(tmp_path / "tokenizer.pt"), "demo:train", str(tmp_path / "t"), **args)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds files that no `mimkit tokenize` run wrote"):
        tokenize(str(tmp_path / "tokenizer.pt"), "demo:val", str(tmp_path / "other"), **args)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_decode_checks_that_records_and_images_line_up(tmp_path: Path) -> None:
    tok = small_tokenizer(seed=7)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    t = str(tmp_path / "tokenizer.pt")
    tokenize(t, "demo:val", str(tmp_path / "d"), num_workers=0, max_images=40, progress=False)
    good = decode_grid(t, str(tmp_path / "d"), str(tmp_path / "g.png"), images="demo:val", count=16)
    assert good["psnr_images"] == 16
    with pytest.raises(ValueError, match="the records do not line up with the images of 'demo:train'"):
        decode_grid(t, str(tmp_path / "d"), str(tmp_path / "g.png"), images="demo:train", count=16)


def test_import_vitvqgan_prunes_to_the_codes_the_images_use(tmp_path: Path) -> None:
    original = small_tokenizer(codebook=64, seed=8)
    torch.save(to_vitvqgan(original), tmp_path / "vq.pt")
    import_vitvqgan(
        str(tmp_path / "vq.pt"), "demo:val", str(tmp_path / "imp"), num_heads=2, max_images=50, num_workers=0
    )
    imported = load_tokenizer(tmp_path / "imp").model
    assert imported.pruned and imported.vocab_size <= 64
    view = tokenizer_view(32, (0.0,) * 3, (1.0,) * 3)
    images = demo_source("val")
    x = torch.stack([view(images.load(i)[0])["image"] for i in range(50)])
    full = original.encode(x)
    assert torch.equal(imported.kept_codes[imported.encode(x)], full)
    assert imported.vocab_size == len(torch.unique(full))


def test_import_vitvqgan_with_a_released_codebook_gives_its_ids(tmp_path: Path) -> None:
    original = small_tokenizer(codebook=64, seed=9)
    torch.save(to_vitvqgan(original), tmp_path / "vq.pt")
    rows = [40, 3, 17, 8, 63, 0]  # a release's compact table: some codes, in its own order, stored raw
    released = original.full_codebook()[rows] * torch.tensor([[2.0], [0.5], [1.0], [3.0], [1.0], [1.5]])
    torch.save(released.clone(), tmp_path / "codebook.ckpt")
    import_vitvqgan(
        str(tmp_path / "vq.pt"),
        "demo:val",
        str(tmp_path / "imp"),
        num_heads=2,
        max_images=20,
        num_workers=0,
        codebook=str(tmp_path / "codebook.ckpt"),
    )
    imported = load_tokenizer(tmp_path / "imp").model
    assert imported.kept_codes.tolist() == rows and imported.vocab_size == 6
    x = torch.rand(4, 3, 32, 32)
    full = original.full_codebook()
    expected = (torch.nn.functional.normalize(original.features(x), dim=-1) @ full[rows].T).argmax(-1)
    assert torch.equal(imported.encode(x).flatten(1), expected)
    other = small_tokenizer(codebook=64, seed=10)
    with pytest.raises(ValueError, match=r"6 of 6 codebook rows match no code of this tokenizer"):
        other.match_codebook(released)


def test_images_are_tokenized_on_the_fly_for_a_token_encoder(tmp_path: Path) -> None:
    """A token model evaluated on images sees the ids that `mimkit tokenize` would have stored, by the
    tokenizer its token data records; the k-NN is then the same as on the stored tokens."""
    tokenized_demo(tmp_path, train=80, val=40)
    train, stored = build_source(str(tmp_path / "train")), build_source(str(tmp_path / "val"))
    images = build_source("demo:val", max_images=40)
    torch.manual_seed(0)
    encoder = small_token_encoder()
    bank, queries = tokenized_for(encoder.input_spec, [train, images])
    assert bank is train and queries.kind == "token_ids" and queries.grid == (8, 8)
    for i in (0, 7, 39):
        ids, label = queries.load(i)
        assert torch.equal(ids.long(), stored.load(i)[0].long()) and label == stored.load(i)[1]
    env = init_distributed("cpu")
    view = eval_view(6, encoder.input_spec)
    on_images = knn_evaluate(encoder, bank, queries, view, env, k=5, pool="mean")
    on_tokens = knn_evaluate(encoder, train, stored, view, env, k=5, pool="mean")
    assert on_images["top1"] == on_tokens["top1"] and on_images["top5"] == on_tokens["top5"]
    # images alone: the tokenizer of the data the encoder was trained on
    (alone,) = tokenized_for(encoder.input_spec, [images], trained_on=str(tmp_path / "train"))
    assert torch.equal(alone.load(3)[0], queries.load(3)[0])
    # with no tokenizer to be found the images stay images, and the encoder says what it needs
    assert tokenized_for(encoder.input_spec, [images]) == [images]
    with pytest.raises(ValueError, match="holds images and no tokenizer is known"):
        knn_evaluate(encoder, images, images, view, env)
