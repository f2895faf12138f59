"""Export an encoder as a safetensors state dict that timm's ViT loads with ``strict=True``, and read
such an export back."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimkit.checkpoint import CheckpointError
from mimkit.methods import default_pool
from mimkit.models.input_spec import InputSpec
from mimkit.models.vit import ViTEncoder


def save_export(encoder: ViTEncoder, info: dict, out: str | Path, weights: str = "student") -> dict:
    """Write the encoder as a safetensors state dict that the matching timm ViT loads with strict=True;
    the metadata holds the timm name and arguments, the encoder's arguments and its input spec (JSON), the
    method and the weights."""
    spec = encoder.timm_spec()
    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {
        "format": "mimkit-encoder",
        "timm_model": spec["model_name"],
        "timm_kwargs": json.dumps(spec["kwargs"]),
        "method": info["method"],
        "weights": weights,
        "encoder": json.dumps(encoder.spec),
        "input_spec": json.dumps(encoder.input_spec.to_dict()),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return {"path": str(out), **spec}


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
    encoder = ViTEncoder(**json.loads(meta["encoder"]))
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
        "probe_pool": default_pool(meta.get("method")),
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
