"""Geometric token augmentations (mimkit.data.token_geometry): resized crops as crop-then-interpolate,
torchvision's random-resized-crop bounds, centre and random crops, flips (SeiT / SeiT++ spec §3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mimkit.data.token_geometry import (
    CropBoxes,
    TokenRandomResizedCrop,
    center_crop,
    hflip,
    random_crop,
    random_resized_crop,
    resized_crop,
    rrc_params,
)
from mimkit.tokens.codebook import (
    embed,
    requantize,
)
from tests.tokens.test_codebook import gen, random_codebook


def crop_then_interpolate(x: torch.Tensor, boxes: CropBoxes, size: int) -> torch.Tensor:
    crops = []
    for b in range(x.shape[0]):
        t, left, h, w = (int(v[b]) for v in boxes)
        crop = x[b : b + 1, :, t : t + h, left : left + w]
        crops.append(F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False))
    return torch.cat(crops)


def test_resized_crop_equals_crop_then_interpolate():
    x = torch.randn(6, 3, 32, 32, generator=gen(8))
    boxes = CropBoxes(  # up- and downscaling, thin, full, corner and edge boxes
        torch.tensor([0, 3, 10, 0, 20, 5]),
        torch.tensor([0, 7, 0, 31, 2, 0]),
        torch.tensor([32, 10, 22, 32, 12, 27]),
        torch.tensor([32, 25, 32, 1, 30, 29]),
    )
    assert torch.allclose(resized_crop(x, boxes, 28), crop_then_interpolate(x, boxes, 28), atol=2e-5)
    assert torch.allclose(resized_crop(x, boxes, 40), crop_then_interpolate(x, boxes, 40), atol=2e-5)
    out, drawn = random_resized_crop(x, 28, (0.08, 1.0), generator=gen(9), return_params=True)
    assert out.shape == (6, 3, 28, 28)
    assert torch.allclose(out, crop_then_interpolate(x, drawn, 28), atol=2e-5)
    with pytest.raises(ValueError, match="crop boxes must lie inside the 32x32 maps"):
        resized_crop(x, CropBoxes(*(torch.full((6,), v) for v in (20, 0, 13, 5))), 28)


def test_rrc_params_follow_torchvision_bounds_and_fallback():
    boxes = rrc_params(2000, 32, 32, (0.2, 1.0), generator=gen(10))
    top, left, h, w = boxes
    assert bool(((h >= 1) & (w >= 1) & (top >= 0) & (left >= 0)).all())
    assert bool(((top + h <= 32) & (left + w <= 32)).all())
    aspect = w.double() / h.double()
    area = (w * h).double() / 1024
    # rounding to whole tokens blurs the bounds by at most half a token per side
    assert bool((area >= ((32 * math.sqrt(0.2) - 1) / 32) ** 2).all())
    assert bool(((aspect > 0.6) & (aspect < 1.7)).all())
    assert len(top.unique()) > 10 and len(h.unique()) > 10
    # no ratio in [10, 20] fits a square grid: centre crop of width 32, height round(32 / 10)
    fallback = rrc_params(3, 32, 32, (0.08, 1.0), (10.0, 20.0), generator=gen(11))
    assert [v.tolist() for v in fallback] == [[14] * 3, [0] * 3, [3] * 3, [32] * 3]
    # a fixed 16x16 box: offsets are uniform over 0..16 inclusive, as torch.randint(0, 32 - 16 + 1)
    top, left, h, w = rrc_params(2000, 32, 32, (0.25, 0.25), (1.0, 1.0), generator=gen(37))
    assert set(h.tolist()) == set(w.tolist()) == {16}
    assert set(top.tolist()) == set(left.tolist()) == set(range(17))
    full = rrc_params(4, 32, 32, (1.0, 1.0), (1.0, 1.0), generator=gen(12))
    assert [v.tolist() for v in full] == [[0] * 4, [0] * 4, [32] * 4, [32] * 4]


def test_full_box_rrc_requantizes_to_the_same_ids():
    codebook = random_codebook(20, 8)
    ids = torch.randint(0, 20, (3, 32, 32), generator=gen(13))
    out = TokenRandomResizedCrop(32, (1.0, 1.0), (1.0, 1.0))(embed(ids, codebook), generator=gen(14))
    assert torch.equal(requantize(out, codebook), ids)


def test_center_and_random_crop_and_hflip():
    x = torch.arange(2 * 35 * 35).view(2, 1, 35, 35)
    assert torch.equal(center_crop(x, 28), x[..., 3:31, 3:31])
    assert torch.equal(center_crop(x[:, 0, :32, :32], 28), x[:, 0, 2:30, 2:30])
    ids = torch.arange(5 * 32 * 32).view(5, 32, 32)
    out, (top, left, h, w) = random_crop(ids, 28, generator=gen(15), return_params=True)
    assert out.shape == (5, 28, 28) and h.tolist() == [28] * 5 and w.tolist() == [28] * 5
    for b in range(5):
        assert torch.equal(out[b], ids[b, top[b] : top[b] + 28, left[b] : left[b] + 28])
    _, (top, left, _, _) = random_crop(ids[:1].expand(300, -1, -1), 28, generator=gen(38), return_params=True)
    assert set(top.tolist()) == set(left.tolist()) == set(range(5))
    emb = torch.randn(16, 3, 4, 4, generator=gen(16))
    flipped, which = hflip(emb, 0.5, generator=gen(17), return_selected=True)
    assert 0 < int(which.sum()) < 16
    assert torch.equal(flipped[which], emb[which].flip(-1)) and torch.equal(flipped[~which], emb[~which])


# ------------------------------------------------------------------------------------ Noise, ColorAdapt
