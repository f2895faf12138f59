import math

import pytest
import torch
from scipy.stats import truncnorm

from mimkit.masking import (
    gather_tokens,
    num_visible,
    random_masking,
    token_masking,
    truncated_normal_ratio,
)


def test_keep_count_uses_floor():
    assert num_visible(196, 0.75) == 49
    assert num_visible(256, 0.75) == 64
    assert num_visible(10, 0.75) == 2  # 2.5 -> 2


def test_reference_convention_on_explicit_noise():
    noise = torch.tensor([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.4, 0.6]])
    m = random_masking(2, 4, 0.5, noise=noise)
    # ascending noise is kept first, in shuffled order
    assert m.ids_keep.tolist() == [[1, 3], [0, 2]]
    # mask is in the original patch order, 0 = kept, 1 = removed
    assert m.mask.tolist() == [[1, 0, 1, 0], [0, 1, 0, 1]]
    assert torch.equal(torch.gather(m.ids_shuffle, 1, m.ids_restore), torch.arange(4).expand(2, 4))


def test_same_generator_seed_gives_the_same_mask_and_different_seeds_differ():
    a = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(3))
    b = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(3))
    c = random_masking(4, 64, 0.75, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.ids_keep, b.ids_keep) and torch.equal(a.mask, b.mask)
    assert not torch.equal(a.ids_keep, c.ids_keep)
    assert a.mask.sum(1).tolist() == [48.0] * 4


def test_bad_noise_shape_and_ratio_are_errors():
    with pytest.raises(ValueError, match="noise must have shape"):
        random_masking(2, 4, 0.5, noise=torch.rand(2, 5))
    with pytest.raises(ValueError, match="mask_ratio"):
        random_masking(2, 4, 1.0)


def test_gather_tokens_picks_per_sample():
    x = torch.arange(2 * 4 * 3).reshape(2, 4, 3)
    ids = torch.tensor([[3, 0], [1, 1]])
    out = gather_tokens(x, ids)
    assert torch.equal(out[0], x[0, [3, 0]]) and torch.equal(out[1], x[1, [1, 1]])


def test_token_masking_on_explicit_noise_drops_and_masks_the_lowest():
    noise = torch.tensor([[0.6, 0.1, 0.5, 0.3, 0.9, 0.2]])
    # n_mask = ceil(6 * 0.5) = 3 -> patches 1, 5, 3; n_drop = ceil(6 * 0.2) = 2 -> patches 1, 5
    m = token_masking(1, 6, 0.5, 0.2, noise=noise)
    assert m.ids_keep.tolist() == [[0, 2, 3, 4]]  # grid order
    assert m.replace.tolist() == [[False, False, True, False]]
    assert m.mask.tolist() == [[0, 1, 0, 1, 0, 1]] and m.mask.dtype == torch.float32
    dropped = torch.tensor([[1, 5]])
    assert torch.equal(
        torch.gather(torch.cat([m.ids_keep, dropped], 1), 1, m.ids_restore), torch.arange(6)[None]
    )


def test_token_masking_counts_use_the_ceiling_and_drop_is_a_subset_of_mask():
    noise = torch.rand(8, 196, generator=torch.Generator().manual_seed(0))
    m = token_masking(8, 196, 0.55, 0.4, noise=noise)
    n_mask, n_drop = 108, 79  # ceil(107.8), ceil(78.4)
    assert m.ids_keep.shape == m.replace.shape == (8, 196 - n_drop)
    assert m.mask.sum(1).tolist() == [float(n_mask)] * 8
    assert m.replace.sum(1).tolist() == [n_mask - n_drop] * 8
    kept = torch.zeros(8, 196, dtype=torch.bool).scatter(1, m.ids_keep, True)
    masked = m.mask.bool()
    assert masked[~kept].all()  # every dropped patch is masked
    assert torch.equal(torch.gather(m.mask, 1, m.ids_keep).bool(), m.replace)
    assert (m.ids_keep.diff(dim=1) > 0).all()
    # one noise orders both: dropped < masked-kept < unmasked
    for n in range(8):
        drop, kept_masked = noise[n][~kept[n]], noise[n][kept[n] & masked[n]]
        assert drop.max() < kept_masked.min() and kept_masked.max() < noise[n][~masked[n]].min()


