"""Optimizer, parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import Lars
from torch.optim import Optimizer

from mimkit.methods.base import Trainable


def effective_batch(optim: Any, world_size: int) -> int:
    return optim.batch_size * optim.accum_iter * world_size


def resolve_lr(optim: Any, eff_batch: int) -> float:
    """An absolute ``optim.lr`` wins; else ``blr`` scaled by the effective batch: linear (MAE:
    blr * B / 256) or sqrt (blr * (ref / 256) * sqrt(B / ref), which is the LUT reference's
    blr * sqrt(B) / 4 at ref 4096 and equals the linear rule at B = ref)."""
    if optim.lr is not None:
        return float(optim.lr)
    if optim.lr_rule == "linear":
        return optim.blr * eff_batch / 256
    ref = optim.lr_ref_batch
    return optim.blr * (ref / 256) * math.sqrt(eff_batch / ref)


def lr_at(
    epoch: float, *, lr: float, min_lr: float, warmup_epochs: float, epochs: float, warmup_from: float = 0.0
) -> float:
    """Linear warmup from ``warmup_from`` to lr, then half-cycle cosine to min_lr; ``epoch`` is fractional."""
    if epoch < warmup_epochs:
        return warmup_from + (lr - warmup_from) * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / span))


def build_optimizers(module: Trainable, optim: Any, lr: float, device: torch.device) -> dict[str, Optimizer]:
    """One optimizer per name the module's parameter groups give (``group["optimizer"]``, default
    "main"), each of ``optim.name``'s kind; per-group settings (lr_scale, weight_decay, betas) pass
    through."""
    by_name: dict[str, list[dict]] = {}
    for group in module.param_groups(optim.weight_decay, optim.decay_tokens):
        group = dict(group)
        by_name.setdefault(group.pop("optimizer", "main"), []).append(group)
    if "main" not in by_name:
        raise ValueError("the module declares no parameter group for the 'main' optimizer")
    return {name: _optimizer(groups, optim, lr, device) for name, groups in by_name.items()}


def _optimizer(groups: list[dict], optim: Any, lr: float, device: torch.device) -> Optimizer:
    if optim.name == "lars":
        # MAE's LARS: the trust ratio scales the update of every tensor of 2 or more dimensions, with or
        # without weight decay; 1-D tensors (biases, norms) are neither adapted nor decayed
        lars_groups = []
        for group in groups:
            for ndim_gt1 in (True, False):
                params = [p for p in group["params"] if (p.ndim > 1) == ndim_gt1]
                if params:
                    wd = group.get("weight_decay", optim.weight_decay) if ndim_gt1 else 0.0
                    lars_groups.append(
                        {**group, "params": params, "weight_decay": wd, "always_adapt": ndim_gt1}
                    )
        return Lars(lars_groups, lr=lr, momentum=optim.momentum, trust_coeff=0.001)
    fused = device.type == "cuda" if optim.fused is None else optim.fused
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), fused=fused or None)
