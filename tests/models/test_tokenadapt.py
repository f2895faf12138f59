"""TokenAdapt: shapes, the official ``tokenadapt.ckpt`` layout (keys, shapes, an exact round trip and
agreement with a plain re-statement of the official forward pass), the loader's errors, and the f-space
geometry (reproducible draws, the law of the draw, agreement with torchvision's affine)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms.v2 import functional as TF

from mimkit.checkpoint import save_atomic
from mimkit.data.token_geometry import CropBoxes
from mimkit.methods.token_views import (
    AffineParams,
    GeoParams,
    affine_warp,
    apply_geometry,
    feature_augment,
    feature_augment_params,
    scale_boxes,
    tokenadapt_view,
)
from mimkit.models.tokenadapt import (
    TokenAdapt,
    load_tokenadapt,
    official_key_map,
    save_tokenadapt,
    to_official_tokenadapt,
)
from tests.reference import enhancing_transformer_shapes

K, D, WIDTH, HEADS, G_IN, G_OUT = 11, 8, 32, 2, 4, 3


# -- the official layout, written down independently from SeiT++'s layers.py / models_mtm.py ----------------
def official_sincos(dim: int, grid: int) -> torch.Tensor:
    """layers.get_2d_sincos_pos_embed in float32 numpy: meshgrid with w first, so the first half of the
    channels encodes the column."""
    w, h = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))

    def one_d(d: int, pos: np.ndarray) -> np.ndarray:
        omega = np.arange(d // 2, dtype=np.float32) / np.float32(d / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    table = np.concatenate([one_d(dim // 2, w), one_d(dim // 2, h)], axis=1)
    return torch.from_numpy(table).float().unsqueeze(0)


def official_shapes(
    *,
    vocab: int = K,
    dim: int = D,
    width: int = WIDTH,
    hidden: int = 4 * WIDTH,
    in_grid: int = G_IN,
    out_grid: int = G_OUT,
    depth: int = 1,
    project_out: bool = True,
) -> dict[str, tuple[int, ...]]:
    """Every key of the official TokenAdapt state dict and its shape (spec §3.6)."""

    def transformer(prefix: str) -> dict[str, tuple[int, ...]]:
        return enhancing_transformer_shapes(prefix, width, depth, hidden, project_out)

    return {
        "conversion_function.0.weight": (width, dim),
        "conversion_function.0.bias": (width,),
        "conversion_function.1.de_pos_embedding": (1, in_grid * in_grid, width),
        **transformer("conversion_function.1"),
        "conversion_function.1.to_pixel.1.weight": (width, dim, 2, 2),
        "conversion_function.1.to_pixel.1.bias": (dim,),
        "reverse_transform.0.en_pos_embedding": (1, out_grid * out_grid, width),
        "reverse_transform.0.to_patch_embedding.0.weight": (width, dim, 2, 2),
        "reverse_transform.0.to_patch_embedding.0.bias": (width,),
        **transformer("reverse_transform.0"),
        "reverse_transform.1.weight": (vocab, width),
        "reverse_transform.1.bias": (vocab,),
    }


def official_state(seed: int = 0, **geometry: int | bool) -> dict[str, torch.Tensor]:
    """A random official-layout state dict: sin-cos tables where the positions go, random tensors (all
    distinct, so a swapped pair shows) everywhere else."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in official_shapes(**geometry).items():
        if key.endswith("pos_embedding"):
            sd[key] = official_sincos(shape[2], math.isqrt(shape[1]))
        elif key.endswith("norm.weight"):
            sd[key] = 1 + 0.1 * torch.randn(shape, generator=g)
        else:
            sd[key] = torch.randn(shape, generator=g) / math.sqrt(shape[-1] if len(shape) == 2 else 4)
    return sd


def _ln(x: torch.Tensor, sd: dict, key: str) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{key}.weight"], sd[f"{key}.bias"], eps=1e-5)


