"""The training engine and the pre-training entry point."""

from mimkit.train.distributed import DistEnv, init_distributed
from mimkit.train.engine import NonFiniteLoss, Trainer
from mimkit.train.optim import build_optimizer, effective_batch, lr_at, resolve_lr
from mimkit.train.pretrain import pretrain

__all__ = [
    "DistEnv",
    "NonFiniteLoss",
    "Trainer",
    "build_optimizer",
    "effective_batch",
    "init_distributed",
    "lr_at",
    "pretrain",
    "resolve_lr",
]
