"""The analyses (mimkit.analysis) against independent computations: mean attention distance on
constructed attention patterns, the recorded attention against a block-by-block recomputation, the
singular value spectrum of features of known spectrum, reconstructions through decoders that predict
exactly, and patch clustering of planted clusters."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm
from threadpoolctl import threadpool_limits
from torch import nn

from mimkit.analysis import (
    attention_distance,
    attention_maps,
    cluster_patches,
    denormalize_patches,
    effective_rank,
    feature_spectrum,
    mean_attention_distance,
    patch_features,
    query_maps,
    rankme,
    reconstruct_pixels,
    reconstruct_tokens,
    recorded_attention,
    segment,
    singular_spectrum,
    spectra,
    token_spectrum,
    tsne_embedding,
    upsampled_encoder,
)
from mimkit.configs import build_config
from mimkit.masking import token_masking
from mimkit.methods import MAE, MTM, build_method
from mimkit.methods.mae import MAEConfig
from mimkit.models.patches import patchify
from mimkit.models.vit import build_encoder
from tests.test_tokenizer import small_token_encoder

GREY = 0.5


def pixel_encoder(patch_size: int = 8, seed: int = 0, *, sharp: bool = True):
    """A depth-2, width-64, 4-head encoder of 32 px images; ``sharp`` scales up the qkv weights so the
    attention is far from uniform."""
    torch.manual_seed(seed)
    enc = build_encoder("vit_tiny", img_size=32, patch_size=patch_size, embed_dim=64, depth=2, num_heads=4)
    if sharp:
        gen = torch.Generator().manual_seed(seed + 100)
        with torch.no_grad():
            for block in enc.blocks:
                block.attn.qkv.weight.copy_(torch.randn(block.attn.qkv.weight.shape, generator=gen) * 0.5)
                block.attn.qkv.bias.copy_(torch.randn(block.attn.qkv.bias.shape, generator=gen) * 0.5)
    return enc.eval()


def images_for(encoder, n: int, seed: int = 1) -> torch.Tensor:
    """Images in [0, 1], normalised with the encoder's input spec."""
    spec = encoder.input_spec
    u = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return (u - torch.tensor(spec.mean).view(1, 3, 1, 1)) / torch.tensor(spec.std).view(1, 3, 1, 1)


def with_attention_dropout(encoder):
    """Dropout on every block's attention: a forward left in train mode would not be reproducible."""
    for block in encoder.blocks:
        block.attn.attn_drop.p = 0.5
    return encoder


def centres(grid: tuple[int, int], patch_size: float) -> list[tuple[float, float]]:
    return [(r * patch_size, c * patch_size) for r in range(grid[0]) for c in range(grid[1])]


# ----------------------------------------------------------------------------- mean attention distance


GRID, PATCH = (3, 4), 8
L = GRID[0] * GRID[1]
T = L + 1


def mean_pairwise_distance(grid: tuple[int, int], patch_size: float) -> float:
    points = centres(grid, patch_size)
    return sum(math.dist(a, b) for a, b in itertools.product(points, points)) / len(points) ** 2


def test_attention_to_self_has_distance_zero():
    attn = torch.eye(T).expand(2, 3, T, T)
    for renorm in (True, False):
        out = attention_distance(attn, GRID, PATCH, renorm=renorm)
        assert out.shape == (2, 3)
        assert torch.equal(out, torch.zeros(2, 3))


def test_uniform_attention_over_the_patches_gives_the_mean_pairwise_distance():
    expected = mean_pairwise_distance(GRID, PATCH)
    attn = torch.zeros(T, T)
    attn[:, 1:] = 1 / L  # no weight on cls
    for renorm in (True, False):
        assert attention_distance(attn, GRID, PATCH, renorm=renorm).item() == pytest.approx(
            expected, rel=1e-6
        )


def test_weight_on_cls_counts_as_distance_zero_unless_renormalised():
    expected = mean_pairwise_distance(GRID, PATCH)
    attn = torch.full((T, T), 1 / T)  # cls gets 1/T of every row
    raw = attention_distance(attn, GRID, PATCH, renorm=False).item()
    full = attention_distance(attn, GRID, PATCH, renorm=True).item()
    assert raw == pytest.approx(L / (L + 1) * expected, rel=1e-6)
    assert full == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize(("step", "expected"), [((0, 1), 3 * 3 / L), ((1, 0), 2 * 4 / L)])
