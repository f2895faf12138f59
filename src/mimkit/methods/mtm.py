"""SeiT++'s masked token modeling (MTM, a port of MAGE to token datasets): the encoder takes grids of
token ids through a learned id embedding and a patch stem; one mask ratio per batch from a truncated
normal; the patches with the lowest noise are dropped (never seen by the encoder), more are masked (seen
as the mask token), dropped a subset of masked; MAGE's decoder; and a classifier of every cell's id,
tied to the input embedding without gradient through the tie, whose cross-entropy is averaged over the
masked patches. The training views are the token-space pipeline of :mod:`mimkit.methods.token_views`.

General in grid, vocabulary, embedding width and patch (the reference fixes 28 x 28 cells, 391 ids,
32-d embeddings and 2 x 2 patches) and runs on any device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from mimkit.configs import Config, checked
from mimkit.data.transforms import MaskNoise, Views, as_ids
from mimkit.masking import TokenMask, token_masking, truncated_normal_ratio
from mimkit.methods.base import Method, StepOutput, encoder_from_config, validate_decoder
from mimkit.methods.mae import mask_noise
from mimkit.methods.token_views import (
    TokenViews,
    resolve_tokenadapt,
    validate_choice_probabilities,
    views_codebook,
)
from mimkit.models.decoders import MTMDecoder
from mimkit.models.heads import TokenLogitsHead
from mimkit.models.vit import ViTEncoder


@dataclass
class MTMConfig:
    name: str = "mtm"
    # the batch's mask ratio: normal(mean, std) truncated to [min, max]; the fraction of patches dropped
    # is mask_ratio_min (the pre-training script's values; MAGE's are 0.55 / 0.25 on [0.5, 1])
    mask_ratio_mean: float = 0.45
    mask_ratio_std: float = checked(0.25, low=0, low_open=True)
    mask_ratio_min: float = 0.4
    mask_ratio_max: float = 1.0
    decoder_embed_dim: int = 512
    decoder_depth: int = checked(4, low=0)
    decoder_num_heads: int = checked(16, low=1)
    # on the decoder's projections and attention
    decoder_dropout: float = checked(0.1, low=0, high=1, high_open=True)
    label_smoothing: float = checked(0.0, low=0, high=1, high_open=True)
    # the views (method.token_views): codebook vectors of the ids, colour, crop, TokenAdapt, re-quantise
    codebook: str | None = None  # a codebook file (K x D); None: the training token dataset's
    min_crop_scale: float = checked(
        0.2, low=0, high=1, low_open=True
    )  # random resized crop scale (s, 1), both paths
    tokenadapt: str | None = None  # TokenAdapt weights (official tokenadapt.ckpt or a run); None: no TA path
    noise_prob: float = checked(0.0, low=0, high=1)  # per batch: Emb-Noise with this probability,
    coloradapt_prob: float = checked(
        0.0, low=0, high=1
    )  # else ColorAdapt with this one (SeiT++ pre-training: off)

    def validate(self) -> None:
        if not 0 <= self.mask_ratio_min < self.mask_ratio_max <= 1:
            raise ValueError(
                "'method.mask_ratio_min' and 'method.mask_ratio_max' must satisfy 0 <= min < max <= 1; "
                f"got {self.mask_ratio_min} and {self.mask_ratio_max}"
            )
        validate_choice_probabilities(self, "noise_prob", "coloradapt_prob")
        validate_decoder(self)

    def validate_with(self, cfg: Config) -> None:
        if cfg.model.stem != "token_ids":
            raise ValueError(
                f"method 'mtm' models token ids: set model.stem=token_ids (got '{cfg.model.stem}')"
            )
        if self.tokenadapt and cfg.optim.batch_size % 2:
            raise ValueError(
                "the TokenAdapt path takes half of each batch: 'optim.batch_size' must be even; "
                f"got {cfg.optim.batch_size}"
            )


def mtm_loss(
    logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, label_smoothing: float = 0.0
) -> torch.Tensor:
    """Cross-entropy of every cell's id, averaged over the cells of a patch, then over the masked
    patches (dropped ones included). logits [N, L, C, K], targets [N, L, C] ids, mask [N, L] (1 =
    masked). Computed in fp32."""
    n, length, cells, vocab = logits.shape
    per_cell = F.cross_entropy(
        logits.float().reshape(-1, vocab),
        targets.reshape(-1),
        label_smoothing=label_smoothing,
        reduction="none",
    )
    per_patch = per_cell.view(n, length, cells).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


class MTM(Method):
    name = "mtm"
    Config = MTMConfig
    probe_pool = "mean"  # the patch tokens' mean, as SeiT++'s classifier pools

    def __init__(self, encoder: ViTEncoder, cfg: MTMConfig) -> None:
        super().__init__()
        if encoder.stem.kind != "token_ids" or encoder.mask_token is None:
            raise ValueError(
                "MTM needs a token-id encoder with a mask token (stem='token_ids', mask_token=True)"
            )
        self.cfg, self.encoder = cfg, encoder
        stem = encoder.stem
        self.decoder = MTMDecoder(
            encoder_dim=encoder.embed_dim,
            num_patches=encoder.num_patches,
            embed_dim=cfg.decoder_embed_dim,
            depth=cfg.decoder_depth,
            num_heads=cfg.decoder_num_heads,
            dropout=cfg.decoder_dropout,
        )
        self.head = TokenLogitsHead(
            cfg.decoder_embed_dim, stem.token_dim, encoder.patch_size, stem.vocab_size
        )
        self.codebook: torch.Tensor | None = None  # for the views; set by use_data (not a parameter)

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: MTMConfig, data_cfg: Any = None) -> MTM:
        return cls(encoder_from_config(model_cfg, data_cfg, mask_token=True), method_cfg)

    def use_data(self, source: Any) -> None:
        """The codebook of the views: method.codebook, else the training token dataset's."""
        self.codebook = views_codebook(self.cfg.codebook, source, self.encoder.stem.vocab_size)

    def train_transform(self, data: Any) -> Views:
        """{"image", "noise", "ratio_noise"}: the stored id grid as it is (the views crop on the device),
        each patch's mask noise and a uniform that sets the batch's ratio (the first sample's)."""
        return Views(image=as_ids, noise=MaskNoise(self.encoder.num_patches), ratio_noise=MaskNoise(1))

    def batch_transform(self) -> TokenViews:
        if self.codebook is None:
            raise ValueError("the token views need the codebook: call use_data(source) first")
        cfg = self.cfg
        return TokenViews(
            self.codebook,
            self.encoder.stem.img_size[0],
            min_scale=cfg.min_crop_scale,
            noise_prob=cfg.noise_prob,
            coloradapt_prob=cfg.coloradapt_prob,
            tokenadapt=resolve_tokenadapt(cfg.tokenadapt) if cfg.tokenadapt else None,
        )

    def mask_ratio(self, u: float | torch.Tensor) -> torch.Tensor:
        """The batch's mask ratio at the uniform ``u``, a 0-dim float64 tensor on ``u``'s device."""
        cfg = self.cfg
        return truncated_normal_ratio(
            u,
            mean=cfg.mask_ratio_mean,
            std=cfg.mask_ratio_std,
            low=cfg.mask_ratio_min,
            high=cfg.mask_ratio_max,
        )

    def predict(
        self,
        ids: torch.Tensor,
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
        ratio_noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, TokenMask]:
        """For id grids [N, H, W]: the logits [N, L, p*p, K] of every patch's cells, the cells themselves
        [N, L, p*p] (the targets) and the masking. ``noise`` [N, L] and ``mask_ratio`` fix the masking;
        else ``ratio_noise`` (a uniform) sets the ratio; else both are drawn."""
        stem = self.encoder.stem
        units = stem.units(ids)  # [N, L, p*p]: the targets, and the encoder's input
        n, length = units.shape[:2]
        if mask_ratio is None:
            u = ratio_noise.flatten()[0] if ratio_noise is not None else torch.rand(())
            mask_ratio = self.mask_ratio(u)  # on the device: no host sync
        m = token_masking(n, length, mask_ratio, self.cfg.mask_ratio_min, noise=noise, device=ids.device)
        latent = self.encoder.forward_visible(units, m.ids_keep, units=True, replace=m.replace)
        decoded = self.decoder(latent, m.ids_keep, m.mask)
        return self.head(decoded[:, 1:], stem.embedding.weight), units, m

    def forward(
        self,
        batch: dict[str, torch.Tensor],
        noise: torch.Tensor | None = None,
        mask_ratio: float | None = None,
    ) -> StepOutput:
        """``noise`` [N, L] and ``mask_ratio`` fix the masking (else the loader's per-sample noise and the
        batch's ratio uniform set them; else they are drawn)."""
        logits, units, m = self.predict(
            batch["image"], mask_noise(batch, noise), mask_ratio, batch.get("ratio_noise")
        )
        loss = mtm_loss(logits, units, m.mask, self.cfg.label_smoothing)
        with torch.no_grad():
            hit = (logits.argmax(-1) == units).float().mean(-1)
            accuracy = (hit * m.mask).sum() / m.mask.sum()
            # what always answering the batch's most common masked id would score: the accuracy a model
            # that learnt nothing reaches (counted with scatter_add, which needs no host sync)
            weight = m.mask[..., None].expand_as(units).flatten()
            counts = torch.zeros(logits.shape[-1], device=units.device)
            counts.scatter_add_(0, units.flatten(), weight)
            majority = counts.max() / counts.sum()
        return StepOutput(
            loss,
            {
                "loss_mtm": loss.detach(),
                "mask_ratio": m.mask.mean(),
                "masked_token_acc": accuracy,
                "masked_token_majority": majority,
            },
        )
