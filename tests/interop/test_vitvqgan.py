"""The enhancing-transformers ViT-VQGAN layout: key names and shapes, exact round trips, agreement with a
plain re-statement of that model's forward pass, and the errors for files that do not fit."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.checkpoint import CheckpointError
from mimkit.interop.vitvqgan import load_vitvqgan, to_vitvqgan, vitvqgan_shape
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer
from tests.reference import enhancing_transformer_shapes

TINY = TokenizerShape(
    img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, codebook_size=16, code_dim=8
)


def official_keys(
    *,
    dim: int,
    depth: int,
    mlp_dim: int,
    patch: int,
    grid: int,
    codes: int,
    code_dim: int,
    channels: int = 3,
    project_out: bool = True,
    decoder_dim: int | None = None,
    decoder_depth: int | None = None,
    decoder_mlp_dim: int | None = None,
) -> dict[str, tuple[int, ...]]:
    """The state dict of enhancing-transformers' ``ViTVQ`` (without its loss), as read from its
    ``ViTEncoder``/``ViTDecoder``/``Transformer``/``VectorQuantizer`` modules."""

    def transformer(prefix: str, width: int, layers: int, hidden: int) -> dict[str, tuple[int, ...]]:
        return enhancing_transformer_shapes(prefix, width, layers, hidden, project_out)

    ddim, ddepth = decoder_dim or dim, decoder_depth or depth
    return {
        "encoder.en_pos_embedding": (1, grid * grid, dim),
        "encoder.to_patch_embedding.0.weight": (dim, channels, patch, patch),
        "encoder.to_patch_embedding.0.bias": (dim,),
        **transformer("encoder", dim, depth, mlp_dim),
        **transformer("decoder", ddim, ddepth, decoder_mlp_dim or mlp_dim),
        "decoder.de_pos_embedding": (1, grid * grid, ddim),
        "decoder.to_pixel.1.weight": (ddim, channels, patch, patch),
        "decoder.to_pixel.1.bias": (channels,),
        "quantizer.embedding.weight": (codes, code_dim),
        "pre_quant.weight": (code_dim, dim),
        "pre_quant.bias": (code_dim,),
        "post_quant.weight": (ddim, code_dim),
        "post_quant.bias": (ddim,),
    }


def tiny_keys(shape: TokenizerShape = TINY) -> dict[str, tuple[int, ...]]:
    return official_keys(
        dim=shape.embed_dim,
        depth=shape.depth,
        mlp_dim=int(shape.embed_dim * shape.mlp_ratio),
        patch=shape.patch_size,
        grid=shape.grid,
        codes=shape.codebook_size,
        code_dim=shape.code_dim,
        project_out=shape.num_heads > 1,
    )


def official_sincos(dim: int, grid: int) -> np.ndarray:
    """The official table: meshgrid with w first, the first half of the channels from the column."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)[None].astype(np.float32)


def make_model(shape: TokenizerShape = TINY, seed: int = 0) -> VQTokenizer:
    """A random tokenizer with every weight distinct from its init (so a swapped pair of LayerNorms or
    biases shows)."""
    torch.manual_seed(seed)
    model = VQTokenizer(shape, kmeans_init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def images(n: int = 3, shape: TokenizerShape = TINY, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, shape.img_size, shape.img_size, generator=torch.Generator().manual_seed(seed))


# -- the official forward pass, restated on a plain state dict --------------------------------------------
def _ln(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-5)


def _transformer(x: torch.Tensor, sd: dict, prefix: str, depth: int, heads: int) -> torch.Tensor:
    n, length, dim = x.shape
    for i in range(depth):
        layer = f"{prefix}.transformer.layers.{i}"
        q, k, v = (
            t.reshape(n, length, heads, -1).transpose(1, 2)
            for t in F.linear(_ln(x, sd, f"{layer}.0.norm"), sd[f"{layer}.0.fn.to_qkv.weight"]).chunk(3, -1)
        )
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, length, dim)
        if f"{layer}.0.fn.to_out.weight" in sd:
            out = F.linear(out, sd[f"{layer}.0.fn.to_out.weight"], sd[f"{layer}.0.fn.to_out.bias"])
        x = x + out
        h = _ln(x, sd, f"{layer}.1.norm")
        h = torch.tanh(F.linear(h, sd[f"{layer}.1.fn.net.0.weight"], sd[f"{layer}.1.fn.net.0.bias"]))
        x = x + F.linear(h, sd[f"{layer}.1.fn.net.2.weight"], sd[f"{layer}.1.fn.net.2.bias"])
    return _ln(x, sd, f"{prefix}.transformer.norm")


