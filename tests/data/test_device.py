"""Stages on the device (mimkit.data.device): normalising and decoding on the device make the views the
loader makes, and are refused where they cannot apply."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import ViewDataset, build_source, collate
from mimkit.runs.pretrain import pretrain


def _batch(method, data, n=8):
    """The first ``n`` samples of a synthetic source through ``method``'s training views, collated."""
    from mimkit.data import build_source

    dataset = ViewDataset(build_source("synthetic:16", image_size=16), method.train_transform(data))
    return collate([dataset[(0, i)] for i in range(n)])


@pytest.mark.parametrize("name", ["mae", "lut", "latent_mim"])
def test_uint8_views_normalised_on_the_device_equal_the_loaders(tiny, name):
    """data.normalize=device: the views leave the loader as uint8 (a quarter of the bytes) and
    DeviceNormalize gives exactly the loader's floats: images [B, C, H, W] and Latent MIM's patch rows."""
    import dataclasses

    from mimkit.data.transforms import DeviceNormalize
    from mimkit.methods import build_method

    cfg = tiny(f"method={name}", "method.patch_gap=1" if name == "latent_mim" else "method.mask_ratio=0.75")
    method = build_method(cfg)
    floats = _batch(method, dataclasses.replace(cfg.data, normalize="loader"))
    raw = _batch(method, dataclasses.replace(cfg.data, normalize="device"))
    images = [k for k, v in raw.items() if torch.is_tensor(v) and v.dtype == torch.uint8]
    assert images == [
        k for k, v in floats.items() if torch.is_tensor(v) and v.is_floating_point() and k != "noise"
    ]
    assert all(raw[k].numel() == floats[k].numel() for k in images)
    views = method.train_transform(dataclasses.replace(cfg.data, normalize="device"))
    finished = DeviceNormalize(cfg.data.mean, cfg.data.std, views.layouts)(raw)
    for key, value in floats.items():
        if torch.is_tensor(value):
            assert finished[key].dtype == value.dtype and torch.equal(finished[key], value), key


def test_normalize_resolves_by_device_and_input():
    from mimkit.configs import DataConfig
    from mimkit.data.transforms import DeviceNormalize, training_data

    auto = DataConfig()
    assert training_data(auto, torch.device("cpu")).normalize == "loader"
    assert training_data(auto, torch.device("cuda")).normalize == "device"
    assert training_data(auto, torch.device("cuda"), "token_ids").normalize == "loader"
    forced = DataConfig(normalize="device")
    assert training_data(forced, torch.device("cpu")).normalize == "device"
    bad = {"image": torch.zeros(2, 5, 4, 4, dtype=torch.uint8)}
    finish = DeviceNormalize((0.5,) * 3, (0.2,) * 3, {"image": "images", "patches": "patch_rows"})
    with pytest.raises(
        ValueError,
        match=r"batch entry 'image': uint8 of shape \[2, 5, 4, 4\]; expected images \[B, 3, H, W\]",
    ):
        finish(bad)
    # told its layout, never guessed from the rank: patch rows declared as images are an error
    rows = {"patches": torch.zeros(2, 4, 12, dtype=torch.uint8)}
    assert finish(rows)["patches"].shape == (2, 4, 12)
    with pytest.raises(ValueError, match=r"batch entry 'patches': .* expected images \[B, 3, H, W\]"):
        DeviceNormalize((0.5,) * 3, (0.2,) * 3, {"patches": "images"})(rows)
    with pytest.raises(ValueError, match=r"batch entry 'other': .* expected an entry its views declare"):
        finish({"other": torch.zeros(2, 3, 4, 4, dtype=torch.uint8)})


