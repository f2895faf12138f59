"""Moving weights in and out of mimkit."""

from mimkit.interop.timm import export_encoder, load_export

__all__ = ["export_encoder", "load_export"]
