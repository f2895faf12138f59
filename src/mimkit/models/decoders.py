"""Decoders that turn encoder latents back into per-patch predictions."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Attention, Block
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


def visual_cue(pos_query: torch.Tensor, pos_visible: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Latent MIM's mask-query initialisation: for each query position, the visible tokens averaged with
    weights softmax(<pos_q, pos_v> / sqrt(D)) of the position embeddings alone (no parameters). The
    weights are computed in fp32 (the logits of 0..14-scaled tables lie around 7 to 11)."""
    scale = pos_query.shape[-1] ** -0.5
    weights = torch.softmax(pos_query.float() @ pos_visible.float().transpose(-2, -1) * scale, dim=-1)
    return weights.to(visible.dtype) @ visible


class CrossAttention(nn.Module):
    """Queries attend to a separate key/value sequence (``q_proj``, fused ``kv_proj``, ``proj``)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"decoder width {dim} is not divisible by its {num_heads} heads")
        self.num_heads = num_heads
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        n, lq, dim = q.shape
        heads = self.num_heads
        q = self.q_proj(q).reshape(n, lq, heads, dim // heads).transpose(1, 2)
        k, v = self.kv_proj(kv).reshape(n, kv.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(n, lq, dim))


class CrossBlock(nn.Module):
    """Pre-norm block on the queries: self-attention among them, cross-attention to the fixed visible
    latents (with their own norm), MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = LayerNorm6(dim)
        self.self_attn = Attention(dim, num_heads=num_heads, qkv_bias=True)
        self.norm2q = LayerNorm6(dim)
        self.norm2kv = LayerNorm6(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm3 = LayerNorm6(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        q = q + self.self_attn(self.norm1(q))
        q = q + self.cross_attn(self.norm2q(q), self.norm2kv(kv))
        return q + self.mlp(self.norm3(q))


class CrossDecoder(nn.Module):
    """Latent MIM's decoder: one query per target position (a shared mask token plus, by default, the
    visual cue), a learned cls query, Latent MIM's sin-cos positions on queries and visible latents, and
    blocks that update the queries only; the visible latents stay fixed. Predicts ``out_dim`` per query."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        grid_size: tuple[int, int],
        out_dim: int,
        embed_dim: int = 512,
        depth: int = 3,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        use_visual_cue: bool = True,
    ) -> None:
        super().__init__()
        self.use_visual_cue = use_visual_cue
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        table = sincos_2d(embed_dim, grid_size, scaled_coords=True)
        self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.blocks = nn.ModuleList([CrossBlock(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm6(embed_dim)
        self.head = nn.Linear(embed_dim, out_dim)
        mae_init_(self)
        nn.init.normal_(self.cls_token, std=0.02)  # the mask token stays zero, as in the reference

    def forward(
        self, latent: torch.Tensor, visible_ids: torch.Tensor, query_ids: torch.Tensor
    ) -> torch.Tensor:
        """latent [N, 1 + V, D_enc] (cls, then the visible tokens of ``visible_ids`` [N, V]) ->
        predictions [N, 1 + Q, out_dim] for the cls query and the positions ``query_ids`` [N, Q]."""
        x = self.embed(latent)
        n, q = query_ids.shape
        table = self.pos_embed[0].to(x.dtype)
        pos_visible, pos_query = table[1:][visible_ids], table[1:][query_ids]
        queries = self.mask_token.to(x.dtype).expand(n, q, -1)
        if self.use_visual_cue:
            queries = queries + visual_cue(pos_query, pos_visible, x[:, 1:])
        cls_pos = table[:1].expand(n, 1, -1)
        queries = torch.cat([self.cls_token.to(x.dtype).expand(n, -1, -1), queries], dim=1)
        queries = queries + torch.cat([cls_pos, pos_query], dim=1)
        x = x + torch.cat([cls_pos, pos_visible], dim=1)
        for block in self.blocks:
            queries = block(queries, x)
        return self.head(self.norm(queries))


class MTMDecoder(nn.Module):
    """MAGE's decoder as SeiT++'s masked token modeling uses it: the encoder's cls output, projected,
    fills every slot of the full sequence; the kept patches' outputs are written into theirs; every
    masked slot (dropped or kept as the mask token) is reset to the cls copy; then a learned,
    zero-initialised position table (the reference builds a sin-cos one too but never uses it), blocks
    with dropout on projections and attention, and a final norm."""

    def __init__(
        self,
        *,
        encoder_dim: int,
        num_patches: int,
        embed_dim: int = 512,
        depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"decoder width {embed_dim} is not divisible by its {num_heads} heads")
        self.embed = nn.Linear(encoder_dim, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim))
        block = partial(Block, qkv_bias=True, norm_layer=LayerNorm6, proj_drop=dropout, attn_drop=dropout)
        self.blocks = nn.Sequential(*[block(embed_dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = LayerNorm6(embed_dim)
        mae_init_(self)

    def forward(self, latent: torch.Tensor, ids_keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """latent [N, 1 + K, D_enc] (cls, then the kept patches ``ids_keep`` [N, K]); ``mask`` [N, L]
        (1 = masked, dropped ones included) -> [N, 1 + L, D] (cls first, patches in grid order)."""
        x = self.embed(latent)
        n, length = mask.shape
        cls = x[:, :1]
        canvas = cls.expand(n, length, -1).scatter(
            1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]), x[:, 1:]
        )
        canvas = torch.where(mask.unsqueeze(-1).bool(), cls, canvas)
        x = torch.cat([cls, canvas], dim=1) + self.pos_embed.to(x.dtype)
        return self.norm(self.blocks(x))
