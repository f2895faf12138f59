"""The loader (mimkit.data.loader): a sampler that shards and resumes, and views and mask noise that depend
on (seed, epoch, index) only."""

import os
import resource

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit.data import EpochSampler, ViewDataset, Views, build_source, collate, make_loader
from tests.data.test_device import write_jpegs
from tests.data.test_sources import _data


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


def test_encoded_samples_travel_as_one_tensor_per_batch(tmp_path):
    """Between processes each tensor costs a file descriptor: a batch of encoded files is one flat tensor
    (and its shapes), whatever its size; batches of 128 through 2 workers with room for 256 more open
    files (one tensor per sample would need about 1,000)."""
    from mimkit.data.loader import EncodedDataset, unpack_encoded

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
    source = build_source(str(tmp_path / "many"))
    sampler = EpochSampler(len(source), seed=0)
    dataset = EncodedDataset(source, Views(image=lambda x: x))
    # 256 more files than are open now, for this process and the workers it forks
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(len(os.listdir("/proc/self/fd")) + 256, hard), hard))
    try:
        loader = make_loader(dataset, sampler, batch_size=128, num_workers=2, drop_last=True)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for batch in loader:
                assert batch["encoded"].ndim == 1 and len(batch["encoded_shapes"]) == 128
        del loader  # its persistent workers end here
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


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
