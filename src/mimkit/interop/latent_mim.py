"""The official Latent MIM checkpoint layout, both ways.

``{'state_dict': ..., 'optimizer', 'loss_scaler', 'epoch'}`` (or 'model', or a bare dict), keys
``encoder.*`` (the projector as ``encoder.head.linear{i}`` / ``norm{i}``), ``target_encoder.*`` and
``decoder.*``, with ``module.`` in front when saved from DDP. Its patch embedding is a Linear on
(row, col, channel) pixel vectors and its position tables are ``pos_embed.pos_embeds`` [1 + L, D]
buffers; both are converted to timm's conv and [1, 1 + L, D] parameter.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from mimkit.configs import ARCHS, Config, build_config
from mimkit.interop.layouts import TEACHER, count_blocks, load_into
from mimkit.methods import Method, build_method

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
        f"model.depth={count_blocks(state, 'encoder.blocks.')}",
        f"model.num_heads={heads.get(dim, max(1, dim // 64))}",
        f"model.mlp_ratio={state['encoder.blocks.0.mlp.fc1.weight'].shape[0] / dim}",
        f"method.proj_depth={max(linears) + 1}",
    ]
    if len(linears) > 1:
        out.append(f"method.proj_hidden_dim={state['encoder.head.linear0.weight'].shape[0]}")
    if "decoder.embed.weight" in state:
        out += [
            f"method.decoder_embed_dim={state['decoder.embed.weight'].shape[0]}",
            f"method.decoder_depth={count_blocks(state, 'decoder.blocks.')}",
        ]
    return out


def latent_mim_method(
    state: dict[str, Any], overrides: list[str] | None, source: Any
) -> tuple[Method, Config]:
    cfg = build_config(None, [*infer_lmim_overrides(state), *(overrides or [])])
    model = build_method(cfg)
    ours = lmim_to_mimkit(state)
    if not any(k.startswith(TEACHER) for k in ours):
        print(f"note: {source} has no target_encoder; it starts as a copy of the encoder", file=sys.stderr)
        ours |= {TEACHER + k: v for k, v in ours.items() if k.startswith(("encoder.", "projector."))}
    load_into(model, ours, "latent_mim", source)
    return model, cfg


def latent_mim_to_official(state: dict[str, Any], ddp_prefix: bool) -> dict[str, Any]:
    """{'state_dict': ...}, with 'module.' in front of every key if ``ddp_prefix``."""
    prefix = "module." if ddp_prefix else ""
    return {"state_dict": {prefix + k: v for k, v in mimkit_to_lmim(state).items()}}
