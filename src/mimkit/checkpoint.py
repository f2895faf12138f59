"""Checkpoints: atomic writes, RNG capture, and reading an encoder back from a run or an export."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write to a temporary file beside ``path`` then rename, so a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return torch.load(path, map_location="cpu", weights_only=True)


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _from_bytes(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every generator the training step draws from, as plain Python values (they travel between ranks
    as objects, and ``torch.load(weights_only=True)`` reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _to_bytes(torch.get_rng_state()),
        "python": random.getstate(),
        "numpy": (name, keys.astype(np.uint32).tobytes(), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_to_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def seed_all(seed: int) -> None:
    """Seed every generator a training step may draw from: torch (CPU and CUDA), Python and NumPy (timm's
    Mixup draws its mixing weights from NumPy in the main process)."""
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_from_bytes(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_bytes(s) for s in state["cuda"]])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return path


def load_encoder(path: str | Path, weights: str = "student"):
    """An encoder from a mimkit run (folder or .pt), a mimkit safetensors export or an official MAE / LUT
    checkpoint, and the settings an evaluation needs (image size, normalisation). Returns (encoder, info)."""
    from mimkit.configs import build_config
    from mimkit.interop.official import official_method, read
    from mimkit.methods import build_method

    path = resolve_checkpoint(path)
    if path.suffix == ".safetensors":
        from mimkit.interop.timm import load_export

        return load_export(path)
    ckpt = read(path)
    if "config" in ckpt and "model" in ckpt:
        cfg = build_config(ckpt["config"])
        method = build_method(cfg)
        method.load_state_dict(ckpt["model"])
    else:
        method, cfg = official_method(ckpt, source=path)
    info = {
        "method": cfg.method.name,
        "img_size": cfg.model.img_size,
        "mean": list(cfg.data.mean),
        "std": list(cfg.data.std),
        "crop_pct": cfg.data.crop_pct,
        "step": ckpt.get("step"),
        "weights": weights,
        "config": cfg,
    }
    return method.export_encoder(weights), info
