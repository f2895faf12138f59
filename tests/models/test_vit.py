import pytest
import timm
import torch
from torch import nn

from mimkit.masking import random_masking, token_masking
from mimkit.models.input_spec import InputSpec
from mimkit.models.patches import patchify, unpatchify
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.stems import TokenIdStem
from mimkit.models.vit import ARCHS, ViTEncoder, build_encoder


def tiny_encoder(**kw):
    torch.manual_seed(0)
    return build_encoder("vit_tiny", img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2, **kw)


def test_named_sizes_follow_the_spec():
    assert {k: (a.embed_dim, a.depth, a.num_heads, a.patch_size) for k, a in ARCHS.items()} == {
        "vit_tiny": (192, 12, 3, 16),
        "vit_small": (384, 12, 6, 16),
        "vit_base": (768, 12, 12, 16),
        "vit_large": (1024, 24, 16, 16),
        "vit_huge": (1280, 32, 16, 14),
    }


def test_unknown_arch_names_the_nearest():
    with pytest.raises(ValueError, match="did you mean 'vit_base'"):
        build_encoder("vit_bas")


@pytest.mark.parametrize("key", ["patch_size", "embed_dim", "depth", "num_heads"])
def test_sizes_of_zero_are_errors_not_the_archs_defaults(key):
    sizes = dict(img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2)
    with pytest.raises(ValueError, match=rf"^{key} must be at least 1; got 0$"):
        build_encoder("vit_tiny", **{**sizes, key: 0})
    assert len(build_encoder("vit_tiny", **{**sizes, "depth": 1}).blocks) == 1


def test_encoder_conventions():
    enc = tiny_encoder()
    assert not enc.pos_embed.requires_grad
    assert torch.equal(enc.pos_embed.data, sincos_2d(64, 4))
    norms = [m for m in enc.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    qkv = enc.blocks[0].attn.qkv
    assert qkv.bias is not None and torch.count_nonzero(qkv.bias) == 0
    # xavier-uniform bound on the fused [3D, D] matrix
    bound = (6 / (64 + 192)) ** 0.5
    assert qkv.weight.abs().max() <= bound and qkv.weight.abs().max() > 0.9 * bound


def test_patchify_order_is_row_col_channel_and_inverts():
    imgs = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).reshape(2, 3, 8, 8)
    patches = patchify(imgs, 4)
    assert patches.shape == (2, 4, 48)
    # token 1 = row 0, col 1; its first values are pixel (0, 4) channels r, g, b
    assert patches[0, 1, :3].tolist() == [imgs[0, c, 0, 4].item() for c in range(3)]
    assert patches[0, 2, 3:6].tolist() == [imgs[0, c, 4, 1].item() for c in range(3)]
    assert torch.equal(unpatchify(patches, 4, (2, 2)), imgs)


def test_linear_patch_embedding_equals_the_conv():
    enc = tiny_encoder()
    imgs = torch.randn(2, 3, 16, 16)
    conv = enc.patch_embed(imgs)
    linear = enc.stem.embed(patchify(imgs, 4))
    torch.testing.assert_close(linear, conv, rtol=1e-5, atol=1e-5)


def test_visible_forward_matches_the_full_forward_on_all_tokens():
    enc = tiny_encoder().eval()
    imgs = torch.randn(2, 3, 16, 16)
    full = enc.forward_features(imgs)
    ids = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(enc.forward_visible(imgs, ids), full, rtol=1e-5, atol=1e-5)
    # shuffled ids give the same tokens, permuted: positions travel with the patches
    m = random_masking(2, 16, 0.0, generator=torch.Generator().manual_seed(0))
    shuffled = enc.forward_visible(imgs, m.ids_keep)
    for n in range(2):
        torch.testing.assert_close(shuffled[n, 1:], full[n, 1:][m.ids_keep[n]], rtol=1e-4, atol=1e-5)


def test_visible_forward_shape():
    enc = tiny_encoder()
    m = random_masking(3, 16, 0.75)
    assert enc.forward_visible(torch.randn(3, 3, 16, 16), m.ids_keep).shape == (3, 1 + 4, 64)


