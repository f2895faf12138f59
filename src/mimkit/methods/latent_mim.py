"""Latent MIM (Wei et al., ECCV 2024): predict the latents of masked patches, not their pixels. An online
encoder sees a few visible patches cut with random gaps; an EMA target encoder (with its own copy of the
projector, no gradient) encodes only the masked patches; a cross-attention decoder predicts each target
latent from the visible ones; a per-image patch InfoNCE makes every prediction pick out its own target
among the other targets of its image.

What differs from MAE: the views (RandomResizedCrop to grid x (patch + gap) px, patches cut with gaps), a
visible/target split instead of a pixel mask, the projector on both encoders, the target encoder, the
cross-attention decoder, the loss and the average-similarity regulariser. Everything else (the encoder,
the engine, the lr schedule with ``optim.min_lr_frac`` and ``optim.warmup_from_min_lr``) is shared.

Departures from the reference, none of which changes the computation beyond rounding: the loss, the
similarities and the visual-cue weights are computed in fp32 (the reference: fp16 autocast), attention
uses PyTorch's fused kernels (their softmax accumulates in fp32), and the average pairwise similarity is
computed as |sum of unit vectors|^2 / N^2 instead of from the N x N matrix (equal, and cheaper).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.configs import checked, num_patches
from mimkit.data.transforms import BICUBIC, PATCH_ROWS, MaskNoise, Views, to_normalized
from mimkit.masking import visible_target_split
from mimkit.methods.base import MomentumMethod, StepOutput, encoder_from_config, validate_decoder
from mimkit.models.decoders import CrossDecoder
from mimkit.models.heads import mlp_head
from mimkit.models.patches import gap_patchify
from mimkit.models.vit import ViTEncoder, mae_init_

LOSSES = ("infonce_patches", "norm_l2")
# the reference's 20 visible patches of 196, for other grids (None: round(L * 20 / 196))
REFERENCE_VISIBLE_FRACTION = 20 / 196


@dataclass
class LatentMIMConfig:
    name: str = "latent_mim"
    num_vis: int | None = None  # visible patches per image; None: ~10.2% of them (20 of 196)
    # px added to each patch's cell, the patch cut at a random offset in [0, gap) inside it; None:
    # patch_size // 4 (4 for 16-px patches; 1 for 4-px ones, where the offset is always 0: no jitter)
    patch_gap: int | None = checked(None, low=0, null=" for patch_size // 4")
    min_crop_scale: float = checked(
        0.2, low=0, high=1, low_open=True
    )  # RandomResizedCrop(scale=(min_crop_scale, 1))
    mask_target: bool = True  # the target encoder sees only the masked patches
    loss: str = checked("infonce_patches", choices=LOSSES)  # norm_l2: the direct-regression ablation
    tau: float = checked(0.2, low=0, low_open=True)
    # the released run's 0.1 (the reference yaml's default is 0, i.e. off)
    avg_sim_coeff: float = checked(0.1, low=0)
    sim_init: float = 0.75  # the similarity target decays along a cosine from sim_init to sim_end
    sim_end: float = 0.25
    ema_momentum: float = checked(0.99, low=0, high=1)  # m0 of the cosine schedule to 1
    proj_depth: int = checked(3, low=1, note="the projector is always on")
    # None: the reference's 4096 for encoders 384 wide or more (ViT-S/B/L/H), 8 x width below (a 4096-wide
    # projector on every token would cost more than a narrow encoder itself)
    proj_hidden_dim: int | None = checked(None, low=1, null=" for the reference's")
    decoder_embed_dim: int = 512
    decoder_depth: int = checked(3, low=0)
    decoder_num_heads: int = checked(16, low=1)
    visual_cue: bool = True  # the reference's avg_vis_mask_token

    def validate(self) -> None:
        validate_decoder(self)

    def validate_with(self, cfg: Any) -> None:
        """The visible patches must fit the model's grid."""
        self.visible_patches(num_patches(cfg.model))

    def visible_patches(self, length: int) -> int:
        """Visible patches per image out of ``length``: method.num_vis, or the reference's fraction; at
        least one patch must be visible and one predicted."""
        n = self.num_vis if self.num_vis is not None else max(1, round(length * REFERENCE_VISIBLE_FRACTION))
        if not 0 < n < length:
            raise ValueError(f"'method.num_vis' must lie in [1, {length - 1}] for {length} patches; got {n}")
        return n


