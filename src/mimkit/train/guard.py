"""The non-finite guard: a step whose loss or gradients are NaN or inf never reaches the weights, and the
run stops with the weights from before it, at the cost of at most one host sync per step.

Everything is marked on the device: the number of the first step whose loss or gradients were not finite,
and of the first update that left the weights or the optimizer state non-finite. ``run.host_sync=step``
reads the marks after every backward (one sync a step); ``log`` reads them only at log steps and saves,
and until then fused AdamW skips every update on the device (its ``found_inf``) and EMA teachers stand
still through :attr:`NonFiniteGuard.valid`, so the weights stay those from before the bad step. Reading a
bad mark rewinds the counters, buffers and random state to the start of that step."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn

from mimkit import checkpoint
from mimkit.distributed import DistEnv, all_reduce_max
from mimkit.methods.ema import EMATeacher


class NonFiniteLoss(RuntimeError):
    """The loss or its gradients, or the weights after an optimizer step, became NaN or inf; the message
    gives the step and the last good checkpoint. A checkpoint with non-finite weights is never written."""


@torch.no_grad()
def all_finite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device-side boolean: whether every entry of every tensor is finite (no host sync). The max-abs
    norm of each tensor is inf or NaN exactly when the tensor holds one (a 2-norm would overflow on large
    finite weights); ``_foreach_norm`` is the multi-tensor kernel torch's own gradient clipping uses."""
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(tensors, float("inf"))
    return torch.isfinite(torch.stack(norms)).all()


def optimizer_tensors(states: Any) -> list[torch.Tensor]:
    """The float tensors of an optimizer's per-parameter states (AdamW's moments and step counts)."""
    return [t for entry in states for t in entry.values() if torch.is_tensor(t) and t.is_floating_point()]


class NonFiniteGuard:
    """The device marks of one training run, the rewind to the start of a bad step, and the validity that
    what moves outside the optimizer (EMA teachers) reads. ``host_sync``: "step" or "log" (see the
    module's docstring)."""

    def __init__(self, module: nn.Module, env: DistEnv, host_sync: str) -> None:
        device = env.device
        self.module, self.env, self.host_sync = module, env, host_sync
        # 1.0 while no step of this run was found not finite, else 0.0 (updated in place: teachers hold it)
        self.valid = torch.ones((), device=device)
        self._loss_bad = torch.zeros((), dtype=torch.bool, device=device)  # a loss of this step
        self.first_bad_loss = torch.full((), -1, dtype=torch.long, device=device)
        self.first_bad_state = torch.full((), -1, dtype=torch.long, device=device)
        # (epoch, micro-batch, RNG states) at the start of each step not yet read, to rewind to a bad one
        self._starts: dict[int, tuple[int, int, dict]] = {}
        # buffers move in the forward (BatchNorm statistics of a head): kept as they were at the start of
        # the first bad step, to be put back with the rest of that state
        self._buffers_before = [b.detach().clone() for b in module.buffers()]
        # the step whose before_step already ran on the weights this run resumed from, or was rewound to
        # (a teacher that moves before the step must not move twice for it)
        self.before_step_done: int | None = None
        self.teachers = [m for m in module.modules() if isinstance(m, EMATeacher)]
        if host_sync == "log":  # with "step" no bad step survives to a teacher: the plain update
            for teacher in self.teachers:
                teacher.valid = self.valid

    def start_step(self, number: int, epoch: int, micro_batch: int) -> None:
        """Before the first micro-batch of step ``number``: where to rewind to, and the buffers of the last
        step that was not found bad."""
        self._starts[number] = (epoch, micro_batch, checkpoint.rng_state())
        for buffer, before in zip(self.module.buffers(), self._buffers_before, strict=True):
            before.copy_(torch.where(self.valid.bool(), buffer, before))

    @contextlib.contextmanager
    def before_step_hooks(self, number: int) -> Iterator[None]:
        """Around the method's ``before_step`` of step ``number``: teachers hold still when that step's
        move was already made on these weights (a resumed or rewound run)."""
        hold = self.before_step_done == number
        for teacher in self.teachers:
            teacher.hold = hold
        try:
            yield
        finally:
            for teacher in self.teachers:
                teacher.hold = False
            self.before_step_done = None

    def mark_loss(self, loss: torch.Tensor) -> None:
        self._loss_bad |= ~torch.isfinite(loss.detach())

    def mark_gradients(self, number: int, grads: Iterable[torch.Tensor | None], scaler_on: bool) -> None:
        """After the last backward of step ``number``: a loss or gradient that is not finite marks it bad.
        An inf gradient from a finite loss would spoil the update (fp16's loss scaler skips those itself)."""
        bad = self._loss_bad
        if not scaler_on:
            bad = bad | ~all_finite([g for g in grads if g is not None])
        if self.env.enabled and self.host_sync == "log":
            bad = all_reduce_max(bad.to(torch.int32), self.env).bool()  # queued on the device, no wait
        self.first_bad_loss.copy_(torch.where(bad & (self.first_bad_loss < 0), number, self.first_bad_loss))
        self.valid.copy_((self.first_bad_loss < 0).float())
        self._loss_bad.zero_()

    def skip_if_bad(self, optimizer: torch.optim.Optimizer) -> None:
        """With ``log``, the fused kernel skips the update (and its step count) of a marked step."""
        if self.host_sync == "log":
            optimizer.found_inf = 1.0 - self.valid

    def mark_update(self, number: int, trained: list[torch.Tensor]) -> None:
        """After the update of step ``number``: a finite but huge gradient can still overflow it (AdamW's
        second moment first: the weights then stop moving rather than turn NaN)."""
        spoiled = ~all_finite(trained) & (self.first_bad_state < 0)
        self.first_bad_state.copy_(torch.where(spoiled, number, self.first_bad_state))

    def marks(self) -> torch.Tensor:
        """The device's marks as one tensor [first bad loss step, first spoiled update step] (-1: none)."""
        return torch.stack([self.first_bad_loss, self.first_bad_state])

    def rewind(self, bad_step: int) -> tuple[int, int]:
        """Back to the start of ``bad_step``, which was never applied: its buffers and random state; returns
        its (epoch, micro-batch)."""
        epoch, micro_batch, rng = self._starts[bad_step]
        self.first_bad_loss.fill_(-1)
        self.valid.fill_(1.0)
        for buffer, before in zip(self.module.buffers(), self._buffers_before, strict=True):
            buffer.copy_(before)
        checkpoint.set_rng_state(rng)
        self.before_step_done = bad_step
        return epoch, micro_batch

    def forget_before(self, step: int) -> None:
        """Steps up to ``step`` were read sound: no rewind will go back to them."""
        self._starts = {k: v for k, v in self._starts.items() if k > step}