def official_encode(sd: dict, x: torch.Tensor, shape: TokenizerShape) -> torch.Tensor:
    p = shape.patch_size
    h = F.conv2d(
        x, sd["encoder.to_patch_embedding.0.weight"], sd["encoder.to_patch_embedding.0.bias"], stride=p
    )
    h = h.flatten(2).transpose(1, 2) + sd["encoder.en_pos_embedding"]
    h = _transformer(h, sd, "encoder", shape.depth, shape.num_heads)
    z = F.normalize(
        F.linear(h, sd["pre_quant.weight"], sd["pre_quant.bias"]).reshape(-1, shape.code_dim), dim=-1
    )
    e = F.normalize(sd["quantizer.embedding.weight"], dim=-1)
    dist = z.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z @ e.T
    return dist.argmin(1).reshape(x.shape[0], shape.grid, shape.grid)


def official_decode(sd: dict, ids: torch.Tensor, shape: TokenizerShape) -> torch.Tensor:
    q = F.normalize(sd["quantizer.embedding.weight"][ids.flatten(1)], dim=-1)
    h = F.linear(q, sd["post_quant.weight"], sd["post_quant.bias"]) + sd["decoder.de_pos_embedding"]
    h = _transformer(h, sd, "decoder", shape.depth, shape.num_heads)
    h = h.transpose(1, 2).reshape(ids.shape[0], -1, shape.grid, shape.grid)
    return F.conv_transpose2d(
        h, sd["decoder.to_pixel.1.weight"], sd["decoder.to_pixel.1.bias"], stride=shape.patch_size
    )


# -- the layout ---------------------------------------------------------------------------------------------
def test_written_keys_and_shapes_are_the_official_ones() -> None:
    sd = to_vitvqgan(make_model())
    assert {k: tuple(v.shape) for k, v in sd.items()} == tiny_keys()
    for key in ("encoder.en_pos_embedding", "decoder.de_pos_embedding"):
        np.testing.assert_allclose(sd[key].numpy(), official_sincos(32, 4), rtol=0, atol=1e-6)


def test_single_head_has_no_output_projection() -> None:
    shape = dataclasses.replace(TINY, num_heads=1)
    model = make_model(shape)
    with pytest.raises(ValueError, match=r"attn\.proj is not the identity"):
        to_vitvqgan(model)
    with torch.no_grad():
        for stack in (model.encoder, model.decoder):
            for block in stack.blocks:
                block.attn.proj.weight.copy_(torch.eye(32))
                block.attn.proj.bias.zero_()
    sd = to_vitvqgan(model)
    assert {k: tuple(v.shape) for k, v in sd.items()} == tiny_keys(shape)
    loaded = load_vitvqgan(sd)  # no to_out: one head, inferred
    assert loaded.shape == shape
    x = images()
    assert torch.equal(loaded.encode(x), model.encode(x))
    assert torch.equal(loaded.encode(x), official_encode(sd, x, shape))


