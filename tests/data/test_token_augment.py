"""Token augmentations (mimkit.data.token_augment): Token-EDA, embedding noise, ColorAdapt, token mixup and
cutmix (SeiT / SeiT++ spec §3)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mimkit.data.token_augment import (
    ColourChoice,
    SwapParams,
    TokenEDA,
    TokenMixup,
    apply_swap_code,
    color_adapt,
    colour_choice,
    emb_noise,
    replace_synonym,
    swap_code,
    swap_code_params,
    token_eda,
    token_mixup,
)
from mimkit.data.token_geometry import (
    hflip,
    random_crop,
    random_resized_crop,
)
from mimkit.tokens.codebook import (
    build_synonyms,
    embed,
    requantize,
    synonym_counts,
    synonym_table,
)
from tests.tokens.test_codebook import gen, random_codebook


def shift_table(vocab: int = 10, thres: int = 5) -> torch.Tensor:
    """Code i's synonyms are i+1 .. i+thres (mod K): never itself, each column recognisable."""
    return (torch.arange(vocab).unsqueeze(1) + torch.arange(1, thres + 1)) % vocab


def test_replace_synonym_uses_only_listed_synonyms_at_the_given_rate():
    table = shift_table()
    ids = torch.randint(0, 10, (8, 64, 64), generator=gen(1))
    out = replace_synonym(ids, table, 0.25, generator=gen(2))
    assert out.shape == ids.shape and out.dtype == torch.long
    changed = out != ids
    column = (out - ids) % 10 - 1  # which synonym was picked where changed
    assert bool(((column >= 0) & (column < 5))[changed].all())
    assert abs(changed.float().mean().item() - 0.25) < 0.02  # 32768 draws: 8 standard deviations
    shares = torch.bincount(column[changed], minlength=5).float() / changed.sum()
    assert torch.allclose(shares, torch.full((5,), 0.2), atol=0.02)
    assert torch.equal(out, replace_synonym(ids, table, 0.25, generator=gen(2)))
    assert torch.equal(replace_synonym(ids, table, 0.0, generator=gen(2)), ids)
    assert bool((replace_synonym(ids, table, 1.0, generator=gen(2)) != ids).all())


def test_replace_synonym_counts_keep_short_lists_uniform():
    syn = {i: [(i + 1) % 4, (i + 2) % 4] for i in range(4)}
    ids = torch.zeros(4, 50, 50, dtype=torch.long)
    out = replace_synonym(ids, synonym_table(syn), 1.0, generator=gen(3), counts=synonym_counts(syn))
    assert set(out.unique().tolist()) == {1, 2}
    assert abs((out == 1).float().mean().item() - 0.5) < 0.03
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 4\)"):
        replace_synonym(ids + 4, synonym_table(syn), 0.5)


# ------------------------------------------------------------------------------------------- SwapCode


def swap_by_slicing(ids: torch.Tensor, side: int, first: tuple[int, int], second: tuple[int, int]):
    """SeiT's per-sample write order, on a plain 2-D grid."""
    (r0, c0), (r1, c1), s = first, second, side
    out = ids.clone()
    out[r0 : r0 + s, c0 : c0 + s] = ids[r1 : r1 + s, c1 : c1 + s]
    out[r1 : r1 + s, c1 : c1 + s] = ids[r0 : r0 + s, c0 : c0 + s]
    return out


def test_apply_swap_code_moves_blocks_exactly_including_overlap():
    ids = torch.arange(3 * 8 * 8).view(3, 8, 8)
    params = SwapParams(
        torch.tensor([3, 3, 0]),
        torch.tensor([[0, 0], [1, 1], [2, 2]]),
        torch.tensor([[4, 5], [3, 3], [5, 5]]),  # sample 1 overlaps, sample 2 is a no-op
    )
    out = apply_swap_code(ids, params)
    for b in range(3):
        side, first, second = params.side[b].item(), params.first[b].tolist(), params.second[b].tolist()
        assert torch.equal(out[b], swap_by_slicing(ids[b], side, first, second))
    assert out[0, 4, 5].item() == ids[0, 0, 0].item() and out[0, 0, 0].item() == ids[0, 4, 5].item()
    assert out[1, 3, 3].item() == ids[1, 1, 1].item()  # the second write wins on the overlap
    assert torch.equal(out[2], ids[2])


def test_swap_code_draws_valid_params_per_sample():
    ids = torch.randint(0, 391, (64, 32, 32), generator=gen(4))
    out, (side, first, second) = swap_code(ids, 0.25, generator=gen(5), return_params=True)
    assert out.shape == ids.shape and out.dtype == ids.dtype
    assert int(side.min()) >= 0 and int(side.max()) <= 7 and len(side.unique()) > 3
    assert bool(((first >= 0) & (first <= 31 - side.unsqueeze(1))).all())
    assert bool(((second >= 0) & (second <= 31 - side.unsqueeze(1))).all())
    assert bool(((first - second).double().norm(dim=1) > side).all())
    for b in range(64):
        expected = swap_by_slicing(ids[b], side[b].item(), first[b].tolist(), second[b].tolist())
        assert torch.equal(out[b], expected)
    assert torch.equal(swap_code(ids, 0.0, generator=gen(5)), ids)


