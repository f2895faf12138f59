"""Reconstructions, what every MIM user looks at first: the image, what the encoder saw, and what the
decoder made of the rest. MAE and LUT predict pixels (per-patch normalised under norm_pix_loss, so each
prediction is brought back with its own patch's statistics); MTM predicts token ids, shown through the
tokenizer's decoder."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from mimkit.eval.features import evaluating
from mimkit.methods.base import Method
from mimkit.methods.mtm import MTM
from mimkit.models.patches import patchify, unpatchify

MASKED_GREY = 0.5  # what a removed patch shows in the masked input, in [0, 1]


class Reconstruction(NamedTuple):
    original: torch.Tensor  # [N, C, H, W] in [0, 1]
    masked: torch.Tensor  # the original with the removed patches grey
    prediction: torch.Tensor  # the decoder's output at every patch
    pasted: torch.Tensor  # the visible patches from the original, the removed ones predicted
    mask: torch.Tensor  # [N, L], 1 = removed


class TokenReconstruction(NamedTuple):
    ids: torch.Tensor  # [N, h, w] the input id grid
    predicted: torch.Tensor  # [N, h, w] the most likely id at every cell
    pasted: torch.Tensor  # [N, h, w] the input's ids where visible, the predicted ones where masked
    mask: torch.Tensor  # [N, h, w] bool, True = masked
    accuracy: float  # the fraction of masked cells predicted right
    images: Reconstruction | None  # the three grids through the tokenizer's decoder, when one is given


def to_unit_range(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Undo a (mean, std) normalisation and clip to [0, 1] for display."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def denormalize_patches(pred: torch.Tensor, target: torch.Tensor, norm_pix: bool) -> torch.Tensor:
    """Predictions [N, L, U] in the loss's space back in the target's: under ``norm_pix`` each patch is
    rescaled by its own target's std and mean, with the loss's convention (unbiased variance, eps 1e-6
    inside the root); otherwise the prediction already is in the target's space."""
    if not norm_pix:
        return pred
    target = target.float()
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return pred.float() * (var + 1e-6) ** 0.5 + mean


def fill_cells(images: torch.Tensor, cell_mask: torch.Tensor, fill: torch.Tensor | float) -> torch.Tensor:
    """Images [N, C, H, W] with the cells of a [N, h, w] mask (True = removed) taken from ``fill`` (images
    of the same shape, or a value); each cell covers H / h x W / w pixels."""
    cover = F.interpolate(cell_mask[:, None].float(), size=images.shape[-2:], mode="nearest").bool()
    return torch.where(cover, torch.as_tensor(fill, dtype=images.dtype, device=images.device), images)


def grey_out(images: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] with the masked cells grey: what the encoder did not see."""
    return fill_cells(images, cell_mask, MASKED_GREY)


@torch.no_grad()
def reconstruct_pixels(
    method: Method, images: torch.Tensor, noise: torch.Tensor | None = None
) -> Reconstruction:
    """MAE's or LUT's reconstruction of normalised images [N, C, H, W] (in the encoder's input spec) at
    the method's mask ratio; ``noise`` [N, L] fixes the mask (else it is drawn)."""
    if not hasattr(method, "reconstruct") or method.encoder.stem.kind != "pixels":
        raise TypeError(
            f"pixel reconstructions need a pixel-predicting method (MAE, LUT); got {type(method).__name__}"
        )
    encoder = method.encoder
    p, grid = encoder.patch_size, encoder.grid_size
    with evaluating(method):
        pred, m = method.reconstruct(images, noise)
    channels = images.shape[1]
    pred = denormalize_patches(pred, patchify(images, p), method.cfg.norm_pix_loss)
    spec = encoder.input_spec
    shown = to_unit_range(unpatchify(pred.to(images.dtype), p, grid, channels), spec.mean, spec.std)
    original = to_unit_range(images, spec.mean, spec.std)
    cells = m.mask.reshape(-1, *grid).bool()
    return Reconstruction(
        original=original,
        masked=grey_out(original, cells),
        prediction=shown,
        pasted=fill_cells(original, cells, shown),
        mask=m.mask,
    )


@torch.no_grad()
def reconstruct_tokens(
    method: MTM,
    ids: torch.Tensor,
    *,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    noise: torch.Tensor | None = None,
    mask_ratio: float | None = None,
) -> TokenReconstruction:
    """MTM's prediction of id grids [N, h, w] at ``mask_ratio`` (default: the median of the ratio
    distribution it was trained with); ``decode`` (ids -> images in [0, 1], on any device) shows the grids
    as pictures."""
    if not isinstance(method, MTM):
        raise TypeError(f"token reconstructions need an MTM method; got {type(method).__name__}")
    encoder = method.encoder
    p, (gh, gw) = encoder.patch_size, encoder.grid_size
    ratio = float(method.mask_ratio(0.5)) if mask_ratio is None else mask_ratio
    with evaluating(method):
        logits, units, m = method.predict(ids, noise, ratio)
    predicted_units = logits.argmax(dim=-1)  # [N, L, p*p]
    masked = m.mask.bool()[..., None].expand_as(units)
    pasted_units = torch.where(masked, predicted_units, units)

    def grid(u: torch.Tensor) -> torch.Tensor:
        return unpatchify(u[..., None], p, (gh, gw), channels=1)[:, 0]

    cell_mask = grid(masked)
    accuracy = (predicted_units == units)[masked].float().mean().item() if masked.any() else float("nan")
    out = TokenReconstruction(ids, grid(predicted_units), grid(pasted_units), cell_mask, accuracy, None)
    if decode is None:
        return out
    original, prediction, pasted = decode(ids), decode(out.predicted), decode(out.pasted)
    masked_image = grey_out(original, cell_mask.to(original.device))
    return out._replace(images=Reconstruction(original, masked_image, prediction, pasted, m.mask))