def test_a_run_normalising_on_the_device_trains_the_same_weights(tiny, tmp_path):
    from mimkit import checkpoint

    for where in ("loader", "device"):
        pretrain(tiny(f"data.normalize={where}", "run.stop_at_step=3", out=where))
    a, b = (checkpoint.load(tmp_path / w / "last.pt")["model"] for w in ("loader", "device"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def write_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """``n`` smooth JPEGs of differing sizes in two class folders."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        h, w = int(rng.integers(16, 48)), int(rng.integers(16, 48))
        y, x = np.mgrid[0:h, 0:w]
        phase = rng.uniform(0, 6, 3)
        pixels = np.stack([127 + 100 * np.sin(x / 5 + p) * np.cos(y / 7 + p) for p in phase], axis=-1)
        (folder / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(folder / f"c{i % 2}" / f"{i:03d}.jpg", quality=95)


@pytest.mark.parametrize("name", ["mae", "lut"])
def test_decoding_on_the_device_makes_the_views_the_loader_makes(tiny, tmp_path, name):
    """data.decode=device: the workers ship the JPEG bytes; the stage decodes the batch and draws each
    sample's crops, flips and colours under its seed exactly as the workers do. A PNG travels decoded,
    a corrupt JPEG is named under "skipped" and dropped."""
    import dataclasses

    from mimkit.data.loader import EncodedDataset
    from mimkit.methods import build_method

    write_jpegs(tmp_path / "img", 6)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "img" / "c0" / "flat.png")
    (tmp_path / "img" / "c1" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    cfg = tiny(f"method={name}", f"data.train={tmp_path / 'img'}")
    method = build_method(cfg)
    source = build_source(str(tmp_path / "img"))
    views = method.train_transform(dataclasses.replace(cfg.data, normalize="device"))
    loader_side, device_side = ViewDataset(source, views), EncodedDataset(source, views)
    a = collate([loader_side[(3, i)] for i in range(len(source))])
    b = device_side.device_stage(collate([device_side[(3, i)] for i in range(len(source))]))
    broken = str(tmp_path / "img" / "c1" / "broken.jpg")
    assert len(a["skipped"]) == len(b["skipped"]) == 1
    assert a["skipped"][0].startswith(broken) and b["skipped"][0].startswith(broken)
    assert a.keys() == b.keys() and len(b["label"]) == len(source) - 1
    for key, value in a.items():
        if key == "skipped":
            continue
        assert value.dtype == b[key].dtype and value.shape == b[key].shape, key
        if value.dtype == torch.uint8:  # the same crops; the decoders may round differently
            assert (value.int() - b[key].int()).abs().float().mean() < 1.0, key
        else:
            assert torch.equal(value, b[key]), key


@pytest.mark.slow
def test_a_run_decoding_on_the_device_resumes_exactly(tmp_path):
    from tests.conftest import TINY, straight_and_resumed

    write_jpegs(tmp_path / "img", 32)
    overrides = [*TINY, f"data.train={tmp_path / 'img'}", "data.decode=device", "optim.batch_size=4"]
    a, b, summary = straight_and_resumed(overrides, tmp_path, stop_at=5)
    assert summary["steps"] == 16 and summary["skipped_images"] == 0
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_decoding_on_the_device_is_refused_where_it_cannot_apply(tiny, tmp_path):
    from mimkit.configs import DataConfig
    from mimkit.data.transforms import training_data

    with pytest.raises(ValueError, match=r"data.decode=device decodes images; this model reads token_ids"):
        training_data(DataConfig(decode="device"), torch.device("cpu"), "token_ids")
    assert training_data(DataConfig(decode="device"), torch.device("cpu")).normalize == "device"


def test_reduced_decoding_is_refused_with_device_decoding_and_dropped_for_evaluations(tiny, tmp_path):
    from mimkit.configs import ConfigError
    from mimkit.data.sources import Subset, full_size

    with pytest.raises(
        ConfigError, match=r"'data.decode_size' reduces JPEG decoding in the loader's workers"
    ):
        tiny("data.decode=device", "data.decode_size=64")
    y, x = np.mgrid[0:256, 0:320]
    Image.fromarray(np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)).save(tmp_path / "a.jpg")
    reduced = build_source(str(tmp_path), decode_size=64, max_images=1)
    whole = full_size(reduced)
    assert isinstance(whole, Subset) and whole.source is not reduced.source
    assert reduced.load(0)[0].shape == (3, 64, 80) and whole.load(0)[0].shape == (3, 256, 320)