def infonce_patches(pred: torch.Tensor, target: torch.Tensor, tau: float) -> torch.Tensor:
    """Patch discrimination, per image: predictions standardised over the patches of their image
    (unbiased std, eps 1e-4), both sides L2-normalised, logits <p_i, t_j> / tau over the targets j of
    the same image, cross-entropy with j = i, times 2 tau. [N, M, D] each; fp32."""
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        pred = (pred - pred.mean(dim=1, keepdim=True)) / (pred.std(dim=1, keepdim=True) + 1e-4)
        logits = F.normalize(pred, dim=-1) @ F.normalize(target, dim=-1).transpose(1, 2) / tau
        n, m = logits.shape[:2]
        labels = torch.arange(m, device=logits.device).repeat(n)
        return F.cross_entropy(logits.flatten(0, 1), labels) * (2 * tau)


def norm_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The direct-regression ablation: MSE to targets standardised over their channels (MAE's norm-pix)."""
    with torch.autocast(pred.device.type, enabled=False):
        target = target.float()
        target = (target - target.mean(dim=-1, keepdim=True)) / (
            target.var(dim=-1, keepdim=True) + 1e-6
        ) ** 0.5
        return F.mse_loss(pred.float(), target)


def avg_pairwise_sim(z: torch.Tensor) -> torch.Tensor:
    """Mean cosine similarity over all pairs (i, j) of the tokens of each image, the diagonal included,
    averaged over the batch: mean_b |sum_i z_bi / |z_bi||^2 / N^2. [N, M, D] -> scalar, fp32."""
    with torch.autocast(z.device.type, enabled=False):
        total = F.normalize(z.float(), dim=-1).sum(dim=1)
        return (total * total).sum(dim=-1).mean() / z.shape[1] ** 2


def cosine_decay(start: float, end: float, progress: float) -> float:
    """``start`` at progress 0 to ``end`` at 1 along a half cosine (no warmup)."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * progress))


class GapPatches:
    """Image [C, H, W] -> patches [L, p*p*C] cut with gaps; offsets from torch's CPU generator, which the
    loader seeds per sample, so they are reproducible and resume exactly."""

    def __init__(self, patch_size: int, gap: int) -> None:
        self.patch_size, self.gap = patch_size, gap

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return gap_patchify(img[None], self.patch_size, self.gap)[0]

    def __repr__(self) -> str:
        return f"GapPatches(patch_size={self.patch_size}, gap={self.gap})"


class LatentMIM(MomentumMethod):
    name = "latent_mim"
    Config = LatentMIMConfig
    teacher_moves = "before"
    probe_pool = "mean"  # its cls token is trained only as decoder context

    def __init__(self, encoder: ViTEncoder, cfg: LatentMIMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        dim, length = encoder.embed_dim, encoder.num_patches
        self.num_vis = cfg.visible_patches(length)
        self.patch_gap = cfg.patch_gap if cfg.patch_gap is not None else encoder.patch_size // 4
        # the reference's projector: Linear (no bias), LayerNorm (torch's eps 1e-5), GELU; a last LayerNorm
        hidden = cfg.proj_hidden_dim or (4096 if dim >= 384 else 8 * dim)
        self.projector = mlp_head(
            cfg.proj_depth, dim, hidden, dim, norm="ln", act="gelu", last_norm=True, ln_eps=1e-5
        )
        mae_init_(self.projector)
        self.decoder = CrossDecoder(
            encoder_dim=dim,
            grid_size=encoder.grid_size,
            out_dim=dim,
            embed_dim=cfg.decoder_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
            use_visual_cue=cfg.visual_cue,
        )
        # every parameter follows by EMA (the frozen position tables stay equal); there are no buffers
        self.init_teacher(cfg.ema_momentum, include_buffers=False)
        self.register_buffer("sim_target", torch.tensor(float(cfg.sim_init)), persistent=False)

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: Any, data_cfg: Any = None) -> LatentMIM:
        return cls(encoder_from_config(model_cfg, data_cfg, scaled_pos=True), method_cfg)

    def online(self) -> nn.ModuleDict:
        return nn.ModuleDict({"encoder": self.encoder, "projector": self.projector})

    def train_transform(self, data: Any) -> Views:
        """{"patches", "noise"}: RandomResizedCrop to grid x (patch + gap) px (bicubic), flip, normalize,
        gapped patches; and the sample's noise for its visible/target split. Evaluation uses the plain
        img_size view."""
        grid, p = self.encoder.grid_size[0], self.encoder.patch_size
        size = grid * (p + self.patch_gap)
        crop = T.RandomResizedCrop(
            size, scale=(self.cfg.min_crop_scale, 1.0), interpolation=BICUBIC, antialias=True
        )
        return Views(
            patches=T.Compose(
                [crop, T.RandomHorizontalFlip(), *to_normalized(data), GapPatches(p, self.patch_gap)]
            ),
            noise=MaskNoise(self.encoder.num_patches),
            layouts={"patches": PATCH_ROWS},
        )

    def before_step(self, progress: float) -> None:
        """The reference moves the target encoder inside forward, on the first micro-batch of each optimizer
        step, before computing targets (so with the weights of the step before), and reads the similarity
        target at the same point; this is that point."""
        super().before_step(progress)
        self.sim_target.fill_(cosine_decay(self.cfg.sim_init, self.cfg.sim_end, progress))

    def forward(self, batch: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> StepOutput:
        patches = batch["patches"]
        n, length = patches.shape[:2]
        if noise is None:  # the caller's noise wins, else the loader's per-sample noise, else it is drawn
            noise = batch.get("noise")
        split = visible_target_split(
            n, length, self.num_vis, mask_target=self.cfg.mask_target, noise=noise, device=patches.device
        )
        num_masked = split.masked.shape[1]
        with torch.no_grad():
            target = self.teacher.module
            seen = target.encoder.forward_visible(patches, split.target, units=True)
            targets = target.projector(seen)[:, -num_masked:]
        latent = self.projector(self.encoder.forward_visible(patches, split.visible, units=True))
        pred = self.decoder(latent, split.visible, split.masked)[:, 1:]
        if self.cfg.loss == "infonce_patches":
            loss_latent = infonce_patches(pred, targets, self.cfg.tau)
        else:
            loss_latent = norm_l2(pred, targets)
        sim_pred, sim_vis = avg_pairwise_sim(pred), avg_pairwise_sim(latent[:, 1:])
        loss = loss_latent
        if self.cfg.avg_sim_coeff > 0:
            c, s = self.cfg.avg_sim_coeff, self.sim_target
            loss = loss + c * (sim_pred - s).pow(2) + c * (sim_vis - s).pow(2)
        metrics = {
            "loss_latent": loss_latent.detach(),
            "avg_sim_pred": sim_pred.detach(),
            "avg_sim_vis": sim_vis.detach(),
            "avg_sim_trg": avg_pairwise_sim(targets),
            "sim_target": self.sim_target.clone(),
            "ema_momentum": self.teacher.momentum.clone(),
        }
        return StepOutput(loss, metrics)

    def no_weight_decay_names(self, decay_tokens: bool) -> set[str]:
        """The reference's rule also exempts every name containing 'embed': the patch embedding and the
        decoder's input projection."""
        embeds = {n for n, p in self.named_parameters() if p.requires_grad and "embed" in n}
        return super().no_weight_decay_names(decay_tokens) | embeds
