"""The official MAE and LUT checkpoint layouts, both ways.

MAE: ``{'model': encoder}`` (released pre-trained encoders) or ``{'model': encoder + decoder, ...}``
(``*_full.pth`` and training checkpoints). LUT training checkpoints: ``{'model': student with head.* and
predictor.*, 'model_ema': the teacher with every key prefixed 'ema.', ...}``. Key names are the flat ones
of the reference (cls_token, blocks.*, decoder_embed.*, mask_token, decoder_pred.*, head.0.weight, ...).
"""

from __future__ import annotations

import math
import sys
from typing import Any

from mimkit.configs import ARCHS, Config, build_config
from mimkit.interop.layouts import TEACHER, WRAPPER_PREFIXES, count_blocks, load_into, strip_prefixes
from mimkit.methods import Method, build_method

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
        f"model.depth={count_blocks(state, 'blocks.')}",
        f"model.num_heads={heads.get(dim, max(1, dim // 64))}",
        f"model.mlp_ratio={state['blocks.0.mlp.fc1.weight'].shape[0] / dim}",
    ]
    if "decoder_embed.weight" in state:
        out += [
            f"method.decoder_embed_dim={state['decoder_embed.weight'].shape[0]}",
            f"method.decoder_depth={count_blocks(state, 'decoder_blocks.')}",
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


def mae_lut_method(
    ckpt: dict[str, Any], student: dict[str, Any], method: str, overrides: list[str] | None, source: Any
) -> tuple[Method, Config]:
    """A MAE or LUT method (``method``: mae | lut | auto) from an official checkpoint whose student state
    (prefixes stripped) is ``student``."""
    if "cls_token" not in student or "patch_embed.proj.weight" not in student:
        raise ValueError(
            f"{source}: not an official MAE / LUT / Latent MIM layout (no cls_token / "
            "patch_embed.proj.weight, no encoder.embed.proj.weight)"
        )
    if method == "auto":
        method = "lut" if "model_ema" in ckpt or any(k.startswith(HEAD_PREFIXES) for k in student) else "mae"
    if method not in ("mae", "lut"):
        raise ValueError(
            f"load_official reads the 'mae', 'lut', 'latent_mim' and 'mtm' layouts; got method={method!r}"
        )
    cfg = build_config(None, [*infer_overrides(student, method, ckpt.get("args")), *(overrides or [])])
    model = build_method(cfg)
    state = {to_mimkit_key(k): v for k, v in student.items()}
    if method == "lut":
        teacher = strip_prefixes(ckpt.get("model_ema", {}), ("ema.", *WRAPPER_PREFIXES))
        if teacher:
            state |= {TEACHER + to_mimkit_key(k): v for k, v in teacher.items()}
        else:
            print(
                f"note: {source} has no 'model_ema'; the teacher starts as a copy of the student",
                file=sys.stderr,
            )
            state |= {TEACHER + k: v for k, v in state.items()}
    load_into(model, state, method, source)
    return model, cfg


def mae_lut_to_official(state: dict[str, Any]) -> dict[str, Any]:
    """{'model': ...} and, for LUT, {'model_ema': 'ema.'-prefixed}."""
    out = {"model": {to_official_key(k): v for k, v in state.items() if not k.startswith("teacher.")}}
    teacher = {k[len(TEACHER) :]: v for k, v in state.items() if k.startswith(TEACHER)}
    if teacher:
        out["model_ema"] = {"ema." + to_official_key(k): v for k, v in teacher.items()}
    return out
