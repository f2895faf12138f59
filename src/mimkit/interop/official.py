"""Read and write checkpoints in the layouts of the official MAE, LUT, Latent MIM and SeiT++ code: the
layout is detected here, and converted by :mod:`mimkit.interop.mae_lut`, :mod:`mimkit.interop.latent_mim`
or :mod:`mimkit.interop.seit_mtm`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mimkit.configs import Config
from mimkit.interop.latent_mim import is_latent_mim, latent_mim_method, latent_mim_to_official
from mimkit.interop.layouts import WRAPPER_PREFIXES, read, strip_prefixes
from mimkit.interop.mae_lut import mae_lut_method, mae_lut_to_official
from mimkit.interop.seit_mtm import (
    classifier_to_official,
    is_seit_mtm,
    mtm_to_official,
    seit_classifier_kind,
    seit_mtm_method,
)
from mimkit.methods import Method

__all__ = ["load_official", "official_method", "read", "to_official"]


def load_official(
    source: str | Path | dict,
    method: str = "auto",
    overrides: list[str] | None = None,
    *,
    trust: bool = False,
) -> Method:
    """A ready mimkit method (MAE, LUT, Latent MIM or SeiT++'s MTM) from a checkpoint in the official
    layout. ``overrides``
    (key=value) set what neither the weights nor the saved arguments tell (for example
    ``method.head_act=gelu``, or the number of heads of a non-standard width). An encoder-only MAE file
    gives a freshly initialised decoder (said on stderr); a LUT file without 'model_ema', or a Latent MIM
    file without 'target_encoder', starts its teacher as a copy of the student. An SeiT++ MTM file's
    TokenAdapt modules are not part of the method: :func:`mimkit.interop.seit_mtm.load_official_mtm` returns
    them too; SeiT / SeiT++ classifiers load with :func:`mimkit.interop.seit_mtm.load_official_classifier`."""
    return official_method(read(source, trust=trust), method, overrides, source=source)[0]


def official_method(
    ckpt: dict[str, Any],
    method: str = "auto",
    overrides: list[str] | None = None,
    *,
    source: Any = "checkpoint",
) -> tuple[Method, Config]:
    """:func:`load_official` on a checkpoint already read, also returning the config it built."""
    payload = next((ckpt[k] for k in ("model", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    student = strip_prefixes(payload, WRAPPER_PREFIXES)
    if method in ("auto", "latent_mim") and is_latent_mim(student):
        return latent_mim_method(strip_prefixes(payload, ("module.",)), overrides, source)
    if method in ("auto", "mtm") and is_seit_mtm(student):
        loaded = seit_mtm_method(ckpt, overrides, source=source)
        if loaded.tokenadapt is not None:
            print(
                f"note: {source} also holds TokenAdapt weights, not part of the method; "
                "mimkit.interop.seit_mtm.load_official_mtm returns them",
                file=sys.stderr,
            )
        return loaded.module, loaded.config
    if method == "mtm":
        raise ValueError(f"{source}: not an official SeiT++ MTM layout (no 'mlm_layer.fc.weight')")
    if seit_classifier_kind(student, ckpt.get("args")):
        raise ValueError(
            f"{source}: an official SeiT / SeiT++ classifier, not a pre-training checkpoint; load it with "
            "mimkit.interop.seit_mtm.load_official_classifier"
        )
    return mae_lut_method(ckpt, student, method, overrides, source)


def to_official(method: Method, *, ddp_prefix: bool = False) -> dict[str, Any]:
    """The weights in the official layout: {'model': ...} and, for LUT, {'model_ema': 'ema.'-prefixed};
    for Latent MIM {'state_dict': ...} with 'module.' in front of every key if ``ddp_prefix`` (what the
    reference's multi-GPU resume expects); for SeiT++'s MTM {'model': ...} in its layout (TokenAdapt
    modules: :func:`mimkit.interop.seit_mtm.mtm_to_official`); a fine-tune of a token encoder pooled as
    SeiT's (``pool=avg_norm``) gives the SeiT / SeiT++ classifier layout."""
    if method.name == "mtm":
        return mtm_to_official(method)
    if method.name == "finetune":
        return classifier_to_official(method)
    state = method.state_dict()
    if method.name == "latent_mim":
        return latent_mim_to_official(state, ddp_prefix)
    return mae_lut_to_official(state)
