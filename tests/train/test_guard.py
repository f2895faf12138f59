"""The non-finite guard on a toy model, in milliseconds: what it marks on the device, what it rewinds, and
the validity that EMA teachers read; the whole-run cases are in test_engine.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mimkit.distributed import init_distributed
from mimkit.methods.ema import EMATeacher
from mimkit.train.guard import NonFiniteGuard, all_finite


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
        self.teacher = EMATeacher(self.net, 0.5, cosine=False)

    def loss(self, scale: float = 1.0) -> torch.Tensor:
        return self.net(torch.randn(8, 3)).square().mean() * scale


def guarded(host_sync: str) -> tuple[Toy, NonFiniteGuard]:
    torch.manual_seed(0)
    toy = Toy()
    return toy, NonFiniteGuard(toy, init_distributed("cpu"), host_sync)


def test_all_finite_is_one_device_flag() -> None:
    assert bool(all_finite([torch.ones(3), torch.zeros(2, 2)])) and bool(all_finite([]))
    assert not bool(all_finite([torch.ones(3), torch.tensor([1.0, float("inf")])]))
    assert not bool(all_finite([torch.tensor([float("nan")])]))
    assert bool(all_finite([torch.tensor([3e38, -3e38])]))  # large but finite: no overflow to inf


@pytest.mark.parametrize("host_sync", ["step", "log"])
def test_a_nan_loss_marks_its_step_and_the_ones_after_stay_marked_at_it(host_sync: str) -> None:
    toy, guard = guarded(host_sync)
    for number, scale in ((1, 1.0), (2, float("nan")), (3, 1.0)):
        guard.start_step(number, epoch=0, micro_batch=number - 1)
        loss = toy.loss(scale)
        loss.backward()
        guard.mark_loss(loss)
        guard.mark_gradients(number, (p.grad for p in toy.parameters()), scaler_on=False)
        toy.zero_grad()
    assert guard.marks().tolist() == [2, -1] and guard.valid.item() == 0.0


def test_an_inf_gradient_from_a_finite_loss_marks_the_step_unless_a_scaler_handles_it() -> None:
    toy, guard = guarded("log")
    guard.start_step(1, 0, 0)
    guard.mark_loss(torch.tensor(1.0))
    grads = [torch.ones(2), torch.tensor([float("inf")])]
    guard.mark_gradients(1, grads, scaler_on=True)  # fp16's scaler skips that step itself
    assert guard.marks().tolist() == [-1, -1]
    guard.mark_gradients(1, grads, scaler_on=False)
    assert guard.marks().tolist() == [1, -1]
    optimizer = torch.optim.AdamW(toy.parameters())
    guard.skip_if_bad(optimizer)
    assert optimizer.found_inf.item() == 1.0  # the fused kernel skips the update on the device


def test_an_update_that_overflows_is_marked_by_its_step() -> None:
    toy, guard = guarded("step")
    guard.mark_update(4, [p.detach() for p in toy.parameters()])
    assert guard.marks().tolist() == [-1, -1]
    with torch.no_grad():
        toy.net[0].weight[0, 0] = float("inf")
    guard.mark_update(5, [p.detach() for p in toy.parameters()])
    guard.mark_update(6, [p.detach() for p in toy.parameters()])
    assert guard.marks().tolist() == [-1, 5]


def test_rewind_restores_buffers_and_random_state_of_the_bad_steps_start() -> None:
    toy, guard = guarded("log")
    guard.start_step(1, epoch=2, micro_batch=6)
    toy.loss()  # moves the BatchNorm statistics
    guard.start_step(2, epoch=2, micro_batch=7)
    stats = toy.net[1].running_mean.clone()
    expected_draw = torch.rand(3)  # the random state at step 2's start, drawn once here...
    toy.loss(float("nan"))  # ...and moved by the bad step's forward, with its statistics
    guard.mark_loss(torch.tensor(float("nan")))
    guard.mark_gradients(2, [], scaler_on=False)
    assert guard.rewind(2) == (2, 7)
    assert torch.equal(toy.net[1].running_mean, stats)
    assert guard.valid.item() == 1.0 and guard.marks().tolist() == [-1, -1] and guard.before_step_done == 2
    # the generator is back where step 2 began: it draws what was drawn there first
    assert torch.equal(torch.rand(3), expected_draw)
    guard.forget_before(2)
    with pytest.raises(KeyError):
        guard.rewind(1)


def test_the_teacher_reads_the_guards_validity_under_log_and_holds_for_a_step_already_moved() -> None:
    toy, guard = guarded("log")
    assert toy.teacher.valid is guard.valid
    before = [p.clone() for p in toy.teacher.module.parameters()]
    with torch.no_grad():
        for p in toy.net.parameters():
            p.add_(1.0)
    guard.valid.fill_(0.0)  # a marked step not yet read by the host: the teacher stands still
    toy.teacher.update(toy.net)
    assert all(torch.equal(a, b) for a, b in zip(before, toy.teacher.module.parameters(), strict=True))
    guard.valid.fill_(1.0)
    guard.before_step_done = 3
    with guard.before_step_hooks(3):  # its move was made on these weights before the rewind
        toy.teacher.update(toy.net)
    assert all(torch.equal(a, b) for a, b in zip(before, toy.teacher.module.parameters(), strict=True))
    assert guard.before_step_done is None and not toy.teacher.hold
    toy.teacher.update(toy.net)
    assert all(not torch.equal(a, b) for a, b in zip(before, toy.teacher.module.parameters(), strict=True))
    _, plain = guarded("step")
    assert all(t.valid is None for t in plain.teachers)  # no bad step survives to a teacher there
