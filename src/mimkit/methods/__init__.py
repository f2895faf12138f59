"""The catalogue of methods: pre-training methods and the evaluations that train (linear probe,
fine-tune), by name. A method is one file that says what is different about it; importing this package
registers every method's config with :mod:`mimkit.configs`."""

from __future__ import annotations

from typing import Any

from mimkit.configs import register_method_config
from mimkit.methods.base import Method, StepOutput, encoder_from_config
from mimkit.methods.ema import EMATeacher, cosine_momentum
from mimkit.methods.finetune import FineTune, FinetuneConfig
from mimkit.methods.latent_mim import LatentMIM, LatentMIMConfig
from mimkit.methods.linprobe import LinearProbe, LinearProbeConfig
from mimkit.methods.lut import LUT, LUTConfig
from mimkit.methods.mae import MAE, MAEConfig, mae_loss
from mimkit.methods.mtm import MTM, MTMConfig, mtm_loss
from mimkit.methods.tokenadapt import TokenAdaptConfig, TokenAdaptMethod
from mimkit.methods.tokenizer import TokenizerConfig, TokenizerMethod

# pre-training methods; and the classifiers that evaluate an encoder (their `method` section names the
# checkpoint to evaluate)
METHODS: dict[str, type[Method]] = {
    MAE.name: MAE,
    LUT.name: LUT,
    LatentMIM.name: LatentMIM,
    MTM.name: MTM,
    TokenizerMethod.name: TokenizerMethod,  # trained by `mimkit tokenizer train`
    TokenAdaptMethod.name: TokenAdaptMethod,  # trained by `mimkit tokenadapt train`
}
TASKS: dict[str, type[LinearProbe] | type[FineTune]] = {
    LinearProbe.name: LinearProbe,
    FineTune.name: FineTune,
}

for _name, _cls in {**METHODS, **TASKS}.items():
    register_method_config(_name, _cls.Config)


def build_method(cfg: Any) -> Method:
    """The method named by ``cfg.method.name``, with its encoder built from ``cfg.model`` and stating the
    input of ``cfg.data``."""
    if cfg.method.name not in METHODS:
        raise ValueError(
            f"'{cfg.method.name}' is an evaluation, not a pre-training method: run `mimkit {cfg.method.name}`"
        )
    return METHODS[cfg.method.name].build(cfg.model, cfg.method, cfg.data)


def default_pool(method: str | None) -> str:
    """The feature an evaluation reads from an encoder pre-trained by ``method`` when its run says
    nothing: the cls token for MAE and LUT (MAE's linear probe), the mean of the patch tokens for Latent
    MIM (whose cls token is trained only as decoder context)."""
    return METHODS[method].probe_pool if method in METHODS else "cls"


__all__ = [
    "LUT",
    "MAE",
    "METHODS",
    "MTM",
    "TASKS",
    "EMATeacher",
    "FineTune",
    "FinetuneConfig",
    "LUTConfig",
    "LatentMIM",
    "LatentMIMConfig",
    "LinearProbe",
    "LinearProbeConfig",
    "MAEConfig",
    "MTMConfig",
    "Method",
    "StepOutput",
    "TokenAdaptConfig",
    "TokenAdaptMethod",
    "TokenizerConfig",
    "TokenizerMethod",
    "build_method",
    "cosine_momentum",
    "default_pool",
    "encoder_from_config",
    "mae_loss",
    "mtm_loss",
]
