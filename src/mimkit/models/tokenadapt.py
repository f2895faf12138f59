"""TokenAdapt (SeiT++): pixel-style geometric augmentation for token grids.

A token grid cannot be rotated, sheared or translated by sub-token amounts: its cells are codebook ids.
TokenAdapt learns a way around that. ``f`` (:attr:`TokenAdapt.conversion_function`) lifts an emb map of
codebook vectors [B, D, G, G] into a continuous, pixel-like feature map [B, D, 2G, 2G], where torchvision
style geometry (flip, rotation, translation, shear, random resized crop, Mixup/CutMix) behaves as on
images; ``g`` (:attr:`TokenAdapt.reverse_transform`) maps an augmented feature map [B, D, 2h, 2w] back to
logits over the K codes on an h x w grid.

Both are one-layer ViTs of the ViT-VQGAN kind (pre-norm timm blocks with a Tanh MLP, qkv without bias,
torch's LayerNorm eps 1e-5, fixed 2-D sin-cos positions, a final LayerNorm): ``f`` = per-token Linear
D -> width, the ViT over the G x G grid, a 2 x 2 stride-2 ConvTranspose2d width -> D; ``g`` = a 2 x 2
stride-2 Conv2d D -> width, the ViT, a Linear width -> K. The positions are fixed, so ``g`` (and ``f``)
run on any grid: the stored table is used on the grid it was made for, another grid gets its own.

The official weights (``weights/tokenadapt.ckpt`` of SeiT++) are a flat state dict in the
enhancing-transformers module layout (``conversion_function.1.transformer.layers.0.0.fn.to_qkv`` ...).
Our modules are timm blocks; :func:`official_key_map` is the exact correspondence, both ways, including
the stored position tables. :func:`load_tokenadapt` checks every key and shape before it copies
anything (the reference loads these weights non-strictly, so a file under another prefix silently loads
nothing); :func:`save_tokenadapt` writes that layout, and the round trip is bit-exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from mimkit.checkpoint import UnsafeCheckpoint, load, save_atomic
from mimkit.models.enhancing import (
    attention_heads,
    check_identity_projections,
    key_list,
    layer_count,
    prefix_hint,
    set_identity_projections,
    transformer_key_pairs,
    verify_layout,
)
from mimkit.models.pos_embed import sincos_2d

__all__ = [
    "TokenAdapt",
    "load_tokenadapt",
    "official_key_map",
    "save_tokenadapt",
    "to_official_tokenadapt",
    "tokenadapt_geometry",
]

# official names
F_PREFIX, G_PREFIX = "conversion_function.1", "reverse_transform.0"
F_EMBED_KEY = "conversion_function.0.weight"
F_POS_KEY = "conversion_function.1.de_pos_embedding"
G_POS_KEY = "reverse_transform.0.en_pos_embedding"
G_HEAD_KEY = "reverse_transform.1.weight"
_F_QKV_KEY = f"{F_PREFIX}.transformer.layers.0.0.fn.to_qkv.weight"
_F_MLP_KEY = f"{F_PREFIX}.transformer.layers.0.1.fn.net.0.weight"
_F_OUT_KEY = f"{F_PREFIX}.transformer.layers.0.0.fn.to_out.weight"
_ANCHORS = (F_EMBED_KEY, G_HEAD_KEY, F_POS_KEY, G_POS_KEY, _F_QKV_KEY, _F_MLP_KEY)
_POS_TOLERANCE = 1e-5  # a stored position table must be the sin-cos table to this absolute error


# -- the modules ------------------------------------------------------------------------------------------
class _PositionedViT(nn.Module):
    """Fixed sin-cos positions of a ``grid`` x ``grid`` table (stored, so a loaded table is kept bit for
    bit), pre-norm blocks and a final LayerNorm."""

    def __init__(self, width: int, num_heads: int, depth: int, mlp_ratio: float, grid: int) -> None:
        super().__init__()
        self.grid = grid
        self.register_buffer("pos_embed", sincos_2d(width, grid, cls_token=False))
        self.blocks = nn.Sequential(
            *(
                # torch's LayerNorm (eps 1e-5), as the reference's, not timm's default (1e-6)
                Block(width, num_heads, mlp_ratio, qkv_bias=False, act_layer=nn.Tanh, norm_layer=nn.LayerNorm)
                for _ in range(depth)
            )
        )
        self.norm = nn.LayerNorm(width)

    def positions(self, height: int, width: int) -> torch.Tensor:
        """[1, height * width, dim]: the stored table on its own grid, a fresh sin-cos table elsewhere."""
        if (height, width) == (self.grid, self.grid):
            return self.pos_embed
        table = sincos_2d(self.pos_embed.shape[-1], (height, width), cls_token=False)
        return table.to(self.pos_embed.device, self.pos_embed.dtype)

    def encode(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """Tokens [B, height * width, dim] in row-major order -> the same after the blocks."""
        return self.norm(self.blocks(x + self.positions(height, width).to(x.dtype)))


class _Lift(_PositionedViT):
    """f: emb map [B, D, H, W] -> feature map [B, D, 2H, 2W]."""

    def __init__(
        self, token_dim: int, width: int, num_heads: int, depth: int, mlp_ratio: float, grid: int
    ) -> None:
        super().__init__(width, num_heads, depth, mlp_ratio, grid)
        self.embed = nn.Linear(token_dim, width)
        self.to_feat = nn.ConvTranspose2d(width, token_dim, kernel_size=2, stride=2)

    def forward(self, emb: torch.Tensor) -> torch.Tensor:
        batch, _, height, width = emb.shape
        x = self.encode(self.embed(emb.flatten(2).transpose(1, 2)), height, width)
        return self.to_feat(x.transpose(1, 2).reshape(batch, -1, height, width))


class _Invert(_PositionedViT):
    """g: feature map [B, D, 2h, 2w] -> logits [B, K, h, w]."""

    def __init__(
        self,
        vocab_size: int,
        token_dim: int,
        width: int,
        num_heads: int,
        depth: int,
        mlp_ratio: float,
        grid: int,
    ) -> None:
        super().__init__(width, num_heads, depth, mlp_ratio, grid)
        self.patch_embed = nn.Conv2d(token_dim, width, kernel_size=2, stride=2)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(feat)
        batch, _, height, width = x.shape
        x = self.encode(x.flatten(2).transpose(1, 2), height, width)
        return self.head(x).transpose(1, 2).reshape(batch, -1, height, width)


class TokenAdapt(nn.Module):
    """f (``conversion_function``) and g (``reverse_transform``) for K codes of dimension ``token_dim``.
    ``in_grid`` is the token grid f's stored position table is for (SeiT's 32), ``out_grid`` g's (its
    28 x 28 crops); both run on other grids too. The official attention has heads 64 wide, so
    ``num_heads`` = width / 64 gives a model the official code can load."""

    def __init__(
        self,
        vocab_size: int,
        token_dim: int = 32,
        width: int = 384,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        in_grid: int = 32,
        out_grid: int = 28,
        depth: int = 1,
    ) -> None:
        super().__init__()
        for name, value in (
            ("vocab_size", vocab_size),
            ("token_dim", token_dim),
            ("width", width),
            ("num_heads", num_heads),
            ("in_grid", in_grid),
            ("out_grid", out_grid),
            ("depth", depth),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TokenAdapt {name} must be an integer >= 1; got {value!r}")
        if width % num_heads or width % 4:
            raise ValueError(
                f"TokenAdapt width {width} must be divisible by num_heads {num_heads} and by 4 (the sin-cos "
                "position table)"
            )
        hidden = width * mlp_ratio
        if mlp_ratio <= 0 or hidden != int(hidden):
            raise ValueError(f"TokenAdapt mlp_ratio {mlp_ratio} must give a whole MLP width; got {hidden}")
        self.vocab_size, self.token_dim, self.width = vocab_size, token_dim, width
        self.num_heads, self.mlp_ratio, self.depth = num_heads, float(mlp_ratio), depth
        self.in_grid, self.out_grid = in_grid, out_grid
        self.conversion_function = _Lift(token_dim, width, num_heads, depth, mlp_ratio, in_grid)
        self.reverse_transform = _Invert(vocab_size, token_dim, width, num_heads, depth, mlp_ratio, out_grid)
        self.apply(_init_weights)

    def geometry(self) -> dict[str, Any]:
        """The constructor's arguments: everything that fixes the weights' shapes."""
        return {
            "vocab_size": self.vocab_size,
            "token_dim": self.token_dim,
            "width": self.width,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "in_grid": self.in_grid,
            "out_grid": self.out_grid,
            "depth": self.depth,
        }

    def lift(self, emb: torch.Tensor) -> torch.Tensor:
        """f: emb map [B, D, H, W] of codebook vectors -> feature map [B, D, 2H, 2W]."""
        if emb.ndim != 4 or emb.shape[1] != self.token_dim or not emb.is_floating_point():
            raise ValueError(
                f"TokenAdapt lifts emb maps [B, {self.token_dim}, H, W] of codebook vectors; got "
                f"{tuple(emb.shape)} {emb.dtype}"
            )
        return self.conversion_function(emb)

    def invert_logits(self, feat: torch.Tensor) -> torch.Tensor:
        """g: feature map [B, D, 2h, 2w] -> logits [B, K, h, w]."""
        if feat.ndim != 4 or feat.shape[1] != self.token_dim or feat.shape[-2] % 2 or feat.shape[-1] % 2:
            raise ValueError(
                f"TokenAdapt inverts feature maps [B, {self.token_dim}, 2h, 2w] (even sides); got "
                f"{tuple(feat.shape)}"
            )
        return self.reverse_transform(feat)

    def invert(self, feat: torch.Tensor) -> torch.Tensor:
        """g then argmax: feature map [B, D, 2h, 2w] -> ids [B, h, w]."""
        return self.invert_logits(feat).argmax(dim=1)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.geometry().items())


def _init_weights(module: nn.Module) -> None:
    """The reference's: Xavier-uniform Linear and conv weights (a conv as a Linear over its flattened
    kernel), zero Linear biases, unit LayerNorms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        weight = module.weight.data
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))


