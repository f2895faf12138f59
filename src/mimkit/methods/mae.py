"""MAE (He et al., 2021): reconstruct the pixels of the removed patches from the visible ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mimkit.configs import checked
from mimkit.data.transforms import MaskNoise, Views, mae_crop
from mimkit.masking import random_masking
from mimkit.methods.base import Method, StepOutput, validate_decoder
from mimkit.models.decoders import MAEDecoder
from mimkit.models.patches import patchify
from mimkit.models.vit import ViTEncoder


@dataclass
class MAEConfig:
    name: str = "mae"
    mask_ratio: float = checked(0.75, low=0, high=1, high_open=True)
    norm_pix_loss: bool = True
    decoder_embed_dim: int = 512
    decoder_depth: int = checked(8, low=0)
    decoder_num_heads: int = checked(16, low=1)
    min_crop_scale: float = checked(
        0.2, low=0, high=1, low_open=True
    )  # RandomResizedCrop(scale=(min_crop_scale, 1))

    def validate(self) -> None:
        validate_decoder(self)


def mae_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Mean squared error over removed patches only; with ``norm_pix`` each target patch is standardised
    (unbiased variance, eps 1e-6 inside the root), as in the reference. Computed in fp32."""
    pred, target = pred.float(), target.float()
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6) ** 0.5
    per_patch = (pred - target).pow(2).mean(dim=-1)
    return (per_patch * mask).sum() / mask.sum()


def mask_noise(batch: dict[str, torch.Tensor], noise: torch.Tensor | None) -> torch.Tensor | None:
    """The mask noise of a step: the caller's, else the loader's per-sample noise (``batch["noise"]``, a
    function of (seed, epoch, index), so masks resume exactly), else None (drawn on the device)."""
    return noise if noise is not None else batch.get("noise")


class MAE(Method):
    name = "mae"
    Config = MAEConfig

    def __init__(self, encoder: ViTEncoder, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        p = encoder.patch_size
        self.decoder = MAEDecoder(
            encoder_dim=encoder.embed_dim,
            grid_size=encoder.grid_size,
            out_dim=p * p * encoder.patch_embed.proj.in_channels,
            embed_dim=cfg.decoder_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
        )

    def train_transform(self, data: Any) -> Views:
        """{"image", "noise"}: MAE's crop, and the sample's mask noise (drawn after the image's draws)."""
        return Views(
            image=mae_crop(self.encoder.patch_embed.img_size[0], self.cfg.min_crop_scale, data),
            noise=MaskNoise(self.encoder.num_patches),
        )

    def reconstruct(self, images: torch.Tensor, noise: torch.Tensor | None = None):
        """Predictions [N, L, p*p*C] and the mask for a batch of normalised images."""
        m = random_masking(
            images.shape[0], self.encoder.num_patches, self.cfg.mask_ratio, noise=noise, device=images.device
        )
        latent = self.encoder.forward_visible(images, m.ids_keep)
        return self.decoder(latent, m.ids_restore), m

    def forward(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> StepOutput:
        """``noise`` [N, L] fixes the mask; else the loader's ``batch["noise"]`` does; else it is drawn."""
        images = batch["image"]
        pred, m = self.reconstruct(images, mask_noise(batch, noise))
        loss = mae_loss(pred, patchify(images, self.encoder.patch_size), m.mask, self.cfg.norm_pix_loss)
        return StepOutput(loss, {"loss_mim": loss.detach()})
