"""The official SeiT / SeiT++ checkpoint layouts: files written here key by key (tiny sizes), loaded into
mimkit's modules, checked against a plain re-statement of the official forward passes, and written back
exactly; a missing or renamed key is an error that names it."""

from __future__ import annotations

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.interop import load_official, to_official
from mimkit.interop.seit_mtm import (
    classifier_to_official,
    load_official_classifier,
    load_official_mtm,
    mtm_to_official,
)
from mimkit.methods import MTM, FineTune, FinetuneConfig
from mimkit.models.tokenadapt import TokenAdapt, to_official_tokenadapt
from mimkit.models.vit import ViTEncoder

K, E, CELLS, P, D, DEPTH, MLP = 11, 8, 8, 2, 64, 2, 96  # ids, id width, grid side, patch, encoder
DEC, DEC_DEPTH = 32, 1  # decoder width (one head: width / 32) and depth
L = (CELLS // P) ** 2  # 16 patches
CLASSES, C = 5, 6  # SeiT: embedding-grid channels


def rnd(g: torch.Generator, *shape: int, scale: float = 0.2) -> torch.Tensor:
    return torch.randn(*shape, generator=g) * scale


def block(prefix: str, dim: int, hidden: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """One timm / DeiT ViT block, as the official code's state dicts name it."""
    return {
        f"{prefix}.norm1.weight": 1 + rnd(g, dim),
        f"{prefix}.norm1.bias": rnd(g, dim),
        f"{prefix}.attn.qkv.weight": rnd(g, 3 * dim, dim),
        f"{prefix}.attn.qkv.bias": rnd(g, 3 * dim),
        f"{prefix}.attn.proj.weight": rnd(g, dim, dim),
        f"{prefix}.attn.proj.bias": rnd(g, dim),
        f"{prefix}.norm2.weight": 1 + rnd(g, dim),
        f"{prefix}.norm2.bias": rnd(g, dim),
        f"{prefix}.mlp.fc1.weight": rnd(g, hidden, dim),
        f"{prefix}.mlp.fc1.bias": rnd(g, hidden),
        f"{prefix}.mlp.fc2.weight": rnd(g, dim, hidden),
        f"{prefix}.mlp.fc2.bias": rnd(g, dim),
    }


def mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed with a zero cls row (numpy, float32 positions and frequencies)."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float32) / np.float32(d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([np.zeros((1, dim)), np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], 1)])
    return torch.from_numpy(table).float().unsqueeze(0)


def tokenadapt_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return to_official_tokenadapt(TokenAdapt(K, token_dim=E, width=128, num_heads=2, in_grid=4, out_grid=3))


def encoder_state(g: torch.Generator, stem: str) -> dict[str, torch.Tensor]:
    """The encoder of the official models: SeiT++'s id embedding + k2 s2 conv, or SeiT's k4 s2 p1 conv."""
    if stem == "ids":
        state = {
            "token_emb.word_embeddings.weight": rnd(g, K, E, scale=1.0),
            "token_emb.LayerNorm.weight": 1 + rnd(g, E),
            "token_emb.LayerNorm.bias": rnd(g, E),
            "patch_embed.proj.weight": rnd(g, D, E, P, P),
        }
    else:
        state = {"patch_embed.proj.weight": rnd(g, D, C, 4, 4)}
    state |= {
        "patch_embed.proj.bias": rnd(g, D),
        "cls_token": rnd(g, 1, 1, D),
        "pos_embed": rnd(g, 1, L + 1, D),
    }
    for i in range(DEPTH):
        state |= block(f"blocks.{i}", D, MLP, g)
    return state | {"norm.weight": 1 + rnd(g, D), "norm.bias": rnd(g, D)}


def official_mtm() -> dict[str, torch.Tensor]:
    """A tiny MaskedAutoencoderTokenViT state dict, TokenAdapt modules included."""
    g = torch.Generator().manual_seed(0)
    state = encoder_state(g, "ids") | {
        "mask_token_label": rnd(g, 1, 1, D),
        "decoder_embed.weight": rnd(g, DEC, D),
        "decoder_embed.bias": rnd(g, DEC),
        "decoder_pos_embed": mae_sincos(DEC, CELLS // P),
        "decoder_pos_embed_learned": rnd(g, 1, L + 1, DEC),
    }
    for i in range(DEC_DEPTH):
        state |= block(f"decoder_blocks.{i}", DEC, 4 * DEC, g)
    state |= {
        "decoder_norm.weight": 1 + rnd(g, DEC),
        "decoder_norm.bias": rnd(g, DEC),
        "mlm_layer.fc.weight": rnd(g, P * P * E, DEC),
        "mlm_layer.fc.bias": rnd(g, P * P * E),
        "mlm_layer.ln.weight": 1 + rnd(g, E),
        "mlm_layer.ln.bias": rnd(g, E),
        "mlm_layer.bias": rnd(g, 1, 1, K),
    }
    return state | tokenadapt_state()


def official_classifier(stem: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    state = encoder_state(g, stem) | {"head.weight": rnd(g, CLASSES, D), "head.bias": rnd(g, CLASSES)}
    return state | (tokenadapt_state() if stem == "ids" else {})


# -- a plain re-statement of the official forward passes ----------------------------------------------------
def ref_blocks(x: torch.Tensor, s: dict, prefix: str, depth: int, heads: int) -> torch.Tensor:
    for i in range(depth):
        p = f"{prefix}{i}."
        h = F.layer_norm(x, x.shape[-1:], s[p + "norm1.weight"], s[p + "norm1.bias"], 1e-6)
        n, t, d = h.shape
        q, k, v = (
            F.linear(h, s[p + "attn.qkv.weight"], s[p + "attn.qkv.bias"]).view(n, t, 3, heads, -1).unbind(2)
        )
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(-1)
        x = x + F.linear(
            (att @ v).transpose(1, 2).reshape(n, t, d), s[p + "attn.proj.weight"], s[p + "attn.proj.bias"]
        )
        h = F.layer_norm(x, x.shape[-1:], s[p + "norm2.weight"], s[p + "norm2.bias"], 1e-6)
        h = F.linear(
            F.gelu(F.linear(h, s[p + "mlp.fc1.weight"], s[p + "mlp.fc1.bias"])), s[p + "mlp.fc2.weight"]
        )
        x = x + h + s[p + "mlp.fc2.bias"]
    return x


def ref_tokens(s: dict, x: torch.Tensor, stem: str, heads: int = 1) -> torch.Tensor:
    """Stem, cls + positions, blocks; no final norm. ``x``: ids [N, H, W] or embedding grids [N, C, H, W]."""
    if stem == "ids":
        emb = F.layer_norm(
            s["token_emb.word_embeddings.weight"][x],
            (E,),
            s["token_emb.LayerNorm.weight"],
            s["token_emb.LayerNorm.bias"],
            1e-6,
        ).permute(0, 3, 1, 2)
        patches = F.conv2d(emb, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=P)
    else:
        patches = F.conv2d(x, s["patch_embed.proj.weight"], s["patch_embed.proj.bias"], stride=2, padding=1)
    t = patches.flatten(2).transpose(1, 2)
    t = torch.cat([s["cls_token"].expand(len(t), -1, -1), t], 1) + s["pos_embed"]
    return ref_blocks(t, s, "blocks.", DEPTH, heads)


def ref_classifier(s: dict, x: torch.Tensor, stem: str, heads: int = 1) -> torch.Tensor:
    """Global average of the patch tokens, then the final norm, then the head."""
    pooled = ref_tokens(s, x, stem, heads)[:, 1:].mean(1)
    return F.linear(
        F.layer_norm(pooled, (D,), s["norm.weight"], s["norm.bias"], 1e-6), s["head.weight"], s["head.bias"]
    )


def ref_decoder(s: dict, latent: torch.Tensor, keep: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """MAGE's decoder: every slot starts as the projected cls; kept outputs go back to theirs; masked slots
    are reset to the cls; learned positions; blocks; norm."""
    x = F.linear(latent, s["decoder_embed.weight"], s["decoder_embed.bias"])
    canvas = x[:, :1].repeat(1, L + 1, 1)
    for b in range(len(x)):
        canvas[b, 1 + keep[b]] = x[b, 1:]
        canvas[b, 1:][mask[b].bool()] = x[b, 0]
    y = ref_blocks(canvas + s["decoder_pos_embed_learned"], s, "decoder_blocks.", DEC_DEPTH, 1)
    return F.layer_norm(y, (DEC,), s["decoder_norm.weight"], s["decoder_norm.bias"], 1e-6)


def ref_mlm(s: dict, decoded: torch.Tensor) -> torch.Tensor:
    """MlmLayer on patch tokens [N, L, DEC]: per patch p*p cells of E, GELU, LayerNorm (eps 1e-5), logits
    against the id table plus the bias -> [N, L, p*p, K]."""
    h = F.linear(decoded, s["mlm_layer.fc.weight"], s["mlm_layer.fc.bias"]).view(*decoded.shape[:2], P * P, E)
    h = F.layer_norm(F.gelu(h), (E,), s["mlm_layer.ln.weight"], s["mlm_layer.ln.bias"], 1e-5)
    return h @ s["token_emb.word_embeddings.weight"].T + s["mlm_layer.bias"].view(-1)


def assert_same_state(got: dict, want: dict, *, close: tuple[str, ...] = ()) -> None:
    assert sorted(got) == sorted(want)
    for key in want:
        if key in close:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
        else:
            assert got[key].shape == want[key].shape and torch.equal(got[key], want[key]), key


def ids(n: int = 2) -> torch.Tensor:
    return torch.randint(0, K, (n, CELLS, CELLS), generator=torch.Generator().manual_seed(5))


# -- SeiT++ masked token modeling -------------------------------------------------------------------------
def mtm_file(tmp_path, state=None, **args):
    path = tmp_path / "checkpoint-last.pth"
    namespace = argparse.Namespace(model="mae_token_vit_base_patch16_dec512d4b_k2s2_vitvqgan_32", **args)
    torch.save({"model": official_mtm() if state is None else state, "args": namespace, "epoch": 3}, path)
    return path


def test_mtm_loads_every_tensor_and_matches_the_official_forward(tmp_path):
    official = official_mtm()
    args = {"mask_ratio_mu": 0.5, "mask_ratio_std": 0.2, "mask_ratio_min": 0.3, "smoothing": 0.1}
    method, cfg, tokenadapt = load_official_mtm(mtm_file(tmp_path, **args))
    assert isinstance(method, MTM) and isinstance(tokenadapt, TokenAdapt)
    assert (cfg.model.stem, cfg.model.vocab_size, cfg.model.token_dim, cfg.model.token_dropout) == (
        "token_ids",
        K,
        E,
        0.1,
    )
    assert (cfg.model.img_size, cfg.model.patch_size, cfg.model.embed_dim, cfg.model.depth) == (
        CELLS,
        P,
        D,
        DEPTH,
    )
    assert (cfg.method.decoder_embed_dim, cfg.method.decoder_depth, cfg.method.decoder_num_heads) == (
        DEC,
        1,
        1,
    )
    m = cfg.method
    assert (m.mask_ratio_mean, m.mask_ratio_std, m.mask_ratio_min, m.label_smoothing) == (0.5, 0.2, 0.3, 0.1)
    ours = method.state_dict()
    pairs = {
        "token_emb.word_embeddings.weight": "encoder.patch_embed.embedding.weight",
        "token_emb.LayerNorm.bias": "encoder.patch_embed.embedding_norm.bias",
        "mask_token_label": "encoder.mask_token",
        "decoder_pos_embed_learned": "decoder.pos_embed",
        "decoder_blocks.0.mlp.fc2.weight": "decoder.blocks.0.mlp.fc2.weight",
        "mlm_layer.ln.weight": "head.norm.weight",
        "blocks.1.attn.qkv.bias": "encoder.blocks.1.attn.qkv.bias",
    }
    for theirs, mine in pairs.items():
        assert torch.equal(ours[mine], official[theirs]), theirs
    assert torch.equal(ours["head.bias"], official["mlm_layer.bias"].view(-1))
    for key, value in to_official_tokenadapt(tokenadapt).items():
        assert torch.equal(value, official[key]), key

    method.eval()
    x = ids()
    want = ref_tokens(official, x, "ids")
    want = F.layer_norm(want, (D,), official["norm.weight"], official["norm.bias"], 1e-6)
    torch.testing.assert_close(method.encoder.forward_features(x), want, rtol=1e-4, atol=1e-4)
    # the decoder on a masked latent: patches 0..3 kept (1 and 2 of them masked), the rest dropped
    latent = torch.randn(2, 5, D)
    keep = torch.tensor([[3, 0, 2, 1], [1, 2, 3, 0]])
    mask = torch.ones(2, L)
    mask[:, [0, 3]] = 0
    decoded = method.decoder(latent, keep, mask)
    torch.testing.assert_close(decoded, ref_decoder(official, latent, keep, mask), rtol=1e-4, atol=1e-4)
    logits = method.head(decoded[:, 1:], method.encoder.stem.embedding.weight)
    torch.testing.assert_close(logits, ref_mlm(official, decoded[:, 1:]), rtol=1e-4, atol=1e-4)


def test_mtm_round_trip_is_exact(tmp_path):
    official = official_mtm()
    method, _, tokenadapt = load_official_mtm(mtm_file(tmp_path, official))
    back = mtm_to_official(method, tokenadapt)
    # the unused fixed decoder table is rebuilt, not kept: equal up to float rounding
    assert_same_state(back["model"], official, close=("decoder_pos_embed",))
    # the official state of TokenAdapt passes through as it is
    assert_same_state(
        mtm_to_official(method, tokenadapt_state())["model"], official, close=("decoder_pos_embed",)
    )


def test_load_official_dispatches_mtm_and_to_official_writes_it_back(tmp_path, capsys):
    official = official_mtm()
    method = load_official(mtm_file(tmp_path, official))
    assert isinstance(method, MTM)
    assert "TokenAdapt" in capsys.readouterr().err
    written = to_official(method)["model"]
    want = {
        k: v for k, v in official.items() if not k.startswith(("conversion_function.", "reverse_transform."))
    }
    assert_same_state(written, want, close=("decoder_pos_embed",))
    # DDP's prefix, and a file without TokenAdapt
    torch.save({"model": {"module." + k: v for k, v in want.items()}}, tmp_path / "ddp.pth")
    again, _, tokenadapt = load_official_mtm(tmp_path / "ddp.pth")
    assert tokenadapt is None and torch.equal(again.encoder.mask_token, official["mask_token_label"])


@pytest.mark.parametrize(
    "change, named",
    [
        ("drop:mlm_layer.ln.weight", "mlm_layer.ln.weight"),
        ("drop:decoder_pos_embed_learned", "decoder_pos_embed_learned"),
        ("rename:blocks.0.attn.qkv.weight", "blocks.0.attn.qkv_weight"),
        ("rename:mask_token_label", "mask_token_label_"),
        ("shape:decoder_norm.bias", "decoder_norm.bias"),
        ("drop:conversion_function.0.weight", "conversion_function.0.weight"),
    ],
)
def test_mtm_missing_renamed_or_misshapen_keys_are_named(tmp_path, change, named):
    state = official_mtm()
    what, key = change.split(":")
    value = state.pop(key)
    if what == "rename":
        state[named] = value
    elif what == "shape":
        state[key] = value[:-1]
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        load_official_mtm(mtm_file(tmp_path, state))


# -- SeiT++ fine-tuned classifier -------------------------------------------------------------------------
def test_seitpp_classifier_matches_the_official_forward_and_round_trips(tmp_path):
    official = official_classifier("ids")
    path = tmp_path / "checkpoint-best.pth"
    args = argparse.Namespace(model="deit_base_token_32", drop_path=0.2, layer_decay=0.65, smoothing=0.1)
    torch.save({"model": official, "args": args}, path)
    module, cfg, tokenadapt = load_official_classifier(path, ["model.num_heads=2"])
    assert isinstance(module, FineTune) and isinstance(tokenadapt, TokenAdapt)
    assert (cfg.method.name, cfg.method.pool, cfg.method.num_classes) == ("finetune", "avg_norm", CLASSES)
    assert (cfg.method.drop_path, cfg.method.layer_decay, cfg.model.num_heads) == (0.2, 0.65, 2)
    assert module.model.stem.kind == "token_ids" and module.model.input_spec.vocab_size == K
    module.eval()
    x = ids()
    torch.testing.assert_close(
        module.logits(x), ref_classifier(official, x, "ids", heads=2), rtol=1e-4, atol=1e-4
    )
    assert_same_state(classifier_to_official(module, tokenadapt)["model"], official)
    assert_same_state(
        to_official(module)["model"], {k: v for k, v in official.items() if k in module_keys(official)}
    )


def module_keys(official: dict) -> set[str]:
    return {k for k in official if not k.startswith(("conversion_function.", "reverse_transform."))}


def test_classifier_files_are_not_pre_training_checkpoints(tmp_path):
    torch.save({"model": official_classifier("ids")}, tmp_path / "cls.pth")
    with pytest.raises(ValueError, match="load_official_classifier"):
        load_official(tmp_path / "cls.pth")


@pytest.mark.parametrize(
    "stem, key", [("ids", "norm.weight"), ("ids", "token_emb.LayerNorm.bias"), ("emb", "head.bias")]
)
def test_classifier_missing_keys_are_named(tmp_path, stem, key):
    state = official_classifier(stem)
    del state[key]
    torch.save({"model": state, "args": argparse.Namespace(model="deit_base_token_32")}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        load_official_classifier(tmp_path / "c.pth")


# -- SeiT supervised classifier (embedding grids, Stem-Adapter) --------------------------------------------
def test_seit_classifier_matches_the_official_forward_and_round_trips(tmp_path):
    official = official_classifier("emb")
    ema = {k: v + 1 for k, v in official.items()}
    args = argparse.Namespace(model="deit_small_token_32", input_size=32, token_patch_size=4, drop_path=0.1)
    torch.save({"model": official, "model_ema": ema, "args": args}, tmp_path / "checkpoint.pth")
    module, cfg, tokenadapt = load_official_classifier(tmp_path / "checkpoint.pth")
    assert tokenadapt is None and cfg.model.stem == "token_embeddings"
    stem = module.model.stem
    assert (stem.kernel_size, stem.patch_size, stem.padding, stem.token_dim) == (4, (2, 2), 1, C)
    spec = module.model.input_spec
    assert (spec.kind, spec.channels, spec.img_size) == ("token_embeddings", C, CELLS)
    module.eval()
    x = torch.randn(2, C, CELLS, CELLS, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(module.logits(x), ref_classifier(official, x, "emb"), rtol=1e-4, atol=1e-4)
    assert_same_state(classifier_to_official(module)["model"], official)
    # the EMA copy, and a model EMA kept on load
    from_ema = load_official_classifier(tmp_path / "checkpoint.pth", weights="model_ema").module
    assert_same_state(classifier_to_official(from_ema)["model"], ema)
    both = load_official_classifier(tmp_path / "checkpoint.pth", ["method.model_ema=true"]).module
    written = classifier_to_official(both)
    assert_same_state(written["model"], official)
    assert_same_state(written["model_ema"], ema)


def test_only_mean_pooled_token_classifiers_have_a_seit_layout(tmp_path):
    torch.save({"model": official_classifier("emb")}, tmp_path / "c.pth")
    with pytest.raises(ValueError, match=r"method\.pool must be avg_norm"):
        load_official_classifier(tmp_path / "c.pth", ["method.pool=cls"])
    with pytest.raises(ValueError, match="no 'model_ema' state dict"):
        load_official_classifier(tmp_path / "c.pth", weights="model_ema")
    encoder = load_official_classifier(tmp_path / "c.pth").module.model
    spec = encoder.spec
    mean_pooled = FineTune(ViTEncoder(spec), FinetuneConfig(pool="avg"), CLASSES)
    assert sorted(classifier_to_official(mean_pooled)["model"]) == sorted(official_classifier("emb"))
    with pytest.raises(ValueError, match="pool='cls'"):
        classifier_to_official(FineTune(ViTEncoder(spec), FinetuneConfig(pool="cls"), CLASSES))
    pixels = FineTune(
        ViTEncoder(img_size=8, patch_size=4, embed_dim=32, depth=1, num_heads=1),
        FinetuneConfig(pool="avg_norm"),
        3,
    )
    with pytest.raises(ValueError, match="take tokens; this one takes pixels"):
        classifier_to_official(pixels)