# -- the official layout ----------------------------------------------------------------------------------
def _project_out(num_heads: int) -> bool:
    """The official attention drops ``to_out`` for one head as wide as the model (ours keeps an identity
    projection then)."""
    return num_heads != 1


def _single_head_projections(ta: TokenAdapt) -> list[nn.Linear]:
    return [
        block.attn.proj for stack in (ta.conversion_function, ta.reverse_transform) for block in stack.blocks
    ]


def _key_pairs(depth: int, num_heads: int) -> list[tuple[str, str]]:
    """(our name, official name) of every tensor, in the official state dict's order."""
    both = ("weight", "bias")
    project_out = _project_out(num_heads)
    return [
        *((f"conversion_function.embed.{p}", f"conversion_function.0.{p}") for p in both),
        ("conversion_function.pos_embed", F_POS_KEY),
        *transformer_key_pairs("conversion_function", F_PREFIX, depth, project_out),
        *((f"conversion_function.to_feat.{p}", f"{F_PREFIX}.to_pixel.1.{p}") for p in both),
        ("reverse_transform.pos_embed", G_POS_KEY),
        *((f"reverse_transform.patch_embed.{p}", f"{G_PREFIX}.to_patch_embedding.0.{p}") for p in both),
        *transformer_key_pairs("reverse_transform", G_PREFIX, depth, project_out),
        *((f"reverse_transform.head.{p}", f"reverse_transform.1.{p}") for p in both),
    ]


