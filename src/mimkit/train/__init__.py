"""The training engine: one loop for every method, its optimizer, schedule and logs."""

from mimkit.train.engine import NonFiniteLoss, RunInterrupted, Trainer
from mimkit.train.optim import build_optimizers, effective_batch, lr_at, resolve_lr

__all__ = [
    "NonFiniteLoss",
    "RunInterrupted",
    "Trainer",
    "build_optimizers",
    "effective_batch",
    "lr_at",
    "resolve_lr",
]
