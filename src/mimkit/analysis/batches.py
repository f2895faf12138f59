"""What every analysis takes: images as one tensor or as batches of them, and a module run in eval mode
that is given back in the mode it came in."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn


def as_batches(images: torch.Tensor | Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches of at most ``batch_size`` from a tensor [N, ...]; an iterable of batches as it comes."""
    if isinstance(images, torch.Tensor):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        yield from images.split(batch_size)
    else:
        yield from images


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, no drop-path) for the block, then back to its own mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