def official_key_map(ta: TokenAdapt) -> dict[str, str]:
    """Our state dict key -> the official one, for every tensor (with one head, our identity output
    projections have no official counterpart and are left out). Invert it for the other direction."""
    pairs = dict(_key_pairs(ta.depth, ta.num_heads))
    ours = set(ta.state_dict())
    if not _project_out(ta.num_heads):
        ours = {k for k in ours if ".attn.proj." not in k}
    if ours != set(pairs):
        raise RuntimeError(
            f"TokenAdapt weights without an official counterpart: {key_list(ours - set(pairs))}; "
            f"mapped names missing from TokenAdapt: {key_list(set(pairs) - ours)}"
        )
    return pairs


def to_official_tokenadapt(ta: TokenAdapt) -> dict[str, torch.Tensor]:
    """Our weights under the official names (position tables included), CPU tensors in the official
    order: what the SeiT++ code loads from ``tokenadapt.ckpt``. With one head the official attention has
    no output projection, so ours must then be the identity."""
    if not _project_out(ta.num_heads):
        check_identity_projections(_single_head_projections(ta), "TokenAdapt")
    ours = ta.state_dict()
    return {
        theirs: ours[mine].detach().cpu().clone().contiguous()
        for mine, theirs in official_key_map(ta).items()
    }


