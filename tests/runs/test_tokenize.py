"""Tokenizer runs (mimkit.runs.tokenize): a tokenizer learns on real images and resumes exactly; `mimkit
tokenize` writes datasets that read back as encoded, resumes, survives a full disk and a kill, and says
when a tokenizer learnt nothing."""

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
from mimkit.data.source_spec import build_source
from mimkit.data.sources import DEMO_FILE, Subset, demo_source
from mimkit.data.token_sources import TokenSource, tokenizer_of
from mimkit.data.transforms import tokenizer_view
from mimkit.interop.vitvqgan import to_vitvqgan
from mimkit.models.tokenizer import (
    TokenizerShape,
    VQTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from mimkit.runs.tokenize import format_report, tokenize
from mimkit.runs.tokenizer_lifecycle import (
    decode_grid,
    import_vitvqgan,
    reconstruction_report,
    tokenizer_warnings,
    train_tokenizer,
)
from mimkit.tokens.compact_writer import CompactWriter
from mimkit.tokens.dataset import open_tokens
from mimkit.tokens.records import codebook_signature, same_codebook
from tests.conftest import TINY
from tests.models.test_tokenizer import small_tokenizer


def test_the_shipped_tokenizer_is_recorded_by_name_and_a_finished_dataset_is_not_redone(tmp_path):
    first = tokenize("demo", "demo:val", str(tmp_path / "tokens"), max_images=8, progress=False)
    assert first["tokenized_now"] == 8 and format_report(first, tmp_path).startswith("tokenized 8 images")
    assert open_tokens(tmp_path / "tokens").meta["tokenizer"] == "demo"
    assert tokenizer_of(build_source(str(tmp_path / "tokens"))) == "demo"
    again = tokenize("demo", "demo:val", str(tmp_path / "tokens"), max_images=8, progress=False)
    assert again["tokenized_now"] == 0
    assert format_report(again, tmp_path).startswith(
        f"{tmp_path / 'tokens'} was complete already (8 images; nothing to tokenize)"
    )


def test_reconstruction_quality_is_measured_over_the_classes_beside_the_mean_image(demo_tokenizer):
    source = build_source("demo:val")  # stored class by class: the first 50 images are all airplanes
    view = tokenizer_view(32, demo_tokenizer.mean, demo_tokenizer.std)
    spec = demo_tokenizer
    report = reconstruction_report(
        demo_tokenizer.model, source, view, spec, None, torch.device("cpu"), count=20
    )
    assert report["psnr_images"] == 20
    # every class is in the sample, so its mean image is a poor fit: far below the tokenizer
    assert report["psnr_mean_image"] < report["psnr"] - 6
    labels = np.asarray(source.y)[Subset(source, 20, spread=True).indices]
    assert len(set(labels.tolist())) == 10


def test_a_tokenizer_that_learnt_nothing_is_named():
    bad = {"psnr": 13.3, "psnr_mean_image": 12.96, "codes_used": 5, "codebook_size": 384, "perplexity": 3.2}
    assert tokenizer_warnings(bad) == [
        "the tokenizer's reconstruction PSNR 13.30 dB is not clearly above the mean image's 12.96 dB (by at "
        "least 3 dB): it learnt little, its decodes look alike, and models trained on its ids learn little; "
        "train it longer",
        "the tokenizer's codes collapsed: 5 of 384 used, worth 3.2 equally used codes (perplexity); its ids "
        "carry little about the images",
    ]
    good = {"psnr": 22.2, "psnr_mean_image": 12.4, "codes_used": 384, "codebook_size": 384, "perplexity": 340}
    assert tokenizer_warnings(good) == []


def _other_tokenizer(folder):
    """A tokenizer of the same vocabulary as the shipped one (384 codes, unpruned), other codes."""
    from mimkit.models.tokenizer import save_tokenizer

    torch.manual_seed(1)
    shape = TokenizerShape(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=384)
    save_tokenizer(
        VQTokenizer(shape, kmeans_init=False).eval(),
        folder / "tokenizer.pt",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    return folder


@pytest.mark.slow
def test_ids_of_another_tokenizer_of_the_same_vocabulary_are_refused(tmp_path, capsys):
    from mimkit.cli import main
    from mimkit.runs.pretrain import pretrain

    other = _other_tokenizer(tmp_path / "other")
    sizes = ("model.embed_dim", "model.depth", "model.num_heads", "method.decoder")
    small = [
        *(o for o in TINY if o.startswith(sizes)),
        "data.max_images=32",
        "data.num_workers=0",
        "optim.epochs=1",
        "optim.batch_size=16",
        "eval.knn=false",
        "run.progress=false",
    ]
    pretrain(build_config("mtm_demo", [*small, f"run.out={tmp_path / 'run'}"]))
    spec = torch.load(tmp_path / "run" / "last.pt", weights_only=True)["input_spec"]
    demo = load_tokenizer("demo").model.codebook()
    assert same_codebook(spec["codebook_signature"], codebook_signature(demo))
    # the same table normalised with other last bits (another device) is the same tokenizer
    jittered = demo * (1 + 1e-7 * torch.randn(demo.shape, generator=torch.Generator().manual_seed(0)))
    assert same_codebook(codebook_signature(jittered), codebook_signature(demo))
    argv = [
        "knn",
        str(tmp_path / "run"),
        "--val",
        "demo:val",
        "--num-workers",
        "0",
        "--tokenizer",
        str(other),
    ]
    assert main(argv) == 2
    assert (
        f"was made by another tokenizer ('{other}') than this encoder's training tokens (their codebooks "
        "differ)" in capsys.readouterr().err
    )
    tokenize(str(other), "demo:val", str(tmp_path / "c-tokens"), max_images=16, progress=False)
    assert (
        main(["knn", str(tmp_path / "run"), "--val", str(tmp_path / "c-tokens"), "--num-workers", "0"]) == 2
    )
    made_by = other.resolve() / "tokenizer.pt"
    assert f"c-tokens' was made by another tokenizer ('{made_by}')" in capsys.readouterr().err
    # and a run given them as eval.val stops before its first step
    tokenize("demo", "demo:train", str(tmp_path / "b-tokens"), max_images=32, progress=False)
    mixed = [
        *small,
        "data.tokenizer=null",
        f"data.train={tmp_path / 'b-tokens'}",
        f"eval.val={tmp_path / 'c-tokens'}",
        "eval.knn=true",
        f"run.out={tmp_path / 'mixed'}",
    ]
    with pytest.raises(ValueError, match="c-tokens' was made by another tokenizer"):
        pretrain(build_config("mtm_demo", mixed))
    assert not (tmp_path / "mixed").exists()


def test_a_full_disk_leaves_no_temporary_and_names_the_dataset_then_the_rerun_completes(
    tmp_path, monkeypatch
):
    """A SeiT conversion that fails to flush its stream (ENOSPC) and fails again closing it in the clean-up:
    the temporary stream goes all the same, the error names the dataset, and the rerun writes it whole."""
    import errno
    import gzip

    from mimkit.tokens.dataset import convert

    tokenize("demo", "demo:val", str(tmp_path / "src"), max_images=16, progress=False)
    target = tmp_path / "out" / "d-token.data.bin.gz"
    real_close = gzip.GzipFile.close

    def full(self):
        if self.mode == gzip.WRITE and self.fileobj is not None:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_close(self)

    monkeypatch.setattr(gzip.GzipFile, "close", full)
    with pytest.raises(OSError) as err:
        convert(tmp_path / "src", target, to="seit")
    assert (err.value.filename, err.value.strerror) == (str(target), "No space left on device")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no temporary left
    monkeypatch.setattr(gzip.GzipFile, "close", real_close)
    done = convert(tmp_path / "src", target, to="seit")
    assert len(done) == 16 and np.array_equal(done.read(3), open_tokens(tmp_path / "src").read(3))


def test_a_source_changed_in_place_is_not_resumed_into_the_same_tokens(tmp_path):
    d = np.load(DEMO_FILE)
    images = tmp_path / "imgs.npz"
    np.savez(images, x=d["x_val"][:16], y=d["y_val"][:16])
    tokenize("demo", str(images), str(tmp_path / "t"), shard_size=8, progress=False)
    np.savez(images, x=d["x_val"][16:32], y=d["y_val"][16:32])  # same name, same count, other images
    with pytest.raises(ValueError, match=r"holds tokens of another run \(images_sha256 '[0-9a-f]{64}' there"):
        tokenize("demo", str(images), str(tmp_path / "t"), shard_size=8, progress=False)


def test_decode_refuses_another_tokenizers_tokens_and_never_writes_over_its_inputs(tmp_path, capsys):
    from mimkit.cli import main

    other = _other_tokenizer(tmp_path / "other")
    tokenize("demo", "demo:val", str(tmp_path / "t"), max_images=8, progress=False)
    assert (
        main(["tokenizer", "decode", str(other), str(tmp_path / "t"), "--out", str(tmp_path / "g.png")]) == 2
    )
    assert "was made by another tokenizer than" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    tokenizer_pt = other / "tokenizer.pt"
    before = tokenizer_pt.read_bytes()
    assert main(["tokenizer", "decode", str(other), str(tmp_path / "t"), "--out", str(tokenizer_pt)]) == 2
    assert f"--out '{tokenizer_pt}' is the input" in capsys.readouterr().err
    assert tokenizer_pt.read_bytes() == before
    assert main(["tokenizer", "decode", "demo", str(tmp_path / "t"), "--out", str(tmp_path / "g.png")]) == 0


def test_a_rerun_removes_what_a_killed_tokenize_left(tmp_path, capsys):
    data = tmp_path / "d-token.data.bin.gz"  # a run killed before its rename left only temporaries
    left = [tmp_path / ".d-token.data.bin.gz.tmp4242", tmp_path / ".d-label.txt.tmp77"]
    others = [tmp_path / ".codebook.ckpt.tmp5", tmp_path / ".e-token.data.bin.gz.tmp9"]  # not this dataset's
    for path in [*left, *others]:
        path.write_bytes(b"partial")
    tokenize("demo", "demo:val", str(data), to="seit", max_images=8, progress=False)
    assert len(open_tokens(data)) == 8
    assert not any(p.exists() for p in left) and all(p.exists() for p in others)
    assert f"note: removed {left[0]}, left by a process killed while writing it" in capsys.readouterr().err


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