def official_transformer(x: torch.Tensor, sd: dict, prefix: str, heads: int) -> torch.Tensor:
    """layers.Transformer: PreNorm(Attention) + x, PreNorm(FeedForward with Tanh) + x, final LayerNorm."""
    n, length, dim = x.shape
    i = 0
    while f"{prefix}.transformer.layers.{i}.0.norm.weight" in sd:
        layer = f"{prefix}.transformer.layers.{i}"
        qkv = F.linear(_ln(x, sd, f"{layer}.0.norm"), sd[f"{layer}.0.fn.to_qkv.weight"]).chunk(3, dim=-1)
        q, k, v = (t.reshape(n, length, heads, -1).transpose(1, 2) for t in qkv)
        attn = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1)
        out = (attn @ v).transpose(1, 2).reshape(n, length, dim)
        if f"{layer}.0.fn.to_out.weight" in sd:
            out = F.linear(out, sd[f"{layer}.0.fn.to_out.weight"], sd[f"{layer}.0.fn.to_out.bias"])
        x = x + out
        h = torch.tanh(F.linear(_ln(x, sd, f"{layer}.1.norm"), *_wb(sd, f"{layer}.1.fn.net.0")))
        x = x + F.linear(h, *_wb(sd, f"{layer}.1.fn.net.2"))
        i += 1
    return _ln(x, sd, f"{prefix}.transformer.norm")


