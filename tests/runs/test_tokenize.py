"""`mimkit tokenize` (mimkit.runs.tokenize): datasets that read back as encoded, recorded tokenizers,
resumes, a full disk and a kill survived, and two runs never mixed in one folder."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data.source_spec import build_source
from mimkit.data.sources import DEMO_FILE, demo_source
from mimkit.data.token_sources import TokenSource, tokenizer_of
from mimkit.data.transforms import tokenizer_view
from mimkit.models.tokenizer import (
    TokenizerShape,
    VQTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from mimkit.runs.tokenize import format_report, tokenize
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