def test_attention_to_one_neighbour_gives_the_patch_size_for_those_that_have_one(step, expected):
    """Each query attends only to its right (or lower) neighbour, or to itself where it has none: the
    ones with a neighbour are exactly one patch away; the grid is not square, so rows and columns can't
    be swapped unseen."""
    gh, gw = GRID
    attn = torch.zeros(T, T)
    attn[0, 0] = 1
    for r, c in itertools.product(range(gh), range(gw)):
        rr, cc = r + step[0], c + step[1]
        target = rr * gw + cc if rr < gh and cc < gw else r * gw + c
        attn[1 + r * gw + c, 1 + target] = 1
    out = attention_distance(attn, GRID, PATCH).item()
    assert out == pytest.approx(PATCH * expected, rel=1e-6)


def test_attention_distance_of_random_rows_equals_an_explicit_sum():
    gen = torch.Generator().manual_seed(0)
    grid, patch = (2, 3), 4.0
    length, prefix = 6, 1
    attn = torch.randn(2, 3, length + prefix, length + prefix, generator=gen).softmax(-1)
    points = centres(grid, patch)
    for renorm in (True, False):
        expected = torch.zeros(2, 3, dtype=torch.float64)
        for n, h in itertools.product(range(2), range(3)):
            total = 0.0
            for q in range(length):
                row = attn[n, h, prefix + q, prefix:].double()
                if renorm:
                    row = row / row.sum()
                total += sum(row[k].item() * math.dist(points[q], points[k]) for k in range(length))
            expected[n, h] = total / length
        out = attention_distance(attn, grid, patch, renorm=renorm)
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_attention_distance_without_prefix_tokens():
    attn = torch.full((L, L), 1 / L)
    out = attention_distance(attn, GRID, PATCH, prefix_tokens=0, renorm=False)
    assert out.item() == pytest.approx(mean_pairwise_distance(GRID, PATCH), rel=1e-6)


@pytest.mark.parametrize("shape", [(T, T + 1), (T + 1, T + 1), (L, L), (2, T - 1, T - 1), (T, L)])
def test_attention_distance_rejects_wrong_shapes(shape):
    with pytest.raises(ValueError):
        attention_distance(torch.rand(shape), GRID, PATCH)


# ----------------------------------------------------------------------------- recorded attention


