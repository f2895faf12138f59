"""Weights of the unofficial ViT-VQGAN of ``thuanz123/enhancing-transformers`` (class ``ViTVQ``, the
tokenizer SeiT used) in and out of :class:`~mimkit.models.tokenizer.VQTokenizer`.

Users bring a state dict of that model; we never run or unpickle its code. Files are read with torch's
weights-only loader, every expected key and shape is checked before anything is copied (a non-strict
load that silently keeps random weights is the failure this guards against), and the conversion back
(:func:`to_vitvqgan`) makes the round trip exact.

What the two layouts share, and where they differ:

* The same network: Conv2d patch embedding, fixed 2-D sin-cos positions (stored in their state dict as
  frozen parameters; recomputed by ours), pre-norm blocks with qkv without bias and a Tanh MLP, a final
  LayerNorm, ``pre_quant``/``post_quant`` Linears around a 32-d l2-normalised code space, and a
  ConvTranspose2d back to pixels; every LayerNorm with torch's default eps 1e-5.
* The state dict does not record the number of heads. A block without an output projection (``to_out``)
  has one head as wide as the model; otherwise the official default head width of 64 is assumed unless
  ``num_heads`` is given.
* The official codebook is a raw ``nn.Embedding`` that is l2-normalised when used; ours stores the rows
  normalised, as the cosine codebook of ``vector-quantize-pytorch`` expects. Rows that are already of
  unit length are kept bit for bit, so our own models round-trip exactly.
* Pixels: the official ImageNet model takes RGB in [0, 1] (no mean/std normalisation).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mimkit.checkpoint import UnsafeCheckpoint, load
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
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer

IGNORED_PREFIXES = ("loss.",)  # the training loss: LPIPS network and discriminator

PATCH_KEY = "encoder.to_patch_embedding.0.weight"
CODEBOOK_KEY = "quantizer.embedding.weight"
ENCODER_POS_KEY = "encoder.en_pos_embedding"
DECODER_POS_KEY = "decoder.de_pos_embedding"
_QKV_KEY = "encoder.transformer.layers.0.0.fn.to_qkv.weight"
_MLP_KEY = "encoder.transformer.layers.0.1.fn.net.0.weight"
_OUT_KEY = "encoder.transformer.layers.0.0.fn.to_out.weight"
_ANCHORS = (PATCH_KEY, CODEBOOK_KEY, _QKV_KEY, _MLP_KEY)
_UNIT_NORM_TOLERANCE = 1e-6  # codebook rows this close to length 1 count as already normalised
_POS_TOLERANCE = 1e-5  # a stored position table must be the sin-cos table to this absolute error


def _weight_pairs(shape: TokenizerShape) -> list[tuple[str, str]]:
    """(our name, official name) of every trained weight except the codebook, in the official order."""
    project_out = _has_output_projection(shape)
    both = ("weight", "bias")
    return [
        *((f"patch_embed.{p}", f"encoder.to_patch_embedding.0.{p}") for p in both),
        *transformer_key_pairs("encoder", "encoder", shape.depth, project_out),
        *transformer_key_pairs("decoder", "decoder", shape.depth, project_out),
        *((f"to_pixels.{p}", f"decoder.to_pixel.1.{p}") for p in both),
        *((f"pre_quant.{p}", f"pre_quant.{p}") for p in both),
        *((f"post_quant.{p}", f"post_quant.{p}") for p in both),
    ]


def _has_output_projection(shape: TokenizerShape) -> bool:
    """The official attention drops ``to_out`` for one head as wide as the model (ours is always as
    wide as the model)."""
    return shape.num_heads != 1


def _single_head_projections(model: VQTokenizer) -> list[nn.Linear]:
    return [block.attn.proj for stack in (model.encoder, model.decoder) for block in stack.blocks]


def _check_correspondence(model: VQTokenizer, pairs: list[tuple[str, str]]) -> None:
    """Every weight of ours must have an official counterpart (a changed VQTokenizer must fail here, not
    load half its weights)."""
    ours = {k for k in model.state_dict() if not k.startswith("quantizer.") and k != "kept_codes"}
    mapped = {a for a, _ in pairs}
    if not _has_output_projection(model.shape):
        mapped |= {k for k in ours if ".attn.proj." in k}
    if ours != mapped:
        raise RuntimeError(
            f"VQTokenizer weights without an official ViT-VQGAN counterpart: {key_list(ours - mapped)}; "
            f"mapped names missing from VQTokenizer: {key_list(mapped - ours)}"
        )


# -- reading ----------------------------------------------------------------------------------------------
def _read(path: Path) -> dict[str, Any]:
    try:
        return load(path)
    except UnsafeCheckpoint as err:
        raise UnsafeCheckpoint(
            f"{err}. A ViT-VQGAN file must hold tensors only (a state dict, or a Lightning checkpoint with "
            "one under 'state_dict'): where you trust the file, load the model and save its weights with "
            "torch.save(model.state_dict(), path)"
        ) from err


def _weights(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The state dict itself: a Lightning checkpoint nests it under 'state_dict'."""
    nested = state.get("state_dict")
    return nested if isinstance(nested, Mapping) else state


