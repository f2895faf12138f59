"""Export an encoder as a safetensors state dict that timm's ViT loads with ``strict=True``, and read
such an export back."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mimkit.checkpoint import CheckpointError
from mimkit.methods import default_pool
from mimkit.models.vit import ViTEncoder


def save_export(encoder: ViTEncoder, info: dict, out: str | Path, weights: str = "student") -> dict:
    """Write the encoder as a safetensors state dict that the matching timm ViT loads with strict=True;
    the metadata holds the timm name and arguments, and what an evaluation needs."""
    spec = encoder.timm_spec()
    state = {k: v.detach().contiguous().clone() for k, v in encoder.state_dict().items()}
    meta = {
        "format": "mimkit-encoder",
        "timm_model": spec["model_name"],
        "timm_kwargs": json.dumps(spec["kwargs"]),
        "method": info["method"],
        "weights": weights,
        "img_size": str(info["img_size"]),
        "mean": json.dumps(info["mean"]),
        "std": json.dumps(info["std"]),
        "crop_pct": str(info["crop_pct"]),
        "encoder": json.dumps(encoder.spec),
    }
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata=meta)
    return {"path": str(out), **spec}


def load_export(path: Path) -> tuple:
    """The encoder of a mimkit export and what an evaluation needs (image size, normalisation)."""
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
    info = {
        "method": meta.get("method"),
        "img_size": int(meta["img_size"]),
        "mean": json.loads(meta["mean"]),
        "std": json.loads(meta["std"]),
        "crop_pct": float(meta.get("crop_pct", 0.875)),
        "weights": meta.get("weights"),
        "step": None,
        "probe_pool": default_pool(meta.get("method")),
    }
    return encoder, info
