"""Moving weights in and out of mimkit: timm exports, and the official MAE / LUT / Latent MIM layouts."""

from mimkit.interop.official import load_official, to_official
from mimkit.interop.timm import export_encoder, load_export

__all__ = ["export_encoder", "load_export", "load_official", "to_official"]
