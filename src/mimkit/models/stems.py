"""Encoder stems: how an input becomes patch embeddings, in two steps so that a masked forward embeds
only the patches it uses, whatever the input is.

- ``units(x) -> [N, L, U]``: the raw input cut into one unit per patch, grid row-major;
- ``embed(units) -> [N, K, D]``: any subset of those units to patch embeddings.

``forward(x)`` embeds every patch, so timm's ``forward_features`` runs on any stem. An encoder holds its
stem as ``patch_embed`` (timm's name for a ViT's stem): the pixel stem is timm's ``PatchEmbed`` with the
two steps added, so a pixel encoder's state dict stays a timm ViT's.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from torch import nn

from mimkit.configs import IMAGENET_MEAN, IMAGENET_STD
from mimkit.models.input_spec import InputSpec
from mimkit.models.patches import patchify


class Stem(nn.Module):
    """The interface of a stem. Besides the two steps it states its geometry (``img_size``,
    ``patch_size``, ``grid_size`` as timm's PatchEmbed does, ``num_patches``, ``embed_dim``, ``unit_dim``)
    and the :class:`InputSpec` of what it takes, and ``config()`` gives the encoder arguments that rebuild
    it (saved in ``ViTEncoder.spec``)."""

    kind: ClassVar[str]
    img_size: tuple[int, int]
    patch_size: tuple[int, int]
    grid_size: tuple[int, int]
    num_patches: int

    @property
    def embed_dim(self) -> int:
        raise NotImplementedError

    @property
    def unit_dim(self) -> int:
        """U, the width of one unit."""
        raise NotImplementedError

    def units(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, units: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.units(x))

    def reset_parameters(self) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        raise NotImplementedError

    def input_spec(self) -> InputSpec:
        """What this stem takes, with evaluation defaults (a consumer-specific spec replaces them)."""
        raise NotImplementedError


class PixelStem(PatchEmbed, Stem):
    """Images [N, C, H, W]: timm's patch embedding conv (its forward is the full-image path); a unit is a
    flattened (py, px, c) pixel patch (:func:`patchify`), U = p * p * C, embedded by the same conv
    applied as a Linear."""

    kind = "pixels"

    @property
    def embed_dim(self) -> int:
        return self.proj.out_channels

    @property
    def unit_dim(self) -> int:
        return self.patch_size[0] * self.patch_size[1] * self.proj.in_channels

    def units(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4 or x.shape[1] != self.proj.in_channels or not x.is_floating_point():
            raise ValueError(
                f"the pixel stem takes images [N, {self.proj.in_channels}, H, W]; got a "
                f"{x.dtype} tensor of shape {tuple(x.shape)} (pass units=True for pre-cut patches)"
            )
        return patchify(x, self.patch_size[0])

    def embed(self, units: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return self.norm(F.linear(units, w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """MAE's: xavier-uniform on the conv seen as a [D, p*p*C] matrix; the bias keeps torch's init."""
        w = self.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    def config(self) -> dict[str, Any]:
        return {"in_chans": self.proj.in_channels}

    def input_spec(self) -> InputSpec:
        """ImageNet's mean and std for RGB, 0.5 and 0.5 otherwise."""
        c = self.proj.in_channels
        return InputSpec(
            kind="pixels",
            channels=c,
            mean=IMAGENET_MEAN if c == 3 else (0.5,) * c,
            std=IMAGENET_STD if c == 3 else (0.5,) * c,
            img_size=self.img_size[0],
            patch_size=self.patch_size[0],
        )


class TokenIdStem(Stem):
    """Grids of token ids [N, H, W] (SeiT++'s MTM and fine-tune front end): a learned
    ``Embedding(vocab_size, token_dim)`` (not the tokenizer's codebook) + LayerNorm + dropout, then a
    patch of p x p cells to one token by ``proj``, a Conv2d(token_dim -> D, kernel p, stride p) that is
    applied as a Linear on the unit's p * p embeddings. A unit is the p * p ids of one patch, (py, px)
    order, U = p * p. Sizes are in cells: ``img_size`` is the id grid's side."""

    kind = "token_ids"

    def __init__(
        self,
        *,
        vocab_size: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        token_dim: int = 32,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("img_size", img_size),
            ("patch_size", patch_size),
            ("embed_dim", embed_dim),
            ("token_dim", token_dim),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1; got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"id grid side {img_size} is not divisible by patch_size {patch_size}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"token dropout must lie in [0, 1); got {dropout}")
        side = img_size // patch_size
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.vocab_size = vocab_size
        self.token_dim = token_dim
        self.embedding = nn.Embedding(vocab_size, token_dim)
        self.embedding_norm = nn.LayerNorm(token_dim, eps=1e-6)
        self.embedding_drop = nn.Dropout(dropout)
        self.proj = nn.Conv2d(token_dim, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.proj.out_channels

    @property
    def unit_dim(self) -> int:
        return self.patch_size[0] * self.patch_size[1]

    def units(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.is_floating_point() or x.is_complex():
            raise ValueError(
                f"the token-id stem takes integer id grids [N, H, W]; got a {x.dtype} tensor of shape "
                f"{tuple(x.shape)} (pass units=True for pre-cut units)"
            )
        n, h, w = x.shape
        p = self.patch_size[0]
        if h % p or w % p:
            raise ValueError(f"id grid {h}x{w} is not divisible by the patch size {p}")
        x = x.reshape(n, h // p, p, w // p, p).permute(0, 1, 3, 2, 4)
        return x.reshape(n, (h // p) * (w // p), p * p).long()

    def embed(self, units: torch.Tensor) -> torch.Tensor:
        e = self.embedding_drop(self.embedding_norm(self.embedding(units)))  # [N, K, p*p, e]
        w = self.proj.weight  # [D, e, p, p] -> [D, (py, px, e)], the order of the flattened unit
        return F.linear(e.flatten(2), w.permute(0, 2, 3, 1).reshape(w.shape[0], -1), self.proj.bias)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """SeiT++'s: embedding N(0, 0.02), unit LayerNorm, and torch's default conv init for ``proj``."""
        nn.init.normal_(self.embedding.weight, std=0.02)
        self.embedding_norm.reset_parameters()
        self.proj.reset_parameters()

    def config(self) -> dict[str, Any]:
        return {
            "vocab_size": self.vocab_size,
            "token_dim": self.token_dim,
            "token_dropout": self.embedding_drop.p,
        }

    def input_spec(self) -> InputSpec:
        return InputSpec(
            kind="token_ids",
            channels=1,
            img_size=self.img_size[0],
            patch_size=self.patch_size[0],
            vocab_size=self.vocab_size,
        )
