"""The one ViT encoder: timm's VisionTransformer with MAE's fixed sin-cos positions and initialisation,
plus a forward over a subset of patches. Its state dict is a timm ViT's, key for key, so an exported
encoder loads into ``timm.create_model(<arch>_patch16_224, num_classes=0, ...)`` with ``strict=True``."""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.configs import ARCHS, POOLS
from mimkit.masking import gather_tokens
from mimkit.models.patches import patchify
from mimkit.models.pos_embed import sincos_2d

LayerNorm6 = partial(nn.LayerNorm, eps=1e-6)


@torch.no_grad()
def mae_init_(module: nn.Module) -> None:
    """MAE's initialisation: xavier-uniform Linear weights (a fused qkv as one matrix), zero biases,
    unit LayerNorms."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ViTEncoder(VisionTransformer):
    """ViT with a frozen 2-D sin-cos position table (in the state dict, as a non-trainable parameter).
    ``scaled_pos`` lays the table out as Latent MIM does (positions on linspace(0, 1) * grid)."""

    def __init__(
        self,
        *,
        arch: str = "vit_base",
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        in_chans: int = 3,
        scaled_pos: bool = False,
    ) -> None:
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            qkv_bias=True,
            drop_path_rate=drop_path_rate,
            norm_layer=LayerNorm6,
        )
        self.arch = arch
        self.scaled_pos = scaled_pos
        # the arguments that rebuild this encoder (saved with exports)
        self.spec = {
            "arch": arch,
            "img_size": img_size,
            "patch_size": patch_size,
            "embed_dim": embed_dim,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "scaled_pos": scaled_pos,
        }
        self.pos_embed.requires_grad_(False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        mae_init_(self)
        self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, scaled_coords=self.scaled_pos))
        w = self.patch_embed.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        """The patch embedding applied to flattened (py, px, c) pixel patches [N, K, p*p*C]: the conv as a
        Linear, so only the patches that are used get embedded."""
        w = self.patch_embed.proj.weight
        return F.linear(patches, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.patch_embed.proj.bias)

    def forward_visible(
        self, x: torch.Tensor, ids: torch.Tensor | None = None, *, norm: bool = True
    ) -> torch.Tensor:
        """Encode a subset of the patches: ``x`` is an image batch [N, C, H, W] or its patches [N, L, p*p*C];
        ``ids`` [N, K] picks the patches (in any order; positions travel with them). Returns the cls token
        followed by the K tokens, after the final norm unless ``norm`` is False: [N, 1 + K, D]."""
        if ids is None and x.dim() == 4 and norm:
            return self.forward_features(x)
        patches = patchify(x, self.patch_size) if x.dim() == 4 else x
        pos = self.pos_embed[:, 1:].expand(patches.shape[0], -1, -1)
        if ids is not None:
            patches, pos = gather_tokens(patches, ids), gather_tokens(pos, ids)
        tokens = self.patch_embed.norm(self.embed_patches(patches)) + pos
        cls = (self.cls_token + self.pos_embed[:, :1]).expand(tokens.shape[0], -1, -1)
        x = torch.cat([cls.to(tokens.dtype), tokens], dim=1)
        x = self.blocks(self.norm_pre(x))
        return self.norm(x) if norm else x

    def features(self, x: torch.Tensor, pool: str = "cls") -> torch.Tensor:
        """One vector per image from the full forward: the cls token, the mean of the patch tokens, or that
        mean taken before the final norm (``mean_prenorm``, Latent MIM's nearest-neighbour feature)."""
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {', '.join(POOLS)}; got {pool!r}")
        tokens = self.forward_visible(x, norm=pool != "mean_prenorm")
        if pool == "cls":
            return tokens[:, 0]
        return tokens[:, self.num_prefix_tokens :].mean(dim=1)

    def timm_spec(self) -> dict[str, Any]:
        """The timm model name and keyword arguments that build a ViT with this encoder's exact keys."""
        base = ARCHS[self.arch]
        defaults = {
            "img_size": 224,
            "patch_size": base.patch_size,
            "embed_dim": base.embed_dim,
            "depth": base.depth,
            "num_heads": base.num_heads,
            "mlp_ratio": 4.0,
        }
        kwargs = {k: v for k, v in self.spec.items() if k in defaults and v != defaults[k]}
        return {"model_name": base.timm_name(self.arch), "kwargs": {"num_classes": 0, **kwargs}}


def build_encoder(
    arch: str = "vit_base",
    *,
    img_size: int = 224,
    patch_size: int | None = None,
    embed_dim: int | None = None,
    depth: int | None = None,
    num_heads: int | None = None,
    mlp_ratio: float = 4.0,
    drop_path_rate: float = 0.0,
    scaled_pos: bool = False,
) -> ViTEncoder:
    """A named size (vit_tiny/small/base/large/huge), any field of which can be overridden."""
    if arch not in ARCHS:
        near = difflib.get_close_matches(arch, ARCHS, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown encoder arch {arch!r} (known: {', '.join(ARCHS)}){hint}")
    a = ARCHS[arch]
    # None (not 0, which is an error) takes the arch's value
    p = a.patch_size if patch_size is None else patch_size
    d = a.embed_dim if embed_dim is None else embed_dim
    n = a.depth if depth is None else depth
    h = a.num_heads if num_heads is None else num_heads
    sizes = {"img_size": img_size, "patch_size": p, "embed_dim": d, "depth": n, "num_heads": h}
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}")
    if img_size % p:
        raise ValueError(f"img_size {img_size} is not divisible by patch_size {p}")
    if d % h:
        raise ValueError(f"embed_dim {d} is not divisible by num_heads {h}")
    return ViTEncoder(
        arch=arch,
        img_size=img_size,
        patch_size=p,
        embed_dim=d,
        depth=n,
        num_heads=h,
        mlp_ratio=mlp_ratio,
        drop_path_rate=drop_path_rate,
        scaled_pos=scaled_pos,
    )
