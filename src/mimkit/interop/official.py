"""Read and write checkpoints in the layouts of the official MAE, LUT and Latent MIM code.

MAE: ``{'model': encoder}`` (released pre-trained encoders) or ``{'model': encoder + decoder, ...}``
(``*_full.pth`` and training checkpoints). LUT training checkpoints: ``{'model': student with head.* and
predictor.*, 'model_ema': the teacher with every key prefixed 'ema.', ...}``. Key names are the flat ones
of the reference (cls_token, blocks.*, decoder_embed.*, mask_token, decoder_pred.*, head.0.weight, ...).

Latent MIM: ``{'state_dict': ..., 'optimizer', 'loss_scaler', 'epoch'}`` (or 'model', or a bare dict),
keys ``encoder.*`` (the projector as ``encoder.head.linear{i}`` / ``norm{i}``), ``target_encoder.*`` and
``decoder.*``, with ``module.`` in front when saved from DDP. Its patch embedding is a Linear on
(row, col, channel) pixel vectors and its position tables are ``pos_embed.pos_embeds`` [1 + L, D]
buffers; both are converted to timm's conv and [1, 1 + L, D] parameter.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mimkit import checkpoint
from mimkit.configs import Config, build_config
from mimkit.methods import Method, build_method
from mimkit.models.vit import ARCHS

# official decoder names -> mimkit's (the encoder keys are timm's in both, under "encoder." here)
DECODER_NAMES = {
    "decoder_embed.": "decoder.embed.",
    "mask_token": "decoder.mask_token",
    "decoder_pos_embed": "decoder.pos_embed",
    "decoder_blocks.": "decoder.blocks.",
    "decoder_norm.": "decoder.norm.",
    "decoder_pred.": "decoder.pred.",
}
HEAD_PREFIXES = ("head.", "predictor.")
WRAPPER_PREFIXES = ("module.", "backbone.", "base_encoder.")
TEACHER = "teacher.module."


def to_mimkit_key(key: str) -> str:
    for official, ours in DECODER_NAMES.items():
        if key.startswith(official):
            return ours + key[len(official) :]
    if key.startswith(HEAD_PREFIXES):
        return key
    return "encoder." + key


def to_official_key(key: str) -> str:
    for official, ours in DECODER_NAMES.items():
        if key.startswith(ours):
            return official + key[len(ours) :]
    if key.startswith("encoder."):
        return key[len("encoder.") :]
    return key


def _strip(state: dict[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def read(source: str | Path | dict, *, trust: bool = False) -> dict[str, Any]:
    """A checkpoint as a dict. Official files pickle an argparse.Namespace ('args'); that type is allowed,
    anything else needs ``trust=True`` (only for files whose origin you trust)."""
    if isinstance(source, dict):
        return source
    if trust:
        try:
            return torch.load(source, map_location="cpu", weights_only=False)
        except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise checkpoint.CheckpointError(f"{source}: truncated or not a checkpoint ({err})") from err
    torch.serialization.add_safe_globals([argparse.Namespace])
    try:
        return checkpoint.load(source)
    except checkpoint.UnsafeCheckpoint as err:  # a corrupt file is a CheckpointError and passes through
        raise checkpoint.UnsafeCheckpoint(f"{err}; pass trust=True if you trust its origin") from err


# ---- Latent MIM ---------------------------------------------------------------------------------------
LMIM_ENCODERS = {
    "encoder.": ("encoder.", "projector."),
    "target_encoder.": (TEACHER + "encoder.", TEACHER + "projector."),
}
LMIM_HEAD = re.compile(r"head\.(linear|norm)(\d+)\.(.+)")


def is_latent_mim(state: dict[str, Any]) -> bool:
    return any(k.startswith(("encoder.embed.proj.", "target_encoder.")) for k in state)


def lmim_to_mimkit(state: dict[str, Any]) -> dict[str, Any]:
    """Official Latent MIM keys and tensors (``module.`` already stripped) -> mimkit's LatentMIM state."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "decoder.pos_embed.pos_embeds":
            out["decoder.pos_embed"] = value[None]
            continue
        if key.startswith("decoder."):
            out[key] = value
            continue
        official = next((o for o in LMIM_ENCODERS if key.startswith(o)), None)
        if official is None:
            raise ValueError(f"'{key}' is not a Latent MIM entry (encoder., target_encoder., decoder.)")
        encoder, projector = LMIM_ENCODERS[official]
        rest = key[len(official) :]
        if m := LMIM_HEAD.fullmatch(rest):
            kind, index, leaf = m.groups()
            out[f"{projector}{3 * int(index) + (kind == 'norm')}.{leaf}"] = value
        elif rest == "embed.proj.weight":  # Linear on (py, px, c) vectors -> timm's conv [D, C, p, p]
            dim, patch = value.shape[0], math.isqrt(value.shape[1] // 3)
            out[encoder + "patch_embed.proj.weight"] = value.reshape(dim, patch, patch, 3).permute(0, 3, 1, 2)
        elif rest.startswith("embed.proj."):
            out[encoder + "patch_embed.proj." + rest[len("embed.proj.") :]] = value
        elif rest == "pos_embed.pos_embeds":
            out[encoder + "pos_embed"] = value[None]
        else:
            out[encoder + rest] = value
    return out


def mimkit_to_lmim(state: dict[str, Any]) -> dict[str, Any]:
    """The inverse of :func:`lmim_to_mimkit`."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key == "decoder.pos_embed":
            out["decoder.pos_embed.pos_embeds"] = value[0]
            continue
        if key.startswith("decoder."):
            out[key] = value
            continue
        for official, (encoder, projector) in LMIM_ENCODERS.items():
            if key.startswith(projector):
                index, leaf = key[len(projector) :].split(".", 1)
                kind = "norm" if int(index) % 3 == 1 else "linear"
                out[f"{official}head.{kind}{int(index) // 3}.{leaf}"] = value
            elif key.startswith(encoder):
                rest = key[len(encoder) :]
                if rest == "patch_embed.proj.weight":
                    out[official + "embed.proj.weight"] = value.permute(0, 2, 3, 1).reshape(
                        value.shape[0], -1
                    )
                elif rest.startswith("patch_embed.proj."):
                    out[official + "embed.proj." + rest[len("patch_embed.proj.") :]] = value
                elif rest == "pos_embed":
                    out[official + "pos_embed.pos_embeds"] = value[0]
                else:
                    out[official + rest] = value
    return out


def infer_lmim_overrides(state: dict[str, Any]) -> list[str]:
    """Config overrides that rebuild the model of an official Latent MIM state dict (official keys)."""
    dim = state["encoder.cls_token"].shape[-1]
    patch = math.isqrt(state["encoder.embed.proj.weight"].shape[1] // 3)
    grid = math.isqrt(state["encoder.pos_embed.pos_embeds"].shape[0] - 1)
    heads = {a.embed_dim: a.num_heads for a in ARCHS.values()}
    arch = next((n for n, a in ARCHS.items() if a.embed_dim == dim), "vit_base")
    linears = {int(m.group(2)) for k in state if (m := LMIM_HEAD.fullmatch(k[len("encoder.") :]))}
    out = [
        "method=latent_mim",
        f"model.arch={arch}",
        f"model.embed_dim={dim}",
        f"model.patch_size={patch}",
        f"model.img_size={grid * patch}",
        f"model.depth={_count(state, 'encoder.blocks.')}",
        f"model.num_heads={heads.get(dim, max(1, dim // 64))}",
        f"model.mlp_ratio={state['encoder.blocks.0.mlp.fc1.weight'].shape[0] / dim}",
        f"method.proj_depth={max(linears) + 1}",
    ]
    if len(linears) > 1:
        out.append(f"method.proj_hidden_dim={state['encoder.head.linear0.weight'].shape[0]}")
    if "decoder.embed.weight" in state:
        out += [
            f"method.decoder_embed_dim={state['decoder.embed.weight'].shape[0]}",
            f"method.decoder_depth={_count(state, 'decoder.blocks.')}",
        ]
    return out


def _latent_mim_method(
    state: dict[str, Any], overrides: list[str] | None, source: Any
) -> tuple[Method, Config]:
    cfg = build_config(None, [*infer_lmim_overrides(state), *(overrides or [])])
    model = build_method(cfg)
    ours = lmim_to_mimkit(state)
    if not any(k.startswith(TEACHER) for k in ours):
        print(f"note: {source} has no target_encoder; it starts as a copy of the encoder", file=sys.stderr)
        ours |= {TEACHER + k: v for k, v in ours.items() if k.startswith(("encoder.", "projector."))}
    _load(model, ours, "latent_mim", source)
    return model, cfg


def _load(model: Method, state: dict[str, Any], method: str, source: Any) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{source}: entries this {method} model does not have: {sorted(unexpected)[:8]}")
    if lost := sorted(k for k in missing if k.startswith("encoder.")):
        raise ValueError(f"{source}: encoder entries missing: {lost[:8]}")
    if missing:
        parts = ", ".join(sorted({k.split(".")[0] for k in missing}))
        print(f"note: {source} has no {parts} weights; those are freshly initialised", file=sys.stderr)


# ---- MAE and LUT --------------------------------------------------------------------------------------
def _count(state: dict[str, Any], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def _head_settings(state: dict[str, Any], prefix: str) -> dict[str, Any]:
    linears = sorted(
        int(k.split(".")[1])
        for k, v in state.items()
        if k.startswith(prefix) and k.endswith(".weight") and v.dim() == 2
    )
    if not linears:
        return {"depth": 0}
    norm_index = linears[0] + 1
    if f"{prefix}{norm_index}.running_mean" in state:
        norm = "bn"
    elif f"{prefix}{norm_index}.weight" in state:
        norm = "ln"
    else:
        norm = "none"
    return {"depth": len(linears), "hidden": state[f"{prefix}{linears[0]}.weight"].shape[0], "norm": norm}


def infer_overrides(state: dict[str, Any], method: str, args: Any = None) -> list[str]:
    """Config overrides that rebuild the model of an official-layout state dict (flat official keys)."""
    dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["pos_embed"].shape[1] - 1)
    heads = {a.embed_dim: a.num_heads for a in ARCHS.values()} | {512: 8}  # 512: LUT's ViT-M
    arch = next((n for n, a in ARCHS.items() if a.embed_dim == dim), "vit_base")
    out = [
        f"method={method}",
        f"model.arch={arch}",
        f"model.embed_dim={dim}",
        f"model.patch_size={patch}",
        f"model.img_size={grid * patch}",
        f"model.depth={_count(state, 'blocks.')}",
        f"model.num_heads={heads.get(dim, max(1, dim // 64))}",
        f"model.mlp_ratio={state['blocks.0.mlp.fc1.weight'].shape[0] / dim}",
    ]
    if "decoder_embed.weight" in state:
        out += [
            f"method.decoder_embed_dim={state['decoder_embed.weight'].shape[0]}",
            f"method.decoder_depth={_count(state, 'decoder_blocks.')}",
        ]
    if method == "lut":
        head, pred = _head_settings(state, "head."), _head_settings(state, "predictor.")
        out += [f"method.head_depth={head['depth']}", f"method.pred_depth={pred['depth']}"]
        hidden = head.get("hidden") or pred.get("hidden")
        if hidden:
            out += [
                f"method.head_hidden_dim={hidden}",
                f"method.head_norm={head.get('norm', pred.get('norm'))}",
            ]
    # what the weights cannot tell, the pickled training arguments can
    names = {"norm_pix_loss": "norm_pix_loss", "mask_ratio": "mask_ratio"}
    if method == "lut":
        names |= {"w_mae": "w_mae", "w_bc": "w_bc", "model_ema_decay": "ema_momentum"}
    for arg, key in names.items():
        value = getattr(args, arg, None)
        if isinstance(value, (bool, int, float)):
            out.append(f"method.{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


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
    student = _strip(payload, WRAPPER_PREFIXES)
    if method in ("auto", "latent_mim") and is_latent_mim(student):
        return _latent_mim_method(_strip(payload, ("module.",)), overrides, source)
    if "cls_token" not in student or "patch_embed.proj.weight" not in student:
        raise ValueError(
            f"{source}: not an official MAE / LUT / Latent MIM layout (no cls_token / "
            "patch_embed.proj.weight, no encoder.embed.proj.weight)"
        )
    if method == "auto":
        method = "lut" if "model_ema" in ckpt or any(k.startswith(HEAD_PREFIXES) for k in student) else "mae"
    if method not in ("mae", "lut"):
        raise ValueError(
            f"load_official reads the 'mae', 'lut' and 'latent_mim' layouts; got method={method!r}"
        )
    cfg = build_config(None, [*infer_overrides(student, method, ckpt.get("args")), *(overrides or [])])
    model = build_method(cfg)
    state = {to_mimkit_key(k): v for k, v in student.items()}
    if method == "lut":
        teacher = _strip(ckpt.get("model_ema", {}), ("ema.", *WRAPPER_PREFIXES))
        if teacher:
            state |= {TEACHER + to_mimkit_key(k): v for k, v in teacher.items()}
        else:
            print(
                f"note: {source} has no 'model_ema'; the teacher starts as a copy of the student",
                file=sys.stderr,
            )
            state |= {TEACHER + k: v for k, v in state.items()}
    _load(model, state, method, source)
    return model, cfg


def to_official(method: Method, *, ddp_prefix: bool = False) -> dict[str, Any]:
    """The weights in the official layout: {'model': ...} and, for LUT, {'model_ema': 'ema.'-prefixed};
    for Latent MIM {'state_dict': ...} with 'module.' in front of every key if ``ddp_prefix`` (what the
    reference's multi-GPU resume expects)."""
    state = method.state_dict()
    if method.name == "latent_mim":
        prefix = "module." if ddp_prefix else ""
        return {"state_dict": {prefix + k: v for k, v in mimkit_to_lmim(state).items()}}
    out = {"model": {to_official_key(k): v for k, v in state.items() if not k.startswith("teacher.")}}
    teacher = {k[len(TEACHER) :]: v for k, v in state.items() if k.startswith(TEACHER)}
    if teacher:
        out["model_ema"] = {"ema." + to_official_key(k): v for k, v in teacher.items()}
    return out
