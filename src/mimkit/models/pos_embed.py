"""Fixed 2-D sine-cosine position tables and their resampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sincos_2d(
    dim: int,
    grid_size: int | tuple[int, int],
    *,
    cls_token: bool = True,
    scaled_coords: bool = False,
) -> torch.Tensor:
    """A [1, (1+)H*W, dim] table in the MAE layout.

    Token t = row * W + col. Channels [0, dim/2) encode the column, [dim/2, dim) the row; each half is
    [sin(x w_k)] ++ [cos(x w_k)] with w_k = 10000^(-4k/dim). The cls slot (row 0) is zeros.
    ``scaled_coords`` places the H (or W) positions on linspace(0, 1) * H instead of 0..H-1, which is the
    layout the Latent MIM reference uses.
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs a width divisible by 4, got {dim}")
    h, w = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def coords(n: int) -> torch.Tensor:
        if scaled_coords:
            return torch.linspace(0, 1, n, dtype=torch.float64) * n
        return torch.arange(n, dtype=torch.float64)

    rows, cols = torch.meshgrid(coords(h), coords(w), indexing="ij")

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    if cls_token:
        table = torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0)
    return table.float().unsqueeze(0)


def resample_pos_embed(
    pos_embed: torch.Tensor, new_grid: tuple[int, int], num_prefix_tokens: int = 1
) -> torch.Tensor:
    """Bicubic resampling of a [1, prefix + H*W, D] table to another grid; a no-op for the same grid."""
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = round(grid.shape[1] ** 0.5)
    if old * old != grid.shape[1]:
        raise ValueError(f"position table of {grid.shape[1]} grid tokens is not square")
    if (old, old) == tuple(new_grid):
        return pos_embed
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=new_grid, mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
