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

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _pairs(self, student: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor], list[tuple]]:
        ours = dict(self.module.named_parameters())
        theirs = dict(student.named_parameters())
        if self.include_buffers:
            ours.update(self.module.named_buffers())
            theirs.update(student.named_buffers())
        if ours.keys() != theirs.keys():
            missing = sorted(set(ours) ^ set(theirs))[:5]
            raise ValueError(f"the student no longer matches its EMA teacher (differing entries: {missing})")
        floats = [k for k in ours if ours[k].is_floating_point()]
        others = [(ours[k], theirs[k]) for k in ours if not ours[k].is_floating_point()]
        return [ours[k] for k in floats], [theirs[k].detach() for k in floats], others

    @torch.no_grad()
    def update(self, student: nn.Module, progress: float = 0.0, valid: torch.Tensor | None = None) -> float:
        """Move towards ``student`` with the momentum of the cosine schedule at ``progress``; returns it.
        ``valid`` (a 0-dim float on the device, see :meth:`Trainable.after_step`) at 0.0 leaves the teacher
        as it is, with no host sync."""
        m = cosine_momentum(self.base_momentum, progress) if self.cosine else self.base_momentum
        teacher_floats, student_floats, others = self._pairs(student)
        if valid is None:
            torch._foreach_lerp_(teacher_floats, student_floats, 1.0 - m)
            for t, s in others:
                t.copy_(s)
        else:
            # a weight tensor per entry: _foreach_lerp_ reads a single tensor weight on the host, which
            # would wait for the device every step
            weight = (1.0 - m) * valid
            torch._foreach_lerp_(teacher_floats, student_floats, [weight] * len(teacher_floats))
            for t, s in others:
                t.copy_(torch.where(valid.bool(), s, t))
        self.momentum.fill_(m)
        return m
