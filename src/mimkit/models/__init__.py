"""Encoders, their stems and input specs, decoders and position tables."""

from mimkit.models.decoders import MAEDecoder, MTMDecoder
from mimkit.models.input_spec import InputSpec
from mimkit.models.patches import gap_patchify, patchify, unpatchify
from mimkit.models.pos_embed import resample_pos_embed, sincos_2d
from mimkit.models.stems import PixelStem, Stem, TokenEmbeddingStem, TokenIdStem
from mimkit.models.vit import ARCHS, ViTEncoder, build_encoder, mae_init_

__all__ = [
    "ARCHS",
    "InputSpec",
    "MAEDecoder",
    "MTMDecoder",
    "PixelStem",
    "Stem",
    "TokenEmbeddingStem",
    "TokenIdStem",
    "ViTEncoder",
    "build_encoder",
    "gap_patchify",
    "mae_init_",
    "patchify",
    "resample_pos_embed",
    "sincos_2d",
    "unpatchify",
]
