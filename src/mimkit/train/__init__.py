"""The training engine and the pre-training entry point."""

from mimkit.train.distributed import DistEnv, init_distributed
from mimkit.train.engine import NonFiniteLoss, Trainer
from mimkit.train.optim import build_optimizer, effective_batch, lr_at, resolve_lr


def __getattr__(name: str):
    # imported on use: pretrain needs the evaluations, which need this package's distributed helpers
    if name == "pretrain":
        from mimkit.train.pretrain import pretrain

        return pretrain
    raise AttributeError(f"module 'mimkit.train' has no attribute {name!r}")


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
