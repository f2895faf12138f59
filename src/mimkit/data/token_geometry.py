"""Geometric token augmentations of SeiT / SeiT++ on whole batches, on the tensors' device: resized crops
(torchvision's RandomResizedCrop boxes, then a batched bicubic resize), centre and random crops, and
horizontal flips. They work on any map [B, C, H, W] (emb maps of codebook vectors, one-hot maps), the
plain crops and flips on id grids [B, H, W] too. The other token augmentations (Token-EDA, colour,
Mixup/CutMix) and the random draws these share are :mod:`mimkit.data.token_augment`.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from mimkit.data.token_augment import check_emb, draw_device, per_sample, uniform

__all__ = [
    "CropBoxes",
    "TokenRandomResizedCrop",
    "center_crop",
    "hflip",
    "random_crop",
    "random_resized_crop",
    "resized_crop",
    "rrc_params",
]


def _pair(size: int | tuple[int, int]) -> tuple[int, int]:
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"size must be positive, got {size}")
    return int(height), int(width)


class CropBoxes(NamedTuple):
    top: torch.Tensor  # [B] long
    left: torch.Tensor  # [B] long
    height: torch.Tensor  # [B] long
    width: torch.Tensor  # [B] long


def rrc_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    attempts: int = 10,
) -> CropBoxes:
    """Per-sample crop boxes by the algorithm of torchvision's ``RandomResizedCrop.get_params``: up to 10
    tries of area fraction U(scale) and log-uniform aspect ratio, rounded to whole tokens, the first that
    fits wins and its offset is uniform; if none fits, the centre crop clamped to the ratio range. All
    tries of all samples are drawn at once (the random stream differs from torchvision's, not the law)."""
    if not (0 < scale[0] <= scale[1]) or not (0 < ratio[0] <= ratio[1]):
        raise ValueError(f"need 0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1], got {scale}, {ratio}")
    device = draw_device(generator, device)
    f64 = torch.float64
    area = uniform((batch, attempts), generator, device, f64) * (scale[1] - scale[0]) + scale[0]
    area = area * (height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(uniform((batch, attempts), generator, device, f64) * (log_hi - log_lo) + log_lo)
    # torch.round, like Python's round, rounds halves to even
    w = torch.sqrt(area * aspect).round().long()
    h = torch.sqrt(area / aspect).round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first_fit = fits.to(torch.uint8).argmax(1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(1)
    w, h = w.gather(1, first_fit).squeeze(1), h.gather(1, first_fit).squeeze(1)

    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = round(height * max(ratio)), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)
    offsets = uniform((batch, 2), generator, device, f64)
    top = torch.where(found, (offsets[:, 0] * (height - h + 1)).long(), (height - h) // 2)
    left = torch.where(found, (offsets[:, 1] * (width - w + 1)).long(), (width - w) // 2)
    return CropBoxes(torch.minimum(top, height - h), torch.minimum(left, width - w), h, w)


_CUBIC_A = -0.75  # the bicubic kernel parameter of F.interpolate


def _cubic_weights(t: torch.Tensor) -> torch.Tensor:
    """[..., 4] weights of taps at offsets -1, 0, 1, 2 for fractional position ``t`` (Keys, a = -0.75)."""
    a = _CUBIC_A

    def near(x: torch.Tensor) -> torch.Tensor:  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x: torch.Tensor) -> torch.Tensor:  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return torch.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], dim=-1)


def _resize_matrix(start: torch.Tensor, length: torch.Tensor, size_in: int, size_out: int) -> torch.Tensor:
    """[B, size_out, size_in] matrices that crop [start, start+length) and resize it to ``size_out`` like
    ``F.interpolate(mode="bicubic", align_corners=False)``: source position (o + 0.5) * length / size_out
    - 0.5, four taps clamped to the crop (not the image), weights summed where taps coincide."""
    out = torch.arange(size_out, dtype=torch.float64, device=start.device)
    source = (out + 0.5) * (length.double() / size_out).unsqueeze(1) - 0.5  # [B, out], crop coordinates
    base = source.floor()
    weights = _cubic_weights(source - base)  # [B, out, 4]
    taps = base.long().unsqueeze(2) + torch.arange(-1, 3, device=start.device)
    taps = torch.minimum(taps.clamp(min=0), (length - 1).view(-1, 1, 1)) + start.view(-1, 1, 1)
    matrix = torch.zeros(start.shape[0], size_out, size_in, dtype=torch.float64, device=start.device)
    return matrix.scatter_add_(2, taps, weights)


def resized_crop(x: torch.Tensor, boxes: CropBoxes, size: int | tuple[int, int]) -> torch.Tensor:
    """Crop each sample of ``x`` [B, C, H, W] to its box and resize it to ``size`` with bicubic
    interpolation (align_corners False, no antialiasing).

    Equal, up to float rounding, to ``F.interpolate(x[b:b+1, :, box], size, mode="bicubic")`` for each
    sample, which is what SeiT's token RRC does, but done for the whole batch as two batched matrix
    products. Torchvision's tensor ``RandomResizedCrop`` differs from this when a crop is larger than
    ``size``: it antialiases by default. Values overshoot the input range, as bicubic does. With TF32
    matmuls enabled on a GPU the products lose precision (about 1e-3 relative)."""
    check_emb(x, "map")
    out_h, out_w = _pair(size)
    height, width = x.shape[-2:]
    top, left, box_h, box_w = (b.to(x.device) for b in boxes)
    outside = (
        (top < 0) | (left < 0) | (box_h < 1) | (box_w < 1) | (top + box_h > height) | (left + box_w > width)
    )
    if bool(outside.any()):
        raise ValueError(f"crop boxes must lie inside the {height}x{width} maps")
    rows = _resize_matrix(top, box_h, height, out_h).to(x.dtype).unsqueeze(1)  # [B, 1, out_h, H]
    cols = _resize_matrix(left, box_w, width, out_w).to(x.dtype).unsqueeze(1)  # [B, 1, out_w, W]
    with torch.autocast(x.device.type, enabled=False):  # in x's own precision, as F.interpolate would be
        return rows @ x @ cols.transpose(-1, -2)


def random_resized_crop(
    x: torch.Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    *,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CropBoxes]:
    """Token RRC on emb (or one-hot) maps [B, C, H, W]: a box per sample (:func:`rrc_params`), then a
    bicubic resize to ``size`` (:func:`resized_crop`). Interpolation is linear in the map, so this equals
    SeiT's RRC of one-hot maps followed by the codebook lookup."""
    check_emb(x, "map")
    boxes = rrc_params(
        x.shape[0], x.shape[-2], x.shape[-1], scale, ratio, generator=generator, device=x.device
    )
    out = resized_crop(x, boxes, size)
    return (out, boxes) if return_params else out


def center_crop(x: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """Central ``size`` crop of the last two dims (a view). The offset is ``(H - size) // 2`` as in
    SeiT's eval crop; torchvision rounds ``(H - size) / 2`` instead, which differs for odd margins
    (e.g. 35 -> 28: offset 3 here, 4 there)."""
    out_h, out_w = _pair(size)
    height, width = x.shape[-2:]
    if out_h > height or out_w > width:
        raise ValueError(f"cannot crop {out_h}x{out_w} from {height}x{width} maps")
    top, left = (height - out_h) // 2, (width - out_w) // 2
    return x[..., top : top + out_h, left : left + out_w]


def random_crop(
    x: torch.Tensor,
    size: int | tuple[int, int],
    *,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, CropBoxes]:
    """Plain ``size`` crop at a uniform offset per sample, no resize (SeiT's ``--src`` crop); works on
    ids [B, H, W] and maps [B, C, H, W]."""
    out_h, out_w = _pair(size)
    batch, height, width = x.shape[0], x.shape[-2], x.shape[-1]
    if x.ndim < 3 or out_h > height or out_w > width:
        raise ValueError(f"cannot crop {out_h}x{out_w} per sample from shape {tuple(x.shape)}")
    offsets = uniform((batch, 2), generator, x.device, torch.float64)
    top = (offsets[:, 0] * (height - out_h + 1)).long().clamp_(max=height - out_h)
    left = (offsets[:, 1] * (width - out_w + 1)).long().clamp_(max=width - out_w)
    rows = (top.view(batch, 1) + torch.arange(out_h, device=x.device)).view(batch, out_h, 1)
    cols = (left.view(batch, 1) + torch.arange(out_w, device=x.device)).view(batch, 1, out_w)
    flat = x.reshape(batch, -1, height * width)
    index = (rows * width + cols).view(batch, 1, out_h * out_w).expand(-1, flat.shape[1], -1)
    out = flat.gather(2, index).view(*x.shape[:-2], out_h, out_w)
    boxes = CropBoxes(top, left, torch.full_like(top, out_h), torch.full_like(top, out_w))
    return (out, boxes) if return_params else out


def hflip(
    x: torch.Tensor,
    p: float = 0.5,
    *,
    generator: torch.Generator | None = None,
    return_selected: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Mirror the last dim of each sample independently with probability ``p``; ``return_selected``
    also gives the [B] bool mask of the flipped samples."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p must be in [0, 1], got {p}")
    flipped = uniform((x.shape[0],), generator, x.device) < p
    out = torch.where(per_sample(flipped, x), x.flip(-1), x)
    return (out, flipped) if return_selected else out


class TokenRandomResizedCrop(nn.Module):
    """:func:`random_resized_crop` with its size, scale and ratio held."""

    def __init__(
        self,
        size: int | tuple[int, int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ) -> None:
        super().__init__()
        self.size, self.scale, self.ratio = _pair(size), tuple(scale), tuple(ratio)

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return random_resized_crop(x, self.size, self.scale, self.ratio, generator=generator)

    def extra_repr(self) -> str:
        return f"size={self.size}, scale={self.scale}, ratio={self.ratio}"