def test_swap_code_rejects_corners_exactly_s_apart():
    side, first, second = swap_code_params(300, 3, 3, 0.6, generator=gen(36))
    assert set(side.tolist()) == {0, 1}
    # on a 3x3 grid, blocks of side 1 have corners in [0, 1]^2: only diagonal pairs are more than 1 apart
    assert set((first - second)[side == 1].square().sum(1).tolist()) == {2}


def test_swap_code_refuses_a_scale_with_no_valid_corners():
    with pytest.raises(ValueError, match=r"swap scale 0\.9 allows blocks of side 3 on a 4x4 grid"):
        swap_code_params(2, 4, 4, 0.9)


# ------------------------------------------------------------------------------------------ Token-EDA


def test_token_eda_applies_one_op_per_sample():
    table = shift_table()
    ids = torch.randint(0, 10, (400, 8, 8), generator=gen(6))
    out, choice = token_eda(ids, table, 0.25, 0.25, generator=gen(7), return_choice=True)
    counts = torch.bincount(choice, minlength=3).tolist()
    assert all(abs(c - e) < 45 for c, e in zip(counts, [100, 100, 200], strict=True))
    same = (out == ids).flatten(1).all(1)
    assert bool(same[choice == 2].all())
    replaced = choice == 0
    delta = ((out - ids) % 10)[replaced]
    assert bool(((delta == 0) | ((delta >= 1) & (delta <= 5))).all())
    swapped = choice == 1
    assert torch.equal(out[swapped].flatten(1).sort(1).values, ids[swapped].flatten(1).sort(1).values)
    assert torch.equal(out, TokenEDA(table, 0.25, 0.25)(ids, generator=gen(7)))
    with pytest.raises(ValueError, match=r"sum to at most 1, got rc_prob=0\.75, sc_prob=0\.5"):
        token_eda(ids, table, 0.75, 0.5)


# ---------------------------------------------------------------------------------- geometric crops


def test_emb_noise_changes_exactly_half_and_leaves_the_rest_bit_identical():
    x = torch.randn(7, 4, 5, 5, generator=gen(18))
    before = x.clone()
    out, selected = emb_noise(x, generator=gen(19), return_selected=True)
    assert torch.equal(x, before)  # not in place
    assert int(selected.sum()) == 3
    assert torch.equal(out[~selected], x[~selected])
    assert bool((out[selected] != x[selected]).all())
    # std = 0 leaves only the per-channel offset: constant over positions
    offset_only, chosen = emb_noise(x, scale=2.0, std=0.0, generator=gen(20), return_selected=True)
    delta = offset_only[chosen] - x[chosen]
    assert torch.allclose(delta, delta[..., :1, :1].expand_as(delta), atol=1e-6)
    big = emb_noise(torch.zeros(64, 8, 16, 16), scale=0.0, std=1.0, generator=gen(21))
    assert int((big.flatten(1).abs().sum(1) > 0).sum()) == 32
    assert abs(big[big != 0].std().item() - 1.0) < 0.02


def test_color_adapt_is_adain_with_the_reversed_batch():
    x = torch.randn(4, 3, 3, 5, generator=gen(22)) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + 1.0
    before = x.clone()
    out, selected = color_adapt(x, eps=0.0, generator=gen(23), return_selected=True)
    assert torch.equal(x, before) and int(selected.sum()) == 2
    assert torch.equal(out[~selected], x[~selected])
    for i in selected.nonzero().flatten().tolist():
        j = 3 - i
        for c in range(3):
            mine, style = x[i, c].flatten().tolist(), x[j, c].flatten().tolist()
            mu_i, mu_j = sum(mine) / 15, sum(style) / 15
            sd_i = math.sqrt(sum((v - mu_i) ** 2 for v in mine) / 14)
            sd_j = math.sqrt(sum((v - mu_j) ** 2 for v in style) / 14)
            expected = torch.tensor([(v - mu_i) / sd_i * sd_j + mu_j for v in mine]).view(3, 5)
            assert torch.allclose(out[i, c], expected, atol=1e-5)
    # eps adds to the unbiased std of the content sample only
    out, selected = color_adapt(x, eps=0.5, generator=gen(23), return_selected=True)
    i = int(selected.nonzero()[0])
    mine, style = x[i].flatten(1), x[3 - i].flatten(1)
    expected = (mine - mine.mean(1, keepdim=True)) / (mine.std(1, keepdim=True) + 0.5) * style.std(
        1, keepdim=True
    ) + style.mean(1, keepdim=True)
    assert torch.allclose(out[i].flatten(1), expected, atol=1e-6)
    assert mine.std(1).tolist() != mine.std(1, correction=0).tolist()
    constant = torch.ones(2, 1, 4, 4)
    constant[1] = torch.arange(16.0).view(4, 4)
    restyled = color_adapt(constant, fraction=1.0, generator=gen(24))
    assert bool(restyled.isfinite().all()) and torch.allclose(restyled[0], torch.full((1, 4, 4), 7.5))


