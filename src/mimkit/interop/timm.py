"""Export an encoder as a safetensors state dict that timm's ViT loads with ``strict=True``, and read
such an export back."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimkit.checkpoint import CheckpointError, check_output, is_safetensors
from mimkit.methods import default_pool
from mimkit.models.input_spec import InputSpec
from mimkit.models.vit import EncoderSpec, ViTEncoder


def save_export(encoder: ViTEncoder, info: dict, out: str | Path, weights: str = "student") -> dict:
    """Write the encoder as a safetensors state dict that the matching timm ViT loads with strict=True;
    the metadata holds the timm name and arguments, the encoder's arguments and its input spec (JSON), the
    method and the weights."""
    spec = encoder.timm_spec()
    pool = feature_pool(info)
    spec["kwargs"].update(TIMM_POOLS[pool])
    spec["kwargs"]["pretrained_cfg_overlay"] = pretrained_cfg(encoder.input_spec)
    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {
        "format": "mimkit-encoder",
        "timm_model": spec["model_name"],
        "timm_kwargs": json.dumps(spec["kwargs"]),
        "pretrained_cfg": json.dumps(spec["kwargs"]["pretrained_cfg_overlay"]),
        "pool": pool,
        "method": info["method"],
        "weights": weights,
        "encoder": json.dumps(encoder.spec.to_dict()),
        "input_spec": json.dumps(encoder.input_spec.to_dict()),
    }
    out = check_output(out, what="--out", kind=("a safetensors export", is_safetensors))
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:  # written beside, then renamed: a kill or a full disk never leaves half an export
        out.parent.mkdir(parents=True, exist_ok=True)
        save_file(state, str(tmp), metadata=meta)
        tmp.chmod(0o644 & ~_umask())  # an ordinary file, readable as any other export
        os.replace(tmp, out)
    except Exception as err:  # safetensors reports a read-only or full folder as its own error type
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink()
        reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
        raise CheckpointError(f"could not write '{out}': {reason}") from err
    return {"path": str(out), "pool": pool, **spec}


# The timm pooling that gives the same feature as mimkit's: the mean of the normalised patch tokens is
# timm's "avg" with the final norm kept before pooling (fc_norm=False), so the weights keep their keys.
# mimkit's mean_prenorm (the mean before the final norm) has no timm equivalent: "avg" is the nearest.
TIMM_POOLS = {
    "cls": {"global_pool": "token"},
    "mean": {"global_pool": "avg", "fc_norm": False},
    "mean_prenorm": {"global_pool": "avg", "fc_norm": False},
}


def feature_pool(info: dict) -> str:
    """The feature a run evaluates with (its eval.pool), else its method's default."""
    cfg = info.get("config")
    return cfg.eval.pool if cfg is not None else info.get("probe_pool") or "cls"


def pretrained_cfg(spec: InputSpec) -> dict[str, Any]:
    """timm's pretrained_cfg for this input: what ``timm.data.resolve_data_config`` reads to build the
    evaluation transform (mimkit's evaluation view: resize to size / crop_pct, bicubic, centre crop)."""
    return {
        "input_size": (spec.channels, spec.img_size, spec.img_size),
        "mean": tuple(spec.mean),
        "std": tuple(spec.std),
        "crop_pct": spec.crop_pct,
        "crop_mode": "center",
        "interpolation": "bicubic",
        "num_classes": 0,
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load_export(path: Path) -> tuple[ViTEncoder, dict[str, Any]]:
    """The encoder of a mimkit export, its ``input_spec`` set from the metadata, and what else an
    evaluation needs (the method, its default feature)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # safetensors raises its own error type for a bad header
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({err})") from err
    if meta.get("format") != "mimkit-encoder":
        raise CheckpointError(f"{path}: not a mimkit encoder export (no 'format: mimkit-encoder' metadata)")
    encoder = ViTEncoder(EncoderSpec.from_dict(json.loads(meta["encoder"])))
    try:
        state = load_file(str(path))
    except Exception as err:
        raise CheckpointError(f"{path}: truncated or not a safetensors file ({err})") from err
    encoder.load_state_dict(state)
    encoder.input_spec = export_input_spec(encoder, meta)
    info = {
        "method": meta.get("method"),
        "input_spec": encoder.input_spec,
        "weights": meta.get("weights"),
        "step": None,
        "probe_pool": meta.get("pool") or default_pool(meta.get("method")),  # the run's feature, when said
    }
    return encoder, info


def export_input_spec(encoder: ViTEncoder, meta: dict[str, str]) -> InputSpec:
    """The spec an export states: its 'input_spec' JSON, or for an export written before specs were
    saved, its separate img_size / mean / std / crop_pct entries on the encoder's own pixel spec."""
    if "input_spec" in meta:
        return InputSpec.from_dict(json.loads(meta["input_spec"]))
    return replace(
        encoder.input_spec,
        mean=tuple(json.loads(meta["mean"])),
        std=tuple(json.loads(meta["std"])),
        crop_pct=float(meta.get("crop_pct", 0.875)),
    )
