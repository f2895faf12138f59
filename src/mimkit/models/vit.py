"""The one ViT encoder: timm's VisionTransformer with MAE's fixed sin-cos positions and initialisation,
a pluggable stem (pixels, token ids or token embeddings, see :mod:`mimkit.models.stems`), the
:class:`InputSpec` of what it takes, and a forward over a subset of patches. A pixel encoder's state dict
is a timm ViT's, key for key, so an exported encoder loads into
``timm.create_model(<arch>_patch16_224, num_classes=0, ...)`` with ``strict=True``."""

from __future__ import annotations

import difflib
from functools import partial
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from mimkit.configs import ARCHS, POOLS
from mimkit.masking import gather_tokens
from mimkit.models.input_spec import InputSpec
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.stems import PixelStem, Stem, TokenEmbeddingStem, TokenIdStem

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
    ``scaled_pos`` lays the table out as Latent MIM does (positions on linspace(0, 1) * grid).

    ``stem`` is "pixels" (images, ``in_chans`` channels), "token_ids" (grids of ``vocab_size`` ids of side
    ``img_size``, embedded to ``token_dim`` with ``token_dropout``), "token_embeddings" (grids of
    ``token_dim``-wide vectors of side ``img_size``, through SeiT's conv adapter of kernel ``stem_kernel``
    (default 4), stride ``patch_size`` and padding ``stem_padding`` (default 1)) or a :class:`Stem` of the
    encoder's geometry; it is held as ``patch_embed``. ``mask_token`` adds a learned, zero-initialised
    vector that :meth:`forward_visible` puts in place of chosen patch embeddings (absent by default, so a
    default state dict is unchanged). ``input_spec`` says what the encoder takes; by default the stem's
    (pixels: ImageNet mean/std)."""

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
        stem: str | Stem = "pixels",
        vocab_size: int | None = None,
        token_dim: int = 32,
        token_dropout: float = 0.0,
        stem_kernel: int | None = None,
        stem_padding: int | None = None,
        mask_token: bool = False,
        input_spec: InputSpec | None = None,
    ) -> None:
        if (stem_kernel is not None or stem_padding is not None) and stem != "token_embeddings":
            raise ValueError(
                "stem_kernel and stem_padding set the token_embeddings stem's conv; "
                f"got them with stem={stem if isinstance(stem, str) else type(stem).__name__!r}"
            )
        if isinstance(stem, Stem):
            given = stem
            side = img_size // patch_size
            if (stem.grid_size, stem.patch_size[0], stem.embed_dim) != ((side, side), patch_size, embed_dim):
                raise ValueError(
                    f"the stem makes a {stem.grid_size} grid of {stem.embed_dim}-d tokens with patch "
                    f"{stem.patch_size[0]}; the encoder expects ({side}, {side}), {embed_dim}-d, "
                    f"patch {patch_size}"
                )
        elif stem == "pixels":
            given = None
            if vocab_size is not None:
                raise ValueError("vocab_size applies to the token_ids stem; the pixel stem takes images")
        elif stem == "token_ids":
            if vocab_size is None:
                raise ValueError("the token_ids stem needs vocab_size")
            given = TokenIdStem(
                vocab_size=vocab_size,
                img_size=img_size,
                patch_size=patch_size,
                embed_dim=embed_dim,
                token_dim=token_dim,
                dropout=token_dropout,
            )
        elif stem == "token_embeddings":
            if vocab_size is not None:
                raise ValueError(
                    "vocab_size applies to the token_ids stem; the token_embeddings stem takes vectors"
                )
            given = TokenEmbeddingStem(
                token_dim=token_dim,
                img_size=img_size,
                patch_size=patch_size,
                embed_dim=embed_dim,
                kernel_size=4 if stem_kernel is None else stem_kernel,
                padding=1 if stem_padding is None else stem_padding,
            )
        else:
            raise ValueError(
                f"stem must be 'pixels', 'token_ids', 'token_embeddings' or a Stem; got {stem!r}"
            )
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
            embed_layer=PixelStem if given is None else (lambda **_: given),
        )
        self.arch = arch
        self.scaled_pos = scaled_pos
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if mask_token else None
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
            "stem": self.stem.kind,
            **self.stem.config(),
            "mask_token": mask_token,
        }
        self.input_spec = self.stem.input_spec() if input_spec is None else input_spec
        self.pos_embed.requires_grad_(False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        mae_init_(self)
        self.pos_embed.copy_(sincos_2d(self.embed_dim, self.grid_size, scaled_coords=self.scaled_pos))
        self.stem.reset_parameters()
        nn.init.normal_(self.cls_token, std=0.02)
        if self.mask_token is not None:
            nn.init.zeros_(self.mask_token)

    @property
    def stem(self) -> Stem:
        """How the input becomes patch embeddings; timm's name for it is ``patch_embed``."""
        return self.patch_embed

    @property
    def input_spec(self) -> InputSpec:
        """What this encoder takes (saved with checkpoints; read by every consumer)."""
        return self._input_spec

    @input_spec.setter
    def input_spec(self, spec: InputSpec) -> None:
        if not isinstance(spec, InputSpec):
            raise TypeError(f"input_spec must be an InputSpec; got {type(spec).__name__}")
        own = self.stem.input_spec()
        for name in ("kind", "channels", "img_size", "patch_size", "grid", "vocab_size"):
            if getattr(spec, name) != getattr(own, name):
                raise ValueError(
                    f"input_spec.{name} is {getattr(spec, name)!r} but this encoder's stem takes "
                    f"{getattr(own, name)!r}"
                )
        self._input_spec = spec

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def forward_visible(
        self,
        x: torch.Tensor,
        ids: torch.Tensor | None = None,
        *,
        units: bool = False,
        replace: torch.Tensor | None = None,
        norm: bool = True,
    ) -> torch.Tensor:
        """Encode a subset of the patches. ``x`` is the stem's raw input (an image batch, a grid of token
        ids), or with ``units`` its per-patch units [N, L, U] already cut (Latent MIM's gapped patches).
        ``ids`` [N, K] picks the patches (in any order; positions travel with them); ``replace`` [N, K]
        (or [N, L] without ids) marks picked patches whose embedding is swapped for the learned
        ``mask_token`` before positions are added (MAGE / MTM masking). Returns the cls token followed by
        the K tokens, after the final norm unless ``norm`` is False: [N, 1 + K, D]."""
        if ids is None and replace is None and not units and norm:
            return self.forward_features(x)
        stem = self.stem
        u = x if units else stem.units(x)
        if u.dim() != 3 or u.shape[1:] != (self.num_patches, stem.unit_dim):
            raise ValueError(
                f"expected units [N, {self.num_patches}, {stem.unit_dim}] for the {stem.kind} stem; "
                f"got {tuple(u.shape)}"
            )
        pos = self.pos_embed[:, 1:].expand(u.shape[0], -1, -1)
        if ids is not None:
            u, pos = gather_tokens(u, ids), gather_tokens(pos, ids)
        tokens = stem.embed(u)
        if replace is not None:
            if self.mask_token is None:
                raise ValueError("replace needs a mask token: build the encoder with mask_token=True")
            if replace.shape != tokens.shape[:2] or replace.dtype != torch.bool:
                raise ValueError(
                    f"replace must be a bool tensor of shape {tuple(tokens.shape[:2])}; "
                    f"got {replace.dtype} {tuple(replace.shape)}"
                )
            tokens = torch.where(replace.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + pos
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
        """The timm model name and keyword arguments that build a ViT with this encoder's exact keys (a
        ``mask_token``, used in pre-training only, is not one of them)."""
        if self.stem.kind != "pixels":
            raise ValueError(f"a {self.stem.kind} encoder has no timm equivalent: timm's ViT takes pixels")
        base = ARCHS[self.arch]
        defaults = {
            "in_chans": 3,
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
    stem: str | Stem = "pixels",
    vocab_size: int | None = None,
    token_dim: int = 32,
    token_dropout: float = 0.0,
    stem_kernel: int | None = None,
    stem_padding: int | None = None,
    mask_token: bool = False,
    input_spec: InputSpec | None = None,
) -> ViTEncoder:
    """A named size (vit_tiny/small/base/large/huge), any field of which can be overridden; the stem
    and the rest as :class:`ViTEncoder` (for token inputs ``img_size`` is the grid's side, in cells)."""
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
        stem=stem,
        vocab_size=vocab_size,
        token_dim=token_dim,
        token_dropout=token_dropout,
        stem_kernel=stem_kernel,
        stem_padding=stem_padding,
        mask_token=mask_token,
        input_spec=input_spec,
    )
