import pytest
import timm
import torch
from torch import nn

from mimkit.masking import random_masking
from mimkit.models.patches import patchify, unpatchify
from mimkit.models.pos_embed import sincos_2d
from mimkit.models.vit import ARCHS, build_encoder


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
    linear = enc.embed_patches(patchify(imgs, 4))
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
