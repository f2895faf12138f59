"""The official SeiT and SeiT++ checkpoint layouts, both ways.

Three layouts, each ``{'model': state, 'args': Namespace, ...}`` (``module.`` in front of the keys when
saved from DDP):

- SeiT++ masked token modeling (``main_mtm_pretrain.py``): flat keys ``token_emb.*`` (the learned id
  embedding), ``patch_embed.proj.*``, ``cls_token``, ``pos_embed``, ``mask_token_label``, ``blocks.*``,
  ``norm.*``, ``decoder_embed.*``, ``decoder_pos_embed`` (a sin-cos table the model never uses: dropped
  on load, rebuilt on write), ``decoder_pos_embed_learned``, ``decoder_blocks.*``, ``decoder_norm.*``,
  ``mlm_layer.{fc,ln,bias}`` -> mimkit's ``mtm`` method.
- SeiT++ fine-tuned classifier (``main_mtm_finetune.py``): the same encoder keys without the mask token,
  and ``head.*``; the head pools by the mean of the patch tokens, then the encoder's final norm ->
  :class:`~mimkit.methods.FineTune` with ``pool=avg_norm``.
- SeiT supervised classifier (``main_seit.py``): a timm ViT on embedding grids whose ``patch_embed.proj``
  is the Stem-Adapter conv (kernel 4, stride 2, padding 1 in the reference) -> FineTune over an encoder
  with the token-embedding stem, ``pool=avg_norm``.

SeiT++ files also hold the frozen TokenAdapt modules (``conversion_function.*``, ``reverse_transform.*``);
they are returned beside the model, never loaded into it, and written back on request. Sizes come from the
weights; what they cannot tell (heads, training settings) from the pickled arguments or ``overrides``.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from mimkit.configs import ARCHS, Config, build_config
from mimkit.interop.layouts import WRAPPER_PREFIXES, count_blocks, read, strip_prefixes
from mimkit.methods import MTM, FineTune, build_method
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.tokenadapt import TokenAdapt, load_tokenadapt, to_official_tokenadapt
from mimkit.models.vit import EncoderSpec, ViTEncoder

TOKENADAPT_PREFIXES = ("conversion_function.", "reverse_transform.")
UNUSED_DECODER_POS = "decoder_pos_embed"  # the reference's fixed sin-cos decoder table, never read

# (official, mimkit): a name ending in "." maps every key under it, any other name one key
ENCODER_NAMES = (
    ("patch_embed.proj.", "patch_embed.proj."),
    ("cls_token", "cls_token"),
    ("pos_embed", "pos_embed"),
    ("blocks.", "blocks."),
    ("norm.", "norm."),
)
ID_STEM_NAMES = (
    ("token_emb.word_embeddings.", "patch_embed.embedding."),
    ("token_emb.LayerNorm.", "patch_embed.embedding_norm."),
)
MTM_NAMES = (
    *((o, "encoder." + m) for o, m in (*ID_STEM_NAMES, *ENCODER_NAMES, ("mask_token_label", "mask_token"))),
    ("decoder_embed.", "decoder.embed."),
    ("decoder_pos_embed_learned", "decoder.pos_embed"),
    ("decoder_blocks.", "decoder.blocks."),
    ("decoder_norm.", "decoder.norm."),
    ("mlm_layer.fc.", "head.fc."),
    ("mlm_layer.ln.", "head.norm."),
    ("mlm_layer.bias", "head.bias"),
)

# the pickled training arguments a mimkit config takes over: (argument, config key)
MTM_ARGS = (
    ("mask_ratio_mu", "method.mask_ratio_mean"),
    ("mask_ratio_std", "method.mask_ratio_std"),
    ("mask_ratio_min", "method.mask_ratio_min"),
    ("mask_ratio_max", "method.mask_ratio_max"),
    ("smoothing", "method.label_smoothing"),
    ("rrc_ratio", "method.min_crop_scale"),
    ("token_noise_prob", "method.noise_prob"),
    ("token_coloradapt_prob", "method.coloradapt_prob"),
)
CLASSIFIER_ARGS = (
    ("drop_path", "method.drop_path"),
    ("layer_decay", "method.layer_decay"),
    ("smoothing", "method.label_smoothing"),
    ("mixup", "method.mixup"),
    ("cutmix", "method.cutmix"),
)
SEIT_TOKEN_DROPOUT = 0.1  # the reference's id-embedding dropout (fixed in its code, not an argument)
SEIT_STRIDE = 2  # the Stem-Adapter's stride in every reference model


class SeiTLoad(NamedTuple):
    """What a SeiT / SeiT++ file gives: the mimkit module, the config it was built from, and the
    TokenAdapt modules the file carries (None if it has none)."""

    module: nn.Module
    config: Config
    tokenadapt: TokenAdapt | None


def _rename(key: str, names: tuple[tuple[str, str], ...], reverse: bool = False) -> str | None:
    for official, ours in names:
        src, dst = (ours, official) if reverse else (official, ours)
        if key == src or (src.endswith(".") and key.startswith(src)):
            return dst + key[len(src) :]
    return None


def _classifier_names(module: FineTune) -> tuple[tuple[str, str], ...]:
    """The classifier's (official, mimkit) names: under ``model.``, the encoder's final norm where the
    fine-tune keeps it (``fc_norm`` when it pools first, as pool=avg_norm does)."""
    norm = "fc_norm." if "fc_norm.weight" in module.model.state_dict() else "norm."
    encoder = tuple((o, norm if o == "norm." else m) for o, m in ENCODER_NAMES)
    stem = ID_STEM_NAMES if module.model.stem.kind == "token_ids" else ()
    return tuple((o, "model." + m) for o, m in (*stem, *encoder, ("head.", "head.")))


def is_seit_mtm(state: Mapping[str, Any]) -> bool:
    """An SeiT++ masked-token-modeling state (official keys, wrapper prefixes stripped)."""
    return "mlm_layer.fc.weight" in state or (
        "token_emb.word_embeddings.weight" in state and "decoder_embed.weight" in state
    )


def seit_classifier_kind(state: Mapping[str, Any], args: Any = None) -> str | None:
    """'seit++' or 'seit' for an official SeiT++ / SeiT classifier state, else None. SeiT's model is a timm
    ViT on embedding grids: recognised by its training arguments (a ``deit_*_token_*`` model) or, without
    them, by a stem that takes neither 1 nor 3 channels."""
    if "head.weight" not in state or "patch_embed.proj.weight" not in state or is_seit_mtm(state):
        return None
    if "token_emb.word_embeddings.weight" in state:
        return "seit++"
    model = str(getattr(args, "model", ""))
    named = model.startswith("deit_") and "_token_" in model
    return "seit" if named or state["patch_embed.proj.weight"].shape[1] not in (1, 3) else None


def _shape(state: Mapping[str, Any], key: str, dims: int, source: Any) -> torch.Size:
    if key not in state:
        raise ValueError(f"{source}: the official SeiT layout needs '{key}'; it is missing")
    value = state[key]
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{source}: '{key}' should be a {dims}-d tensor; got {got}")
    return value.shape


def _encoder_overrides(state: Mapping[str, Any], source: Any) -> tuple[list[str], int]:
    """Overrides for the encoder of an official SeiT state, and its grid side in patches."""
    dim = _shape(state, "cls_token", 3, source)[-1]
    tokens = _shape(state, "pos_embed", 3, source)[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{source}: 'pos_embed' holds {tokens} patch positions, not a square grid")
    depth = count_blocks(state, "blocks.")
    if depth == 0:
        raise ValueError(f"{source}: no encoder blocks ('blocks.0.*')")
    hidden = _shape(state, "blocks.0.mlp.fc1.weight", 2, source)[0]
    heads = {a.embed_dim: a.num_heads for a in ARCHS.values()}
    arch = next((n for n, a in ARCHS.items() if a.embed_dim == dim), "vit_base")
    return [
        f"model.arch={arch}",
        f"model.embed_dim={dim}",
        f"model.depth={depth}",
        f"model.num_heads={heads.get(dim, max(1, dim // 64))}",
        f"model.mlp_ratio={hidden / dim}",
    ], grid


def _id_stem_overrides(state: Mapping[str, Any], grid: int, source: Any) -> list[str]:
    vocab, width = _shape(state, "token_emb.word_embeddings.weight", 2, source)
    proj = _shape(state, "patch_embed.proj.weight", 4, source)
    if proj[1] != width or proj[2] != proj[3]:
        raise ValueError(
            f"{source}: 'patch_embed.proj.weight' {tuple(proj)} should be [D, {width}, p, p] on the "
            f"{width}-d id embedding"
        )
    patch = proj[-1]
    return [
        "model.stem=token_ids",
        f"model.vocab_size={vocab}",
        f"model.token_dim={width}",
        f"model.token_dropout={SEIT_TOKEN_DROPOUT}",
        f"model.patch_size={patch}",
        f"model.img_size={grid * patch}",
    ]


def _args_overrides(args: Any, names: tuple[tuple[str, str], ...]) -> list[str]:
    out = []
    for arg, key in names:
        value = getattr(args, arg, None)
        if isinstance(value, (bool, int, float)):
            out.append(f"{key}={str(value).lower() if isinstance(value, bool) else value}")
    return out


def _convert(
    state: Mapping[str, Any],
    names: tuple[tuple[str, str], ...],
    expected: Mapping[str, torch.Tensor],
    source: Any,
    drop: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Official keys -> mimkit's, every key of ``expected`` present with its shape, nothing unknown."""
    out: dict[str, Any] = {}
    unknown = []
    for key, value in state.items():
        if key in drop:
            continue
        ours = _rename(key, names)
        if ours is None or ours not in expected:
            unknown.append(key)
            continue
        if ours == "head.bias" and value.dim() == 3:  # the reference keeps it as [1, 1, K]
            value = value.reshape(-1)
        if tuple(value.shape) != tuple(expected[ours].shape):
            raise ValueError(
                f"{source}: '{key}' has shape {tuple(value.shape)}; the model built from the file's sizes "
                f"expects {tuple(expected[ours].shape)}"
            )
        out[ours] = value
    if unknown:
        raise ValueError(f"{source}: entries the official SeiT layout does not have: {sorted(unknown)[:8]}")
    missing = sorted(_rename(k, names, reverse=True) or k for k in expected if k not in out)
    if missing:
        raise ValueError(f"{source}: the official SeiT layout needs {missing[:8]}; missing")
    return out