# -- geometry ---------------------------------------------------------------------------------------------
def vitvqgan_shape(
    state_dict: Mapping[str, Any],
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
    source: str = "state dict",
) -> TokenizerShape:
    """The geometry of a ``ViTVQ`` state dict (a Lightning checkpoint's is taken from 'state_dict'),
    read from its tensors' shapes. The image size comes from the stored position table (``img_size``
    is then a cross-check) or, when the tables were left out, from ``img_size``. ``num_heads`` is not
    recorded: see the module docstring. ``source`` names the input in error messages."""
    sd = _weights(state_dict)
    absent = [k for k in _ANCHORS if not isinstance(sd.get(k), torch.Tensor)]
    if absent:
        raise ValueError(
            f"{source}: not a ViT-VQGAN (enhancing-transformers ViTVQ) state dict: missing key(s) "
            f"{key_list(absent)}; found {key_list(sd, limit=4) or 'no keys'}{prefix_hint(sd, _ANCHORS)}"
        )
    patch = sd[PATCH_KEY]
    if patch.dim() != 4 or patch.shape[2] != patch.shape[3]:
        raise ValueError(
            f"{source}: {PATCH_KEY} must be a square conv kernel [dim, C, p, p]; got {tuple(patch.shape)}"
        )
    dim, channels, patch_size = int(patch.shape[0]), int(patch.shape[1]), int(patch.shape[2])
    codebook = sd[CODEBOOK_KEY]
    if codebook.dim() != 2:
        raise ValueError(
            f"{source}: {CODEBOOK_KEY} must be [n_embed, embed_dim]; got {tuple(codebook.shape)}"
        )

    depth, decoder_depth = layer_count(sd, "encoder"), layer_count(sd, "decoder")
    if decoder_depth != depth:
        raise ValueError(
            f"{source}: the decoder has {decoder_depth} layers and the encoder {depth}; VQTokenizer uses one "
            "geometry for both"
        )
    to_pixel = sd.get("decoder.to_pixel.1.weight")
    if isinstance(to_pixel, torch.Tensor) and to_pixel.dim() == 4 and to_pixel.shape[0] != dim:
        raise ValueError(
            f"{source}: the decoder is {to_pixel.shape[0]} wide and the encoder {dim}; VQTokenizer uses one "
            "geometry for both"
        )
    inner = sd[_QKV_KEY].shape[0] // 3
    if sd[_QKV_KEY].shape != (3 * inner, dim):
        raise ValueError(
            f"{source}: {_QKV_KEY} must be [3 * heads * dim_head, {dim}]; got {tuple(sd[_QKV_KEY].shape)}"
        )
    if inner != dim:
        raise ValueError(
            f"{source}: the attention is {inner} wide (heads x dim_head) in a {dim}-wide model; "
            "VQTokenizer's attention is as wide as the model"
        )
    mlp_dim = int(sd[_MLP_KEY].shape[0])
    mlp_ratio = mlp_dim / dim
    if int(dim * mlp_ratio) != mlp_dim:
        raise ValueError(
            f"{source}: an MLP width of {mlp_dim} is not expressible as a ratio of the width {dim}"
        )
    heads = attention_heads(sd, _OUT_KEY, dim, num_heads, source)

    size = img_size
    for key in (ENCODER_POS_KEY, DECODER_POS_KEY):
        if key in sd and not isinstance(sd[key], torch.Tensor):
            raise ValueError(f"{source}: {key} holds a {type(sd[key]).__name__}, not a tensor")
    table = sd.get(ENCODER_POS_KEY, sd.get(DECODER_POS_KEY))
    if isinstance(table, torch.Tensor):
        tokens = int(table.shape[1]) if table.dim() == 3 else -1
        grid = math.isqrt(max(tokens, 0))
        if table.dim() != 3 or grid * grid != tokens or tokens == 0:
            raise ValueError(
                f"{source}: the position table must be [1, grid * grid, {dim}]; got {tuple(table.shape)}"
            )
        size = grid * patch_size
        if img_size is not None and img_size != size:
            raise ValueError(
                f"{source}: its position table is for {size} px images ({grid}x{grid} patches of "
                f"{patch_size}); got img_size={img_size}"
            )
    elif size is None:
        raise ValueError(
            f"{source}: holds no position table ({ENCODER_POS_KEY}) to read the image size from; "
            "pass img_size"
        )
    try:
        return TokenizerShape(
            img_size=size,
            patch_size=patch_size,
            embed_dim=dim,
            depth=depth,
            num_heads=heads,
            mlp_ratio=mlp_ratio,
            codebook_size=int(codebook.shape[0]),
            code_dim=int(codebook.shape[1]),
            channels=channels,
        )
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from err


