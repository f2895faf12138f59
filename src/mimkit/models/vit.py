"""The one ViT encoder: timm's VisionTransformer with MAE's fixed sin-cos positions and initialisation,
a pluggable stem (pixels, token ids or token embeddings, see :mod:`mimkit.models.stems`), the
:class:`InputSpec` of what it takes, and a forward over a subset of patches. A pixel encoder's state dict
is a timm ViT's, key for key, so an exported encoder loads into
``timm.create_model(<arch>_patch16_224, num_classes=0, ...)`` with ``strict=True``."""

from __future__ import annotations

import difflib
from dataclasses import asdict, dataclass, fields, replace
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


@dataclass(frozen=True)
class EncoderSpec:
    """What builds an encoder, written once: built from the config (:meth:`from_config`) or a named size
    (:meth:`of`), held by the encoder as ``spec``, saved in checkpoints and exports as it is
    (:meth:`to_dict` / :meth:`from_dict`), and the source of the stem (:meth:`build_stem`).

    ``stem`` is "pixels" (images of ``in_chans`` channels), "token_ids" (grids of ``vocab_size`` ids of
    side ``img_size``, embedded to ``token_dim`` with ``token_dropout``) or "token_embeddings" (grids of
    ``token_dim``-wide vectors through SeiT's conv adapter of kernel ``stem_kernel``, default 4, stride
    ``patch_size`` and padding ``stem_padding``, default 1). ``scaled_pos`` lays the position table out
    as Latent MIM does; ``mask_token`` adds a learned, zero-initialised vector for masked patches."""

    arch: str = "vit_base"
    img_size: int = 224
    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0
    in_chans: int = 3
    scaled_pos: bool = False
    stem: str = "pixels"
    vocab_size: int | None = None
    token_dim: int = 32
    token_dropout: float = 0.0
    stem_kernel: int | None = None
    stem_padding: int | None = None
    mask_token: bool = False

    def __post_init__(self) -> None:
        sizes = {k: getattr(self, k) for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")}
        for name, value in sizes.items():
            if value < 1:
                raise ValueError(f"{name} must be at least 1; got {value}")
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)} or a Stem; got {self.stem!r}")
        if (
            self.stem_kernel is not None or self.stem_padding is not None
        ) and self.stem != "token_embeddings":
            raise ValueError(
                f"stem_kernel and stem_padding set the token_embeddings stem's conv; got them with "
                f"stem={self.stem!r}"
            )
        if self.stem == "token_embeddings":  # SeiT's adapter: kernel 4, padding 1 unless given
            object.__setattr__(self, "stem_kernel", 4 if self.stem_kernel is None else self.stem_kernel)
            object.__setattr__(self, "stem_padding", 1 if self.stem_padding is None else self.stem_padding)
        if self.stem == "token_ids" and self.vocab_size is None:
            raise ValueError("the token_ids stem needs vocab_size")
        if self.stem != "token_ids" and self.vocab_size is not None:
            takes = "images" if self.stem == "pixels" else "vectors"
            raise ValueError(f"vocab_size applies to the token_ids stem; the {self.stem} stem takes {takes}")

    @classmethod
    def of(cls, arch: str = "vit_base", **given: Any) -> EncoderSpec:
        """A named size (vit_tiny/small/base/large/huge); a size given as None takes the arch's."""
        if arch not in ARCHS:
            near = difflib.get_close_matches(arch, ARCHS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"unknown encoder arch {arch!r} (known: {', '.join(ARCHS)}){hint}")
        named = ARCHS[arch]
        for size in ("patch_size", "embed_dim", "depth", "num_heads"):
            if given.get(size) is None:
                given[size] = getattr(named, size)
        return cls(arch=arch, **given)

    @classmethod
    def from_config(cls, model_cfg: Any, **extra: Any) -> EncoderSpec:
        """The encoder of a ``model`` config section (its fields of the same name, and ``drop_path``);
        ``extra``: what a method fixes itself (Latent MIM's positions)."""
        taken = {f.name: getattr(model_cfg, f.name) for f in fields(cls) if hasattr(model_cfg, f.name)}
        taken["drop_path_rate"] = model_cfg.drop_path
        if model_cfg.stem != "token_ids":  # the config always carries them; only that stem reads them
            taken.update(vocab_size=None, token_dropout=0.0)
        return cls.of(**{**taken, **extra})

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> EncoderSpec:
        """A spec saved by :meth:`to_dict`, also one of an earlier version (fewer keys)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(saved) - known)
        if unknown:
            raise ValueError(f"an encoder spec with unknown keys {unknown}; known: {sorted(known)}")
        return cls(**saved)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def build_stem(self) -> Stem | None:
        """The stem object (timm's ``embed_layer`` pattern); None: timm's pixel patch embedding."""
        if self.stem == "token_ids":
            return TokenIdStem(
                vocab_size=self.vocab_size,
                img_size=self.img_size,
                patch_size=self.patch_size,
                embed_dim=self.embed_dim,
                token_dim=self.token_dim,
                dropout=self.token_dropout,
            )
        if self.stem == "token_embeddings":
            return TokenEmbeddingStem(
                token_dim=self.token_dim,
                img_size=self.img_size,
                patch_size=self.patch_size,
                embed_dim=self.embed_dim,
                kernel_size=self.stem_kernel,
                padding=self.stem_padding,
            )
        return None


STEMS = ("pixels", "token_ids", "token_embeddings")


class ViTEncoder(VisionTransformer):
    """ViT with a frozen 2-D sin-cos position table (in the state dict, as a non-trainable parameter),
    built from one :class:`EncoderSpec` (``spec``; or its fields as keywords). ``stem``: a :class:`Stem`
    of the encoder's geometry instead of the spec's; it is held as ``patch_embed``. ``input_spec`` says
    what the encoder takes; by default the stem's (pixels: ImageNet mean/std)."""

    def __init__(
        self,
        spec: EncoderSpec | None = None,
        *,
        stem: str | Stem | None = None,
        input_spec: InputSpec | None = None,
        **fields_: Any,
    ) -> None:
        if isinstance(stem, str):  # the spec's stem kind, by name
            fields_["stem"], stem = stem, None
        if spec is not None and fields_:
            spec = replace(spec, **fields_)
        spec = spec if spec is not None else EncoderSpec(**fields_)
        if stem is not None:
            side = spec.img_size // spec.patch_size
            if (stem.grid_size, stem.patch_size[0], stem.embed_dim) != (
                (side, side),
                spec.patch_size,
                spec.embed_dim,
            ):
                raise ValueError(
                    f"the stem makes a {stem.grid_size} grid of {stem.embed_dim}-d tokens with patch "
                    f"{stem.patch_size[0]}; the encoder expects ({side}, {side}), {spec.embed_dim}-d, "
                    f"patch {spec.patch_size}"
                )
            spec = replace(spec, stem=stem.kind, **stem.config())
        given = stem if stem is not None else spec.build_stem()
        super().__init__(
            img_size=spec.img_size,
            patch_size=spec.patch_size,
            in_chans=spec.in_chans,
            num_classes=0,
            global_pool="token",
            embed_dim=spec.embed_dim,
            depth=spec.depth,
            num_heads=spec.num_heads,
            mlp_ratio=spec.mlp_ratio,
            qkv_bias=True,
            drop_path_rate=spec.drop_path_rate,
            norm_layer=LayerNorm6,
            embed_layer=PixelStem if given is None else (lambda **_: given),
        )
        self.spec = spec
        self.arch, self.scaled_pos = spec.arch, spec.scaled_pos
        self.mask_token = nn.Parameter(torch.zeros(1, 1, spec.embed_dim)) if spec.mask_token else None
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
        spec = self.spec.to_dict()
        kwargs = {k: v for k, v in spec.items() if k in defaults and v != defaults[k]}
        return {"model_name": base.timm_name(self.arch), "kwargs": {"num_classes": 0, **kwargs}}


def build_encoder(
    arch: str = "vit_base",
    *,
    stem: str | Stem | None = None,
    input_spec: InputSpec | None = None,
    **given: Any,
) -> ViTEncoder:
    """A named size (vit_tiny/small/base/large/huge), any :class:`EncoderSpec` field of which can be given
    (for token inputs ``img_size`` is the grid's side, in cells); ``stem``: a :class:`Stem` object."""
    if isinstance(stem, str):  # the spec's stem kind, by name
        given["stem"], stem = stem, None
    return ViTEncoder(EncoderSpec.of(arch, **given), stem=stem, input_spec=input_spec)
