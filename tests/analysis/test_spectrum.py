"""Singular value spectra (mimkit.analysis.spectrum) of features whose spectrum is known by construction."""

from __future__ import annotations

import math

import pytest
import torch

from mimkit.analysis import (
    effective_rank,
    feature_spectrum,
    rankme,
    singular_spectrum,
    spectra,
    token_spectrum,
)
from tests.analysis.test_attention import images_for, pixel_encoder, with_attention_dropout


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
