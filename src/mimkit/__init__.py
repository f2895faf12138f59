"""mimkit: masked image modeling for Vision Transformers."""

__version__ = "0.1.0"

from mimkit.configs import Config, build_config
from mimkit.methods import METHODS, build_method
from mimkit.models import ViTEncoder, build_encoder

__all__ = ["METHODS", "Config", "ViTEncoder", "__version__", "build_config", "build_encoder", "build_method"]
