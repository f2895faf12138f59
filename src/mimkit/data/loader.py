"""From a source to batches: a shuffled, rank-sharded and resumable order, per-sample seeded
augmentation, and corrupt images reported and skipped instead of crashing an epoch.

Every sample's augmentation, and its mask noise (a view like the others), is a function of (seed, epoch,
index) alone, so the batches of an epoch are the same whatever the number of workers, and a run resumed in
the middle of an epoch, on the same or another number of processes, sees exactly the samples, views and
masks that the uninterrupted run would have seen.
"""

from __future__ import annotations

import math
import os
import random
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from mimkit.checkpoint import seed_cpu
from mimkit.data.sources import ImageSource, UnreadableImage, decode_batch


@contextmanager
def seeded(seed: int | None = None) -> Iterator[Callable[[int], None]]:
    """Run a block with the CPU generators seeded with ``seed`` (or reseeded by the block through the
    function it gets, once per sample), then put their states back."""
    torch_state, py_state, np_state = torch.get_rng_state(), random.getstate(), np.random.get_state()
    if seed is not None:
        seed_cpu(seed)
    try:
        yield seed_cpu
    finally:
        torch.set_rng_state(torch_state)
        random.setstate(py_state)
        np.random.set_state(np_state)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 0x9E3779B1 + epoch) * 0x85EBCA77 + index) % (1 << 63)


class ViewDataset(Dataset):
    """Applies a view transform to a source; indexed by (epoch, index) pairs from :class:`EpochSampler`.
    ``device_stage``: what finishes the views on the training device, batched (:class:`DeviceNormalize`
    for views that leave the loader as uint8); the engine applies it before the method's own stage."""

    def __init__(
        self,
        source: ImageSource,
        transform: Callable[[torch.Tensor], dict],
        seed: int = 0,
        device_stage: torch.nn.Module | None = None,
    ) -> None:
        self.source, self.transform, self.seed = source, transform, seed
        self.device_stage = device_stage

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        try:
            img, label = self._load(index)
        except UnreadableImage as err:
            return {"skipped": str(err)}
        seed = sample_seed(self.seed, epoch, index)
        sample = self._views(img, seed, index)
        sample["label"] = label
        sample["index"] = index
        sample["seed"] = seed  # for device-side batch transforms (per_sample_uniform)
        return sample

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.source.load(index)

    def _views(self, img: torch.Tensor, seed: int, index: int) -> dict[str, Any]:
        with seeded(seed):
            return self.transform(img)


class EncodedDataset(ViewDataset):
    """``data.decode=device``: the workers only read the files, and the training device decodes a batch's
    JPEGs and makes each sample's views (:class:`DeviceViews`), under the sample's seed as the workers
    would: the crops, flips and colour draws are the same, the pixels the same up to the decoders' and the
    device resize's rounding. For when CPU cores, not the GPU, limit training."""

    def __init__(
        self,
        source: ImageSource,
        transform: Callable[[torch.Tensor], dict],
        seed: int = 0,
        finish: torch.nn.Module | None = None,
    ) -> None:
        super().__init__(source, transform, seed, device_stage=DeviceViews(transform, finish))

    def _load(self, index: int) -> tuple[torch.Tensor, int]:
        return self.source.load_encoded(index)

    def _views(self, img: torch.Tensor, seed: int, index: int) -> dict[str, Any]:
        return {"encoded": img, "path": self.source.path_of(index)}  # the views are made on the device


