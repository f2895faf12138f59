"""Attention analyses (mimkit.analysis.attention) against independent computations: mean attention
distance on constructed attention patterns, and the recorded attention against a block-by-block
recomputation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from mimkit.analysis import (
    attention_distance,
    attention_maps,
    mean_attention_distance,
    query_maps,
    recorded_attention,
)
from mimkit.models.vit import build_encoder

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
