"""What every method shares: a step returns a loss and metrics; an EMA teacher, if any, moves after the
optimizer step; the encoder is what evaluation and export use."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from mimkit.models.vit import ViTEncoder, build_encoder


class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, what backward() takes
    metrics: dict[str, torch.Tensor]  # detached scalars, logged every log step (no host sync per step)


class Method(nn.Module):
    """A ViT encoder + a way to pick visible tokens + a target + a loss."""

    name: ClassVar[str]
    Config: ClassVar[type]
    probe_pool: ClassVar[str] = "cls"  # the feature evaluations read by default (methods.default_pool)
    encoder: ViTEncoder

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def before_step(self, progress: float) -> None:
        """Called before the first micro-batch of every optimizer step with the fraction of training done
        (data iterations / total); schedules that the loss reads, and teachers that move before the
        step (Latent MIM), are set here."""

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with the fraction of training done; EMA teachers move here."""

    def train_transform(self, data: Any) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """The training views: from a uint8 [C, H, W] image to the batch entries forward() reads."""
        raise NotImplementedError

    def encoders(self) -> dict[str, ViTEncoder]:
        """The encoders a user may evaluate or export, by name; methods with a teacher add 'teacher'."""
        return {"student": self.encoder}

    def export_encoder(self, weights: str = "student") -> ViTEncoder:
        choices = self.encoders()
        if weights not in choices:
            raise ValueError(f"method '{self.name}' has no '{weights}' weights; it has: {', '.join(choices)}")
        return choices[weights]

    def no_weight_decay_names(self, decay_tokens: bool) -> set[str]:
        """Full names of parameters excluded from weight decay beyond 1-D tensors and biases."""
        if decay_tokens:
            return set()
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in {"cls_token", "mask_token"}}

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: Any) -> Method:
        return cls(encoder_from_config(model_cfg), method_cfg)


def validate_decoder(cfg: Any) -> None:
    """The ``method.decoder_*`` settings MAE and Latent MIM share. Depth 0 is a valid decoder (the input
    and prediction layers alone); the width carries a sin-cos position table, hence the multiple of 4."""
    if cfg.decoder_depth < 0:
        raise ValueError(f"'method.decoder_depth' must be >= 0; got {cfg.decoder_depth}")
    if cfg.decoder_num_heads < 1:
        raise ValueError(f"'method.decoder_num_heads' must be at least 1; got {cfg.decoder_num_heads}")
    if cfg.decoder_embed_dim < 1 or cfg.decoder_embed_dim % 4:
        raise ValueError(
            f"'method.decoder_embed_dim' must be a positive multiple of 4 (the sin-cos position table); "
            f"got {cfg.decoder_embed_dim}"
        )
    if cfg.decoder_depth > 0 and cfg.decoder_embed_dim % cfg.decoder_num_heads:
        raise ValueError(
            f"'method.decoder_embed_dim' ({cfg.decoder_embed_dim}) must be divisible by "
            f"'method.decoder_num_heads' ({cfg.decoder_num_heads})"
        )


def encoder_from_config(model_cfg: Any, **extra: Any) -> ViTEncoder:
    """The encoder of ``model_cfg``; ``extra``: what a method fixes itself (Latent MIM's positions)."""
    return build_encoder(
        model_cfg.arch,
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size,
        embed_dim=model_cfg.embed_dim,
        depth=model_cfg.depth,
        num_heads=model_cfg.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        drop_path_rate=model_cfg.drop_path,
        **extra,
    )
