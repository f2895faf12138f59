import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import EpochSampler, ViewDataset, Views, build_source, collate, eval_view, make_loader
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


def test_sampler_shards_pads_and_resumes():
    full = EpochSampler(10, seed=1, rank=0, world_size=1)
    full.set_epoch(3)
    order = list(full)
    assert sorted(i for _, i in order) == list(range(10)) and all(e == 3 for e, _ in order)
    ranks = [EpochSampler(10, seed=1, rank=r, world_size=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(3)
    shards = [[i for _, i in s] for s in ranks]
    assert [len(s) for s in shards] == [4, 4, 4] and set().union(*shards) == set(range(10))
    full.set_epoch(3, start=6)
    assert list(full) == order[6:]
    other = EpochSampler(10, seed=1)
    other.set_epoch(4)
    assert list(other) != order


def test_augmentation_depends_only_on_seed_epoch_and_index():
    from mimkit.data.transforms import mae_crop

    src = build_source("synthetic:16", image_size=16)
    dataset = ViewDataset(src, Views(image=mae_crop(8, 0.2, _data())), seed=5)
    a = dataset[(2, 7)]["image"]
    torch.manual_seed(123)  # the global generator does not matter
    assert torch.equal(dataset[(2, 7)]["image"], a)
    assert not torch.equal(dataset[(3, 7)]["image"], a)
    sampler = EpochSampler(16, seed=0)
    loaded = [make_loader(dataset, sampler, batch_size=4, num_workers=w, drop_last=True) for w in (0, 2)]
    for b0, b2 in zip(*loaded, strict=True):
        assert torch.equal(b0["image"], b2["image"])


def test_a_resumed_epoch_deals_out_the_rest_of_the_global_order():
    """``start`` counts the samples all ranks took together; from any multiple of the world size the ranks
    share out exactly the rest of the (padded) order, each rank's share being the tail of its whole-epoch
    shard, so an uninterrupted run is dealt what DistributedSampler deals."""
    for size in (10, 12, 64):
        for world in (1, 2, 3, 4):
            ranks = [EpochSampler(size, seed=1, rank=r, world_size=world) for r in range(world)]
            order = ranks[0].order()
            assert len(order) == ranks[0].total >= size and sorted(set(order)) == list(range(size))
            whole = [s.indices() for s in ranks]
            assert whole == [order[r::world] for r in range(world)]
            for start in range(0, len(order) + 1, world):
                rest = []
                for r, s in enumerate(ranks):
                    s.set_epoch(0, start=start)
                    assert s.indices() == whole[r][start // world :] and len(s) == len(s.indices())
                    rest += s.indices()
                assert sorted(rest) == sorted(order[start:])
    # taken on one process, the rest of the epoch on two: nothing repeated, nothing skipped
    one, two = EpochSampler(64, seed=3), [EpochSampler(64, seed=3, rank=r, world_size=2) for r in range(2)]
    one.set_epoch(5)
    first = [i for _, i in one][:24]
    for s in two:
        s.set_epoch(5, start=24)
    assert sorted(first + [i for s in two for _, i in s]) == list(range(64))
    with pytest.raises(ValueError, match=r"multiple of the world size 2; got 3"):
        two[0].set_epoch(0, start=3)


def test_mask_noise_depends_only_on_seed_epoch_and_index():
    """A sample's mask noise is the same whatever its batch, its place in the order and the number of
    loader workers; another epoch or run seed draws another one; and drawn after the image, it leaves the
    image view as it is without it."""
    from mimkit.data.transforms import MaskNoise, mae_crop

    src = build_source("synthetic:16", image_size=16)
    crop = mae_crop(8, 0.2, _data())
    dataset = ViewDataset(src, Views(image=crop, noise=MaskNoise(4)), seed=5)
    expected = {i: dataset[(3, i)]["noise"] for i in range(16)}
    assert all(n.shape == (4,) and n.dtype == torch.float32 for n in expected.values())
    for batch_size, workers, order_seed in ((2, 0, 0), (8, 0, 1), (2, 2, 2), (8, 2, 0)):
        torch.manual_seed(100 + workers)  # the global generator does not matter
        sampler = EpochSampler(16, seed=order_seed)
        sampler.set_epoch(3)
        loader = make_loader(dataset, sampler, batch_size=batch_size, num_workers=workers, drop_last=True)
        seen = 0
        for batch in loader:
            assert batch["noise"].shape == (batch_size, 4)
            for index, noise in zip(batch["index"].tolist(), batch["noise"], strict=True):
                assert torch.equal(noise, expected[index]), (batch_size, workers, index)
                seen += 1
        assert seen == 16
    assert not torch.equal(dataset[(4, 7)]["noise"], expected[7])
    other_run = ViewDataset(src, Views(image=crop, noise=MaskNoise(4)), seed=6)
    assert not torch.equal(other_run[(3, 7)]["noise"], expected[7])
    without = ViewDataset(src, Views(image=crop), seed=5)
    for index in range(16):
        assert torch.equal(without[(3, index)]["image"], dataset[(3, index)]["image"])


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


@pytest.mark.slow
def test_encoded_samples_travel_as_one_tensor_per_batch(tmp_path):
    """Between processes each tensor costs a file descriptor: a batch of encoded files is one flat tensor
    (and its shapes), whatever its size; batches of 128 through 2 workers under a limit of 256 open
    files (one tensor per sample would need about 1,000)."""
    import subprocess
    import sys
    import textwrap

    from mimkit.data.loader import EncodedDataset, unpack_encoded
    from tests.conftest import subprocess_env

    write_jpegs(tmp_path / "img", 6)
    Image.fromarray(np.full((20, 30, 3), 90, np.uint8)).save(tmp_path / "img" / "c0" / "flat.png")
    source = build_source(str(tmp_path / "img"))
    dataset = EncodedDataset(source, Views(image=lambda x: x))
    samples = [dataset[(0, i)] for i in range(len(source))]
    entries = [s["encoded"].clone() for s in samples]
    batch = collate(samples)
    assert torch.is_tensor(batch["encoded"]) and batch["encoded"].ndim == 1
    unpacked = unpack_encoded(batch["encoded"], batch["encoded_shapes"])
    assert [e.shape for e in unpacked] == [e.shape for e in entries] and all(
        map(torch.equal, unpacked, entries)
    )
    assert sorted(e.ndim for e in entries) == [1] * 6 + [3]  # the PNG arrives decoded
    odd = [
        torch.zeros(3, 0, 5, dtype=torch.uint8),
        torch.zeros(0, dtype=torch.uint8),
        torch.ones(1, 2, 2).byte(),
    ]
    packed = collate([{"encoded": e.clone(), "label": 0} for e in odd])
    assert [e.shape for e in unpack_encoded(packed["encoded"], packed["encoded_shapes"])] == [
        e.shape for e in odd
    ]

    write_jpegs(tmp_path / "many", 300)
    script = textwrap.dedent(f"""
        import resource
        from mimkit.data import EpochSampler, Views, build_source, make_loader
        from mimkit.data.loader import EncodedDataset
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))
        source = build_source({str(tmp_path / "many")!r})
        sampler = EpochSampler(len(source), seed=0)
        dataset = EncodedDataset(source, Views(image=lambda x: x))
        loader = make_loader(dataset, sampler, batch_size=128, num_workers=2, drop_last=True)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader:
                assert batch["encoded"].ndim == 1 and len(batch["encoded_shapes"]) == 128
        del loader  # its persistent workers end here, not at interpreter exit
        print("ok")
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_sample_seeding_leaves_the_gpu_generators_alone(monkeypatch):
    """The main process seeds every sample's views when the device decodes; the GPUs' generators carry
    the run's own draws (drop path) and must not be reseeded by them."""
    from mimkit.data.loader import seeded

    def forbidden(seed):
        raise AssertionError("a CUDA generator was reseeded")

    monkeypatch.setattr(torch.cuda, "manual_seed_all", forbidden)
    monkeypatch.setattr(torch.cuda, "manual_seed", forbidden)
    before = torch.get_rng_state()
    with seeded(3):
        a = torch.rand(4)
    with seeded() as reseed:
        reseed(3)
        b = torch.rand(4)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), before)


def test_an_unreadable_buffer_is_named_by_its_path_the_same_each_time(tmp_path):
    from mimkit.data.sources import UnreadableImage, _decode

    messages = set()
    for _ in range(2):
        with pytest.raises(UnreadableImage) as err:
            _decode("/data/broken.png", data=b"not an image at all")
        messages.add(str(err.value))
    (message,) = messages
    assert message.startswith("/data/broken.png: UnidentifiedImageError") and "0x" not in message


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
