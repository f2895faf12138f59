from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import EpochSampler, ViewDataset, Views, build_source, collate, eval_view, make_loader
from mimkit.data.sources import FolderSource
from mimkit.train.pretrain import pretrain


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


def _data():
    from mimkit.configs import DataConfig

    return DataConfig(crop_pct=1.0)


def test_a_batch_with_no_readable_image_is_an_error(tiny, tmp_path):
    paths = write_images(tmp_path / "imgs", 8)
    for path in paths:
        path.write_bytes(b"broken")
    with pytest.raises(ValueError, match=r"every image of a batch was unreadable; the first: .*img"):
        pretrain(tiny(f"data.train={tmp_path / 'imgs'}", "optim.epochs=1", "optim.warmup_epochs=0"))
