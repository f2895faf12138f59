"""The module layout of ``thuanz123/enhancing-transformers``, which the weights of its ViT-VQGAN (the
tokenizer SeiT used) and of SeiT++'s TokenAdapt share: the key correspondence of its transformer stacks
with timm blocks, and the checks every loader of such weights makes before it copies anything."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

DEFAULT_HEAD_DIM = 64  # the official attention's default head width (its configs never change it)


def transformer_key_pairs(ours: str, theirs: str, depth: int, project_out: bool) -> list[tuple[str, str]]:
    """(our name, official name) of every weight of a stack of ``depth`` pre-norm blocks and its final
    LayerNorm: timm ``Block`` s at ``{ours}.blocks.i`` and ``{ours}.norm`` against the official
    ``{theirs}.transformer.layers.i`` and ``{theirs}.transformer.norm``. ``project_out`` False: the
    official attention has no ``to_out`` (one head as wide as the model)."""
    pairs: list[tuple[str, str]] = []
    for i in range(depth):
        a, b = f"{ours}.blocks.{i}.", f"{theirs}.transformer.layers.{i}."
        pairs += [(a + "norm1." + p, b + "0.norm." + p) for p in ("weight", "bias")]
        pairs.append((a + "attn.qkv.weight", b + "0.fn.to_qkv.weight"))
        if project_out:
            pairs += [(a + "attn.proj." + p, b + "0.fn.to_out." + p) for p in ("weight", "bias")]
        pairs += [(a + "norm2." + p, b + "1.norm." + p) for p in ("weight", "bias")]
        pairs += [(a + "mlp.fc1." + p, b + "1.fn.net.0." + p) for p in ("weight", "bias")]
        pairs += [(a + "mlp.fc2." + p, b + "1.fn.net.2." + p) for p in ("weight", "bias")]
    pairs += [(f"{ours}.norm.{p}", f"{theirs}.transformer.norm.{p}") for p in ("weight", "bias")]
    return pairs


def key_list(keys: Any, limit: int = 8) -> str:
    """The first ``limit`` keys, sorted, for an error message."""
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" (and {len(keys) - limit} more)" if len(keys) > limit else "")


def prefix_hint(sd: Mapping[str, Any], anchors: tuple[str, ...]) -> str:
    """A hint for a state dict whose keys end like ``anchors`` after a prefix (a wrapper's name)."""
    for key in sd:
        for anchor in anchors:
            if key.endswith("." + anchor):
                return f"; its keys carry a prefix '{key[: -len(anchor)]}' (strip it)"
    return ""


def layer_count(sd: Mapping[str, Any], prefix: str) -> int:
    """The number of blocks stored under ``{prefix}.transformer.layers``."""
    pattern = re.compile(rf"^{re.escape(prefix)}\.transformer\.layers\.(\d+)\.")
    indices = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def attention_heads(sd: Mapping[str, Any], out_key: str, dim: int, num_heads: int | None, source: str) -> int:
    """The number of heads of a ``dim``-wide official attention, which its state dict does not record:
    one when its output projection ``out_key`` is absent (the official code drops it only then),
    ``num_heads`` when given, else the default head width of 64."""
    if out_key not in sd:  # only one head as wide as the model has no output projection
        if num_heads not in (None, 1):
            raise ValueError(
                f"{source}: has no attention output projection ({out_key}), which the official code leaves "
                f"out only for a single head; got num_heads={num_heads}"
            )
        return 1
    if num_heads is not None:
        if num_heads == 1:
            raise ValueError(
                f"{source}: has an attention output projection ({out_key}), so it has more than one head; "
                "got num_heads=1"
            )
        return num_heads
    if dim % DEFAULT_HEAD_DIM or dim == DEFAULT_HEAD_DIM:
        raise ValueError(
            f"{source}: the number of attention heads is not stored and a {dim}-wide model does not have the "
            f"default head width {DEFAULT_HEAD_DIM}; pass num_heads"
        )
    return dim // DEFAULT_HEAD_DIM


def verify_layout(
    sd: Mapping[str, Any],
    expected: dict[str, tuple],
    source: str,
    what: str,
    *,
    ignored: tuple[str, ...] = (),
    hint: str = "",
) -> None:
    """Every key of ``expected`` present, a tensor of its shape, and no other key (but those starting
    with ``ignored``), before anything is copied; otherwise a ValueError naming ``source``, ``what`` the
    file should have been, and the offending keys (``hint`` follows the unexpected ones)."""
    missing = [k for k in expected if k not in sd]
    not_tensors = [k for k in expected if k in sd and not isinstance(sd[k], torch.Tensor)]
    wrong = [
        f"{k} {tuple(sd[k].shape)} (expected {expected[k]})"
        for k in expected
        if isinstance(sd.get(k), torch.Tensor) and tuple(sd[k].shape) != expected[k]
    ]
    unexpected = [k for k in sd if k not in expected and not (ignored and k.startswith(ignored))]
    problems = []
    if missing:
        problems.append(f"missing {key_list(missing)}")
    if not_tensors:
        problems.append(f"not tensors: {key_list(not_tensors)}")
    if wrong:
        problems.append(f"wrong shape: {key_list(wrong)}")
    if unexpected:
        problems.append(f"unexpected {key_list(unexpected)}{hint}")
    if problems:
        raise ValueError(f"{source}: does not fit {what}: " + "; ".join(problems))


# The official attention of a single head as wide as the model has no output projection (``to_out``);
# ours keeps one, which must then be the identity: set so when loading, checked when writing.
@torch.no_grad()
def set_identity_projections(projections: list[nn.Linear]) -> None:
    for proj in projections:
        proj.weight.copy_(torch.eye(proj.in_features))
        proj.bias.zero_()


def check_identity_projections(projections: list[nn.Linear], what: str) -> None:
    for proj in projections:
        eye = torch.eye(proj.in_features)
        if not (torch.equal(proj.weight.detach().cpu().float(), eye) and not proj.bias.detach().any()):
            raise ValueError(
                f"a one-head {what} has no attention output projection (to_out) in the official layout; "
                "this one's attn.proj is not the identity, so it cannot be written in that layout"
            )
