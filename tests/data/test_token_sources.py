"""Token sources (mimkit.data.token_sources): images tokenized as the tokenizer encodes them, token data
that keep their tokenizer, input specs checked against sources, SeiT labels and class files."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data import build_source, eval_view
from mimkit.data.source_spec import tokenized_for
from mimkit.data.sources import Subset
from mimkit.data.token_sources import TokenizedImages, check_input, tokenizer_of
from mimkit.data.transforms import tokenizer_view
from mimkit.distributed import init_distributed
from mimkit.eval.knn import knn_evaluate
from mimkit.methods.token_views import views_codebook
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import (
    DEMO_TOKENIZER,
    save_tokenizer,
)
from mimkit.runs.pretrain import pretrain
from mimkit.runs.tokenize import tokenize
from mimkit.tokens.dataset import open_tokens
from tests.conftest import TINY
from tests.data.test_source_spec import _npz
from tests.eval.test_knn import tokenized_demo
from tests.models.test_tokenizer import small_token_encoder, small_tokenizer


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


def test_a_broken_class_file_of_seit_data_is_named(tmp_path):
    data = tmp_path / "d-token.data.bin.gz"
    tokenize("demo", "demo:val", str(data), to="seit", max_images=8, progress=False)
    classes = tmp_path / "d-class-to-id.json"
    assert classes.is_file()
    classes.write_text("{not json")
    with pytest.raises(ValueError, match=rf"{classes}: not valid JSON \(Expecting property name"):
        open_tokens(data)


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


def test_labels_earlier_versions_wrote_and_labels_no_file_should_hold(tmp_path, capsys):
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

    pretrain(build_config(None, [*TINY, "optim.epochs=1", f"run.out={run}"]))
    assert main(["knn", str(run), "--train", "synthetic:8", "--val", val, "--out", val]) == 2
    assert f"--out '{val}' is the input '{val}'" in capsys.readouterr().err
    assert sorted(np.load(val).files) == ["class_names", "x", "y"]


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