def recomputed_attention(encoder, images: torch.Tensor) -> list[torch.Tensor]:
    """Every block's softmax attention, written out from the block's weights: [N, heads, T, T] each."""
    out = []
    with torch.no_grad():
        x = encoder.patch_embed(images)
        x = torch.cat([encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + encoder.pos_embed
        x = encoder.norm_pre(x)
        for block in encoder.blocks:
            heads = block.attn.num_heads
            n, t, d = x.shape
            h = block.norm1(x)
            qkv = h @ block.attn.qkv.weight.T + block.attn.qkv.bias
            q, k, _ = qkv.reshape(n, t, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
            out.append((q @ k.transpose(-2, -1) / math.sqrt(d // heads)).softmax(dim=-1))
            x = block(x)
    return out


def test_attention_maps_equal_a_block_by_block_recomputation():
    encoder = pixel_encoder()
    images = images_for(encoder, 3)
    expected = recomputed_attention(encoder, images)
    # dropout on the attention: in train mode the second block's input would differ
    for block in encoder.blocks:
        block.attn.attn_drop.p = 0.5
    encoder.blocks[0].attn.fused_attn, encoder.blocks[1].attn.fused_attn = True, False
    encoder.train()
    attn = attention_maps(encoder, images)
    assert encoder.training
    assert [b.attn.fused_attn for b in encoder.blocks] == [True, False]
    assert attn.shape == (2, 3, 4, 17, 17) and attn.dtype == torch.float32
    for got, want in zip(attn, expected, strict=True):
        torch.testing.assert_close(got, want)
    # not near uniform: the comparison means something
    assert attn.amax() > 0.5
    torch.testing.assert_close(attn.sum(-1), torch.ones(2, 3, 4, 17))


def test_recording_leaves_the_output_and_the_flags_as_they_were():
    encoder = pixel_encoder()
    images = images_for(encoder, 2)
    encoder.blocks[0].attn.fused_attn, encoder.blocks[1].attn.fused_attn = False, True
    with torch.no_grad():
        plain = encoder.forward_visible(images)
        with recorded_attention(encoder) as records:
            assert [b.attn.fused_attn for b in encoder.blocks] == [False, False]
            recorded = encoder.forward_visible(images)
        assert len(records) == 2 and records[0].shape == (2, 4, 17, 17)
        after = encoder.forward_visible(images)
    assert [b.attn.fused_attn for b in encoder.blocks] == [False, True]
    assert len(records) == 2  # the hooks are gone
    torch.testing.assert_close(recorded, plain)
    torch.testing.assert_close(after, plain)
    assert not encoder.training


def test_recording_restores_the_flags_after_an_error():
    encoder = pixel_encoder()
    with pytest.raises(RuntimeError, match="boom"), recorded_attention(encoder) as records:
        raise RuntimeError("boom")
    assert all(b.attn.fused_attn for b in encoder.blocks)
    with torch.no_grad():
        encoder(images_for(encoder, 1))
    assert records == []


def test_recording_needs_timms_attention():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.Linear(4, 4)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.Sequential(Block())

    with pytest.raises(TypeError), recorded_attention(Model()):
        pass


def test_mean_attention_distance_averages_the_per_image_distances():
    encoder = pixel_encoder()
    images = images_for(encoder, 5)
    result = mean_attention_distance(encoder, images, batch_size=2)
    assert result.renorm.shape == result.raw.shape == (2, 4)
    assert result.images == 5
    assert (result.raw < result.renorm).all()  # the softmax always gives cls some weight
    per_image = [attention_maps(encoder, images[i : i + 1]) for i in range(5)]
    for renorm, got in ((True, result.renorm), (False, result.raw)):
        each = [attention_distance(a[:, 0], (4, 4), 8.0, renorm=renorm) for a in per_image]
        torch.testing.assert_close(got, torch.stack(each).mean(0))
    batches = mean_attention_distance(encoder, [images[:3], images[3:]])
    assert batches.images == 5
    torch.testing.assert_close(batches.renorm, result.renorm)
    torch.testing.assert_close(batches.raw, result.raw)
    # in pixels: no mean distance exceeds the grid's diagonal
    assert (result.renorm <= 8 * math.hypot(3, 3)).all() and (result.raw > 0).all()


def test_mean_attention_distance_needs_images():
    with pytest.raises(ValueError):
        mean_attention_distance(pixel_encoder(), [])


def test_query_maps_select_the_rows_of_the_queries():
    gen = torch.Generator().manual_seed(0)
    attn = torch.rand(2, 4, T, T, generator=gen)
    maps = query_maps(attn, GRID, [None, 5, 11])
    assert maps.shape == (3, 2, 4, *GRID)
    torch.testing.assert_close(maps[0], attn[:, :, 0, 1:].reshape(2, 4, *GRID))
    for i, q in ((1, 5), (2, 11)):
        for n, h, r, c in itertools.product(range(2), range(4), range(GRID[0]), range(GRID[1])):
            assert maps[i, n, h, r, c] == attn[n, h, 1 + q, 1 + r * GRID[1] + c]


@pytest.mark.parametrize("query", [L, -1, 100])
def test_query_maps_reject_queries_outside_the_grid(query):
    with pytest.raises(ValueError):
        query_maps(torch.rand(1, 1, T, T), GRID, [query])
    with pytest.raises(ValueError):  # also when the queries come as a generator
        query_maps(torch.rand(1, 1, T, T), GRID, (q for q in [query]))


# ----------------------------------------------------------------------------- spectrum


def test_effective_rank_of_known_spectra():
    for d in (1, 4, 16, 64):
        assert effective_rank(torch.full((d,), 2.5)) == pytest.approx(d, rel=1e-4)
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0, 0.0])) == pytest.approx(1.0, abs=1e-4)
    values = [4.0, 4.0, 1.0, 1.0, 1.0, 1.0]
    p = [v / sum(values) for v in values]
    expected = math.exp(-sum(x * math.log(x) for x in p))
    assert effective_rank(torch.tensor(values)) == pytest.approx(expected, rel=1e-5)
    assert effective_rank(torch.tensor(values) * 1e3) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError):
        effective_rank(torch.zeros(3))


def orthonormal_centred(n: int, d: int, gen: torch.Generator) -> torch.Tensor:
    """n x d with orthonormal columns, each orthogonal to the ones vector (centred)."""
    m = torch.randn(n, d, generator=gen, dtype=torch.float64)
    q, _ = torch.linalg.qr(m - m.mean(dim=0, keepdim=True))
    return q


def test_singular_spectrum_of_features_of_known_spectrum():
    gen = torch.Generator().manual_seed(0)
    n, d = 40, 6
    a = orthonormal_centred(n, d, gen)
    assert a.sum(dim=0).abs().max() < 1e-10
    b, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    s = torch.tensor([0.5, 3.0, 0.1, 5.0, 1.0, 2.0], dtype=torch.float64)
    z = (
        a @ torch.diag(s) @ b + torch.randn(1, d, generator=gen, dtype=torch.float64) * 10
    )  # offset: centred away
    values = singular_spectrum(z.float())
    assert values.dtype == torch.float64 and values.shape == (d,)
    expected = (s**2 / n).sort(descending=True).values
    torch.testing.assert_close(values, expected, rtol=1e-5, atol=1e-6)


def test_features_of_rank_r_have_r_non_negligible_values():
    gen = torch.Generator().manual_seed(1)
    n, d, r = 50, 10, 3
    z = torch.randn(n, r, generator=gen, dtype=torch.float64) @ torch.randn(
        r, d, generator=gen, dtype=torch.float64
    )
    values = singular_spectrum(z)
    assert int((values > 1e-9 * values[0]).sum()) == r
    assert effective_rank(values) <= r + 1e-3
    assert rankme(z) <= r + 1e-3


def test_rankme_is_scale_invariant_and_not_centred():
    gen = torch.Generator().manual_seed(2)
    z = torch.randn(30, 8, generator=gen)
    assert rankme(z * 7.3) == pytest.approx(rankme(z), rel=1e-6)
    assert rankme(z) > 5
    # a large common offset dominates the uncentred features, not the centred covariance
    shifted = z + 100
    assert rankme(shifted) < 1.5
    assert effective_rank(singular_spectrum(shifted)) > 5


def test_singular_spectrum_needs_two_samples():
    with pytest.raises(ValueError):
        singular_spectrum(torch.randn(1, 4))
    with pytest.raises(ValueError):
        singular_spectrum(torch.randn(4))


def covariance_eigenvalues(features: torch.Tensor) -> torch.Tensor:
    z = features.double()
    z = z - z.mean(dim=0)
    return torch.linalg.eigvalsh(z.T @ z / z.shape[0]).flip(0).clamp_min(0)


def test_feature_spectrum_pools_the_features_it_names():
    encoder = with_attention_dropout(pixel_encoder())
    images = images_for(encoder, 12)
    with torch.no_grad():
        tokens = encoder.forward_features(images)
    encoder.train()  # the spectrum is of the eval-mode features
    cls = feature_spectrum(encoder, images, pool="cls", batch_size=5)
    mean = feature_spectrum(encoder, images, pool="mean")
    assert cls.images == mean.images == 12
    assert cls.values.shape == mean.values.shape == (64,)
    assert not torch.allclose(cls.values, mean.values)
    torch.testing.assert_close(cls.values, covariance_eigenvalues(tokens[:, 0]), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(
        mean.values, covariance_eigenvalues(tokens[:, 1:].mean(1)), rtol=1e-4, atol=1e-8
    )
    assert mean.effective_rank == pytest.approx(effective_rank(mean.values))
    assert mean.rankme == pytest.approx(rankme(tokens[:, 1:].mean(1)), rel=1e-4)
    assert encoder.training
    # 12 centred samples span at most 11 directions
    assert int((cls.values > 1e-9 * cls.values[0]).sum()) <= 11


def test_token_spectrum_is_a_normalised_per_image_spectrum():
    encoder = with_attention_dropout(pixel_encoder())
    images = images_for(encoder, 3)
    with torch.no_grad():
        tokens = encoder.forward_features(images)[:, 1:].double()
    encoder.train()
    centred = token_spectrum(encoder, images, batch_size=2)
    assert encoder.training
    assert centred.shape == (16,)  # min(L = 16, D = 64)
    assert centred.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert (centred >= 0).all() and (centred[:-1] >= centred[1:] - 1e-12).all()
    # centred over 16 patches, each image's token matrix has rank <= 15
    assert centred[-1] < 1e-6 * centred[0]
    raw = token_spectrum(encoder, images, center=False)
    assert raw.sum().item() == pytest.approx(1.0, abs=1e-9)
    assert raw[-1] > 1e-4 * raw[0]
    s = torch.linalg.svdvals(tokens - tokens.mean(1, keepdim=True))
    torch.testing.assert_close(centred, (s / s.sum(1, keepdim=True)).mean(0), rtol=1e-4, atol=1e-7)


def test_spectra_of_one_pass_equal_the_separate_spectra():
    encoder = with_attention_dropout(pixel_encoder())
    images = images_for(encoder, 5)
    encoder.train()
    both = spectra(encoder, images, batch_size=2)
    assert encoder.training
    for got, pool in ((both.mean, "mean"), (both.cls, "cls")):
        alone = feature_spectrum(encoder, images, pool=pool, batch_size=3)
        torch.testing.assert_close(got.values, alone.values)
        assert got.effective_rank == pytest.approx(alone.effective_rank)
        assert got.rankme == pytest.approx(alone.rankme) and got.images == 5
    assert not torch.allclose(both.mean.values, both.cls.values)
    torch.testing.assert_close(both.tokens, token_spectrum(encoder, images, batch_size=3))


# ----------------------------------------------------------------------------- pixel reconstructions


def normalised_patches(target: torch.Tensor) -> torch.Tensor:
    """MAE's norm_pix target written out: per patch, mean and unbiased variance, eps 1e-6 in the root."""
    u = target.shape[-1]
    mean = target.sum(-1, keepdim=True) / u
    var = ((target - mean) ** 2).sum(-1, keepdim=True) / (u - 1)
    return (target - mean) / torch.sqrt(var + 1e-6)


def test_denormalize_patches_inverts_the_norm_pix_target():
    gen = torch.Generator().manual_seed(0)
    target = torch.rand(2, 16, 48, generator=gen) * 3 + torch.rand(2, 16, 1, generator=gen) * 5
    torch.testing.assert_close(denormalize_patches(normalised_patches(target), target, True), target)
    # a zero prediction is each patch's own mean
    torch.testing.assert_close(
        denormalize_patches(torch.zeros_like(target), target, True),
        target.mean(-1, keepdim=True).expand_as(target),
    )
    pred = torch.randn(2, 16, 48, generator=gen)
    assert torch.equal(denormalize_patches(pred, target, False), pred)


def tiny_mae(norm_pix_loss: bool = True, patch_size: int = 8) -> MAE:
    cfg = MAEConfig(norm_pix_loss=norm_pix_loss, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    return MAE(pixel_encoder(patch_size, sharp=False), cfg)


def exact_decoder(method: MAE, monkeypatch: pytest.MonkeyPatch, seen_modes: list[bool]) -> None:
    """The method's own masking, with a decoder that predicts exactly the loss's target."""
    own = method.reconstruct

    def reconstruct(images, noise=None):
        seen_modes.append(method.training)
        _, m = own(images, noise)
        target = patchify(images, method.encoder.patch_size)
        return (normalised_patches(target) if method.cfg.norm_pix_loss else target), m

    monkeypatch.setattr(method, "reconstruct", reconstruct)


@pytest.mark.parametrize("norm_pix_loss", [True, False])
def test_reconstruct_pixels_with_an_exact_decoder_gives_the_original(monkeypatch, norm_pix_loss):
    method = tiny_mae(norm_pix_loss).train()
    seen: list[bool] = []
    exact_decoder(method, monkeypatch, seen)
    images = images_for(method.encoder, 3)
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(5))
    out = reconstruct_pixels(method, images, noise)
    assert seen == [False] and method.training
    for name in ("original", "masked", "prediction", "pasted"):
        x = getattr(out, name)
        assert x.shape == (3, 3, 32, 32), name
        assert x.min() >= 0 and x.max() <= 1, name
    u = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))  # what images_for normalised
    torch.testing.assert_close(out.original, u)
    torch.testing.assert_close(out.prediction, out.original, rtol=0, atol=1e-5)
    torch.testing.assert_close(out.pasted, out.original, rtol=0, atol=1e-5)
    # MAE's mask at 0.75 of 16 patches: the 4 lowest-noise patches are kept
    expected_mask = torch.ones(3, 16).scatter(1, noise.argsort(1)[:, :4], 0.0)
    assert torch.equal(out.mask.float(), expected_mask)
    masked, original = patchify(out.masked, 8), patchify(out.original, 8)
    removed = expected_mask.bool()
    assert (masked[removed] == GREY).all()
    assert torch.equal(masked[~removed], original[~removed])


def test_reconstruct_pixels_pastes_predictions_only_where_removed():
    method = tiny_mae(patch_size=4)
    images = images_for(method.encoder, 2)
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(6))
    out = reconstruct_pixels(method, images, noise)
    removed = out.mask.bool()
    assert int(removed.sum()) == 2 * 48
    pasted, original, prediction = (patchify(x, 4) for x in (out.pasted, out.original, out.prediction))
    assert torch.equal(pasted[~removed], original[~removed])
    assert torch.equal(pasted[removed], prediction[removed])
    assert not torch.allclose(prediction, original, atol=1e-2)  # an untrained decoder


