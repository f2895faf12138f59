"""Read and write checkpoints in the layouts of the official MAE, LUT and Latent MIM code: the layout is
detected here, and converted by :mod:`mimkit.interop.mae_lut` or :mod:`mimkit.interop.latent_mim`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mimkit.configs import Config
from mimkit.interop.latent_mim import is_latent_mim, latent_mim_method, latent_mim_to_official
from mimkit.interop.layouts import WRAPPER_PREFIXES, read, strip_prefixes
from mimkit.interop.mae_lut import mae_lut_method, mae_lut_to_official
from mimkit.methods import Method

__all__ = ["load_official", "official_method", "read", "to_official"]


def load_official(
    source: str | Path | dict,
    method: str = "auto",
    overrides: list[str] | None = None,
    *,
    trust: bool = False,
) -> Method:
    """A ready mimkit method (MAE, LUT or Latent MIM) from a checkpoint in the official layout. ``overrides``
    (key=value) set what neither the weights nor the saved arguments tell (for example
    ``method.head_act=gelu``, or the number of heads of a non-standard width). An encoder-only MAE file
    gives a freshly initialised decoder (said on stderr); a LUT file without 'model_ema', or a Latent MIM
    file without 'target_encoder', starts its teacher as a copy of the student."""
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
    return mae_lut_method(ckpt, student, method, overrides, source)


def to_official(method: Method, *, ddp_prefix: bool = False) -> dict[str, Any]:
    """The weights in the official layout: {'model': ...} and, for LUT, {'model_ema': 'ema.'-prefixed};
    for Latent MIM {'state_dict': ...} with 'module.' in front of every key if ``ddp_prefix`` (what the
    reference's multi-GPU resume expects)."""
    state = method.state_dict()
    if method.name == "latent_mim":
        return latent_mim_to_official(state, ddp_prefix)
    return mae_lut_to_official(state)
