"""The EMA teacher: a frozen copy of a student that follows it by exponential moving average. One piece,
used by every method with a momentum encoder (LUT's context encoder, Latent MIM's target encoder)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def cosine_momentum(base: float, progress: float) -> float:
    """``base`` at the start of training, rising along a half cosine to 1 at the end (DINO's schedule):
    m = 1 - (1 - base) * (1 + cos(pi * progress)) / 2, progress = iteration / total iterations."""
    return 1.0 - (1.0 - base) * (1.0 + math.cos(math.pi * progress)) / 2.0


class EMATeacher(nn.Module):
    """``teacher <- m * teacher + (1 - m) * student`` for every parameter and, with ``include_buffers``,
    every floating buffer (BatchNorm running statistics); integer buffers are copied. The teacher gets no
    gradient and stays in eval mode whatever mode its owner is put in. With ``cosine=False`` the momentum
    stays at ``base_momentum`` (the fine-tune's model EMA)."""

    def __init__(
        self, student: nn.Module, base_momentum: float, *, include_buffers: bool = True, cosine: bool = True
    ) -> None:
        super().__init__()
        if not 0.0 <= base_momentum <= 1.0:
            raise ValueError(f"EMA momentum must lie in [0, 1]; got {base_momentum}")
        self.module = copy.deepcopy(student).requires_grad_(False).eval()
        self.base_momentum = base_momentum
        self.include_buffers = include_buffers
        self.cosine = cosine
        # the momentum of the latest update, for logging; a tensor so that compiled forwards that read it
        # are not specialised to its value
        self.register_buffer("momentum", torch.tensor(float(base_momentum)), persistent=False)
        # set by the training engine's non-finite guard: a 0-dim float on the device, 0.0 from the first
        # step found not finite (not yet read by the host) on, that stops the teacher without a host sync;
        # and, host side, ``hold`` for a step whose move was already made on these weights
        self.valid: torch.Tensor | None = None
        self.hold = False

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        """(the teacher's parameters, the student's, [(teacher buffer, student buffer)])."""
        ours, theirs = dict(self.module.named_parameters()), dict(student.named_parameters())
        our_buffers = dict(self.module.named_buffers()) if self.include_buffers else {}
        their_buffers = dict(student.named_buffers()) if self.include_buffers else {}
        if ours.keys() | our_buffers.keys() != theirs.keys() | their_buffers.keys():
            missing = sorted((ours.keys() | our_buffers.keys()) ^ (theirs.keys() | their_buffers.keys()))[:5]
            raise ValueError(f"the student no longer matches its EMA teacher (differing entries: {missing})")
        buffers = [(our_buffers[k], their_buffers[k]) for k in our_buffers]
        return list(ours.values()), [theirs[k].detach() for k in ours], buffers

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float = 0.0, valid: torch.Tensor | None = None) -> float:
        """Move towards ``student`` with the momentum of the cosine schedule at ``progress``; returns it.
        ``valid`` (a 0-dim float on the device; by default the engine's, see :attr:`valid`) at 0.0 leaves
        the teacher as it is, with no host sync."""
        m = cosine_momentum(self.base_momentum, progress) if self.cosine else self.base_momentum
        if self.hold:
            self.momentum.fill_(m)
            return m
        valid = self.valid if valid is None else valid
        teacher_params, student_params, buffers = self._pairs(student)
        if valid is None:
            torch._foreach_lerp_(teacher_params, student_params, 1.0 - m)
            for t, s in buffers:
                if t.is_floating_point():
                    t.lerp_(s, 1.0 - m)
                else:
                    t.copy_(s)
        else:
            # lerp's formula for weights below 1/2, t + w (s - t), in three fused calls: _foreach_lerp_
            # would read a single tensor weight on the host (a wait for the device every step), and takes
            # a list of them only one tensor at a time. The parameters stay finite when a step is skipped
            # (the optimizer skips it too), so w = 0 leaves them exactly as they are
            weight = (1.0 - m) * valid
            step = torch._foreach_sub(student_params, teacher_params)
            torch._foreach_mul_(step, weight)
            torch._foreach_add_(teacher_params, step)
            # buffers (BatchNorm statistics) move in the forward and may be NaN after a bad one: selected
            keep = valid.bool()
            for t, s in buffers:
                t.copy_(torch.where(keep, torch.lerp(t, s, weight) if t.is_floating_point() else s, t))
        self.momentum.fill_(m)
        return m