def tiny_mtm() -> MTM:
    cfg = build_config(
        None,
        [
            "method=mtm",
            "model.arch=vit_tiny",
            "model.stem=token_ids",
            "model.img_size=8",
            "model.patch_size=2",
            "model.token_dim=16",
            "model.token_dropout=0.1",
            "model.vocab_size=24",
            "model.embed_dim=64",
            "model.depth=2",
            "model.num_heads=4",
            "method.decoder_embed_dim=32",
            "method.decoder_depth=1",
            "method.decoder_num_heads=2",
            "data.num_workers=0",
        ],
    )
    torch.manual_seed(0)
    return build_method(cfg)


def test_reconstruct_pixels_needs_a_pixel_method():
    method = tiny_mtm()
    with pytest.raises(TypeError):
        reconstruct_pixels(method, torch.randint(0, 24, (1, 8, 8)))


# ----------------------------------------------------------------------------- token reconstructions

VOCAB = 24


def cell_mask_of(mask: torch.Tensor, p: int = 2, side: int = 8) -> torch.Tensor:
    """A per-patch mask [N, L] as a per-cell one [N, side, side]: cell (i, j) lies in patch (i//p, j//p)."""
    g = side // p
    grid = mask.bool().reshape(-1, g, g)
    return grid.repeat_interleave(p, dim=1).repeat_interleave(p, dim=2)


