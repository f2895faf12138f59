"""LUT (Kim et al., ECCV 2024): MAE plus a "broader context" loss on the unmasked tokens. The student's
mean of the visible tokens of one view, through a projector and a predictor, must match (cosine) an EMA
teacher's projection of the mean of all tokens of the other, unmasked view.

What differs from MAE: two views (weak and strong), disjoint visible positions, the heads, the teacher
and the cross-view loss. Departure from the reference, for speed only: the two student views go through
the encoder in one batched call and the two teacher views in another (the reference makes four calls);
LayerNorm and attention act per sample, so the result is the same. The heads still run once per view, so
BatchNorm keeps per-view batch statistics as in the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.configs import checked
from mimkit.data.transforms import MaskNoise, Views, simple_crop, strong_colour, to_normalized
from mimkit.masking import disjoint_pair
from mimkit.methods.base import MomentumMethod, StepOutput
from mimkit.methods.mae import MAE, MAEConfig, mae_loss, mask_noise
from mimkit.models.heads import mlp_head
from mimkit.models.patches import patchify
from mimkit.models.vit import ViTEncoder, mae_init_


@dataclass
class LUTConfig(MAEConfig):
    name: str = "lut"
    w_mae: float = checked(1.0, low=0)
    w_bc: float = checked(
        0.25, low=0
    )  # the documented value (the reference parser's --w_b 0.1 is never read)
    # m0 of the cosine schedule to 1 (the parser's 0.99996 is not the recipe)
    ema_momentum: float = checked(0.996, low=0, high=1)
    head_depth: int = checked(2, low=0)
    pred_depth: int = checked(2, low=0)
    head_hidden_dim: int = checked(4096, low=1)
    head_norm: str = checked("bn", choices=("bn", "ln", "none"))
    head_act: str = checked("relu", choices=("relu", "gelu"))
    crop_padding: int = checked(4, low=0)
    # None: the reference's PIL radius range (0.1, 2.0) at 224 px, its upper end scaled to the image size
    blur_sigma: tuple[float, float] | None = None

    def validate(self) -> None:
        super().validate()
        if self.min_crop_scale != MAEConfig.min_crop_scale:
            raise ValueError(
                "'method.min_crop_scale' is MAE's RandomResizedCrop; LUT's views use a simple random "
                "crop (method.crop_padding) and would ignore it"
            )
        if self.mask_ratio < 0.5:
            raise ValueError(
                f"'method.mask_ratio' must be >= 0.5 for LUT's two disjoint views; got {self.mask_ratio}"
            )


def cosine_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """2 - 2 cos(a, b) per sample, in fp32."""
    return 2 - 2 * (F.normalize(a.float(), dim=-1) * F.normalize(b.float(), dim=-1)).sum(dim=-1)


class LUT(MomentumMethod, MAE):
    name = "lut"
    Config = LUTConfig

    def __init__(self, encoder: ViTEncoder, cfg: LUTConfig) -> None:
        super().__init__(encoder, cfg)
        dim = encoder.embed_dim
        heads = dict(norm=cfg.head_norm, act=cfg.head_act)
        self.head = mlp_head(cfg.head_depth, dim, cfg.head_hidden_dim, dim, **heads)
        self.predictor = mlp_head(cfg.pred_depth, dim, cfg.head_hidden_dim, dim, **heads)
        mae_init_(self.head)
        mae_init_(self.predictor)
        self.init_teacher(cfg.ema_momentum)

    def online(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {"encoder": self.encoder, "decoder": self.decoder, "head": self.head, "predictor": self.predictor}
        )

    def train_transform(self, data: Any) -> Views:
        """A weak and a strong view, each from its own simple random crop, and one mask noise per sample
        that both views' disjoint positions come from."""
        size, c = self.encoder.patch_embed.img_size[0], self.cfg
        blur = c.blur_sigma or (0.1, max(0.1, 2.0 * size / 224))
        normalize = to_normalized(data)
        return Views(
            view1=T.Compose([simple_crop(size, c.crop_padding), *normalize]),
            view2=T.Compose([simple_crop(size, c.crop_padding), strong_colour(blur), *normalize]),
            noise=MaskNoise(self.encoder.num_patches),
        )

    def forward(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> StepOutput:
        x1, x2 = batch["view1"], batch["view2"]
        n = x1.shape[0]
        noise = mask_noise(batch, noise)
        m1, ids2 = disjoint_pair(
            n, self.encoder.num_patches, self.cfg.mask_ratio, noise=noise, device=x1.device
        )
        z1, z2 = self.encoder.forward_visible(torch.cat([x1, x2]), torch.cat([m1.ids_keep, ids2])).split(n)
        loss_mim = mae_loss(
            self.decoder(z1, m1.ids_restore),
            patchify(x1, self.encoder.patch_size),
            m1.mask,
            self.cfg.norm_pix_loss,
        )
        q1 = self.predictor(self.head(z1[:, 1:].mean(dim=1)))
        q2 = self.predictor(self.head(z2[:, 1:].mean(dim=1)))
        with torch.no_grad():
            teacher = self.teacher.module
            full = teacher.encoder.forward_features(torch.cat([x1, x2]))
            k1, k2 = teacher.head(full[:, 1:].mean(dim=1)).split(n)
        loss_bc = (cosine_distance(q2, k1).mean() + cosine_distance(q1, k2).mean()) / 2
        loss = self.cfg.w_mae * loss_mim + self.cfg.w_bc * loss_bc
        metrics = {
            "loss_mim": loss_mim.detach(),
            "loss_bc": loss_bc.detach(),
            "ema_momentum": self.teacher.momentum.clone(),
        }
        return StepOutput(loss, metrics)
