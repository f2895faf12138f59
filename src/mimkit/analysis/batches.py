"""What every analysis takes: images as one tensor or as batches of them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch


def as_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of at most ``batch_size`` from a tensor [N, ...]; an iterable of batches as it comes."""
    if isinstance(images, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        yield from images.split(batch_size)
    else:
        yield from images