def colour_decode(seed: int = 0):
    table = torch.rand(VOCAB, 3, generator=torch.Generator().manual_seed(seed))

    def decode(ids: torch.Tensor) -> torch.Tensor:
        return table[ids].permute(0, 3, 1, 2).repeat_interleave(4, dim=2).repeat_interleave(4, dim=3)

    return decode


def test_reconstruct_tokens_keeps_the_visible_ids_and_masks_as_token_masking():
    method = tiny_mtm().train()
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(0, VOCAB, (3, 8, 8), generator=gen)
    noise = torch.rand(3, 16, generator=gen)
    out = reconstruct_tokens(method, ids, noise=noise, mask_ratio=0.6)
    assert method.training
    expected = token_masking(3, 16, 0.6, method.cfg.mask_ratio_min, noise=noise).mask
    assert torch.equal(out.mask, cell_mask_of(expected))
    assert out.mask.dtype == torch.bool
    assert int(out.mask.sum()) == 3 * math.ceil(16 * 0.6) * 4
    assert torch.equal(out.ids, ids)
    assert torch.equal(out.pasted[~out.mask], ids[~out.mask])
    assert torch.equal(out.pasted[out.mask], out.predicted[out.mask])
    # the predicted grid is the argmax of the method's logits, put back cell by cell
    method.eval()
    with torch.no_grad():
        logits, _, _ = method.predict(ids, noise, 0.6)
    best = logits.argmax(-1).reshape(3, 4, 4, 2, 2).permute(0, 1, 3, 2, 4).reshape(3, 8, 8)
    assert torch.equal(out.predicted, best)
    hits = (best == ids)[out.mask].float().mean().item()
    assert out.accuracy == pytest.approx(hits)
    assert 0 <= out.accuracy <= 1
    assert out.images is None