def test_state_dict_loads_into_timm_with_strict_true():
    enc = tiny_encoder()
    spec = enc.timm_spec()
    assert spec["model_name"] == "vit_tiny_patch16_224"
    model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"])
    model.load_state_dict(enc.state_dict(), strict=True)
    imgs = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model.eval()(imgs), enc.eval().features(imgs, "cls"))


def test_pixel_stem_cuts_the_same_units_as_patchify_and_gives_todays_result():
    enc = tiny_encoder().eval()
    imgs = torch.randn(2, 3, 16, 16)
    assert torch.equal(enc.stem.units(imgs), patchify(imgs, 4))
    m = random_masking(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    for norm in (True, False):
        from_image = enc.forward_visible(imgs, m.ids_keep, norm=norm)
        from_units = enc.forward_visible(patchify(imgs, 4), m.ids_keep, units=True, norm=norm)
        assert torch.equal(from_image, from_units)
    # all patches through the units path equal timm's own forward
    all_ids = torch.arange(16).expand(2, 16)
    timm_path = enc.forward_features(imgs)
    torch.testing.assert_close(enc.forward_visible(imgs, all_ids), timm_path, rtol=1e-5, atol=1e-5)
    units_path = enc.forward_visible(patchify(imgs, 4), units=True)
    torch.testing.assert_close(units_path, timm_path, rtol=1e-5, atol=1e-5)


def test_the_input_kind_is_never_guessed_from_the_tensor_rank():
    enc = tiny_encoder()
    with pytest.raises(ValueError, match="pixel stem takes images"):
        enc.forward_visible(patchify(torch.randn(2, 3, 16, 16), 4), torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected units \[N, 16, 48\]"):
        enc.forward_visible(torch.randn(2, 3, 16, 16), units=True)


def test_default_state_dict_is_unchanged_and_the_mask_token_is_opt_in():
    plain, with_token = tiny_encoder(), tiny_encoder(mask_token=True)
    assert plain.mask_token is None
    assert set(with_token.state_dict()) - set(plain.state_dict()) == {"mask_token"}
    assert torch.count_nonzero(with_token.mask_token) == 0 and with_token.mask_token.requires_grad
    assert not any("input_spec" in k or "stem." in k for k in plain.state_dict())
    with pytest.raises(ValueError, match="mask_token=True"):
        plain.forward_visible(torch.randn(1, 3, 16, 16), replace=torch.zeros(1, 16, dtype=torch.bool))


def test_the_rebuild_arguments_are_plain_and_rebuild_the_encoder():
    enc = tiny_encoder(mask_token=True)
    assert enc.spec.stem == "pixels" and enc.spec.in_chans == 3 and enc.spec.mask_token is True
    again = ViTEncoder(enc.spec)
    again.load_state_dict(enc.state_dict(), strict=True)


def test_pixel_encoder_states_its_input():
    spec = tiny_encoder().input_spec
    assert (spec.kind, spec.channels, spec.img_size, spec.patch_size, spec.grid) == (
        "pixels",
        3,
        16,
        4,
        (4, 4),
    )
    assert spec.mean == (0.485, 0.456, 0.406) and spec.vocab_size is None


VOCAB, GRID, P = 11, 8, 2  # 8x8 ids, 2x2 ids per patch -> 4x4 = 16 patches


def token_encoder(**kw):
    torch.manual_seed(0)
    return build_encoder(
        "vit_tiny",
        img_size=GRID,
        patch_size=P,
        embed_dim=64,
        depth=2,
        num_heads=2,
        stem="token_ids",
        vocab_size=VOCAB,
        token_dim=8,
        **kw,
    )


def token_ids(n=2, seed=0, high=VOCAB):
    return torch.randint(0, high, (n, GRID, GRID), generator=torch.Generator().manual_seed(seed))


def test_token_stem_units_are_the_ids_of_each_block_row_major():
    stem = token_encoder().stem
    ids = torch.arange(64).reshape(1, 8, 8)
    units = stem.units(ids)
    assert units.shape == (1, 16, 4) and units.dtype == torch.long
    assert units[0, 0].tolist() == [0, 1, 8, 9]  # patch (0, 0): (py, px) order
    assert units[0, 5].tolist() == [18, 19, 26, 27]  # patch (1, 1)


def test_token_stem_equals_embedding_then_a_stride_p_conv():
    stem = token_encoder().stem
    ids = token_ids()
    emb = stem.embedding_norm(stem.embedding(ids)).permute(0, 3, 1, 2)  # [N, e, H, W]
    conv = torch.nn.functional.conv2d(emb, stem.proj.weight, stem.proj.bias, stride=P)
    torch.testing.assert_close(stem(ids), conv.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-5)


def test_token_encoder_geometry_and_no_pixel_leftovers():
    enc = token_encoder()
    assert isinstance(enc.patch_embed, TokenIdStem) and enc.stem is enc.patch_embed
    assert (enc.grid_size, enc.num_patches, enc.patch_size) == ((4, 4), 16, 2)
    assert enc.pos_embed.shape == (1, 17, 64)
    assert torch.equal(enc.pos_embed.data, sincos_2d(64, 4))
    stem_keys = {k for k in enc.state_dict() if k.startswith("patch_embed.")}
    assert stem_keys == {
        "patch_embed.embedding.weight",
        "patch_embed.embedding_norm.weight",
        "patch_embed.embedding_norm.bias",
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    assert enc.stem.proj.weight.shape == (64, 8, P, P)
    assert abs(enc.stem.embedding.weight.std().item() - 0.02) < 0.01
    spec = enc.input_spec
    assert (spec.kind, spec.channels, spec.img_size, spec.grid, spec.vocab_size) == (
        "token_ids",
        1,
        GRID,
        (4, 4),
        VOCAB,
    )
    assert spec.mean == () and spec.std == ()
    with pytest.raises(ValueError, match="timm's ViT takes pixels"):
        enc.timm_spec()


def test_token_encoder_full_forward_and_features():
    enc = token_encoder().eval()
    ids = token_ids()
    full = enc.forward_features(ids)
    assert full.shape == (2, 17, 64)
    all_ids = torch.arange(16).expand(2, 16)
    torch.testing.assert_close(enc.forward_visible(ids, all_ids), full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(enc.features(ids, "cls"), full[:, 0])
    assert enc.features(ids, "mean_prenorm").shape == (2, 64)
    with pytest.raises(ValueError, match="integer id grids"):
        enc.forward_visible(torch.randn(2, 3, GRID, GRID))


def test_token_encoder_rebuilds_from_its_spec():
    enc = token_encoder(mask_token=True, token_dropout=0.1)
    assert {
        k: getattr(enc.spec, k) for k in ("stem", "vocab_size", "token_dim", "token_dropout", "mask_token")
    } == {
        "stem": "token_ids",
        "vocab_size": VOCAB,
        "token_dim": 8,
        "token_dropout": 0.1,
        "mask_token": True,
    }
    again = ViTEncoder(enc.spec)
    again.load_state_dict(enc.state_dict(), strict=True)
    ids = token_ids()
    torch.testing.assert_close(again.eval().forward_features(ids), enc.eval().forward_features(ids))


def test_token_encoder_drops_with_ids_only():
    enc = token_encoder().eval()
    m = token_masking(2, 16, 0.5, 0.25, generator=torch.Generator().manual_seed(0))
    ids = token_ids()
    out = enc.forward_visible(ids, m.ids_keep)
    assert out.shape == (2, 1 + 12, 64)
    # dropped patches are not seen: changing them changes nothing
    other = ids.clone()
    dropped = m.mask.bool() & ~torch.zeros(2, 16, dtype=torch.bool).scatter(1, m.ids_keep, True)
    units = enc.stem.units(other)
    units[dropped] = (units[dropped] + 1) % VOCAB
    assert torch.equal(enc.forward_visible(units, m.ids_keep, units=True), out)


def test_replaced_patches_get_the_mask_token_and_gradients_flow():
    enc = token_encoder(mask_token=True)
    with torch.no_grad():
        enc.mask_token.normal_()  # zero-init; any value must be what replaced positions see
    m = token_masking(2, 16, 0.75, 0.25, noise=torch.rand(2, 16, generator=torch.Generator().manual_seed(3)))
    assert m.replace.sum(1).tolist() == [8, 8]
    # replaced patches hold only id VOCAB - 1, which appears nowhere else
    units = enc.stem.units(token_ids(high=VOCAB - 1))
    units[m.mask.bool()] = VOCAB - 1
    enc.eval()
    out = enc.forward_visible(units, m.ids_keep, units=True, replace=m.replace)
    assert out.shape == (2, 1 + 12, 64)
    # inputs that differ only where patches are replaced give identical outputs ...
    other = units.clone()
    other[m.mask.bool()] = 0
    assert torch.equal(enc.forward_visible(other, m.ids_keep, units=True, replace=m.replace), out)
    # ... but not where they are kept, nor with another mask token
    kept_plain = ~m.mask.bool()
    changed = units.clone()
    changed[kept_plain] = (changed[kept_plain] + 1) % (VOCAB - 1)
    assert not torch.allclose(enc.forward_visible(changed, m.ids_keep, units=True, replace=m.replace), out)
    without = enc.forward_visible(units, m.ids_keep, units=True)
    assert not torch.allclose(without, out)
    enc.train()
    enc.forward_visible(units, m.ids_keep, units=True, replace=m.replace).square().mean().backward()
    grads = {n: p.grad for n, p in enc.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values()), [n for n, g in grads.items() if g is None]
    assert grads["mask_token"].abs().sum() > 0
    emb = grads["patch_embed.embedding.weight"]
    assert emb[: VOCAB - 1].abs().sum() > 0
    assert torch.count_nonzero(emb[VOCAB - 1]) == 0  # the hidden ids get no gradient
    with pytest.raises(ValueError, match="replace must be a bool tensor"):
        enc.forward_visible(units, m.ids_keep, units=True, replace=m.replace[:, :4])


def test_input_spec_must_match_the_stem():
    pixels = InputSpec(kind="pixels", channels=3, mean=(0.5,) * 3, std=(0.2,) * 3, img_size=16, patch_size=4)
    assert tiny_encoder(input_spec=pixels).input_spec == pixels
    with pytest.raises(ValueError, match=r"input_spec\.kind is 'pixels' but this encoder's stem takes"):
        token_encoder(input_spec=pixels)
    enc = tiny_encoder()
    with pytest.raises(ValueError, match=r"input_spec\.patch_size is 8"):
        enc.input_spec = InputSpec(
            kind="pixels", channels=3, mean=(0.5,) * 3, std=(0.2,) * 3, img_size=16, patch_size=8
        )
    with pytest.raises(ValueError, match="vocab_size applies to the token_ids stem"):
        tiny_encoder(vocab_size=10)
    with pytest.raises(ValueError, match="needs vocab_size"):
        tiny_encoder(stem="token_ids")


def test_one_encoder_spec_is_held_saved_and_read_back_also_from_an_earlier_export():
    from mimkit.models.vit import EncoderSpec

    enc = build_encoder("vit_tiny", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2)
    assert enc.spec == EncoderSpec.of(
        "vit_tiny", img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2
    )
    assert EncoderSpec.from_dict(enc.spec.to_dict()) == enc.spec
    # what exports wrote before the spec was one dataclass: the stem's keys only, no drop path
    earlier = {
        "arch": "vit_tiny",
        "img_size": 32,
        "patch_size": 4,
        "embed_dim": 64,
        "depth": 2,
        "num_heads": 2,
        "mlp_ratio": 4.0,
        "scaled_pos": False,
        "stem": "pixels",
        "in_chans": 3,
        "mask_token": False,
    }
    assert EncoderSpec.from_dict(earlier) == enc.spec
    with pytest.raises(ValueError, match=r"an encoder spec with unknown keys \['depht'\]"):
        EncoderSpec.from_dict({**earlier, "depht": 3})
    with pytest.raises(ValueError, match="embed_dim 64 is not divisible by num_heads 3"):
        EncoderSpec.of("vit_tiny", embed_dim=64, num_heads=3)
