"""Reconstructions (mimkit.analysis.reconstruction) through decoders that predict exactly, of pixels and
of token grids."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy.stats import truncnorm

from mimkit.analysis import (
    denormalize_patches,
    reconstruct_pixels,
    reconstruct_tokens,
)
from mimkit.configs import build_config
from mimkit.masking import token_masking
from mimkit.methods import MAE, MTM, build_method
from mimkit.methods.mae import MAEConfig
from mimkit.models.patches import patchify
from tests.analysis.test_attention import GREY, images_for, pixel_encoder


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