def test_reconstruct_tokens_default_ratio_is_the_median_of_the_training_distribution():
    method = tiny_mtm()
    c = method.cfg
    a, b = (
        (c.mask_ratio_min - c.mask_ratio_mean) / c.mask_ratio_std,
        (c.mask_ratio_max - c.mask_ratio_mean) / c.mask_ratio_std,
    )
    median = truncnorm(a, b, loc=c.mask_ratio_mean, scale=c.mask_ratio_std).median()
    assert c.mask_ratio_min < median < c.mask_ratio_max and median != pytest.approx(
        c.mask_ratio_mean, abs=0.05
    )
    ids = torch.randint(0, VOCAB, (2, 8, 8), generator=torch.Generator().manual_seed(0))
    out = reconstruct_tokens(method, ids)
    per_image = out.mask.reshape(2, -1).sum(1)
    assert per_image.tolist() == [4 * math.ceil(16 * median)] * 2


@pytest.mark.parametrize("shift", [0, 1])
def test_reconstruct_tokens_accuracy_of_a_perfect_and_a_wrong_predictor(monkeypatch, shift):
    method = tiny_mtm()
    own = method.predict

    def predict(ids, noise=None, mask_ratio=None, ratio_noise=None):
        logits, units, m = own(ids, noise, mask_ratio, ratio_noise)
        return F.one_hot((units + shift) % VOCAB, VOCAB).float() * 10 + logits * 0, units, m

    monkeypatch.setattr(method, "predict", predict)
    ids = torch.randint(0, VOCAB, (2, 8, 8), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    out = reconstruct_tokens(method, ids, noise=noise, mask_ratio=0.5)
    assert torch.equal(out.predicted, (ids + shift) % VOCAB)
    assert out.accuracy == (1.0 if shift == 0 else 0.0)
    assert torch.equal(out.pasted, torch.where(out.mask, (ids + shift) % VOCAB, ids))


def test_reconstruct_tokens_decodes_the_grids():
    method = tiny_mtm()
    decode = colour_decode()
    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 8, 8), generator=gen)
    noise = torch.rand(2, 16, generator=gen)
    out = reconstruct_tokens(method, ids, noise=noise, mask_ratio=0.7, decode=decode)
    images = out.images
    assert images is not None
    assert torch.equal(images.original, decode(ids))
    assert torch.equal(images.prediction, decode(out.predicted))
    assert torch.equal(images.pasted, decode(out.pasted))
    assert images.masked.shape == (2, 3, 32, 32)
    cover = out.mask.repeat_interleave(4, dim=1).repeat_interleave(4, dim=2)[:, None].expand(-1, 3, -1, -1)
    assert (images.masked[cover] == GREY).all()
    assert torch.equal(images.masked[~cover], images.original[~cover])
    assert cover.any() and (~cover).any()


