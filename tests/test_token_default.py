"""The token half for a new user: the shipped tokenizer, images tokenized as a token model reads them,
token data that keep their tokenizer when moved, and the quality gates that say when a result is
meaningless."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest
import torch

from mimkit.configs import build_config
from mimkit.data.sources import DEMO_FILE, Subset, TokenizedImages, build_source, tokenizer_of
from mimkit.data.transforms import tokenizer_view
from mimkit.methods.token_views import views_codebook
from mimkit.models.tokenizer import DEMO_TOKENIZER, load_tokenizer
from mimkit.runs.pretrain import quality_warnings
from mimkit.runs.tokenize import format_report, reconstruction_report, tokenize, tokenizer_warnings
from mimkit.tokens.dataset import open_tokens
from mimkit.tokens.records import codebook_signature, same_codebook
from tests.conftest import TINY


@pytest.fixture(scope="module")
def demo_tokenizer():
    return load_tokenizer("demo")


def test_the_shipped_tokenizer_is_small_pruned_and_states_its_quality(demo_tokenizer):
    assert DEMO_TOKENIZER.stat().st_size < 5_000_000
    model, info = demo_tokenizer.model, demo_tokenizer.info
    assert model.pruned and model.shape.grid == 8 and model.shape.img_size == 32
    report = info["report"]
    # held-out reconstructions far above the mean image, and the codebook in use
    assert report["psnr_on"] == "demo:val (held out)"
    assert report["psnr"] > report["psnr_mean_image"] + 6
    assert report["codes_used"] == model.vocab_size and report["perplexity"] > 100
    assert report["warnings"] == []
    assert "none of the demo set's" in info["trained_on"]


def test_images_are_tokenized_once_as_the_tokenizer_encodes_them(demo_tokenizer):
    images = Subset(build_source("demo:val"), 40)
    tokenized = build_source("demo:val", max_images=40, tokenizer="demo")
    assert isinstance(tokenized, TokenizedImages)
    assert tokenized.kind == "token_ids" and tokenized.grid == (8, 8) and tokenized.vocab_size == 384
    assert tokenizer_of(tokenized) == "demo" and tokenized.classes == images.classes
    view = tokenizer_view(32, demo_tokenizer.mean, demo_tokenizer.std)
    for index in (0, 17, 39):
        image, label = images.load(index)
        expected = demo_tokenizer.model.encode(view(image)["image"][None])[0]
        ids, got_label = tokenized.load(index)
        assert ids.dtype == torch.int64 and torch.equal(ids, expected) and got_label == label
    # the token views move ids through the tokenizer's own codebook
    assert torch.equal(views_codebook(None, tokenized, 384), demo_tokenizer.model.codebook())


def test_token_data_find_their_tokenizer_when_both_move(tmp_path):
    (tmp_path / "a").mkdir()
    shutil.copy(DEMO_TOKENIZER, tmp_path / "a" / "tokenizer.pt")
    tokenize(str(tmp_path / "a"), "demo:val", str(tmp_path / "a" / "tokens"), max_images=16, progress=False)
    shutil.move(tmp_path / "a", tmp_path / "b")
    moved = build_source(str(tmp_path / "b" / "tokens"))
    assert tokenizer_of(moved) == str(tmp_path / "b" / "tokens" / ".." / "tokenizer.pt")
    (tmp_path / "b" / "tokenizer.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"which is gone: give its tokenizer with --tokenizer PATH"):
        tokenizer_of(build_source(str(tmp_path / "b" / "tokens")))


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


def test_runs_whose_figures_mean_nothing_say_so():
    summary = {
        "knn": {"top1": 20.4},
        "knn_at_init": {"top1": 25.8},
        "last_logged": {"masked_token_acc": 0.0044, "masked_token_majority": 0.0151},
    }
    knn, tokens = quality_warnings(summary)
    assert knn.startswith("the final k-NN top-1 20.40% is not above the encoder at initialisation (25.80%)")
    assert tokens.startswith(
        "masked-token accuracy 0.44% is no better than always answering the most common id (1.51%)"
    )
    fine = {
        "knn": {"top1": 30.0},
        "knn_at_init": {"top1": 25.8},
        "last_logged": {"masked_token_acc": 0.06, "masked_token_majority": 0.015},
    }
    assert quality_warnings(fine) == []


def test_the_token_default_recipe_reads_the_demo_through_the_shipped_tokenizer():
    cfg = build_config("mtm_demo")
    assert (cfg.data.train, cfg.data.tokenizer, cfg.eval.val) == ("demo:train", "demo", "demo:val")
    assert cfg.model.stem == "token_ids" and cfg.eval.baseline


@pytest.mark.slow
def test_the_token_default_runs_end_to_end_and_keeps_its_baseline_through_a_resume(tmp_path):
    """mtm_demo at a tiny size: images tokenized by the shipped tokenizer, k-NN beside the encoder at
    initialisation, the masked-token accuracy beside its majority baseline; a resumed run still has the
    at-initialisation figure of its first session."""
    from mimkit.runs.pretrain import pretrain

    sizes = ("model.embed_dim", "model.depth", "model.num_heads", "method.decoder")
    small = [
        *(o for o in TINY if o.startswith(sizes)),  # the tests' depth-2, width-64 model
        "data.max_images=64",
        "data.num_workers=0",
        "optim.epochs=2",
        "optim.batch_size=16",
        "eval.every_epochs=0",
        "eval.lmim_nn=true",  # the leave-one-out 1-NN reads demo:val through the tokenizer too
        "run.progress=false",
        f"run.out={tmp_path / 'run'}",
    ]
    first = pretrain(build_config("mtm_demo", [*small, "run.stop_at_step=3"]))
    assert first["stopped_early"] and "knn" not in first
    resumed = pretrain(build_config("mtm_demo", small))
    assert resumed["knn_at_init"] == first["knn_at_init"]
    assert resumed["knn"]["val"] == "demo:val (tokenized by demo)" and resumed["knn"]["val_images"] == 500
    assert resumed["lmim_nn"]["val"] == "demo:val (tokenized by demo)"
    last = resumed["last_logged"]
    assert 0 < last["masked_token_majority"] < 1 and "masked_token_acc" in last
    assert isinstance(resumed["warnings"], list)


def test_a_tokenizer_given_to_a_pixel_model_is_an_error_not_ignored():
    from mimkit.configs import ConfigError
    from mimkit.runs.pretrain import token_reader

    with pytest.raises(ConfigError, match=r"data.tokenizer=demo turns images into token ids for a token"):
        token_reader(build_config("demo", ["data.tokenizer=demo"]))
    assert token_reader(build_config("mtm_demo")) == "demo"
    with pytest.raises(
        ConfigError, match=r"^data.tokenizer: no tokenizer at 'runs/tokenizer_cifar10'; train one"
    ):
        token_reader(build_config("mtm_cifar10"))


def test_a_relative_tokenizer_is_recorded_absolute(tmp_path, monkeypatch):
    from mimkit.runs.pretrain import token_reader

    (tmp_path / "tok").mkdir()
    shutil.copy(DEMO_TOKENIZER, tmp_path / "tok" / "tokenizer.pt")
    monkeypatch.chdir(tmp_path)
    cfg = build_config("mtm_demo", ["data.tokenizer=tok"])
    assert token_reader(cfg) == cfg.data.tokenizer == str(tmp_path / "tok")


@pytest.mark.slow
def test_a_token_datasets_held_out_split_is_per_class(tmp_path):
    tokenize("demo", "demo:val", str(tmp_path / "tokens"), max_images=100, progress=False)
    val = build_source(f"{tmp_path / 'tokens'}#val=0.1")
    labels = np.asarray(open_tokens(tmp_path / "tokens").labels)
    per_class = np.bincount(labels, minlength=10)
    # a tenth of each class, at least one and never the whole of a class of two or more
    expected = [min(max(1, round(0.1 * n)), max(n - 1, 1)) if n else 0 for n in per_class]
    assert np.bincount(labels[val.indices], minlength=10).tolist() == expected
    assert sum(expected) == 11  # a split that ignored the labels would hold out exactly 10


def test_evaluation_data_a_model_cannot_read_stop_the_run_before_its_first_step(tmp_path):
    """Tokens of another vocabulary as eval.val: refused when the run starts, not after it trained."""
    from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, save_tokenizer
    from mimkit.runs.pretrain import pretrain

    torch.manual_seed(0)
    shape = TokenizerShape(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=32)
    save_tokenizer(
        VQTokenizer(shape, kmeans_init=False).eval(),
        tmp_path / "other" / "tokenizer.pt",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    tokenize(
        str(tmp_path / "other"), "demo:val", str(tmp_path / "other-tokens"), max_images=16, progress=False
    )
    sizes = ("model.embed_dim", "model.depth", "model.num_heads", "method.decoder")
    small = [*(o for o in TINY if o.startswith(sizes)), "data.max_images=32", "data.num_workers=0"]
    out = tmp_path / "run"
    cfg = build_config("mtm_demo", [*small, f"eval.val={tmp_path / 'other-tokens'}", f"run.out={out}"])
    with pytest.raises(
        ValueError, match=r"has 32 codes but the encoder embeds 384: its ids would mean other"
    ):
        pretrain(cfg)
    assert not out.exists()  # no step, no checkpoint, no folder


def test_a_separate_memory_bank_is_read_for_the_end_of_run_knn(tmp_path):
    from mimkit.runs.pretrain import pretrain

    knn = [o for o in TINY if o != "eval.knn=false"]
    cfg = build_config(
        None,
        [*knn, "optim.epochs=1", "eval.train=synthetic:32", "eval.val=synthetic:16", f"run.out={tmp_path}"],
    )
    summary = pretrain(cfg)
    assert summary["knn"]["train_images"] == 32 and summary["knn"]["val_images"] == 16


def test_a_broken_class_file_of_seit_data_is_named(tmp_path):
    data = tmp_path / "d-token.data.bin.gz"
    tokenize("demo", "demo:val", str(data), to="seit", max_images=8, progress=False)
    classes = tmp_path / "d-class-to-id.json"
    assert classes.is_file()
    classes.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{classes}: not valid JSON \(Expecting property name"):
        open_tokens(data)


def _npz(path, y=None, names=True):
    arrays = {"x": np.zeros((4, 8, 8, 3), np.uint8)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    if names:
        arrays["class_names"] = np.array(["a", "b", "c"])
    np.savez(path, **arrays)
    return str(path)


def test_labels_are_checked_where_a_source_is_opened(tmp_path, capsys):
    unlabelled = build_source(_npz(tmp_path / "nolabels.npz"))
    assert not unlabelled.has_labels and unlabelled.load(0)[1] == -1
    assert "'class_names' but no labels 'y': read as unlabelled images" in capsys.readouterr().err
    tokenize("demo", str(tmp_path / "nolabels.npz"), str(tmp_path / "tok"), progress=False)
    assert open_tokens(tmp_path / "tok").labels is None  # no column of -1 "labels"
    for y, bad in (([0, 1, -3, 2], "label -3 of record 2"), ([0, 99, 1, 2], "label 99 of record 1")):
        path = _npz(tmp_path / f"bad{bad[6:9].strip()}.npz", y)
        with pytest.raises(
            ValueError, match=rf"{bad} is not a class index \(1 such labels\); labels must be 0..2"
        ):
            build_source(path)
    with pytest.raises(
        ValueError,
        match=r"label -1 of record 0 is not a class index .* must be 0..999999 \(unnamed classes\)",
    ):
        build_source(_npz(tmp_path / "neg.npz", [-1, 0, 1, 2], names=False))


@pytest.mark.parametrize("line", ["--3", "\u0663", "3.0", ""])
def test_a_seit_label_line_that_is_not_an_integer_is_named(tmp_path, line):
    data = tmp_path / "d-token.data.bin.gz"
    tokenize("demo", "demo:val", str(data), to="seit", max_images=4, progress=False)
    labels = (tmp_path / "d-label.txt").read_text().splitlines()
    labels[2] = line
    (tmp_path / "d-label.txt").write_text("\n".join(labels) + "\n")
    with pytest.raises(
        ValueError, match=rf"d-label.txt: line 3 \(record 2\) is {re.escape(repr(line))}, not an integer"
    ):
        open_tokens(data)


def _other_tokenizer(folder):
    """A tokenizer of the same vocabulary as the shipped one (384 codes, unpruned), other codes."""
    from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, save_tokenizer

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


def test_labels_earlier_versions_wrote_and_labels_no_file_should_hold(tmp_path, capsys):
    from mimkit.cli import main
    from mimkit.tokens.dataset import write_tokens

    ids = np.zeros((3, 2, 2), np.int64)
    (tmp_path / "old-seit").mkdir()
    data = tmp_path / "old-seit" / "o-token.data.bin.gz"
    write_tokens(data, ids, None, to="seit")
    (tmp_path / "old-seit" / "o-label.txt").write_text("-1\n-1\n-1\n")  # an unlabelled set, as written before
    assert open_tokens(data).labels is None
    with pytest.raises(
        ValueError, match=r"label 1000000000000 of record 3 is not a class index .* 0..999999"
    ):
        build_source(_npz(tmp_path / "huge.npz", [0, 1, 2, 10**12], names=False))
    with pytest.raises(ValueError, match=r"'y' must hold integer class indices; got float64"):
        build_source(_npz(tmp_path / "float.npz", [0.7, 1.2, 2.9, 0.1]))
    val = _npz(tmp_path / "val.npz", [0, 1, 2, 0])
    run = tmp_path / "run"
    from mimkit.runs.pretrain import pretrain

    pretrain(build_config(None, [*TINY, "optim.epochs=1", f"run.out={run}"]))
    assert main(["knn", str(run), "--train", "synthetic:8", "--val", val, "--out", val]) == 2
    assert f"--out '{val}' is the input '{val}'" in capsys.readouterr().err
    assert sorted(np.load(val).files) == ["class_names", "x", "y"]


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
