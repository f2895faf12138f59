"""The VQ image tokenizer as something the engine trains (``mimkit tokenizer train``): reconstruct the
image through the quantised codes. Its architecture is the ``model`` section (image size, patch, width,
depth, heads; the decoder mirrors the encoder), the codebook and loss are this section.

The loss is L1 + L2 on pixels plus the quantiser's commitment term (its codebook follows the encoder by
EMA). ViT-VQGAN adds a perceptual (LPIPS) and an adversarial term; LPIPS needs pre-trained VGG weights,
which cannot be downloaded here, and a GAN term at this scale mostly adds variance and tuning, so both are
left out: the small tokenizers this trains are judged by PSNR and codebook use, not by FID.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2 as T

from mimkit.configs import ARCHS, checked
from mimkit.data.transforms import BICUBIC, Views, to_normalized
from mimkit.methods.base import Method, StepOutput
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, psnr


@dataclass
class TokenizerConfig:
    name: str = "vq_tokenizer"
    codebook_size: int = checked(8192, low=1)
    code_dim: int = checked(32, low=1)  # the factorised code space the ids index (SeiT's 32)
    commitment_weight: float = checked(0.25, low=0)
    codebook_decay: float = checked(0.8, low=0, high=1, low_open=True, high_open=True)  # EMA of the codebook
    kmeans_init: bool = True  # the codebook starts as k-means centres of the first batch's features
    # codes used fewer times (EMA count) are restarted from the batch
    dead_code_threshold: float = checked(2.0, low=0)
    l1_weight: float = checked(1.0, low=0)
    l2_weight: float = checked(1.0, low=0)
    # RandomResizedCrop(scale=(min_crop_scale, 1)); 1: the whole image
    min_crop_scale: float = checked(0.8, low=0, high=1, low_open=True)

    def validate(self) -> None:
        if self.l1_weight == 0 and self.l2_weight == 0:
            raise ValueError("'method.l1_weight' and 'method.l2_weight' are both 0: nothing to reconstruct")


def tokenizer_shape(model_cfg: Any, cfg: TokenizerConfig) -> TokenizerShape:
    """The tokenizer geometry of a config: the model section gives the ViT, this section the codes."""
    arch = ARCHS.get(model_cfg.arch)
    if arch is None:
        raise ValueError(f"unknown arch '{model_cfg.arch}' (known: {', '.join(ARCHS)})")
    return TokenizerShape(
        img_size=model_cfg.img_size,
        patch_size=model_cfg.patch_size or arch.patch_size,
        embed_dim=model_cfg.embed_dim or arch.embed_dim,
        depth=model_cfg.depth or arch.depth,
        num_heads=model_cfg.num_heads or arch.num_heads,
        mlp_ratio=model_cfg.mlp_ratio,
        codebook_size=cfg.codebook_size,
        code_dim=cfg.code_dim,
    )


class TokenizerMethod(Method):
    """Trains a :class:`VQTokenizer`; it has no encoder to evaluate by k-NN (``encoders()`` is empty)."""

    name = "vq_tokenizer"
    Config = TokenizerConfig

    def __init__(self, tokenizer: VQTokenizer, cfg: TokenizerConfig, spec: InputSpec) -> None:
        super().__init__()
        self.cfg, self.tokenizer, self.spec = cfg, tokenizer, spec
        # the pixel range in the normalised space, for PSNR on the [0, 1] scale
        self.register_buffer("mean", torch.tensor(spec.mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std).view(1, -1, 1, 1), persistent=False)

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: Any, data_cfg: Any = None) -> TokenizerMethod:
        shape = tokenizer_shape(model_cfg, method_cfg)
        tokenizer = VQTokenizer(
            shape,
            commitment_weight=method_cfg.commitment_weight,
            codebook_decay=method_cfg.codebook_decay,
            kmeans_init=method_cfg.kmeans_init,
            dead_code_threshold=method_cfg.dead_code_threshold,
        )
        mean = tuple(data_cfg.mean) if data_cfg is not None else (0.0,) * shape.channels
        std = tuple(data_cfg.std) if data_cfg is not None else (1.0,) * shape.channels
        spec = InputSpec(
            kind="pixels",
            channels=shape.channels,
            mean=mean,
            std=std,
            img_size=shape.img_size,
            crop_pct=1.0,
            patch_size=shape.patch_size,
        )
        return cls(tokenizer, method_cfg, spec)

    def encoders(self) -> dict:
        return {}

    def input_spec(self) -> InputSpec:
        return self.spec

    def train_transform(self, data: Any) -> Views:
        size = self.tokenizer.shape.img_size
        return Views(
            image=T.Compose(
                [
                    T.RandomResizedCrop(
                        size, scale=(self.cfg.min_crop_scale, 1.0), interpolation=BICUBIC, antialias=True
                    ),
                    T.RandomHorizontalFlip(),
                    *to_normalized(data),
                ]
            )
        )

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images back to the [0, 1] pixel scale."""
        return images.float() * self.std + self.mean

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        images = batch["image"]
        recon, q = self.tokenizer(images)
        diff = recon.float() - images.float()
        l1, l2 = diff.abs().mean(), diff.pow(2).mean()
        loss = self.cfg.l1_weight * l1 + self.cfg.l2_weight * l2 + q.loss.float()
        with torch.no_grad():
            counts = torch.bincount(q.ids.flatten(), minlength=self.tokenizer.shape.codebook_size)
            p = counts.float() / counts.sum()
            batch_perplexity = torch.exp(-(p * p.clamp_min(1e-12).log()).sum())
            quality = psnr(self.to_unit(recon.detach()), self.to_unit(images)).mean()
        metrics = {
            "loss_l1": l1.detach(),
            "loss_l2": l2.detach(),
            "loss_commit": q.loss.detach().float(),
            "psnr": quality,
            "codes_used": (counts > 0).sum().float(),
            "perplexity": batch_perplexity,
        }
        return StepOutput(loss, metrics)


__all__ = ["TokenizerConfig", "TokenizerMethod", "tokenizer_shape"]
