import pytest
import torch

from mimkit.masking import gather_tokens, num_visible, random_masking


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
