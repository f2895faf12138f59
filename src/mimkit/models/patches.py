"""Images to patch vectors and back: the reference layout (tokens row-major, values in (py, px, c) order,
channel fastest), and Latent MIM's patches cut with gaps."""

from __future__ import annotations

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """[N, C, H, W] -> [N, L, p*p*C]; tokens row-major, values in (py, px, c) order (channel fastest)."""
    n, c, h, w = imgs.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
    x = imgs.reshape(n, c, h // p, p, w // p, p)
    return torch.einsum("nchpwq->nhwpqc", x).reshape(n, (h // p) * (w // p), p * p * c)


def gap_patchify(
    imgs: torch.Tensor,
    patch_size: int,
    gap: int,
    *,
    offsets: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Latent MIM's patches with gaps: the image is a grid of cells of ``patch_size + gap`` px and each
    cell gives one ``patch_size`` patch cut at its own random offset (oy, ox) in ``[0, gap)``, so
    neighbouring patches are 1 to 2 * gap - 1 px apart and never touch. ``offsets`` [N, gh, gw, 2] (row,
    column) fixes them; otherwise they are drawn on the CPU generator, row offsets first, then column
    offsets (the reference's order). Returns [N, L, p*p*C] in :func:`patchify`'s layout; gap 0 is
    :func:`patchify`."""
    if gap == 0:
        return patchify(imgs, patch_size)
    if gap < 0:
        raise ValueError(f"patch gap must be >= 0, got {gap}")
    n, c, h, w = imgs.shape
    p, cell = patch_size, patch_size + gap
    if h % cell or w % cell:
        raise ValueError(
            f"image size {h}x{w} is not divisible by the cell size {cell} (patch {p} + gap {gap})"
        )
    gh, gw = h // cell, w // cell
    if offsets is None:
        rows = torch.randint(0, gap, (n, gh, gw), generator=generator)
        cols = torch.randint(0, gap, (n, gh, gw), generator=generator)
        offsets = torch.stack([rows, cols], dim=-1)
    elif offsets.shape != (n, gh, gw, 2):
        raise ValueError(f"offsets must have shape {(n, gh, gw, 2)}, got {tuple(offsets.shape)}")
    if imgs.device.type == "cuda" and offsets.device.type == "cpu":
        offsets = offsets.pin_memory()  # a pageable copy would wait for the device
    offsets = offsets.to(imgs.device, non_blocking=True)
    span = torch.arange(p, device=imgs.device)
    top = (torch.arange(gh, device=imgs.device) * cell)[None, :, None, None] + offsets[..., 0, None] + span
    left = (torch.arange(gw, device=imgs.device) * cell)[None, None, :, None] + offsets[..., 1, None] + span
    pixel = (top[..., :, None] * w + left[..., None, :]).reshape(n, 1, -1).expand(-1, c, -1)  # [N, C, L*p*p]
    x = imgs.reshape(n, c, h * w).gather(2, pixel).reshape(n, c, gh * gw, p, p)
    return x.permute(0, 2, 3, 4, 1).reshape(n, gh * gw, p * p * c)


def unpatchify(
    patches: torch.Tensor, patch_size: int, grid: tuple[int, int], channels: int = 3
) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    n = patches.shape[0]
    (gh, gw), p = grid, patch_size
    x = patches.reshape(n, gh, gw, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(n, channels, gh * p, gw * p)