def save_tokenadapt(ta: TokenAdapt, path: str | os.PathLike) -> Path:
    """Write ``ta`` as the official flat ``tokenadapt.ckpt`` (atomically)."""
    return save_atomic(to_official_tokenadapt(ta), Path(path))


def _read(path: Path) -> dict[str, Any]:
    try:
        return load(path)
    except UnsafeCheckpoint as err:
        raise UnsafeCheckpoint(
            f"{err}. A TokenAdapt file must hold tensors only (a state dict): where you trust the file, load "
            "it and save its weights with torch.save(model.state_dict(), path)"
        ) from err


def _unwrap(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The flat state dict: nested under 'model' or 'state_dict', and DDP's 'module.' prefix stripped."""
    for key in ("model", "state_dict"):
        if isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if state and all(isinstance(k, str) and k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _tensor(sd: Mapping[str, Any], key: str, dims: int, source: str, what: str) -> torch.Tensor:
    value = sd[key]
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{source}: {key} must be {what}; got {shape}")
    return value


def _grid_of(sd: Mapping[str, Any], key: str, width: int, source: str) -> int:
    table = _tensor(sd, key, 3, source, f"a position table [1, grid * grid, {width}]")
    grid = math.isqrt(int(table.shape[1]))
    if table.shape[0] != 1 or table.shape[2] != width or grid * grid != table.shape[1] or grid == 0:
        raise ValueError(
            f"{source}: {key} must be a position table [1, grid * grid, {width}]; got {tuple(table.shape)}"
        )
    return grid


def _whole_model_hint(sd: Mapping[str, Any]) -> str:
    if any(not k.startswith(("conversion_function.", "reverse_transform.")) for k in sd):
        return (
            "; if this is a whole SeiT++ model's state dict, keep only its conversion_function.* and "
            "reverse_transform.* entries"
        )
    return ""


def tokenadapt_geometry(
    state_dict: Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    token_dim: int | None = None,
    num_heads: int | None = None,
    source: str = "state dict",
) -> dict[str, Any]:
    """The :class:`TokenAdapt` arguments of an official-layout state dict, read from its shapes.
    ``vocab_size`` and ``token_dim`` are cross-checks; ``num_heads`` is not stored (default: width / 64,
    the official head width)."""
    sd = state_dict
    absent = [k for k in _ANCHORS if k not in sd]
    if absent:
        raise ValueError(
            f"{source}: not a TokenAdapt state dict (SeiT++'s tokenadapt.ckpt layout): missing key(s) "
            f"{key_list(absent)}; found {key_list(sd, limit=4) or 'no keys'}{prefix_hint(sd, _ANCHORS)}"
        )
    head = _tensor(sd, G_HEAD_KEY, 2, source, "[K, width]")
    vocab, width = int(head.shape[0]), int(head.shape[1])
    embed = _tensor(sd, F_EMBED_KEY, 2, source, f"[{width}, token_dim]")
    if embed.shape[0] != width:
        raise ValueError(f"{source}: {F_EMBED_KEY} is {tuple(embed.shape)}; f must be as wide as g ({width})")
    dim = int(embed.shape[1])
    for name, given, found in (("vocab_size", vocab_size, vocab), ("token_dim", token_dim, dim)):
        if given is not None and given != found:
            raise ValueError(f"{source}: holds a TokenAdapt with {name} {found}; expected {given}")
    depth, g_depth = layer_count(sd, F_PREFIX), layer_count(sd, G_PREFIX)
    if depth != g_depth or depth == 0:
        raise ValueError(
            f"{source}: f has {depth} transformer layers and g {g_depth}; TokenAdapt needs one depth >= 1 "
            "for both"
        )
    qkv = _tensor(sd, _F_QKV_KEY, 2, source, f"[3 * {width}, {width}]")
    if tuple(qkv.shape) != (3 * width, width):
        raise ValueError(
            f"{source}: {_F_QKV_KEY} is {tuple(qkv.shape)}: an attention {qkv.shape[0] // 3} wide in a "
            f"{width}-wide model; TokenAdapt's attention is as wide as the model ([{3 * width}, {width}])"
        )
    hidden = int(_tensor(sd, _F_MLP_KEY, 2, source, f"[hidden, {width}]").shape[0])
    heads = attention_heads(sd, _F_OUT_KEY, width, num_heads, source)
    return {
        "vocab_size": vocab,
        "token_dim": dim,
        "width": width,
        "num_heads": heads,
        "mlp_ratio": hidden / width,
        "in_grid": _grid_of(sd, F_POS_KEY, width, source),
        "out_grid": _grid_of(sd, G_POS_KEY, width, source),
        "depth": depth,
    }


def load_tokenadapt(
    path_or_state: str | os.PathLike | Mapping[str, Any],
    *,
    vocab_size: int | None = None,
    token_dim: int | None = None,
    num_heads: int | None = None,
) -> TokenAdapt:
    """A :class:`TokenAdapt` with the weights of an official-layout file (SeiT++'s ``tokenadapt.ckpt``,
    or what :func:`save_tokenadapt` wrote) or state dict, in eval mode. The file is read with the
    weights-only loader; a state dict nested under 'model' or 'state_dict', or with DDP's 'module.'
    prefix, is accepted. Every key and shape is checked, and the stored position tables must be the
    sin-cos tables, before anything is copied: a ValueError names the file and the offending keys."""
    if isinstance(path_or_state, Mapping):
        source, state = "state dict", path_or_state
    else:
        source, state = str(path_or_state), _read(Path(path_or_state))
    sd = _unwrap(state)
    kwargs = tokenadapt_geometry(
        sd, vocab_size=vocab_size, token_dim=token_dim, num_heads=num_heads, source=source
    )
    try:
        ta = TokenAdapt(**kwargs)
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err
    pairs = official_key_map(ta)
    ours = ta.state_dict()
    expected = {theirs: tuple(ours[mine].shape) for mine, theirs in pairs.items()}
    what = (
        f"a TokenAdapt of {kwargs['vocab_size']} codes of {kwargs['token_dim']} dims, width "
        f"{kwargs['width']}, grids {kwargs['in_grid']} -> {kwargs['out_grid']}"
    )
    verify_layout(sd, expected, source, what, hint=prefix_hint(sd, _ANCHORS) or _whole_model_hint(sd))
    for key in (F_POS_KEY, G_POS_KEY):
        reference = sincos_2d(ta.width, math.isqrt(sd[key].shape[1]), cls_token=False)
        error = float((sd[key].float() - reference).abs().max())
        if error > _POS_TOLERANCE:
            raise ValueError(
                f"{source}: {key} is not the fixed 2-D sin-cos table (it differs by up to {error:.3g}); "
                "TokenAdapt's positions are fixed"
            )
    new = dict(ta.state_dict())
    new.update({mine: sd[theirs] for mine, theirs in pairs.items()})
    ta.load_state_dict(new, strict=True)
    if not _project_out(ta.num_heads):
        set_identity_projections(_single_head_projections(ta))
    return ta.eval()