def test_token_masking_is_reproducible_from_a_generator():
    def draw(seed: int):
        return token_masking(4, 64, 0.5, 0.25, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not torch.equal(a.mask, c.mask)


def test_token_masking_ties_keep_exact_counts_and_edge_ratios():
    m = token_masking(2, 10, 0.5, 0.3, noise=torch.zeros(2, 10))
    assert m.mask.sum(1).tolist() == [5.0, 5.0] and m.ids_keep.shape == (2, 7)
    everything = token_masking(1, 4, 1.0, 0.0, noise=torch.rand(1, 4))
    assert everything.replace.all() and everything.ids_keep.tolist() == [[0, 1, 2, 3]]
    nothing = token_masking(1, 4, 0.0, 0.0, noise=torch.rand(1, 4))
    assert not nothing.replace.any() and nothing.mask.sum() == 0


@pytest.mark.parametrize(
    ("mask_ratio", "drop_ratio", "match"),
    [
        (0.3, 0.4, "must not exceed mask_ratio"),
        (1.1, 0.4, "mask_ratio"),
        (1.0, 1.0, "drop_ratio"),
        (0.5, -0.1, "drop_ratio"),
    ],
)
def test_token_masking_rejects_impossible_ratios(mask_ratio, drop_ratio, match):
    with pytest.raises(ValueError, match=match):
        token_masking(2, 16, mask_ratio, drop_ratio)


def test_mtm_ratio_is_the_truncated_normal_of_the_spec() -> None:
    u = torch.linspace(0, 1, 1001, dtype=torch.float64)
    ours = truncated_normal_ratio(u)
    mean, std, low, high = 0.45, 0.25, 0.4, 1.0
    expected = truncnorm.ppf(u.numpy(), (low - mean) / std, (high - mean) / std, loc=mean, scale=std)
    assert torch.allclose(ours, torch.from_numpy(expected), atol=1e-9)
    assert float(ours[0]) == low and float(ours[-1]) == high
    assert bool((ours[1:] >= ours[:-1]).all())  # monotone in u
    # a Python float is read in float64, as a float64 tensor is (not rounded through float32 first)
    assert all(
        float(truncated_normal_ratio(float(v))) == float(ours[i])
        for i, v in zip(range(0, 1001, 97), u[::97], strict=True)
    )
    # a ratio as a tensor (drawn on the device) masks exactly as the same ratio as a float
    noise = torch.rand(3, 196)
    for v in (0.0, 0.37, 0.5, 0.93, 1.0):
        ratio = truncated_normal_ratio(v)
        as_float, as_tensor = (token_masking(3, 196, r, 0.4, noise=noise) for r in (float(ratio), ratio))
        assert all(torch.equal(a, b) for a, b in zip(as_float, as_tensor, strict=True))
    # the mask counts it gives: ceil(196 r) masked of which ceil(196 * 0.4) = 79 dropped
    r = float(truncated_normal_ratio(0.5))
    m = token_masking(2, 196, r, 0.4, noise=torch.rand(2, 196))
    assert int(m.mask.sum(1)[0]) == math.ceil(196 * r) and m.ids_keep.shape[1] == 196 - 79
    with pytest.raises(ValueError, match=r"u must lie in \[0, 1\]"):
        truncated_normal_ratio(1.5)
    with pytest.raises(ValueError, match=r"0 <= low < high <= 1; got \[0.5, 0.4\]"):
        truncated_normal_ratio(0.5, low=0.5, high=0.4)