# -- loading ----------------------------------------------------------------------------------------------
def _expected_shapes(model: VQTokenizer, pairs: list[tuple[str, str]], with_pos: bool) -> dict[str, tuple]:
    ours = model.state_dict()
    expected = {theirs: tuple(ours[mine].shape) for mine, theirs in pairs}
    expected[CODEBOOK_KEY] = (model.shape.codebook_size, model.shape.code_dim)
    if with_pos:
        table = tuple(model.encoder.pos_embed.shape)
        expected[ENCODER_POS_KEY] = expected[DECODER_POS_KEY] = table
    return expected


def _shape_text(expected: dict[str, tuple]) -> str:
    """A short geometry line for error messages (width, patch, codebook)."""
    dim, channels, patch, _ = expected["encoder.to_patch_embedding.0.weight"]
    codes, code_dim = expected[CODEBOOK_KEY]
    return f"width {dim}, {channels} channels, patch {patch}, {codes} x {code_dim} codes"


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    """l2-normalised rows (as the official model uses them); rows already of unit length are kept as
    they are, so a round trip through :func:`to_vitvqgan` is bit-exact."""
    rows = rows.float()
    norms = rows.norm(dim=-1, keepdim=True)
    unit = (norms - 1).abs() <= _UNIT_NORM_TOLERANCE
    return torch.where(unit, rows, rows / norms.clamp_min(1e-12))


