"""Image sources (mimkit.data.sources): folders, npz parts and the embedded demo, broken and odd images,
decoding at reduced size."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import ViewDataset, build_source, collate, eval_view
from mimkit.data.sources import FolderSource
from mimkit.runs.pretrain import pretrain


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