class DeviceViews(torch.nn.Module):
    """Decode a batch of :class:`EncodedDataset` samples on the device this module is on, make each
    sample's views there under its seed (read on the CPU, before the batch moves: no host sync), stack
    them, and ``finish`` the batch (:class:`DeviceNormalize` for uint8 views). Samples that cannot be
    decoded are dropped and named under "skipped", as the workers' unreadable files are."""

    def __init__(
        self, transform: Callable[[torch.Tensor], dict], finish: torch.nn.Module | None = None
    ) -> None:
        super().__init__()
        self.transform, self.finish = transform, finish
        self.register_buffer("anchor", torch.zeros(0), persistent=False)  # follows .to(device)
        self._stream: torch.cuda.Stream | None = None

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        if "encoded" not in batch:
            return batch  # every sample of the batch was unreadable in the workers
        batch = dict(batch)
        encoded = unpack_encoded(batch.pop("encoded"), batch.pop("encoded_shapes"))
        images, failed = self._decode(encoded, batch.pop("path"))
        keep = [i for i, image in enumerate(images) if image is not None]
        views = []
        with seeded() as reseed:
            for i, seed in enumerate(batch["seed"].tolist()):
                if images[i] is not None:
                    reseed(seed)
                    views.append(self.transform(images[i]))
        batch["skipped"] = [*batch.get("skipped", []), *failed]
        if not views:
            return {"skipped": batch["skipped"]}
        if len(keep) < len(images):
            rows = torch.tensor(keep)
            batch.update({k: v[rows] for k, v in batch.items() if torch.is_tensor(v)})
        batch.update({key: torch.stack([v[key] for v in views]) for key in views[0]})
        return self.finish(batch) if self.finish is not None else batch

    def _decode(self, encoded: list[torch.Tensor], paths: list[str]) -> tuple[list, list[str]]:
        """On a GPU the decoder writes on a stream of its own: its outputs are allocated on a side stream
        (so no block the training stream may still read is handed to it) and the training stream waits
        for them."""
        device = self.anchor.device
        if device.type != "cuda":
            return decode_batch(encoded, paths, device)
        if self._stream is None:
            self._stream = torch.cuda.Stream(device)
        current = torch.cuda.current_stream(device)
        with torch.cuda.stream(self._stream):
            images, failed = decode_batch(encoded, paths, device)
        current.wait_stream(self._stream)
        for image in images:
            if image is not None:
                image.record_stream(current)
        return images, failed


def _signed(value: int) -> int:
    """A 64-bit constant as torch's int64 holds it."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical right shift of int64 (torch shifts arithmetically)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _splitmix64(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finaliser on int64 (multiplications wrap modulo 2^64)."""
    z = (z ^ _shift_right(z, 30)) * _signed(0xBF58476D1CE4E5B9)
    z = (z ^ _shift_right(z, 27)) * _signed(0x94D049BB133111EB)
    return z ^ _shift_right(z, 31)


def per_sample_uniform(seeds: torch.Tensor, count: int) -> torch.Tensor:
    """[N, count] uniform numbers in [0, 1), row n a function of ``seeds[n]`` alone (SplitMix64 of the
    hashed seed and a counter): device-side transforms draw from them, so a sample's draw does not depend
    on its batch, its rank or the device's generator, and a run resumes exactly on any number of
    processes."""
    golden = _signed(0x9E3779B97F4A7C15)
    counter = torch.arange(1, count + 1, device=seeds.device, dtype=torch.int64)
    z = _splitmix64(_splitmix64(seeds.to(torch.int64) * golden)[:, None] + counter * golden)
    return _shift_right(z, 40).to(torch.float32) / float(1 << 24)


class FeatureDataset(ViewDataset):
    """Cached features in the loader's (epoch, index) protocol; nothing random is left to seed, and the
    tensors are in memory, so the engine reads them in-process."""

    in_memory = True

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        self.features, self.labels, self.seed = features, labels, seed

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index = key[1] if isinstance(key, tuple) else key
        return {"features": self.features[index], "label": int(self.labels[index]), "index": index}


