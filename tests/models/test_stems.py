"""The token-embedding stem (SeiT's conv adapter on continuous embedding grids) and its encoder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mimkit.masking import random_masking
from mimkit.models.input_spec import InputSpec
from mimkit.models.stems import TokenEmbeddingStem
from mimkit.models.vit import ViTEncoder, build_encoder

C, GRID, S, D = 6, 8, 2, 32  # 8x8 grid of 6-d vectors, stride 2 -> 4x4 = 16 patches


def stem(**kw) -> TokenEmbeddingStem:
    torch.manual_seed(0)
    return TokenEmbeddingStem(token_dim=C, img_size=GRID, patch_size=S, embed_dim=D, **kw)


def grids(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, C, GRID, GRID, generator=torch.Generator().manual_seed(seed))


def encoder(**kw) -> ViTEncoder:
    torch.manual_seed(0)
    args = {"img_size": GRID, "patch_size": S, "embed_dim": D, "depth": 1, "num_heads": 2}
    return build_encoder("vit_tiny", stem="token_embeddings", token_dim=C, **(args | kw))


@pytest.mark.parametrize("kernel, padding", [(4, 1), (2, 0), (6, 2)])
def test_forward_and_units_both_equal_the_strided_conv(kernel, padding):
    s = stem(kernel_size=kernel, padding=padding)
    x = grids()
    conv = F.conv2d(x, s.proj.weight, s.proj.bias, stride=S, padding=padding)  # [N, D, 4, 4]
    want = conv.flatten(2).transpose(1, 2)
    assert s(x).shape == (2, 16, D)
    torch.testing.assert_close(s(x), want, rtol=1e-5, atol=1e-5)
    units = s.units(x)
    assert units.shape == (2, 16, kernel * kernel * C) == (2, s.num_patches, s.unit_dim)
    torch.testing.assert_close(s.embed(units), want, rtol=1e-5, atol=1e-5)


def test_units_are_zero_padded_windows_in_the_conv_weight_order():
    s = stem()
    x = torch.arange(C * GRID * GRID, dtype=torch.float32).reshape(1, C, GRID, GRID) + 1
    units = s.units(x).reshape(1, 16, C, 4, 4)  # (c, ky, kx)
    # patch (0, 0): rows/cols -1..2 of the grid, the first row and column in the padding
    assert torch.equal(units[0, 0, :, 0, :], torch.zeros(C, 4))
    assert torch.equal(units[0, 0, :, :, 0], torch.zeros(C, 4))
    assert torch.equal(units[0, 0, :, 1:, 1:], x[0, :, 0:3, 0:3])
    # patch (1, 2) (index 6): rows 1..4, cols 3..6, inside the grid
    assert torch.equal(units[0, 6], x[0, :, 1:5, 3:7])


def test_a_subset_of_units_embeds_to_the_full_forward_at_those_positions():
    s = stem()
    x = grids()
    ids = torch.tensor([[5, 0, 15, 9], [2, 3, 11, 1]])
    sub = s.embed(torch.gather(s.units(x), 1, ids[..., None].expand(-1, -1, s.unit_dim)))
    full = s(x)
    torch.testing.assert_close(sub, torch.gather(full, 1, ids[..., None].expand(-1, -1, D)))


def test_masked_forward_equals_the_full_forward_when_the_encoder_has_no_blocks():
    enc = encoder(depth=1).eval()
    enc.blocks = torch.nn.Sequential()  # tokens = stem + positions, then the final norm
    x = grids()
    full = enc.forward_visible(x)
    keep = random_masking(2, 16, 0.75, generator=torch.Generator().manual_seed(1)).ids_keep
    part = enc.forward_visible(x, keep)
    assert part.shape == (2, 1 + keep.shape[1], D)
    torch.testing.assert_close(part[:, 0], full[:, 0])
    torch.testing.assert_close(part[:, 1:], torch.gather(full[:, 1:], 1, keep[..., None].expand(-1, -1, D)))


def test_encoder_wiring_spec_features_and_no_timm_equivalent():
    enc = encoder(depth=2)
    assert isinstance(enc.stem, TokenEmbeddingStem) and enc.stem is enc.patch_embed
    assert (enc.grid_size, enc.num_patches, enc.patch_size) == ((4, 4), 16, S)
    assert {k for k in enc.state_dict() if k.startswith("patch_embed.")} == {
        "patch_embed.proj.weight",
        "patch_embed.proj.bias",
    }
    assert enc.stem.proj.weight.shape == (D, C, 4, 4)
    assert (enc.stem.proj.stride, enc.stem.proj.padding) == ((S, S), (1, 1))
    assert enc.input_spec == InputSpec(kind="token_embeddings", channels=C, img_size=GRID, patch_size=S)
    assert {k: getattr(enc.spec, k) for k in ("stem", "token_dim", "stem_kernel", "stem_padding")} == {
        "stem": "token_embeddings",
        "token_dim": C,
        "stem_kernel": 4,
        "stem_padding": 1,
    }
    enc.eval()
    x = grids()
    tokens = enc.forward_visible(x)
    torch.testing.assert_close(tokens, enc.forward_features(x))
    torch.testing.assert_close(enc.features(x, "mean"), tokens[:, 1:].mean(1))
    assert enc.features(x, "cls").shape == (2, D)
    with pytest.raises(ValueError, match="token_embeddings encoder has no timm equivalent"):
        enc.timm_spec()


def test_spec_round_trip_rebuilds_the_same_encoder():
    enc = encoder(depth=2, stem_kernel=6, stem_padding=2, mask_token=True).eval()
    again = ViTEncoder(enc.spec)
    assert isinstance(again.stem, TokenEmbeddingStem) and again.stem.proj.weight.shape == (D, C, 6, 6)
    own = enc.state_dict()
    assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in own.items()}
    again.load_state_dict(own)
    again.eval()
    x = grids()
    torch.testing.assert_close(again.forward_features(x), enc.forward_features(x))
    assert again.spec == enc.spec and again.input_spec == enc.input_spec


def test_default_init_is_torch_conv_init():
    s = stem()
    bound = 1 / (C * 16) ** 0.5  # kaiming-uniform(a=sqrt(5)) and the bias both give 1/sqrt(fan_in)
    assert s.proj.weight.abs().max() <= bound and s.proj.bias.abs().max() <= bound
    assert s.proj.weight.abs().max() > 0.9 * bound  # uniform over the whole range, not xavier's
    # the encoder's own init (xavier on Linears, bound sqrt(6 / (D + U)) ~ 0.22 here) leaves the stem alone
    w = encoder().stem.proj.weight
    assert 0.9 * bound < w.abs().max() <= bound


def test_shape_and_argument_errors_are_clear():
    s = stem()
    with pytest.raises(ValueError, match=r"embedding grids \[N, 6, H, W\].*torch.int64"):
        s(torch.zeros(2, C, GRID, GRID, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\[N, 6, H, W\].*\(2, 5, 8, 8\)"):
        s.units(torch.zeros(2, 5, GRID, GRID))
    with pytest.raises(ValueError, match=r"takes 8x8 grids.*got 10x10"):
        s(torch.zeros(2, C, 10, 10))
    with pytest.raises(ValueError, match="gives 3 patches per side; the encoder's grid needs 4"):
        stem(kernel_size=4, padding=0)
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        TokenEmbeddingStem(token_dim=C, img_size=9, patch_size=2, embed_dim=D)
    with pytest.raises(ValueError, match="padding must be an integer >= 0"):
        stem(padding=-1)
    enc = encoder()
    with pytest.raises(ValueError, match=r"expected units \[N, 16, 96\] for the token_embeddings stem"):
        enc.forward_visible(torch.zeros(2, 16, 4), units=True, ids=torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="stem_kernel and stem_padding set the token_embeddings"):
        build_encoder("vit_tiny", img_size=16, patch_size=4, depth=1, stem="pixels", stem_kernel=4)
    with pytest.raises(ValueError, match="vocab_size applies to the token_ids stem"):
        encoder(vocab_size=10)
