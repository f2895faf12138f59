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


class TokenEmbeddingStem(Stem):
    """Grids of token embeddings [N, C, H, W] (SeiT's continuous input: codebook vectors, C =
    ``token_dim``): SeiT's Stem-Adapter, a Conv2d(C -> D, ``kernel_size``, stride ``patch_size``,
    ``padding``), by default kernel 4, stride 2, padding 1, so neighbouring patches overlap by half a
    window. A unit is the zero-padded k x k window a patch's token is computed from, flattened in the
    conv weight's (c, ky, kx) order, U = k * k * C; ``embed`` applies the conv as a Linear on units, so a
    masked forward embeds only the windows it uses. Sizes are in cells: ``img_size`` is the grid's side
    (SeiT on ImageNet: 28 -> 14 x 14 patches) and the stride is the encoder's patch size."""

    kind = "token_embeddings"

    def __init__(
        self,
        *,
        token_dim: int,
        img_size: int,
        patch_size: int,
        embed_dim: int,
        kernel_size: int = 4,
        padding: int = 1,
    ) -> None:
        super().__init__()
        for name, value, least in (
            ("token_dim", token_dim, 1),
            ("img_size", img_size, 1),
            ("patch_size", patch_size, 1),
            ("embed_dim", embed_dim, 1),
            ("kernel_size", kernel_size, 1),
            ("padding", padding, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}; got {value!r}")
        if img_size % patch_size:
            raise ValueError(f"embedding grid side {img_size} is not divisible by patch_size {patch_size}")
        side = img_size // patch_size
        # the conv's output side must be the encoder's grid, or positions and patches would not line up
        out = (img_size + 2 * padding - kernel_size) // patch_size + 1
        if img_size + 2 * padding < kernel_size or out != side:
            raise ValueError(
                f"a kernel {kernel_size}, stride {patch_size}, padding {padding} conv on a {img_size}-cell "
                f"side gives {max(out, 0)} patches per side; the encoder's grid needs {side} "
                f"(img_size / patch_size): pick padding (kernel_size - patch_size) / 2"
            )
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (side, side)
        self.num_patches = side * side
        self.token_dim = token_dim
        self.kernel_size, self.padding = kernel_size, padding
        self.proj = nn.Conv2d(token_dim, embed_dim, kernel_size, stride=patch_size, padding=padding)
        self.reset_parameters()

    @property
    def embed_dim(self) -> int:
        return self.proj.out_channels

    @property
    def unit_dim(self) -> int:
        return self.kernel_size * self.kernel_size * self.token_dim

    def _check(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.token_dim or not x.is_floating_point():
            raise ValueError(
                f"the token-embedding stem takes embedding grids [N, {self.token_dim}, H, W] (floats); got "
                f"a {x.dtype} tensor of shape {tuple(x.shape)} (pass units=True for pre-cut units)"
            )
        if tuple(x.shape[2:]) != self.img_size:
            raise ValueError(
                f"the token-embedding stem takes {self.img_size[0]}x{self.img_size[1]} grids (the "
                f"encoder's img_size, in cells); got {x.shape[2]}x{x.shape[3]}"
            )

    def units(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        cols = F.unfold(x, self.kernel_size, padding=self.padding, stride=self.patch_size[0])
        return cols.transpose(1, 2)  # [N, C*k*k, L] -> [N, L, U]

    def embed(self, units: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight  # [D, C, k, k] flattens in the units' (c, ky, kx) order
        return F.linear(units, w.reshape(w.shape[0], -1), self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Every patch at once: the conv itself (no k*k/s^2-fold copy of the input in units)."""
        self._check(x)
        return self.proj(x).flatten(2).transpose(1, 2)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PyTorch's default conv init (kaiming-uniform a=sqrt(5) weights, uniform +-1/sqrt(fan_in) bias),
        as SeiT's stem has it: its model factory replaces timm's patch conv with a fresh Conv2d after the
        ViT's own init ran, so no ViT init touches the stem."""
        self.proj.reset_parameters()

    def config(self) -> dict[str, Any]:
        return {"token_dim": self.token_dim, "stem_kernel": self.kernel_size, "stem_padding": self.padding}

    def input_spec(self) -> InputSpec:
        return InputSpec(
            kind="token_embeddings",
            channels=self.token_dim,
            img_size=self.img_size[0],
            patch_size=self.patch_size[0],
        )
