"""Which tokens an encoder sees. Pure functions of explicit noise (or a generator), so any mask can be
reproduced exactly: tests fix it, parity checks feed the reference's noise, resume replays it.

Convention (MAE reference): ``noise ~ U[0, 1)`` per patch, ``ids_shuffle = argsort(noise)`` (ascending,
small noise = kept), the first ``int(L * (1 - r))`` shuffled ids are visible, and the binary ``mask`` is in
the original patch order with 0 = kept, 1 = removed.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Mask(NamedTuple):
    ids_keep: torch.Tensor  # [N, K] visible patch ids, in shuffled (random) order
    ids_restore: torch.Tensor  # [N, L] position of each patch in the shuffled order
    mask: torch.Tensor  # [N, L] float, original patch order, 0 = kept, 1 = removed
    ids_shuffle: torch.Tensor  # [N, L] argsort of the noise


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Visible patches per sample: floor, as the reference (196 patches at 0.75 keep 49)."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    return int(num_patches * (1 - mask_ratio))


def uniform_noise(
    batch: int,
    num_patches: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    if generator is not None:
        device = generator.device
    return torch.rand(batch, num_patches, generator=generator, device=device)


def _given_or_drawn(
    noise: torch.Tensor | None,
    batch: int,
    num_patches: int,
    generator: torch.Generator | None,
    device: torch.device | str | None,
) -> torch.Tensor:
    """The caller's noise (checked for shape), or fresh uniform noise."""
    if noise is None:
        return uniform_noise(batch, num_patches, generator=generator, device=device)
    if noise.shape != (batch, num_patches):
        raise ValueError(f"noise must have shape {(batch, num_patches)}, got {tuple(noise.shape)}")
    return noise


def random_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Mask:
    """Per-sample uniform random masking with the reference's convention (see the module docstring)."""
    noise = _given_or_drawn(noise, batch, num_patches, generator, device)
    keep = num_visible(num_patches, mask_ratio)
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_patches, device=noise.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Mask(ids_shuffle[:, :keep], ids_restore, mask, ids_shuffle)


def disjoint_pair(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> tuple[Mask, torch.Tensor]:
    """LUT's two views: one shuffle per sample; view 1 keeps the first K = int(L * (1 - r)) shuffled ids
    (with its mask and restore ids, as :func:`random_masking`), view 2 the next K, so the two views see
    disjoint grid positions. Needs r >= 0.5. Returns (view 1's Mask, view 2's ids [N, K])."""
    if mask_ratio < 0.5:
        raise ValueError(f"two disjoint views need mask_ratio >= 0.5; got {mask_ratio}")
    first = random_masking(batch, num_patches, mask_ratio, noise=noise, generator=generator, device=device)
    keep = first.ids_keep.shape[1]
    return first, first.ids_shuffle[:, keep : 2 * keep]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x[n, ids[n, k]] for a [N, L, C] tensor and [N, K] ids."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


class LatentSplit(NamedTuple):
    visible: torch.Tensor  # [N, V] the online encoder's patch ids, in permutation order
    masked: torch.Tensor  # [N, L - V] the patches to predict, in permutation order
    target: torch.Tensor  # [N, T] what the target encoder sees: the masked ids, or all L (masked last)


def visible_target_split(
    batch: int,
    num_patches: int,
    num_visible: int,
    *,
    mask_target: bool = True,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> LatentSplit:
    """Latent MIM's views: one permutation per sample (argsort of uniform noise); its first
    ``num_visible`` ids are visible, the rest masked. With ``mask_target`` the target encoder sees only
    the masked patches; without it all of them, in permutation order, so that its last L - V outputs are
    the targets either way."""
    if not 0 < num_visible < num_patches:
        raise ValueError(
            f"num_visible must lie in [1, {num_patches - 1}] for {num_patches} patches; got {num_visible}"
        )
    order = torch.argsort(_given_or_drawn(noise, batch, num_patches, generator, device), dim=1)
    masked = order[:, num_visible:]
    return LatentSplit(order[:, :num_visible], masked, masked if mask_target else order)