def _wb(sd: dict, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return sd[f"{key}.weight"], sd[f"{key}.bias"]


def official_lift(sd: dict, emb: torch.Tensor, heads: int) -> torch.Tensor:
    """models_mtm.forward_conversion: Linear per token, ViTDecoder (positions, transformer, to_pixel)."""
    n, _, h, w = emb.shape
    x = F.linear(emb.flatten(2).transpose(1, 2), *_wb(sd, "conversion_function.0"))
    x = official_transformer(
        x + sd["conversion_function.1.de_pos_embedding"], sd, "conversion_function.1", heads
    )
    x = x.transpose(1, 2).reshape(n, -1, h, w)
    return F.conv_transpose2d(x, *_wb(sd, "conversion_function.1.to_pixel.1"), stride=2)


def official_invert_logits(sd: dict, feat: torch.Tensor, heads: int, table: torch.Tensor) -> torch.Tensor:
    """models_mtm.forward_inversion before the argmax: ViTEncoder (conv, positions, transformer), Linear;
    ``table`` the positions of the grid it runs on (the official code only has its stored one)."""
    x = F.conv2d(feat, *_wb(sd, "reverse_transform.0.to_patch_embedding.0"), stride=2)
    n, _, h, w = x.shape
    x = official_transformer(x.flatten(2).transpose(1, 2) + table, sd, "reverse_transform.0", heads)
    return F.linear(x, *_wb(sd, "reverse_transform.1")).transpose(1, 2).reshape(n, -1, h, w)


def tiny(**kwargs: int) -> TokenAdapt:
    geometry = {"token_dim": D, "width": WIDTH, "num_heads": HEADS, "in_grid": G_IN, "out_grid": G_OUT}
    torch.manual_seed(0)
    return TokenAdapt(K, **{**geometry, **kwargs}).eval()


# -- modules ------------------------------------------------------------------------------------------------
def test_shapes_for_other_vocabularies_dims_and_grids() -> None:
    ta = TokenAdapt(7, token_dim=4, width=48, num_heads=3, in_grid=6, out_grid=5)
    emb = torch.randn(2, 4, 6, 6)
    feat = ta.lift(emb)
    assert feat.shape == (2, 4, 12, 12)
    assert ta.invert_logits(feat).shape == (2, 7, 6, 6)
    assert ta.invert_logits(feat[..., :10, :10]).shape == (2, 7, 5, 5)
    ids = ta.invert(feat[..., :8, :6])
    assert ids.shape == (2, 4, 3) and ids.dtype == torch.long
    names = {n.split(".")[0] for n in ta.state_dict()}
    assert names == {"conversion_function", "reverse_transform"}
    with pytest.raises(ValueError, match=r"\[B, 4, 2h, 2w\]"):
        ta.invert_logits(torch.randn(1, 4, 7, 8))
    with pytest.raises(ValueError, match=r"\[B, 4, H, W\]"):
        ta.lift(torch.randn(1, 5, 6, 6))
    with pytest.raises(ValueError, match="num_heads"):
        TokenAdapt(7, width=48, num_heads=5)


# -- the official layout ------------------------------------------------------------------------------------
def test_official_state_loads_and_computes_what_the_official_model_computes() -> None:
    sd = official_state()
    ta = load_tokenadapt(sd, num_heads=HEADS)
    assert ta.geometry() == {
        "vocab_size": K,
        "token_dim": D,
        "width": WIDTH,
        "num_heads": HEADS,
        "mlp_ratio": 4.0,
        "in_grid": G_IN,
        "out_grid": G_OUT,
        "depth": 1,
    }
    emb = torch.randn(3, D, G_IN, G_IN, generator=torch.Generator().manual_seed(1))
    feat = ta.lift(emb)
    torch.testing.assert_close(feat, official_lift(sd, emb, HEADS), atol=1e-5, rtol=1e-5)
    crop = feat[..., : 2 * G_OUT, 1 : 1 + 2 * G_OUT]
    expected = official_invert_logits(sd, crop, HEADS, sd["reverse_transform.0.en_pos_embedding"])
    torch.testing.assert_close(ta.invert_logits(crop), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ta.invert(crop), expected.argmax(1))


def test_round_trip_official_ours_official_is_exact(tmp_path) -> None:
    sd = official_state(seed=3)
    out = to_official_tokenadapt(load_tokenadapt(sd, num_heads=HEADS))
    assert list(out) == list(official_shapes())
    for key, value in sd.items():
        assert torch.equal(out[key], value), key
    # and through a file, as save_tokenadapt writes it
    path = save_tokenadapt(load_tokenadapt(sd, num_heads=HEADS), tmp_path / "tokenadapt.ckpt")
    again = load_tokenadapt(path, num_heads=HEADS)
    assert all(torch.equal(to_official_tokenadapt(again)[k], v) for k, v in sd.items())


def test_ours_official_ours_is_exact_and_the_key_map_covers_everything() -> None:
    ta = tiny()
    with torch.no_grad():
        for p in ta.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    back = load_tokenadapt(to_official_tokenadapt(ta), num_heads=HEADS)
    for key, value in ta.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    key_map = official_key_map(ta)
    assert set(key_map) == set(ta.state_dict())
    assert set(key_map.values()) == set(official_shapes())


def test_g_runs_on_a_grid_it_was_not_saved_with() -> None:
    sd = official_state(seed=5)
    ta = load_tokenadapt(sd, num_heads=HEADS)
    feat = torch.randn(2, D, 10, 10, generator=torch.Generator().manual_seed(2))  # a 5 x 5 grid, saved: 3 x 3
    expected = official_invert_logits(sd, feat, HEADS, official_sincos(WIDTH, 5))
    torch.testing.assert_close(ta.invert_logits(feat), expected, atol=1e-5, rtol=1e-5)


def test_accepts_nesting_and_ddp_prefix_and_infers_heads_from_the_official_head_width(tmp_path) -> None:
    sd = official_state(width=128, hidden=256)
    assert load_tokenadapt({"model": sd}).num_heads == 2  # 128 / 64
    prefixed = {f"module.{k}": v for k, v in sd.items()}
    save_atomic({"state_dict": prefixed}, tmp_path / "wrapped.ckpt")
    assert load_tokenadapt(tmp_path / "wrapped.ckpt").num_heads == 2
    assert load_tokenadapt(sd, num_heads=4).num_heads == 4
    with pytest.raises(ValueError, match="pass num_heads"):
        load_tokenadapt(official_state())  # 32 wide: no 64-wide heads


def test_one_head_layout_without_output_projection() -> None:
    sd = official_state(width=64, hidden=128, project_out=False)
    ta = load_tokenadapt(sd)
    assert ta.num_heads == 1
    emb = torch.randn(1, D, G_IN, G_IN)
    torch.testing.assert_close(ta.lift(emb), official_lift(sd, emb, 1), atol=1e-5, rtol=1e-5)
    out = to_official_tokenadapt(ta)
    assert set(out) == set(sd) and all(torch.equal(out[k], v) for k, v in sd.items())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("prefix", r"missing key\(s\) conversion_function\.0\.weight.*prefix 'tokenadapt\.'"),
        ("missing", r"missing reverse_transform\.0\.transformer\.layers\.0\.0\.fn\.to_out\.bias"),
        ("shape", r"wrong shape: reverse_transform\.1\.bias \(12,\) \(expected \(11,\)\)"),
        ("extra", r"unexpected blocks\.0\.weight.*whole SeiT\+\+ model"),
        ("positions", r"conversion_function\.1\.de_pos_embedding is not the fixed 2-D sin-cos table"),
        ("vocab", r"vocab_size 11; expected 12"),
    ],
)
def test_files_that_do_not_fit_are_errors_naming_the_file_and_key(
    tmp_path, change: str, message: str
) -> None:
    sd = official_state()
    kwargs: dict[str, int] = {"num_heads": HEADS}
    if change == "prefix":
        sd = {f"tokenadapt.{k}": v for k, v in sd.items()}
    elif change == "missing":
        del sd["reverse_transform.0.transformer.layers.0.0.fn.to_out.bias"]
    elif change == "shape":
        sd["reverse_transform.1.bias"] = torch.zeros(K + 1)
    elif change == "extra":
        sd["blocks.0.weight"] = torch.zeros(3)
    elif change == "positions":
        sd["conversion_function.1.de_pos_embedding"] = sd["conversion_function.1.de_pos_embedding"].flip(1)
    else:
        kwargs["vocab_size"] = K + 1
    path = save_atomic(sd, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=message) as err:
        load_tokenadapt(path, **kwargs)
    assert str(path) in str(err.value)