def collate(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the readable samples; the unreadable ones travel as a list of messages under 'skipped'.
    Encoded files (:class:`EncodedDataset`), of differing lengths, travel as one flat tensor and their
    shapes (one tensor per batch between processes, not one per sample: each costs a file descriptor)."""
    good = [s for s in samples if "skipped" not in s]
    encoded = [s.pop("encoded") for s in good if "encoded" in s]
    batch = default_collate(good) if good else {}
    if encoded:
        batch["encoded"] = torch.cat([e.reshape(-1) for e in encoded])
        batch["encoded_shapes"] = torch.tensor([[e.ndim, *e.shape] + [0] * (3 - e.ndim) for e in encoded])
    batch["skipped"] = [s["skipped"] for s in samples if "skipped" in s]
    return batch


def unpack_encoded(flat: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """:func:`collate`'s flat tensor back into the samples' entries: a JPEG's bytes [N] (a shape row
    (1, N, 0, 0)) or a decoded image [C, H, W] (a row (3, C, H, W))."""
    rows = [row[1 : 1 + row[0]] for row in shapes.tolist()]
    pieces = torch.split(flat, [math.prod(row) for row in rows])
    return [piece.view(*row) for piece, row in zip(pieces, rows, strict=True)]


class EpochSampler(Sampler[tuple[int, int]]):
    """(epoch, index) pairs: a permutation fixed by (seed, epoch), padded by wrapping to a multiple of the
    world size and dealt out rank by rank (as DistributedSampler). ``start`` resumes an epoch: it counts the
    samples of that order already taken by all ranks together, and the rest, ``order[start:]``, is dealt
    out, so a run resumes at the same sample whatever its number of processes. From a multiple of the
    world size this is DistributedSampler's own shard with its first ``start // world_size`` left out."""

    def __init__(
        self,
        size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pad: bool = True,
    ) -> None:
        if size < 1:
            raise ValueError("cannot sample from an empty source")
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.epoch, self.start = 0, 0

    @property
    def per_rank(self) -> int:
        """Samples of a whole epoch on this rank."""
        if self.pad:
            return -(-self.size // self.world_size)
        return len(range(self.rank, self.size, self.world_size))

    @property
    def total(self) -> int:
        """Samples of a whole epoch on all ranks together (the padded order's length)."""
        return self.per_rank * self.world_size if self.pad else self.size

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Deal out ``epoch`` from global position ``start``, a multiple of the world size (a whole number of
        rounds, so that every rank gets the same number of samples)."""
        if start < 0 or start % self.world_size:
            raise ValueError(
                f"start must be a non-negative multiple of the world size {self.world_size}; got {start}"
            )
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        """The epoch's global order: the permutation, padded by wrapping to :attr:`total`."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        return (order * (self.total // self.size + 1))[: self.total]

    def indices(self) -> list[int]:
        """This rank's share of what is left of the epoch."""
        return self.order()[self.start :][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for index in self.indices():
            yield self.epoch, index

    def __len__(self) -> int:
        return len(range(self.rank, max(0, self.total - self.start), self.world_size))


def _ignore_stop_signals(worker_id: int) -> None:
    """Loader workers leave SIGINT and SIGTERM to the main process, which saves at the next step boundary
    and needs its workers until then (a Ctrl-C reaches the whole process group). Workers still end with
    the main process."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def default_workers() -> int:
    """Loader processes when none are asked for: the cores this process may use, shared among the
    processes torchrun started on this machine (more workers than cores only adds contention)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def close_loader(loader: DataLoader) -> None:
    """End a loader's persistent workers now. They ignore SIGTERM (:func:`_ignore_stop_signals`), so
    workers still alive when the interpreter exits (a traceback keeps the loader referenced) would leave
    multiprocessing's exit handler waiting for them forever."""
    shutdown = getattr(getattr(loader, "_iterator", None), "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    loader._iterator = None


def make_loader(
    dataset: ViewDataset,
    sampler: EpochSampler,
    *,
    batch_size: int,
    num_workers: int | None,
    drop_last: bool,
    pin_memory: bool = False,
) -> DataLoader:
    if num_workers is None:
        num_workers = default_workers()
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: starting an iterator draws a worker seed, which must not move the global
        # generator that the masks come from (a resumed run starts a different number of iterators)
        generator=torch.Generator().manual_seed(dataset.seed),
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
    )
