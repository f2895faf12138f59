"""The singular value spectrum of an encoder's features (dimensional collapse, Jing et al. 2022): how many
directions the features really use. LUT's claim is a flatter spectrum than MAE's."""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

import torch
from torch import nn

from mimkit.analysis.batches import as_batches
from mimkit.eval.features import evaluating


def singular_spectrum(features: torch.Tensor) -> torch.Tensor:
    """Singular values, largest first, of the covariance C = Zc^T Zc / N of the centred features [N, D]
    (float64, on the CPU)."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"expected features [N >= 2, D]; got {tuple(features.shape)}")
    z = features.detach().double().cpu()
    z = z - z.mean(dim=0, keepdim=True)
    return torch.linalg.svdvals(z.T @ z / z.shape[0])


def effective_rank(values: torch.Tensor, eps: float = 1e-7) -> float:
    """exp of the entropy of the values normalised to sum 1 (RankMe's form, with its eps): D for a flat
    spectrum of D values, 1 for a single non-zero one."""
    v = values.detach().double().cpu().clamp_min(0)
    if v.numel() == 0 or float(v.sum()) == 0.0:
        raise ValueError("the effective rank needs at least one non-zero value")
    p = v / v.sum() + eps
    return float(torch.exp(-(p * p.log()).sum()))


def rankme(features: torch.Tensor) -> float:
    """RankMe (Garrido et al. 2023): the effective rank of the singular values of the features [N, D]
    themselves, not centred."""
    return effective_rank(torch.linalg.svdvals(features.detach().double().cpu()))


class Spectrum(NamedTuple):
    values: torch.Tensor  # [D]: covariance singular values, largest first
    effective_rank: float  # of ``values``
    rankme: float  # of the uncentred features
    images: int


def spectrum_of(features: torch.Tensor) -> Spectrum:
    """The covariance spectrum, its effective rank and RankMe of features [N, D]."""
    values = singular_spectrum(features)
    return Spectrum(values, effective_rank(values), rankme(features), features.shape[0])


@torch.no_grad()
def feature_spectrum(
    encoder: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    pool: str = "mean",
    batch_size: int = 128,
) -> Spectrum:
    """The spectrum of the encoder's image features (``pool``: "mean" of the final-norm patch tokens, the
    default; "cls"; or "mean_prenorm") over all the images."""
    with evaluating(encoder):
        feats = [encoder.features(batch, pool=pool).float().cpu() for batch in as_batches(images, batch_size)]
    if not feats:
        raise ValueError("the feature spectrum needs images")
    return spectrum_of(torch.cat(feats))


def _token_spectra(patches: torch.Tensor, center: bool) -> torch.Tensor:
    """Each image's normalised spectrum of its [L, D] patch tokens: [N, min(L, D)], float64 on the CPU."""
    tokens = patches.double().cpu()
    if center:
        tokens = tokens - tokens.mean(dim=1, keepdim=True)
    s = torch.linalg.svdvals(tokens)
    return s / s.sum(dim=1, keepdim=True).clamp_min(1e-300)


@torch.no_grad()
def token_spectrum(
    encoder: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    center: bool = True,
    batch_size: int = 128,
) -> torch.Tensor:
    """The per-image variant: singular values of each image's [L, D] matrix of final-norm patch tokens
    (centred over the image's patches unless ``center`` is False), each spectrum normalised to sum 1,
    averaged over the images -> [min(L, D)]."""
    total, count = None, 0
    with evaluating(encoder):
        for batch in as_batches(images, batch_size):
            s = _token_spectra(encoder.forward_visible(batch)[:, encoder.num_prefix_tokens :], center)
            total = s.sum(dim=0) if total is None else total + s.sum(dim=0)
            count += s.shape[0]
    if total is None:
        raise ValueError("the token spectrum needs images")
    return total / count


class Spectra(NamedTuple):
    mean: Spectrum  # of the mean-pooled final-norm patch tokens
    cls: Spectrum  # of the cls token
    tokens: torch.Tensor  # the per-image variant, centred (token_spectrum)


@torch.no_grad()
def spectra(
    encoder: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 128
) -> Spectra:
    """The three spectra of :func:`feature_spectrum` (mean and cls) and :func:`token_spectrum`, from one
    forward pass over the images instead of three."""
    means, cls, total, count = [], [], None, 0
    with evaluating(encoder):
        for batch in as_batches(images, batch_size):
            tokens = encoder.forward_visible(batch)
            patches = tokens[:, encoder.num_prefix_tokens :]
            means.append(patches.mean(dim=1).float().cpu())  # encoder.features(pool="mean")
            cls.append(tokens[:, 0].float().cpu())  # encoder.features(pool="cls")
            s = _token_spectra(patches, center=True)
            total = s.sum(dim=0) if total is None else total + s.sum(dim=0)
            count += s.shape[0]
    if total is None:
        raise ValueError("the spectra need images")
    return Spectra(spectrum_of(torch.cat(means)), spectrum_of(torch.cat(cls)), total / count)