def test_reconstruct_tokens_takes_a_decoder_on_another_device():
    """A tokenizer decoding on the CPU for a model on a GPU: the grids are shown where the decoder put
    them (the meta device stands in for the other device)."""
    method = tiny_mtm()
    on_cpu = colour_decode()
    ids = torch.randint(0, VOCAB, (2, 8, 8), generator=torch.Generator().manual_seed(3))
    out = reconstruct_tokens(method, ids, mask_ratio=0.7, decode=lambda grid: on_cpu(grid).to("meta"))
    assert {t.device.type for t in out.images[:4]} == {"meta"}
    assert out.images.masked.shape == (2, 3, 32, 32)


def test_reconstruct_tokens_needs_mtm():
    with pytest.raises(TypeError):
        reconstruct_tokens(tiny_mae(), torch.randint(0, VOCAB, (1, 8, 8)))


# ----------------------------------------------------------------------------- segmentation


def assert_partition(labels: np.ndarray, k: int, length: int) -> None:
    assert labels.shape == (length,)
    assert sorted(set(labels.tolist())) == list(range(k))


def test_cluster_patches_gives_nested_partitions_of_k_clusters():
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ks = (5, 2, 3, 8, 16)  # a cut into every patch, beside coarser ones
    cuts = cluster_patches(features, ks)
    assert list(cuts) == list(ks)
    for k in ks:
        assert_partition(cuts[k], k, 16)
    assert sorted(cuts[16].tolist()) == list(range(16))
    for coarse, fine in itertools.combinations(sorted(ks), 2):
        for label in set(cuts[fine].tolist()):
            assert len(set(cuts[coarse][cuts[fine] == label].tolist())) == 1, (coarse, fine)


def test_cluster_patches_recovers_planted_clusters():
    """Three directions, each point at a length of 1 or 20: clustered by direction (the features are
    L2-normalised), not by length."""
    gen = torch.Generator().manual_seed(3)
    directions = torch.eye(8)[[0, 3, 6]] + 0.2
    planted = torch.randperm(15, generator=gen) % 3
    lengths = torch.where(torch.arange(15) % 2 == 0, 1.0, 20.0)[:, None]
    features = (directions[planted] + 0.02 * torch.randn(15, 8, generator=gen)) * lengths
    labels = cluster_patches(features, (3,))[3]
    planted = planted.numpy()
    for i, j in itertools.combinations(range(15), 2):
        assert (labels[i] == labels[j]) == (planted[i] == planted[j])