def test_official_geometries_are_read_from_shapes() -> None:
    def meta(keys: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
        return {k: torch.empty(s, device="meta") for k, s in keys.items()}

    common = dict(patch=8, grid=32, codes=8192, code_dim=32)
    base = meta(official_keys(dim=768, depth=12, mlp_dim=3072, **common))
    base["loss.discriminator.convs.0.0.weight"] = torch.empty(64, 3, 3, 3, device="meta")
    assert vitvqgan_shape(base) == TokenizerShape(
        img_size=256,
        patch_size=8,
        embed_dim=768,
        depth=12,
        num_heads=12,
        mlp_ratio=4.0,
        codebook_size=8192,
        code_dim=32,
        channels=3,
    )
    small = meta(official_keys(dim=512, depth=8, mlp_dim=2048, **common))
    assert vitvqgan_shape(small) == TokenizerShape(embed_dim=512, depth=8, num_heads=8)
    large = meta(
        official_keys(
            dim=512, depth=8, mlp_dim=2048, decoder_dim=1280, decoder_depth=32, decoder_mlp_dim=5120, **common
        )
    )
    with pytest.raises(ValueError, match=r"state dict: the decoder has 32 layers and the encoder 8"):
        vitvqgan_shape(large)


# -- round trips and agreement ------------------------------------------------------------------------------
def test_round_trip_is_exact() -> None:
    model = make_model()
    sd = to_vitvqgan(model)
    loaded = load_vitvqgan(sd, num_heads=2)
    assert loaded.shape == TINY and not loaded.training
    assert bool(loaded.quantizer._codebook.initted)
    assert {b.norm1.eps for s in (loaded.encoder, loaded.decoder) for b in s.blocks} == {1e-5}
    x = images()
    ids = model.encode(x)
    assert torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))
    back = to_vitvqgan(loaded)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def test_loaded_model_computes_the_official_forward() -> None:
    sd = to_vitvqgan(make_model())
    scale = torch.rand(16, 1, generator=torch.Generator().manual_seed(3)) * 4 + 0.5
    sd["quantizer.embedding.weight"] = sd["quantizer.embedding.weight"] * scale  # a raw, unnormalised table
    loaded = load_vitvqgan(sd, num_heads=2)
    x = images(4)
    ids = official_encode(sd, x, TINY)
    assert len(ids.unique()) > 1
    assert torch.equal(loaded.encode(x), ids)
    # the quantiser's own path (training, counts) agrees: its cosine codebook holds unit rows
    assert torch.equal(loaded.quantize(loaded.features(x)).ids.reshape(ids.shape), ids)
    torch.testing.assert_close(loaded.decode(ids), official_decode(sd, ids, TINY), rtol=0, atol=1e-5)
    unit = F.normalize(sd["quantizer.embedding.weight"], dim=-1)
    torch.testing.assert_close(to_vitvqgan(loaded)["quantizer.embedding.weight"], unit, rtol=0, atol=1e-7)


def test_pruned_tokenizer_is_written_with_its_kept_codes() -> None:
    model = make_model()
    counts = torch.zeros(16, dtype=torch.long)
    counts[[1, 4, 5, 9, 12]] = 7
    model.prune(counts)
    sd = to_vitvqgan(model)
    assert sd["quantizer.embedding.weight"].shape == (5, 8)
    loaded = load_vitvqgan(sd, num_heads=2)
    x = images()
    ids = model.encode(x)
    assert loaded.vocab_size == 5 and torch.equal(loaded.encode(x), ids)
    assert torch.equal(loaded.decode(ids), model.decode(ids))


def test_lightning_checkpoint_with_loss_weights_loads(tmp_path: Path) -> None:
    model = make_model()
    sd = to_vitvqgan(model)
    sd["loss.discriminator.convs.0.0.weight"] = torch.randn(4, 3, 3, 3)
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    path = tmp_path / "last.ckpt"
    torch.save(
        {"epoch": 3, "global_step": 70, "state_dict": sd, "optimizer_states": [], "lr_schedulers": []}, path
    )
    loaded = load_vitvqgan(path, num_heads=2)
    x = images()
    assert torch.equal(loaded.encode(x), model.encode(x))