def _split(ckpt: Mapping[str, Any], weights: str, source: Any) -> tuple[dict[str, Any], TokenAdapt | None]:
    """The model state (wrapper prefixes stripped) and the TokenAdapt modules it carries."""
    payload = ckpt.get(weights) if isinstance(ckpt.get(weights), dict) else None
    if payload is None:
        if weights != "model" or not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise ValueError(f"{source}: no '{weights}' state dict in the file (keys: {sorted(ckpt)[:8]})")
        payload = ckpt  # a bare state dict
    state = strip_prefixes(payload, WRAPPER_PREFIXES)
    aside = {k: v for k, v in state.items() if k.startswith(TOKENADAPT_PREFIXES)}
    state = {k: v for k, v in state.items() if k not in aside}
    if not aside:
        return state, None
    try:
        return state, load_tokenadapt(aside)
    except ValueError as err:
        raise ValueError(f"{source}: its TokenAdapt entries: {err}") from err


def seit_mtm_method(
    ckpt: Mapping[str, Any], overrides: list[str] | None = None, *, source: Any = "checkpoint"
) -> SeiTLoad:
    """:func:`load_official_mtm` on a checkpoint already read."""
    state, tokenadapt = _split(ckpt, "model", source)
    if not is_seit_mtm(state):
        raise ValueError(f"{source}: not an official SeiT++ MTM layout (no 'mlm_layer.fc.weight')")
    encoder, grid = _encoder_overrides(state, source)
    dec_dim = _shape(state, "decoder_embed.weight", 2, source)[0]
    dec_heads = max(1, dec_dim // 32)  # the reference's decoder: 512 wide, 16 heads
    inferred = [
        "method=mtm",
        *encoder,
        *_id_stem_overrides(state, grid, source),
        f"method.decoder_embed_dim={dec_dim}",
        f"method.decoder_depth={count_blocks(state, 'decoder_blocks.')}",
        f"method.decoder_num_heads={dec_heads if dec_dim % dec_heads == 0 else 1}",
        *_args_overrides(ckpt.get("args"), MTM_ARGS),
    ]
    if getattr(ckpt.get("args"), "bce_loss", False):
        print(f"note: {source} was trained with --bce_loss; mimkit's mtm uses cross-entropy", file=sys.stderr)
    cfg = build_config(None, [*inferred, *(overrides or [])])
    method = build_method(cfg)
    if "decoder_blocks.0.mlp.fc1.weight" in state:
        ratio = state["decoder_blocks.0.mlp.fc1.weight"].shape[0] / dec_dim
        if ratio != 4:
            raise ValueError(f"{source}: the decoder's MLP ratio is {ratio}; mimkit's MTM decoder has 4")
    if UNUSED_DECODER_POS in state:
        _shape(state, UNUSED_DECODER_POS, 3, source)
    method.load_state_dict(
        _convert(state, MTM_NAMES, method.state_dict(), source, drop=(UNUSED_DECODER_POS,))
    )
    return SeiTLoad(method, cfg, tokenadapt)


def load_official_mtm(
    source: str | Path | dict, overrides: list[str] | None = None, *, trust: bool = False
) -> SeiTLoad:
    """An SeiT++ masked-token-modeling checkpoint (``main_mtm_pretrain.py``) as mimkit's ``mtm`` method,
    its config, and the file's TokenAdapt modules (frozen in the reference; None if absent). The reference
    fixes the id-embedding dropout (0.1) and a 512-wide decoder with 16 heads: heads are inferred as
    width / 32, and ``overrides`` (key=value) set what neither the weights nor the arguments tell."""
    return seit_mtm_method(read(source, trust=trust), overrides, source=source)


def mtm_to_official(method: MTM, tokenadapt: TokenAdapt | Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{'model': state}`` in the SeiT++ MTM layout, with the unused fixed decoder table rebuilt and the
    TokenAdapt modules (a module or its official state) if given."""
    out = {}
    for key, value in method.state_dict().items():
        official = _rename(key, MTM_NAMES, reverse=True)
        if official is None:
            raise ValueError(f"'{key}' has no place in the official SeiT++ MTM layout")
        out[official] = value.reshape(1, 1, -1) if key == "head.bias" else value
    dec_dim = method.decoder.pos_embed.shape[-1]
    out[UNUSED_DECODER_POS] = sincos_2d(dec_dim, method.encoder.grid_size)
    return {"model": out | _official_tokenadapt(tokenadapt)}


def _official_tokenadapt(tokenadapt: TokenAdapt | Mapping[str, Any] | None) -> dict[str, Any]:
    if tokenadapt is None:
        return {}
    state = dict(tokenadapt) if isinstance(tokenadapt, Mapping) else to_official_tokenadapt(tokenadapt)
    if bad := sorted(k for k in state if not k.startswith(TOKENADAPT_PREFIXES)):
        raise ValueError(
            f"TokenAdapt entries must lie under {' or '.join(TOKENADAPT_PREFIXES)}; got {bad[:8]}"
        )
    return state


def seit_classifier(
    ckpt: Mapping[str, Any],
    overrides: list[str] | None = None,
    *,
    weights: str = "model",
    source: Any = "checkpoint",
) -> SeiTLoad:
    """:func:`load_official_classifier` on a checkpoint already read."""
    args = ckpt.get("args")
    state, tokenadapt = _split(ckpt, weights, source)
    kind = seit_classifier_kind(state, args)
    if kind is None:
        raise ValueError(
            f"{source}: not an official SeiT / SeiT++ classifier (needs head.weight and a token stem: "
            "token_emb.* for SeiT++, a non-RGB patch_embed.proj for SeiT)"
        )
    encoder, grid = _encoder_overrides(state, source)
    num_classes = _shape(state, "head.weight", 2, source)[0]
    inferred = ["method=finetune", "method.pool=avg_norm", f"method.num_classes={num_classes}", *encoder]
    if isinstance(source, (str, Path)):
        inferred.append(f"method.checkpoint={source}")
    kernel = padding = None
    if kind == "seit++":
        inferred += _id_stem_overrides(state, grid, source)
    else:
        proj = _shape(state, "patch_embed.proj.weight", 4, source)
        # the grid in cells is the training input over the tokenizer's patch (224 / 8 = 28)
        size, cell = getattr(args, "input_size", None), getattr(args, "token_patch_size", None)
        cells = size // cell if isinstance(size, int) and isinstance(cell, int) and cell > 0 else 0
        stride = cells // grid if cells and cells % grid == 0 else SEIT_STRIDE
        inferred += [
            "model.stem=token_embeddings",
            f"model.token_dim={proj[1]}",
            f"model.patch_size={stride}",
            f"model.img_size={grid * stride}",
        ]
        kernel = proj[-1]
    inferred += _args_overrides(args, CLASSIFIER_ARGS)
    cfg = build_config(None, [*inferred, *(overrides or [])])
    if cfg.method.pool != "avg_norm":
        raise ValueError(
            f"{source}: the official SeiT classifiers pool the patch tokens' mean, then the encoder's norm; "
            f"method.pool must be avg_norm (got {cfg.method.pool!r})"
        )
    m = cfg.model
    if kernel is not None:
        padding = (kernel - m.patch_size) // 2  # what keeps the conv's output on the encoder's grid
    encoder_model = ViTEncoder(EncoderSpec.from_config(m, stem_kernel=kernel, stem_padding=padding))
    module = FineTune(encoder_model, cfg.method, num_classes)
    names = _classifier_names(module)
    expected = {k: v for k, v in module.state_dict().items() if k.startswith("model.")}
    module.load_state_dict(_convert(state, names, expected, source), strict=False)
    if module.ema is not None:  # method.model_ema=true: the file's EMA copy, else the loaded weights
        ema = module.model.state_dict()
        if weights == "model" and isinstance(ckpt.get("model_ema"), dict):
            ema_state = _split(ckpt, "model_ema", source)[0]
            ema = {k[len("model.") :]: v for k, v in _convert(ema_state, names, expected, source).items()}
        module.ema.module.load_state_dict(ema)
    return SeiTLoad(module, cfg, tokenadapt)


def load_official_classifier(
    source: str | Path | dict,
    overrides: list[str] | None = None,
    *,
    weights: str = "model",
    trust: bool = False,
) -> SeiTLoad:
    """An official SeiT++ fine-tuned classifier (``main_mtm_finetune.py``: token ids) or SeiT supervised
    classifier (``main_seit.py``: embedding grids through the Stem-Adapter conv) as a mimkit
    :class:`~mimkit.methods.FineTune` that pools as they do (the patch tokens' mean, then the encoder's
    final norm: ``pool=avg_norm``), with its config and the file's TokenAdapt modules (None if absent).
    ``weights``: "model" or "model_ema" (SeiT's EMA copy). SeiT's stride (2 in the reference) comes from
    the arguments (input size / tokenizer patch) when present; ``overrides`` set the rest."""
    return seit_classifier(read(source, trust=trust), overrides, weights=weights, source=source)


def classifier_to_official(
    module: FineTune, tokenadapt: TokenAdapt | Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``{'model': state}`` in the SeiT++ (token-id encoder) or SeiT (token-embedding encoder) classifier
    layout, plus ``'model_ema'`` for a fine-tune with a model EMA; the TokenAdapt modules (a module or its
    official state) are added to 'model' if given."""
    # avg and avg_norm hold the same modules (mean, then fc_norm, then head) and differ only in where
    # fc_norm started from; cls reads another token
    if module.cfg.pool not in ("avg", "avg_norm"):
        raise ValueError(
            "the official SeiT classifiers pool the patch tokens' mean then a norm (pool=avg_norm or avg); "
            f"this fine-tune has pool={module.cfg.pool!r}"
        )
    kind = module.model.stem.kind
    if kind not in ("token_ids", "token_embeddings"):
        raise ValueError(f"the official SeiT classifiers take tokens; this one takes {kind}")
    names = _classifier_names(module)

    def convert(model: nn.Module) -> dict[str, Any]:
        out = {}
        for key, value in model.state_dict().items():
            if key == "mask_token":  # a pre-training leftover the classifier never uses
                continue
            official = _rename("model." + key, names, reverse=True)
            if official is None:
                raise ValueError(f"'model.{key}' has no place in the official SeiT classifier layout")
            out[official] = value
        return out

    out = {"model": convert(module.model) | _official_tokenadapt(tokenadapt)}
    if module.ema is not None:
        out["model_ema"] = convert(module.ema.module)
    return out
