"""What the engine trains, and what every method shares: a step returns a loss and metrics; hooks run
before and after each optimizer step; a method declares its parameter groups (and so its optimizers) and
may add a device-side batch transform; an EMA teacher is one reusable piece (:class:`MomentumMethod`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import torch
from timm.optim import param_groups_weight_decay
from torch import nn

from mimkit.methods.ema import EMATeacher
from mimkit.models.input_spec import InputSpec
from mimkit.models.vit import EncoderSpec, ViTEncoder


class StepOutput(NamedTuple):
    loss: torch.Tensor  # scalar, what backward() takes
    metrics: dict[str, torch.Tensor]  # detached scalars, logged every log step (no host sync per step)


class BatchTransform(nn.Module):
    """A device-side stage between the loader and the method, for augmentations that are cheaper batched
    on the GPU (uint8 crops and colour, CutMix/Mixup, token augmentations). It reads ``batch["seed"]``,
    each sample's seed from (run seed, epoch, index), so it is reproducible and resumes exactly on any
    number of processes; the seeds stay on the host (seeding a generator from them then needs no sync
    with the device; ``per_sample_uniform(seeds.to(device), n)`` draws on the device). The engine holds
    it apart from the method: its modules are frozen and stay out of the optimizer, the EMA teacher and
    the checkpoint."""

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class Trainable(nn.Module):
    """What the engine calls on what it trains (a pre-training method, a linear probe, a fine-tune); the
    defaults are no-ops, so the engine never probes for optional hooks."""

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        raise NotImplementedError

    def before_step(self, progress: float) -> None:
        """Called before the first micro-batch of every optimizer step with the fraction of training done
        (data iterations / total); schedules that the loss reads, and teachers that move before the
        step (Latent MIM), are set here."""

    def after_step(self, progress: float) -> None:
        """Called after every optimizer step with the fraction of training done; EMA teachers move here
        (an :class:`EMATeacher` stands still after a step the engine found not finite on its own: the
        engine's guard holds its validity)."""

    def no_weight_decay_names(self, decay_tokens: bool) -> set[str]:
        """Full names of parameters excluded from weight decay beyond 1-D tensors and biases."""
        if decay_tokens:
            return set()
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in {"cls_token", "mask_token"}}

    def param_groups(self, weight_decay: float, decay_tokens: bool) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: timm's rule (no decay for 1-D tensors and biases) plus
        :meth:`no_weight_decay_names`; frozen tensors are left out. A group may carry ``lr_scale`` (layer
        decay) and ``optimizer``: groups naming another optimizer than "main" get one of their own (a
        discriminator's), stepped with the main one."""
        names = sorted(self.no_weight_decay_names(decay_tokens))
        return param_groups_weight_decay(self, weight_decay, no_weight_decay_list=names)

    def batch_transform(self) -> BatchTransform | None:
        """A new device-side stage for training batches, or None; not registered as a submodule."""
        return None

    def use_data(self, source: Any) -> None:
        """Called by a run with its training source before the first batch transform is made: what a
        device-side stage needs from the data (a token dataset's codebook) is taken here."""


class Method(Trainable):
    """A ViT encoder + a way to pick visible tokens + a target + a loss."""

    name: ClassVar[str]
    Config: ClassVar[type]
    probe_pool: ClassVar[str] = "cls"  # the feature evaluations read by default (methods.default_pool)
    encoder: ViTEncoder

    def train_transform(self, data: Any) -> Callable[[torch.Tensor], dict[str, torch.Tensor]]:
        """The training views: from a uint8 [C, H, W] image to the batch entries forward() reads."""
        raise NotImplementedError

    def encoders(self) -> dict[str, ViTEncoder]:
        """The encoders a user may evaluate or export, by name; methods with a teacher add 'teacher'."""
        return {"student": self.encoder}

    def input_spec(self) -> InputSpec:
        """What the method trains on (its encoder's input)."""
        return self.encoder.input_spec

    def export_encoder(self, weights: str = "student") -> ViTEncoder:
        choices = self.encoders()
        if not choices:
            raise ValueError(
                f"method '{self.name}' has no encoder to evaluate, analyse or export (a tokenizer is used "
                "through `mimkit tokenize` and `mimkit tokenizer decode`)"
            )
        if weights not in choices:
            raise ValueError(f"method '{self.name}' has no '{weights}' weights; it has: {', '.join(choices)}")
        return choices[weights]

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: Any, data_cfg: Any = None) -> Method:
        return cls(encoder_from_config(model_cfg, data_cfg), method_cfg)


class MomentumMethod(Method):
    """A method with an EMA teacher of some of its modules (:meth:`online`): LUT's context encoder, Latent
    MIM's target encoder. The teacher follows a cosine momentum schedule, moves after each optimizer step
    (or before its first micro-batch: ``teacher_moves = "before"``, as Latent MIM's reference), and its
    encoder is offered for evaluation and export as 'teacher'."""

    teacher_moves: ClassVar[str] = "after"
    teacher: EMATeacher

    def online(self) -> nn.ModuleDict:
        """The modules the teacher copies and follows (a view; not registered twice)."""
        raise NotImplementedError

    def init_teacher(self, base_momentum: float, *, include_buffers: bool = True) -> None:
        self.teacher = EMATeacher(self.online(), base_momentum, include_buffers=include_buffers)

    def before_step(self, progress: float) -> None:
        if self.teacher_moves == "before":
            self.teacher.update(self.online(), progress)

    def after_step(self, progress: float) -> None:
        if self.teacher_moves == "after":
            self.teacher.update(self.online(), progress)

    def encoders(self) -> dict[str, ViTEncoder]:
        return {"student": self.encoder, "teacher": self.teacher.module.encoder}


def validate_decoder(cfg: Any) -> None:
    """The ``method.decoder_*`` settings MAE, Latent MIM and MTM share, beyond their declared ranges
    (depth 0 is a valid decoder: the input and prediction layers alone): the width carries a sin-cos
    position table, hence the multiple of 4, and must split into the heads."""
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


def encoder_from_config(model_cfg: Any, data_cfg: Any = None, **extra: Any) -> ViTEncoder:
    """The encoder of ``model_cfg``, stating the input of ``data_cfg`` (its normalisation and evaluation
    crop; None: the stem's default) so that checkpoints and evaluations read it from the encoder rather
    than from the config; ``extra``: what a method fixes itself (Latent MIM's positions)."""
    if model_cfg.stem == "token_ids" and model_cfg.vocab_size is None:
        raise ValueError(
            "'model.vocab_size' is not set: a token-id encoder embeds a fixed number of ids (runs take "
            "it from the training token dataset)"
        )
    encoder = ViTEncoder(EncoderSpec.from_config(model_cfg, **extra))
    # set after building, so that a bad geometry is named by build_encoder; token inputs have no
    # normalisation and are centre-cropped to the encoder's grid (the stem's own spec)
    if data_cfg is not None and model_cfg.stem == "pixels":
        encoder.input_spec = InputSpec.from_config(model_cfg, data_cfg)
    return encoder
