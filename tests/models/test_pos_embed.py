import math

import numpy as np
import pytest
import torch

from mimkit.models.pos_embed import resample_pos_embed, sincos_2d


def spec_table(dim: int, grid: int) -> np.ndarray:
    """The MAE layout written out entry by entry from the spec (section 1)."""
    d = dim // 2
    table = np.zeros((1 + grid * grid, dim))
    for row in range(grid):
        for col in range(grid):
            t = 1 + row * grid + col
            for k in range(d // 2):
                w = 10000 ** (-2 * k / d)
                table[t, k] = math.sin(col * w)
                table[t, d // 2 + k] = math.cos(col * w)
                table[t, d + k] = math.sin(row * w)
                table[t, d + d // 2 + k] = math.cos(row * w)
    return table


@pytest.mark.parametrize(("dim", "grid"), [(16, 4), (64, 3)])
def test_sincos_matches_the_spec_layout(dim, grid):
    ours = sincos_2d(dim, grid)
    assert ours.shape == (1, 1 + grid * grid, dim)
    assert ours.dtype == torch.float32
    np.testing.assert_allclose(ours[0].numpy(), spec_table(dim, grid), atol=1e-6)


def test_cls_slot_is_zero_and_first_half_encodes_the_column():
    table = sincos_2d(32, 4)[0]
    assert torch.count_nonzero(table[0]) == 0
    # tokens in the same column share the first half; tokens in the same row share the second half
    same_col = table[1 + 0 * 4 + 2], table[1 + 3 * 4 + 2]
    same_row = table[1 + 1 * 4 + 0], table[1 + 1 * 4 + 3]
    assert torch.equal(same_col[0][:16], same_col[1][:16]) and not torch.equal(
        same_col[0][16:], same_col[1][16:]
    )
    assert torch.equal(same_row[0][16:], same_row[1][16:]) and not torch.equal(
        same_row[0][:16], same_row[1][:16]
    )


def test_scaled_coords_place_positions_on_0_to_grid():
    table = sincos_2d(8, 3, cls_token=False, scaled_coords=True)[0]
    # column coordinate of token (0, 2) is linspace(0, 1, 3)[2] * 3 = 3 -> first channel sin(3 * w_0)
    assert table[2, 0].item() == pytest.approx(math.sin(3.0), abs=1e-6)


def test_resample_keeps_values_for_the_same_grid_and_changes_shape_otherwise():
    table = sincos_2d(16, 4)
    assert resample_pos_embed(table, (4, 4)) is table
    bigger = resample_pos_embed(table, (8, 8))
    assert bigger.shape == (1, 65, 16)
    assert torch.equal(bigger[:, 0], table[:, 0])


def test_width_must_be_divisible_by_four():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_2d(30, 4)