# -- f-space geometry ---------------------------------------------------------------------------------------
def _params(batch: int, size: int, *, flip: bool = False, angle=0.0, translate=(0.0, 0.0), shear=(0.0, 0.0)):
    full = torch.full((batch,), size)
    return GeoParams(
        torch.full((batch,), flip),
        AffineParams(
            torch.full((batch,), angle), torch.tensor([translate] * batch), torch.tensor([shear] * batch)
        ),
        CropBoxes(torch.zeros(batch, dtype=torch.long), torch.zeros(batch, dtype=torch.long), full, full),
    )


def test_identity_and_flip_only_params() -> None:
    x = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(apply_geometry(x, _params(3, 8), 8), x, atol=1e-5, rtol=0)
    torch.testing.assert_close(apply_geometry(x, _params(3, 8, flip=True), 8), torch.flip(x, dims=[-1]))


@pytest.mark.parametrize(
    ("angle", "translate", "shear"),
    [(17.0, (0.0, 0.0), (0.0, 0.0)), (0.0, (0.13, -0.19), (0.0, 0.0)), (0.0, (0.0, 0.0), (11.0, 6.0))],
)
def test_affine_ops_agree_with_torchvision_applied_in_turn(angle, translate, shear) -> None:
    x = torch.randn(2, 3, 12, 16)
    params = AffineParams(
        torch.tensor([angle, 0.0]), torch.tensor([translate, (0.0, 0.0)]), torch.tensor([shear, (0.0, 0.0)])
    )
    bilinear = TF.InterpolationMode.BILINEAR

    def in_turn(fill: float | None) -> torch.Tensor:
        expected = x[:1]
        for op in (
            {"angle": angle, "translate": [0.0, 0.0], "shear": [0.0, 0.0]},
            {"angle": 0.0, "translate": [translate[0] * 16, 0.0], "shear": [0.0, 0.0]},
            {"angle": 0.0, "translate": [0.0, translate[1] * 12], "shear": [0.0, 0.0]},
            {"angle": 0.0, "translate": [0.0, 0.0], "shear": [shear[0], 0.0]},
            {"angle": 0.0, "translate": [0.0, 0.0], "shear": [0.0, shear[1]]},
        ):
            if op["angle"] or any(op["translate"]) or any(op["shear"]):
                expected = TF.affine(expected, scale=1.0, interpolation=bilinear, fill=fill, **op)
        return expected

    out = affine_warp(x, params)
    # RandomAffine passes its fill (0) on, so torchvision blends a resampled mask: border cells dim
    torch.testing.assert_close(out[:1], in_turn(0.0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(out[:1], in_turn(None), atol=1e-3)  # plain zero padding differs there
    assert not torch.allclose(out[:1], x[:1], atol=1e-2)
    assert torch.equal(out[1], x[1])  # a sample without ops is left untouched


def test_feature_augment_is_reproducible_and_draws_once_for_the_batch() -> None:
    feat = torch.randn(6, 4, 8, 8)
    a, pa = feature_augment(feat, 6, generator=torch.Generator().manual_seed(0), return_params=True)
    b = feature_augment(feat, 6, generator=torch.Generator().manual_seed(0))
    assert a.shape == (6, 4, 6, 6) and torch.equal(a, b)
    assert len(set(pa.flip.tolist())) == 1 and len(set(pa.affine.angle.tolist())) == 1
    outs = {
        feature_augment(feat, 6, generator=torch.Generator().manual_seed(s)).sum().item() for s in range(4)
    }
    assert len(outs) == 4


def test_the_law_of_the_draw() -> None:
    n = 20_000
    p = feature_augment_params(n, 16, 16, per_sample=True, generator=torch.Generator().manual_seed(0))
    angle, (tx, ty), (sx, sy) = p.affine.angle, p.affine.translate.unbind(1), p.affine.shear.unbind(1)
    assert abs(p.flip.float().mean() - 0.5) < 0.02
    for value in (angle, tx, ty, sx, sy):  # RandomApply(0.5) around each op's own gate of 0.5
        assert abs((value != 0).float().mean() - 0.25) < 0.02
    assert angle.abs().max() <= 30 and angle.min() < -25 and angle.max() > 25
    assert tx.abs().max() <= 0.2 and ty.min() < -0.15
    assert sx.min() >= 0 and sy.min() >= 0 and sx.max() <= 15 and sy.max() > 12  # one-sided shear
    applied = (p.affine.angle != 0) | (p.affine.translate != 0).any(1) | (p.affine.shear != 0).any(1)
    assert abs(applied.float().mean() - 0.5 * (1 - 0.5**5)) < 0.02
    area = (p.boxes.height * p.boxes.width).float() / 256
    assert area.min() >= 0.2 - 0.05 and area.max() <= 1


def test_boxes_scale_with_the_map() -> None:
    boxes = CropBoxes(*(torch.tensor([v]) for v in (1, 2, 3, 4)))
    assert [b.item() for b in scale_boxes(boxes, 2)] == [2, 4, 6, 8]
    with pytest.raises(ValueError, match="whole factor"):
        scale_boxes(boxes, 0)


def test_tokenadapt_view_returns_ids_and_applies_mix_in_f_space() -> None:
    ta = tiny()
    emb = torch.randn(4, D, G_IN, G_IN)
    seen: list[tuple[int, ...]] = []

    def mix(x: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x.flip(0)

    ids = tokenadapt_view(emb, ta, 3, (0.5, 1.0), generator=torch.Generator().manual_seed(0), mix=mix)
    assert ids.shape == (4, 3, 3) and ids.dtype == torch.long
    assert int(ids.min()) >= 0 and int(ids.max()) < K
    assert seen == [(4, D, 6, 6)]
    again = tokenadapt_view(emb, ta, 3, (0.5, 1.0), generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.flip(0), ids)


def test_one_draw_is_the_same_geometry_on_a_coarse_and_a_fine_map() -> None:
    """What pairs pixel and f-space augmentation: boxes drawn on the coarse map and scaled, translations
    as fractions, rotation and shear about the centre. A smooth image augmented at 32 px then pooled to
    16 x 16 matches the pooled image augmented at 16 x 16; a mismatched translation, crop or flip does not."""
    size, coarse = 32, 16
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    image = torch.stack([torch.sin(3 * xs + 2 * ys), torch.cos(4 * ys - xs), xs * ys]).unsqueeze(0)
    image = image.expand(64, -1, -1, -1).contiguous()
    params = feature_augment_params(
        64, coarse, coarse, (0.5, 1.0), per_sample=True, generator=torch.Generator().manual_seed(1)
    )
    small = apply_geometry(F.avg_pool2d(image, 2), params, coarse)

    def error(fine_params: GeoParams) -> torch.Tensor:
        """Per sample, away from the borders (zero fill straddles cells there)."""
        fine = F.avg_pool2d(apply_geometry(image, fine_params, size), 2)
        return (fine - small).abs()[..., 2:-2, 2:-2].mean((1, 2, 3))

    paired = params._replace(boxes=scale_boxes(params.boxes, 2))
    good = error(paired)
    assert good.mean() < 0.01 and good.max() < 0.03, (float(good.mean()), float(good.max()))
    moved = (params.affine.translate != 0).any(1)
    assert moved.any() and bool((params.affine.angle != 0).any() and (params.affine.shear != 0).any())
    doubled = paired._replace(affine=paired.affine._replace(translate=2 * paired.affine.translate))
    assert error(doubled)[moved].mean() > 5 * good[moved].mean()
    b = paired.boxes
    centred = paired._replace(
        boxes=CropBoxes((size - b.height) // 2, (size - b.width) // 2, b.height, b.width)
    )
    assert error(centred).mean() > 5 * good.mean()
    assert error(paired._replace(flip=~paired.flip)).mean() > 5 * good.mean()