def test_tables_left_out_need_the_image_size() -> None:
    model = make_model()
    sd = {k: v for k, v in to_vitvqgan(model).items() if not k.endswith("pos_embedding")}
    with pytest.raises(
        ValueError, match=r"state dict: holds no position table \(encoder\.en_pos_embedding\)"
    ):
        load_vitvqgan(sd, num_heads=2)
    loaded = load_vitvqgan(sd, img_size=16, num_heads=2)
    x = images()
    assert torch.equal(loaded.encode(x), model.encode(x))


# -- files that do not fit ----------------------------------------------------------------------------------
def test_missing_key_is_named() -> None:
    sd = to_vitvqgan(make_model())
    del sd["encoder.transformer.layers.1.0.fn.to_qkv.weight"]
    with pytest.raises(
        ValueError,
        match=r"state dict: does not fit .*: missing encoder\.transformer\.layers\.1\.0\.fn\.to_qkv\.weight$",
    ):
        load_vitvqgan(sd, num_heads=2)


def test_wrong_shape_is_named(tmp_path: Path) -> None:
    sd = to_vitvqgan(make_model())
    sd["post_quant.bias"] = torch.zeros(5)
    path = tmp_path / "vq.pt"
    torch.save(sd, path)
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"{path}: does not fit a ViT-VQGAN of shape width 32, 3 channels, patch 4, 16 x 8 codes: "
            "wrong shape: post_quant.bias (5,) (expected (32,))"
        ),
    ):
        load_vitvqgan(path, num_heads=2)


def test_unexpected_key_is_named_and_loss_keys_are_not() -> None:
    sd = to_vitvqgan(make_model())
    sd["loss.logvar"] = torch.zeros(())
    sd["encoder.transformer.layers.0.0.fn.to_qkv.bias"] = torch.zeros(96)
    with pytest.raises(
        ValueError, match=r": unexpected encoder\.transformer\.layers\.0\.0\.fn\.to_qkv\.bias$"
    ):
        load_vitvqgan(sd, num_heads=2)


def test_prefixed_keys_are_refused_with_the_prefix_named() -> None:
    sd = {f"model.{k}": v for k, v in to_vitvqgan(make_model()).items()}
    with pytest.raises(
        ValueError,
        match=r"not a ViT-VQGAN \(enhancing-transformers ViTVQ\) state dict: missing key\(s\) "
        r"encoder\.to_patch_embedding\.0\.weight, .*found model\.\S+, .*prefix 'model\.' \(strip it\)",
    ):
        load_vitvqgan(sd, num_heads=2)


def test_whole_pickled_module_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "vitvq.ckpt"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(
        CheckpointError, match=re.escape(f"{path}: refused as unsafe: it holds a pickled")
    ) as err:
        load_vitvqgan(path)
    assert "torch.save(model.state_dict(), path)" in str(err.value)


def test_geometry_mismatches_are_explained() -> None:
    sd = to_vitvqgan(make_model())
    with pytest.raises(
        ValueError, match=r"position table is for 16 px images \(4x4 patches of 4\); got img_size=32"
    ):
        load_vitvqgan(sd, img_size=32, num_heads=2)
    with pytest.raises(ValueError, match=r"the number of attention heads is not stored .* pass num_heads"):
        load_vitvqgan(sd)
    with pytest.raises(ValueError, match=r"so it has more than one head; got num_heads=1"):
        load_vitvqgan(sd, num_heads=1)
    shifted = dict(sd, **{"decoder.de_pos_embedding": sd["decoder.de_pos_embedding"].roll(1, dims=1)})
    with pytest.raises(ValueError, match=r"decoder\.de_pos_embedding is not the fixed 2-D sin-cos table"):
        load_vitvqgan(shifted, num_heads=2)
