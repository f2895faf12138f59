"""Decoders that turn encoder latents back into per-patch predictions."""

from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.masking import gather_tokens
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import LayerNorm6, mae_init_


class MAEDecoder(nn.Module):
    """MAE's self-attention decoder: visible latents plus a shared mask token at every removed position,
    fixed sin-cos positions, pre-norm blocks, a linear prediction per patch."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 8,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(sincos_2d(embed_dim, grid_size), requires_grad=False)
        self.blocks = nn.Sequential(
            *[
                Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=LayerNorm6)
                for _ in range(depth)
            ]
        )
        self.norm = LayerNorm6(embed_dim)
        self.pred = nn.Linear(embed_dim, out_dim)
        mae_init_(self)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [N, 1 + K, D] (cls first, visible tokens in any order) -> predictions [N, L, out_dim]."""
        x = self.embed(latent)
        n, length = ids_restore.shape
        fill = self.mask_token.to(x.dtype).expand(n, length - (x.shape[1] - 1), -1)
        patches = gather_tokens(torch.cat([x[:, 1:], fill], dim=1), ids_restore)
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed.to(x.dtype)
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:]