def test_cluster_patches_keeps_a_clusters_label_on_its_largest_part():
    """From one k to the next, the largest part of each coarser cluster keeps the cluster's label, so a
    region keeps its colour across the cuts."""
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    ks = (2, 3, 4, 6)
    cuts = cluster_patches(features, ks)
    for coarse, fine in itertools.pairwise(ks):
        for parent in range(coarse):
            inside = cuts[fine][cuts[coarse] == parent]
            children, sizes = np.unique(inside, return_counts=True)
            assert parent in children.tolist(), (coarse, fine, parent)
            assert sizes[children.tolist().index(parent)] == sizes.max()


def test_cluster_patches_is_ward_not_single_linkage():
    """A chain of 8 evenly spaced points and one a little further off its end: single linkage's first
    split takes off the lone point, Ward's cuts the chain near its middle (far less within-cluster
    variance)."""
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8.5]) * 0.05  # angles on the unit circle
    features = torch.stack([positions.cos(), positions.sin()], dim=1)
    labels = cluster_patches(features, (2,))[2]
    sizes = np.bincount(labels)
    assert sizes.min() >= 3, labels
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[-3:].tolist())) == 1


@pytest.mark.parametrize("ks", [(17,), (2, 17), (0,)])
def test_cluster_patches_rejects_impossible_cuts(ks):
    with pytest.raises(ValueError):
        cluster_patches(torch.randn(16, 8), ks)


@pytest.fixture
def one_thread():
    """t-SNE's OpenMP loops slow down by orders of magnitude when their threads compete with other
    processes for the cores; one thread keeps the tests' time steady."""
    with threadpool_limits(limits=1):
        yield


def test_tsne_embedding_is_finite_and_seeded(one_thread):
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a = tsne_embedding(features, seed=0)
    assert a.shape == (16, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(tsne_embedding(features, seed=0), a)


def test_segment_on_an_upsampled_grid(one_thread):
    encoder = pixel_encoder(16)  # a 2 x 2 grid, 4 x 4 upsampled: few points for t-SNE
    pos = encoder.pos_embed.detach().clone()
    images = images_for(encoder, 2)
    seg = segment(encoder, images, ks=(2, 3), upsample=2)
    assert seg.grid == (4, 4)
    assert set(seg.labels) == {2, 3}
    for k, labels in seg.labels.items():
        assert labels.shape == (2, 4, 4)
        for per_image in labels:
            assert sorted(set(per_image.flatten().tolist())) == list(range(k))
    assert seg.embedding.shape == (2, 16, 2) and np.isfinite(seg.embedding).all()
    # the encoder itself is untouched
    assert encoder.grid_size == (2, 2) and torch.equal(encoder.pos_embed, pos)


def test_upsampled_encoder_keeps_the_weights_on_a_finer_grid():
    encoder = pixel_encoder()
    assert upsampled_encoder(encoder, 1) is encoder
    bigger = upsampled_encoder(encoder, 2)
    assert bigger is not encoder and bigger.grid_size == (8, 8)
    torch.testing.assert_close(bigger.blocks[1].attn.qkv.weight, encoder.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert bigger.forward_visible(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)
    with pytest.raises(ValueError):
        upsampled_encoder(encoder, 0)
    with pytest.raises(ValueError):
        upsampled_encoder(small_token_encoder(), 2)


def test_patch_features_are_the_last_blocks_patch_tokens():
    encoder = with_attention_dropout(pixel_encoder())
    images = images_for(encoder, 3)
    encoder.train()
    feats = patch_features(encoder, images, batch_size=2)
    assert encoder.training
    encoder.eval()
    with torch.no_grad():
        expected = encoder.forward_visible(images, norm=False)[:, 1:]
        normed = encoder.forward_features(images)[:, 1:]
    assert feats.shape == (3, 16, 64)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(patch_features(encoder, images, final_norm=True), normed)
    assert not torch.allclose(expected, normed)
    encoder.train()
    big = patch_features(encoder, images, upsample=2)
    assert big.shape == (3, 64, 64)
    torch.testing.assert_close(patch_features(encoder, images, upsample=2), big)
    # images twice the size (bilinear) through the encoder on the finer grid
    bigger = upsampled_encoder(encoder, 2).eval()
    larger = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(big, bigger.forward_visible(larger, norm=False)[:, 1:])
