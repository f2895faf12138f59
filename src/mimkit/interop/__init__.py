"""Moving weights in and out of mimkit: timm exports, and the official MAE, LUT, Latent MIM and SeiT++
layouts."""

from mimkit.interop.load import export_encoder, load_encoder, load_method
from mimkit.interop.official import load_official, to_official
from mimkit.interop.seit_mtm import (
    classifier_to_official,
    load_official_classifier,
    load_official_mtm,
    mtm_to_official,
)
from mimkit.interop.timm import load_export, save_export

__all__ = [
    "classifier_to_official",
    "export_encoder",
    "load_encoder",
    "load_export",
    "load_method",
    "load_official",
    "load_official_classifier",
    "load_official_mtm",
    "mtm_to_official",
    "save_export",
    "to_official",
]