def test_colour_choice_picks_one_branch_per_batch():
    x = torch.randn(4, 2, 3, 3, generator=gen(25))
    g, reference = gen(26), gen(26)
    out, choice = colour_choice(x, 0.0, 1.0, generator=g, return_choice=True)
    torch.rand(1, generator=reference)  # the branch draw
    assert choice == "coloradapt" and torch.equal(out, color_adapt(x, generator=reference))
    out, choice = colour_choice(x, 1.0, 0.0, generator=gen(27), return_choice=True)
    assert choice == "noise" and int((out != x).flatten(1).any(1).sum()) == 2
    out, choice = colour_choice(x, 0.0, 0.0, return_choice=True)
    assert choice == "identity" and out is x
    g = gen(28)
    picks = [colour_choice(x, 0.5, 0.25, generator=g, return_choice=True)[1] for _ in range(800)]
    assert abs(picks.count("noise") - 400) < 60 and abs(picks.count("coloradapt") - 200) < 50
    assert torch.equal(
        ColourChoice(0.0, 1.0)(x, generator=gen(29)), colour_choice(x, 0.0, 1.0, generator=gen(29))
    )


# --------------------------------------------------------------------------------------- Mixup / CutMix


def test_token_mixup_blends_with_the_reversed_batch():
    x = torch.randn(4, 3, 6, 6, generator=gen(30))
    target = torch.tensor([0, 1, 2, 3])
    before = x.clone()
    np.random.seed(0)
    mixed, soft = token_mixup(x, target, num_classes=5, mixup_alpha=0.8, cutmix_alpha=0.0)
    assert torch.equal(x, before) and soft.shape == (4, 5)
    off, on = 0.1 / 5, 1 - 0.1 + 0.1 / 5
    lam = (soft[0, 0].item() - off) / (on - off)
    assert 0 < lam < 1
    assert torch.allclose(mixed, lam * x + (1 - lam) * x.flip(0), atol=1e-6)
    assert torch.allclose(
        soft[0], torch.tensor([on * lam + off * (1 - lam), off, off, lam * off + (1 - lam) * on, off])
    )


def test_token_cutmix_pastes_one_box_from_the_reversed_batch():
    x = torch.randn(4, 2, 8, 8, generator=gen(31))
    np.random.seed(0)  # a 5x5 box
    mixed, soft = TokenMixup(num_classes=4)(x, torch.tensor([0, 1, 2, 3]))
    pasted = (mixed != x).any(1)  # [B, H, W]
    assert torch.equal(mixed[:, :, pasted[0]], x.flip(0)[:, :, pasted[0]])
    assert torch.equal(mixed[:, :, ~pasted[0]], x[:, :, ~pasted[0]])
    rows, cols = pasted[0].nonzero().unbind(1)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert int(box) == int(pasted[0].sum()) > 0  # a rectangle
    lam = 1 - box.item() / 64  # timm corrects lambda to the clipped box area
    off, on = 0.1 / 4, 1 - 0.1 + 0.1 / 4
    assert soft[0, 0].item() == pytest.approx(on * lam + off * (1 - lam), abs=1e-6)
    with pytest.raises(ValueError, match="needs an even batch, got 3"):
        token_mixup(x[:3], torch.tensor([0, 1, 2]), num_classes=4)


# -------------------------------------------------------------------------------------- end to end


def test_continuous_augmentations_requantize_to_valid_ids():
    codebook = random_codebook(391, 32)
    ids = torch.randint(0, 391, (8, 32, 32), generator=gen(32))
    g = gen(33)
    ids = token_eda(ids, synonym_table(build_synonyms(codebook, k=5)), 0.25, 0.25, generator=g)
    emb = colour_choice(embed(ids, codebook), 0.5, 0.25, generator=g)
    emb = random_resized_crop(emb, 28, (0.08, 1.0), generator=g)
    np.random.seed(2)
    emb, _ = token_mixup(emb, torch.arange(8), num_classes=10)
    out = requantize(emb, codebook)
    assert out.shape == (8, 28, 28) and out.dtype == torch.long
    assert int(out.min()) >= 0 and int(out.max()) < 391


def test_a_given_generator_leaves_the_global_rng_alone():
    codebook = random_codebook(12, 4)
    ids = torch.randint(0, 12, (4, 8, 8), generator=gen(34))
    emb = embed(ids, codebook)
    table = synonym_table(build_synonyms(codebook, k=3))
    state = torch.get_rng_state()
    g = gen(35)
    token_eda(ids, table, 0.5, 0.5, generator=g)
    random_crop(ids, 6, generator=g)
    hflip(emb, generator=g)
    random_resized_crop(emb, 6, generator=g)
    emb_noise(emb, generator=g)
    color_adapt(emb, generator=g)
    colour_choice(emb, 0.5, 0.5, generator=g)
    assert torch.equal(torch.get_rng_state(), state)
