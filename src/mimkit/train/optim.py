"""Optimizer, parameter groups and the learning-rate schedule."""

from __future__ import annotations

import math
from typing import Any

import torch
from timm.optim import Lars, param_groups_weight_decay
from torch import nn


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


def param_groups(module: nn.Module, weight_decay: float, no_decay: set[str]) -> list[dict]:
    """timm's rule (no decay for 1-D tensors and biases) plus the named exclusions; frozen tensors
    (the sin-cos tables) are left out. A module may supply its own groups (layer decay, heads)."""
    custom = getattr(module, "param_groups", None)
    if callable(custom):
        return custom(weight_decay)
    return param_groups_weight_decay(module, weight_decay, no_weight_decay_list=sorted(no_decay))


def build_optimizer(module: nn.Module, optim: Any, lr: float, device: torch.device) -> torch.optim.Optimizer:
    no_decay = (
        module.no_weight_decay_names(optim.decay_tokens)
        if hasattr(module, "no_weight_decay_names")
        else set()
    )
    groups = param_groups(module, optim.weight_decay, no_decay)
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
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(optim.betas), fused=fused or None)
