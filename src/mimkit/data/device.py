"""What happens to a loader batch on the training device, in order and in one place (:class:`DeviceStages`):
the dataset's own finish (JPEGs decoded, uint8 views normalised, each in the layout its views declare),
a check of what was left, the move of every tensor to the device, then the method's batch transform
(token views, CutMix and Mixup, colour on the GPU)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on ``device``, except the samples' seeds: batch stages seed generators from
    them, which on the host costs no synchronisation with the device."""
    return {
        k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k != "seed" else v
        for k, v in batch.items()
    }


class DeviceStages:
    """The ordered device-side stages of training batches. ``dataset_stage``: a dataset's
    ``device_stage`` (a copy is put on the device: the dataset itself goes to the loader's workers, which
    must not receive device tensors); ``check``: called on the batch after it (unreadable images are
    reported there); ``method_stage``: the method's :meth:`batch_transform`. The stages' modules are frozen
    and held here, out of the optimizer, the EMA teacher and the checkpoint."""

    def __init__(
        self,
        device: torch.device,
        dataset_stage: nn.Module | None = None,
        method_stage: nn.Module | None = None,
        check: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.device, self.check = device, check
        self.dataset_stage = None if dataset_stage is None else _frozen(copy.deepcopy(dataset_stage), device)
        self.method_stage = None if method_stage is None else _frozen(method_stage, device)

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        if self.dataset_stage is not None:
            batch = self.dataset_stage(batch)  # on the loader's batch: it moves what it works on
        if self.check is not None:
            self.check(batch)
        batch = to_device(batch, self.device)
        if self.method_stage is not None:
            batch = self.method_stage(batch)
        return batch


def _frozen(module: nn.Module, device: torch.device) -> nn.Module:
    return module.to(device).requires_grad_(False).eval()
