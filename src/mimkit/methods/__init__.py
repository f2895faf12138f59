"""The methods, by name. A method is one file that says what is different about it."""

from __future__ import annotations

from typing import Any

from mimkit.methods.base import Method, StepOutput, encoder_from_config
from mimkit.methods.ema import EMATeacher, cosine_momentum
from mimkit.methods.latent_mim import LatentMIM, LatentMIMConfig
from mimkit.methods.lut import LUT, LUTConfig
from mimkit.methods.mae import MAE, MAEConfig, mae_loss

METHODS: dict[str, type[Method]] = {MAE.name: MAE, LUT.name: LUT, LatentMIM.name: LatentMIM}


def build_method(cfg: Any) -> Method:
    """The method named by ``cfg.method.name``, with its encoder built from ``cfg.model``."""
    if cfg.method.name not in METHODS:
        raise ValueError(
            f"'{cfg.method.name}' is an evaluation, not a pre-training method: run `mimkit {cfg.method.name}`"
        )
    return METHODS[cfg.method.name].build(cfg.model, cfg.method)


__all__ = [
    "LUT",
    "MAE",
    "METHODS",
    "EMATeacher",
    "LUTConfig",
    "LatentMIM",
    "LatentMIMConfig",
    "MAEConfig",
    "Method",
    "StepOutput",
    "build_method",
    "cosine_momentum",
    "encoder_from_config",
    "mae_loss",
]
