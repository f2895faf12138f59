"""Image and token sources (mimkit.data.sources): folders, npz parts and the embedded demo, broken and odd
images, class names checked between splits, and token data that keep their tokenizer."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data import ViewDataset, build_source, collate, eval_view
from mimkit.data.source_spec import tokenized_for
from mimkit.data.sources import FolderSource, Subset
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
from tests.eval.test_knn import tokenized_demo
from tests.models.test_tokenizer import small_token_encoder, small_tokenizer


def write_images(folder: Path, n: int, size: int = 16) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        arr = np.full((size, size, 3), 20 * i % 255, dtype=np.uint8)
        path = folder / f"img{i}.png"
        Image.fromarray(arr).save(path)
        paths.append(path)
    return paths


def test_image_folder_layout_gives_labels(tmp_path):
    write_images(tmp_path / "cat", 2)
    write_images(tmp_path / "dog" / "nested", 3)
    src = build_source(str(tmp_path))
    assert isinstance(src, FolderSource) and len(src) == 5 and src.classes == ("cat", "dog")
    img, label = src.load(4)
    assert img.shape == (3, 16, 16) and img.dtype == torch.uint8 and label == 1


def test_flat_folder_has_no_labels(tmp_path):
    write_images(tmp_path, 3)
    src = build_source(str(tmp_path))
    assert len(src) == 3 and not src.has_labels and src.load(0)[1] == -1


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data path '.*nowhere' does not exist"):
        build_source(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no images found under '.*empty'"):
        build_source(str(tmp_path / "empty"))


def test_npz_sources_concatenate_and_check_their_arrays(tmp_path):
    for i in range(2):
        np.savez(tmp_path / f"part{i}.npz", x=np.full((3, 8, 8, 3), i, np.uint8), y=np.arange(3) + i)
    src = build_source(str(tmp_path / "part*.npz"))
    assert len(src) == 6 and src.load(4)[1] == 2 and src.load(4)[0].shape == (3, 8, 8)
    np.savez(tmp_path / "bad.npz", x=np.zeros((3, 8, 8, 3), np.float32))
    with pytest.raises(ValueError, match=r"bad\.npz: 'x' must be uint8"):
        build_source(str(tmp_path / "bad.npz"))


def test_demo_source_is_embedded_and_balanced():
    train, val = build_source("demo:train"), build_source("demo:val")
    assert (len(train), len(val)) == (2000, 500)
    assert np.bincount(val.y).tolist() == [50] * 10
    assert train.x.shape[1:] == (32, 32, 3)


def test_unreadable_image_is_reported_and_skipped(tmp_path):
    paths = write_images(tmp_path / "a", 4)
    paths[1].write_bytes(b"not an image at all")
    dataset = ViewDataset(build_source(str(tmp_path)), eval_view(16, _data()))
    batch = collate([dataset[i] for i in range(4)])
    assert batch["image"].shape[0] == 3
    assert len(batch["skipped"]) == 1 and str(paths[1]) in batch["skipped"][0]


def test_a_run_counts_and_reports_skipped_images(tiny, tmp_path, capfd):
    paths = write_images(tmp_path / "imgs" / "x", 16)
    paths[5].write_bytes(b"\x89PNG broken")
    summary = pretrain(tiny(f"data.train={tmp_path / 'imgs'}", "optim.epochs=1", "optim.warmup_epochs=0"))
    assert summary["skipped_images"] == 1 and summary["steps"] == 2
    assert f"skipped unreadable image {paths[5]}" in capfd.readouterr().err


def _data():
    from mimkit.configs import DataConfig

    return DataConfig(crop_pct=1.0)


def test_a_batch_with_no_readable_image_is_an_error(tiny, tmp_path):
    paths = write_images(tmp_path / "imgs", 8)
    for path in paths:
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"every image of a batch was unreadable; the first: .*img"):
        pretrain(tiny(f"data.train={tmp_path / 'imgs'}", "optim.epochs=1", "optim.warmup_epochs=0"))


def write_solid(folder: Path, colours: list[tuple[int, int, int]], size: int = 16) -> list[Path]:
    """One solid-colour PNG per colour in ``folder`` (created, empty if no colours)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, colour in enumerate(colours):
        path = folder / f"img{i}.png"
        Image.fromarray(np.full((size, size, 3), colour, dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_an_empty_class_folder_keeps_the_labels_of_the_others(tmp_path, capfd):
    write_solid(tmp_path / "a", [(255, 0, 0)])
    (tmp_path / "b").mkdir()
    write_solid(tmp_path / "c", [(0, 0, 255)] * 2)
    (tmp_path / ".hidden").mkdir()
    src = build_source(str(tmp_path))
    assert src.classes == ("a", "b", "c") and [src.load(i)[1] for i in range(3)] == [0, 2, 2]
    assert f"warning: class folder '{tmp_path / 'b'}' has no images; class 'b' keeps label 1" in (
        capfd.readouterr().err
    )


def test_training_and_evaluation_sources_must_name_the_same_classes(tmp_path):
    from mimkit.data.sources import check_same_classes

    write_solid(tmp_path / "A" / "a", [(255, 0, 0)])
    write_solid(tmp_path / "A" / "b", [(0, 255, 0)])
    write_solid(tmp_path / "A" / "c", [(0, 0, 255)])
    write_solid(tmp_path / "B" / "a", [(255, 0, 0)])
    write_solid(tmp_path / "B" / "c", [(0, 0, 255)])
    A, B = build_source(str(tmp_path / "A")), build_source(str(tmp_path / "B"))
    message = f"classes differ between '{A.name}' (a, b, c) and '{B.name}' (a, c): only in '{A.name}': b"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_same_classes(A, B)
    check_same_classes(A, A)
    check_same_classes(build_source("demo:train", max_images=64), build_source("demo:val"))
    check_same_classes(build_source("synthetic:64"), build_source("synthetic:32"))

    def npz(name: str, labels: list[int], class_names: list[str] | None = None):
        arrays = {"x": np.zeros((len(labels), 4, 4, 3), np.uint8), "y": np.asarray(labels)}
        if class_names is not None:
            arrays["class_names"] = np.asarray(class_names)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        return build_source(str(tmp_path / f"{name}.npz"))

    # names stored in the files are compared by name and order
    with pytest.raises(ValueError, match=r"\(a, b, c\) and .* \(b, a, c\): the same names in another order"):
        check_same_classes(npz("n1", [0, 1, 2], ["a", "b", "c"]), npz("n2", [0, 1, 2], ["b", "a", "c"]))
    # names numbered from the labels: a split may lack the top labels, but not reach past the other's classes
    full, short = npz("d1", [0, 1, 2, 3]), npz("d2", [0, 1])
    assert full.classes_from_labels and short.classes == ("0", "1")
    check_same_classes(full, short)
    check_same_classes(short, full)
    check_same_classes(A, short)
    with pytest.raises(ValueError, match=r"'.*d1\.npz' has labels up to 3 but '.*A' names only 3 classes"):
        check_same_classes(A, full)


def test_npz_parts_naming_different_classes_are_an_error(tmp_path):
    for i, names in enumerate((["a", "b"], ["b", "a"])):
        np.savez(
            tmp_path / f"p{i}.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.arange(2), class_names=names
        )
    with pytest.raises(ValueError, match=r"npz files name different classes: .*p0\.npz \(a, b\); .*p1\.npz"):
        build_source(str(tmp_path / "p*.npz"))


def test_a_bad_npz_is_one_clear_error(tmp_path):
    good = tmp_path / "good.npz"
    np.savez(good, x=np.zeros((64, 8, 8, 3), np.uint8), y=np.arange(64))
    np.save(tmp_path / "one_array.npy", np.zeros(3))
    bad = {
        "truncated": (good.read_bytes()[: good.stat().st_size // 2], "BadZipFile: File is not a zip file"),
        "random": (np.random.default_rng(0).bytes(300), "not a zip archive, which a .npz is"),
        "empty": (b"", "the file is empty"),
        "one_array": (
            (tmp_path / "one_array.npy").read_bytes(),
            r"a single array \(\.npy\), not named arrays",
        ),
    }
    for name, (data, reason) in bad.items():
        path = tmp_path / f"{name}.npz"
        path.write_bytes(data)
        with pytest.raises(
            ValueError, match=rf"^{re.escape(str(path))}: not a readable \.npz file \({reason}\)$"
        ):
            build_source(str(path))


def _decoded(path: Path) -> torch.Tensor:
    src = build_source(str(path.parent))
    assert src.files == [str(path)]
    return src.load(0)[0]


def test_sixteen_bit_images_are_scaled_to_eight_bits(tmp_path):
    """Microscopy-style 16-bit grey PNG and TIFF (both byte orders): round(v / 257) in all 3 channels,
    where Pillow's own RGB conversion clips nearly every pixel to 255."""
    values = np.linspace(0, 65535, 16 * 20).round().astype(np.uint16).reshape(16, 20)
    expected = torch.from_numpy(np.round(values / 257).astype(np.uint8)).expand(3, 16, 20)
    images = {
        "png/img.png": Image.fromarray(values),
        "tif/img.tif": Image.fromarray(values),
        "tif_big_endian/img.tiff": Image.frombytes("I;16B", (20, 16), values.astype(">u2").tobytes()),
        "tif_int32/img.tif": Image.fromarray(values.astype(np.int32)),
    }
    for name, image in images.items():
        path = tmp_path / name
        path.parent.mkdir()
        image.save(path)
        with Image.open(path) as check:  # the modes Pillow reads these files back in
            assert check.mode == {"png": "I;16", "tif": "I;16", "tif_big_endian": "I;16B"}.get(
                path.parent.name, "I"
            )
        img = _decoded(path)
        assert img.dtype == torch.uint8 and img.shape == (3, 16, 20), name
        assert torch.equal(img, expected), name
        assert (img == 255).float().mean() < 0.01, name


def test_float_and_wide_integer_images_are_scaled_or_named(tmp_path):
    from mimkit.data.sources import UnreadableImage

    ramp = np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)
    (tmp_path / "f").mkdir()
    Image.fromarray(ramp).save(tmp_path / "f" / "img.tif")
    assert torch.equal(
        _decoded(tmp_path / "f" / "img.tif")[1], torch.from_numpy(np.rint(ramp * 255.0).astype(np.uint8))
    )
    (tmp_path / "wide").mkdir()
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "wide" / "img.tif")
    with pytest.raises(
        UnreadableImage, match=r"img\.tif: 32-bit integer pixels \(mode I\) range 70000\.\.70000"
    ):
        _decoded(tmp_path / "wide" / "img.tif")


def test_jpegs_decode_reduced_to_the_smallest_scale_that_keeps_decode_size(tmp_path):
    y, x = np.mgrid[0:384, 0:512]
    smooth = np.stack([127 + 100 * np.sin(x / 23), 127 + 100 * np.cos(y / 17), (x + y) / 4], axis=-1)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "a.jpg", quality=90)
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "b.png")
    shapes = {}
    for size in (None, 200, 192, 100, 96, 40, 1):
        source = build_source(str(tmp_path), decode_size=size)
        shapes[size] = [tuple(source.load(i)[0].shape) for i in range(2)]
    assert shapes[None] == [(3, 384, 512), (3, 384, 512)]
    # 1/2 keeps 192 px on the short side, 1/4 keeps 96, 1/8 (48) is the smallest libjpeg makes
    expected = {200: 384, 192: 192, 100: 192, 96: 96, 40: 48, 1: 48}
    for size, short in expected.items():
        assert shapes[size][0] == (3, short, short * 4 // 3), size
        assert shapes[size][1] == (3, 384, 512)  # a PNG has no reduced decoding
    full = build_source(str(tmp_path)).load(0)[0].float()
    half = build_source(str(tmp_path), decode_size=192).load(0)[0].float()
    # the reduced decode is the picture at half size (DCT scaling averages), not a crop of it
    pooled = torch.nn.functional.avg_pool2d(full[None], 2)[0]
    assert (half - pooled).abs().mean() < 3
    assert (half - full[:, :192, :256]).abs().mean() > 30


def test_decode_size_must_be_positive(tiny):
    from mimkit.configs import ConfigError

    with pytest.raises(ConfigError, match=r"'data.decode_size' must be at least 1 \(or null\); got 0"):
        tiny("data.decode_size=0")


def test_an_unreadable_buffer_is_named_by_its_path_the_same_each_time(tmp_path):
    from mimkit.data.sources import UnreadableImage, _decode

    messages = set()
    for _ in range(2):
        with pytest.raises(UnreadableImage) as err:
            _decode("/data/broken.png", data=b"not an image at all")
        messages.add(str(err.value))
    (message,) = messages
    assert message.startswith("/data/broken.png: UnidentifiedImageError") and "0x" not in message


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
    from mimkit.runs.pretrain import pretrain

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
