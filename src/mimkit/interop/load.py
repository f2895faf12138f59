"""From a file to something to evaluate: a mimkit run or checkpoint, a mimkit export, or an official MAE /
LUT / Latent MIM checkpoint, each recognised by what it holds."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mimkit.checkpoint import check_output, is_safetensors, resolve_checkpoint
from mimkit.configs import Config, build_config
from mimkit.interop.official import official_method, read
from mimkit.interop.timm import load_export, save_export
from mimkit.methods import Method, build_method, default_pool
from mimkit.models.input_spec import InputSpec
from mimkit.models.vit import ViTEncoder


def load_method(
    path: str | Path, overrides: list[str] | None = None
) -> tuple[Method, Config, dict[str, Any]]:
    """The method of a mimkit run (folder or .pt) or of an official checkpoint, its config, and the raw
    checkpoint (for what else it holds: the step). Its encoders state the checkpoint's saved input spec; a
    mimkit checkpoint from before specs were saved (said on stderr), or an official one, the spec of the
    config it is rebuilt from. ``overrides`` (key=value) complete an official file's config with what its
    weights cannot tell (``model.num_heads`` of a non-standard width, say); a mimkit checkpoint states its
    own and takes none."""
    path = resolve_checkpoint(path)
    ckpt = read(path)
    if "config" in ckpt and "model" in ckpt:
        if overrides:
            raise ValueError(
                f"{path} is a mimkit checkpoint, whose config is saved with it; key=value settings "
                f"({' '.join(overrides)}) apply to official files"
            )
        cfg = build_config(ckpt["config"])
        method = build_method(cfg)
        method.load_state_dict(ckpt["model"])
        if "input_spec" in ckpt:
            spec = InputSpec.from_dict(ckpt["input_spec"])
            for encoder in method.encoders().values():  # a teacher takes what its student takes
                encoder.input_spec = spec
        else:
            print(f"note: {path} predates saved input specs; inferred from its config", file=sys.stderr)
        return method, cfg, ckpt
    method, cfg = official_method(ckpt, overrides=overrides, source=path)
    return method, cfg, ckpt


def load_encoder(path: str | Path, weights: str = "student") -> tuple[ViTEncoder, dict[str, Any]]:
    """An encoder from a mimkit run (folder or .pt), a mimkit safetensors export or an official checkpoint,
    with its ``input_spec`` (what an evaluation feeds it: size, normalisation, crop; also ``info
    ["input_spec"]``), and what else an evaluation needs (the method, its default feature, the config)."""
    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        return load_export(path)
    method, cfg, ckpt = load_method(path)
    encoder = method.export_encoder(weights)
    info = {
        "method": cfg.method.name,
        "input_spec": encoder.input_spec,
        "step": ckpt.get("step"),
        "weights": weights,
        "probe_pool": default_pool(cfg.method.name),
        "config": cfg,
    }
    return encoder, info


def export_encoder(checkpoint: str | Path, out: str | Path, weights: str = "student") -> dict:
    """:func:`~mimkit.interop.timm.save_export` of the encoder in ``checkpoint`` (never over the
    checkpoint itself, nor over a device or a pipe)."""
    export = ("a safetensors export", is_safetensors)
    check_output(out, [resolve_checkpoint(checkpoint)], "--out", kind=export)
    encoder, info = load_encoder(checkpoint, weights)
    return save_export(encoder, info, out, weights)
