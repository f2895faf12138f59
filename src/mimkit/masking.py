"""Which tokens an encoder sees. Pure functions of explicit noise (or a generator), so any mask can be
reproduced exactly: tests fix it, parity checks feed the reference's noise, resume replays it.

Convention (MAE reference): ``noise ~ U[0, 1)`` per patch, ``ids_shuffle = argsort(noise)`` (ascending,
small noise = kept), the first ``int(L * (1 - r))`` shuffled ids are visible, and the binary ``mask`` is in
the original patch order with 0 = kept, 1 = removed. MTM (:func:`token_masking`) follows its own
reference the other way round: the lowest noise is masked.
"""

from __future__ import annotations

import math
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


class TokenMask(NamedTuple):
    ids_keep: torch.Tensor  # [N, K] the non-dropped patch ids, ascending (grid order), K = L - n_drop
    replace: torch.Tensor  # [N, K] bool: kept patches that are masked (their embedding -> the mask token)
    mask: torch.Tensor  # [N, L] float, original patch order, 1 = masked (dropped ones included)
    ids_restore: torch.Tensor  # [N, L] where each patch sits in cat([kept, dropped]), both ascending


def token_masking(
    batch: int,
    num_patches: int,
    mask_ratio: float,
    drop_ratio: float,
    *,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> TokenMask:
    """MAGE / SeiT++ MTM masking: one uniform noise per patch; the ``n_drop = ceil(L * drop_ratio)``
    lowest are dropped (the encoder never sees them) and the ``n_mask = ceil(L * mask_ratio)`` lowest are
    masked, so dropped is a subset of masked; masked patches that are kept enter the encoder as the mask
    token. The counts are exact (a stable argsort, where the reference's threshold could tie); the
    ceilings are the reference's formula. The kept ids stay in grid order, as the reference keeps them.
    ``mask_ratio`` may be a 0-dim tensor on the device (a ratio drawn there): the shapes depend only on
    ``drop_ratio``, so the masking then needs no host sync; such a ratio is not checked here."""
    if not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must lie in [0, 1); got {drop_ratio}")
    if not torch.is_tensor(mask_ratio):
        if not 0.0 <= mask_ratio <= 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1]; got {mask_ratio}")
        if drop_ratio > mask_ratio:
            raise ValueError(
                f"drop_ratio ({drop_ratio}) must not exceed mask_ratio ({mask_ratio}): dropped patches are "
                "masked"
            )
    noise = _given_or_drawn(noise, batch, num_patches, generator, device)
    n_drop = math.ceil(num_patches * drop_ratio)
    if torch.is_tensor(mask_ratio):
        n_mask = torch.ceil(num_patches * mask_ratio.to(noise.device, torch.float64))
    else:
        n_mask = math.ceil(num_patches * mask_ratio)
    order = torch.argsort(noise, dim=1, stable=True)  # lowest noise first
    ids_drop = order[:, :n_drop].sort(dim=1).values
    ids_keep = order[:, n_drop:].sort(dim=1).values
    positions = torch.arange(num_patches, device=noise.device).expand(batch, -1)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # each patch's place in the order
    mask = (rank < n_mask).float()
    ids_restore = torch.argsort(torch.cat([ids_keep, ids_drop], dim=1), dim=1)
    return TokenMask(ids_keep, mask.gather(1, ids_keep).bool(), mask, ids_restore)


def truncated_normal_ratio(
    u: float | torch.Tensor, *, mean: float = 0.45, std: float = 0.25, low: float = 0.4, high: float = 1.0
) -> torch.Tensor:
    """MTM's mask ratio (one per batch in SeiT++ and MAGE): a normal(mean, std) truncated to
    [low, high], as the inverse of its CDF at ``u`` in [0, 1] (explicit noise, so a batch's ratio can be
    replayed). The defaults are SeiT++'s pre-training script's (MAGE's class defaults are 0.55 / 0.25 on
    [0.5, 1]). Computed in float64: Phi^-1 is steep near the tails. A ``u`` on another device than the CPU
    stays there and is not checked (that would wait for the device)."""
    if not std > 0:
        raise ValueError(f"the ratio's std must be > 0; got {std}")
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"the ratio's range must satisfy 0 <= low < high <= 1; got [{low}, {high}]")
    u = torch.as_tensor(u, dtype=torch.float64)  # a tensor keeps its device
    if u.device.type == "cpu" and bool(((u < 0) | (u > 1)).any()):
        raise ValueError("u must lie in [0, 1]")
    a = torch.special.ndtr(torch.tensor((low - mean) / std, dtype=torch.float64))
    b = torch.special.ndtr(torch.tensor((high - mean) / std, dtype=torch.float64))
    ratio = mean + std * torch.special.ndtri(a + u * (b - a))
    return ratio.clamp(low, high)  # rounding at u = 0 or 1 stays inside the range
