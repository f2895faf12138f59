"""Encoders, decoders and position tables."""

from mimkit.models.decoders import MAEDecoder
from mimkit.models.patches import gap_patchify, patchify, unpatchify
from mimkit.models.pos_embed import resample_pos_embed, sincos_2d
from mimkit.models.vit import ARCHS, ViTEncoder, build_encoder, mae_init_

__all__ = [
    "ARCHS",
    "MAEDecoder",
    "ViTEncoder",
    "build_encoder",
    "gap_patchify",
    "mae_init_",
    "patchify",
    "resample_pos_embed",
    "sincos_2d",
    "unpatchify",
]