def load_vitvqgan(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
) -> VQTokenizer:
    """A :class:`VQTokenizer` with the weights of an enhancing-transformers ``ViTVQ`` (a state dict, or
    a file holding one, possibly as a Lightning checkpoint), in eval mode. Every key and shape is
    checked: a missing, misshapen or unexpected key (other than the training loss's) is a ValueError
    naming the keys. It takes images as the official model does (RGB in [0, 1] for ImageNet)."""
    if isinstance(path_or_state_dict, Mapping):
        source, state = "state dict", path_or_state_dict
    else:
        source, state = str(path_or_state_dict), _read(Path(path_or_state_dict))
    sd = _weights(state)
    shape = vitvqgan_shape(sd, img_size=img_size, num_heads=num_heads, source=source)
    model = VQTokenizer(shape, kmeans_init=False)
    pairs = _weight_pairs(shape)
    _check_correspondence(model, pairs)
    with_pos = ENCODER_POS_KEY in sd or DECODER_POS_KEY in sd
    expected = _expected_shapes(model, pairs, with_pos)
    what = f"a ViT-VQGAN of shape {_shape_text(expected)}"
    verify_layout(sd, expected, source, what, ignored=IGNORED_PREFIXES, hint=prefix_hint(sd, _ANCHORS))

    new = dict(model.state_dict())
    for mine, theirs in pairs:
        new[mine] = sd[theirs]
    codes = _unit_rows(sd[CODEBOOK_KEY]).unsqueeze(0)
    new["quantizer._codebook.embed"] = codes
    new["quantizer._codebook.embed_avg"] = codes.clone()  # EMA state consistent with the codes
    model.load_state_dict(new, strict=True)
    if not _has_output_projection(shape):
        set_identity_projections(_single_head_projections(model))
    model.quantizer._codebook.initted.fill_(True)  # k-means init must not overwrite the loaded codes

    if with_pos:
        for stack, key in ((model.encoder, ENCODER_POS_KEY), (model.decoder, DECODER_POS_KEY)):
            stored = sd[key].to(stack.pos_embed.dtype)
            error = float((stored - stack.pos_embed).abs().max())
            if error > _POS_TOLERANCE:
                raise ValueError(
                    f"{source}: {key} is not the fixed 2-D sin-cos table (it differs by up to {error:.3g}); "
                    "VQTokenizer cannot use other position tables"
                )
            stack.pos_embed = stored.clone()  # the official model adds exactly these values
    return model.eval()


# -- writing ----------------------------------------------------------------------------------------------
def to_vitvqgan(tokenizer: VQTokenizer) -> dict[str, torch.Tensor]:
    """Our tokenizer's weights under the enhancing-transformers ``ViTVQ`` names (the training loss's
    weights aside), CPU tensors. A pruned tokenizer is written with its kept codes only, so the official
    model returns the same compact ids. With one head, the official attention has no output projection:
    ours must then be the identity."""
    shape = tokenizer.shape
    pairs = _weight_pairs(shape)
    _check_correspondence(tokenizer, pairs)
    if not _has_output_projection(shape):
        check_identity_projections(_single_head_projections(tokenizer), "ViT-VQGAN")
    ours = tokenizer.state_dict()
    named = {theirs: ours[mine] for mine, theirs in pairs}
    codebook = tokenizer.quantizer._codebook.embed[0]
    if tokenizer.pruned:
        codebook = codebook[tokenizer.kept_codes.to(codebook.device)]
    out = {ENCODER_POS_KEY: tokenizer.encoder.pos_embed}
    out.update({k: v for k, v in named.items() if k.startswith("encoder.")})
    out.update({k: v for k, v in named.items() if k.startswith("decoder.transformer.")})
    out[DECODER_POS_KEY] = tokenizer.decoder.pos_embed
    out.update({k: v for k, v in named.items() if k.startswith("decoder.to_pixel.")})
    out[CODEBOOK_KEY] = codebook
    out.update({k: v for k, v in named.items() if k.startswith(("pre_quant.", "post_quant."))})
    return {k: v.detach().cpu().clone().contiguous() for k, v in out.items()}


__all__ = [
    "attention_heads",
    "key_list",
    "layer_count",
    "load_vitvqgan",
    "prefix_hint",
    "to_vitvqgan",
    "transformer_key_pairs",
    "verify_layout",
    "vitvqgan_shape",
]
