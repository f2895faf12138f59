"""Token-space augmentations of SeiT / SeiT++ on whole batches, on the tensors' device.

Two kinds of input: id grids [B, H, W] (Token-EDA: synonym replacement and block swaps) and emb maps
[B, D, H, W] of codebook vectors (Emb-Noise, ColorAdapt, Mixup/CutMix), which
:func:`~mimkit.tokens.codebook.requantize` maps back to ids afterwards. The geometric ones (resized, centre
and random crops, flips) are :mod:`mimkit.data.token_geometry`, which draws through the helpers here.

Every random function takes ``generator``: a ``torch.Generator`` on the tensors' device makes the draw
reproducible; ``None`` uses torch's global RNG. The one exception is :func:`token_mixup`, which is
timm's ``Mixup`` and draws from numpy's global RNG. Random parameters are drawn by separate
``*_params`` functions or returned on request, so the deterministic part can be checked on its own.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from timm.data import Mixup
from torch import nn

from mimkit.tokens.codebook import check_ids, embed, requantize

__all__ = [
    "COLOUR_CHOICES",
    "EDA_CHOICES",
    "ColourChoice",
    "SwapParams",
    "TokenEDA",
    "TokenMixup",
    "apply_swap_code",
    "color_adapt",
    "colour_choice",
    "draw_device",
    "emb_noise",
    "embed",
    "replace_synonym",
    "requantize",
    "swap_code",
    "swap_code_params",
    "token_eda",
    "token_mixup",
]

COLOUR_CHOICES = ("noise", "coloradapt", "identity")
EDA_CHOICES = ("replace", "swap", "identity")


# -------------------------------------------------------------------------------------- shared checks


def draw_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """The device to draw on; a generator on another device would fail inside torch with a vague error."""
    if device is None:
        return generator.device if generator is not None else torch.device("cpu")
    device = torch.device(device)
    if generator is not None and generator.device.type != device.type:
        raise ValueError(
            f"the generator is on '{generator.device}' but the tensors are on '{device}'; "
            f"create it with torch.Generator(device='{device}')"
        )
    return device


def uniform(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    return torch.rand(shape, generator=generator, device=draw_device(generator, device), dtype=dtype)


def _pick_exactly(
    batch: int, fraction: float, generator: torch.Generator | None, device: torch.device
) -> torch.Tensor:
    """``int(batch * fraction)`` distinct sample indices drawn uniformly (SeiT's ``randperm`` selection)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    perm = torch.randperm(batch, generator=generator, device=draw_device(generator, device))
    return perm[: int(batch * fraction)]


def _selected_mask(batch: int, chosen: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(batch, dtype=torch.bool, device=chosen.device)
    mask[chosen] = True
    return mask


def per_sample(flags: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[B] -> [B, 1, ..., 1] to broadcast a per-sample choice against ``like``."""
    return flags.view(-1, *([1] * (like.ndim - 1)))


def _check_probabilities(*probs: float, names: tuple[str, ...]) -> None:
    if any(p < 0 for p in probs) or sum(probs) > 1 + 1e-9:
        shown = ", ".join(f"{n}={p}" for n, p in zip(names, probs, strict=True))
        raise ValueError(f"probabilities must be >= 0 and sum to at most 1, got {shown}")


def check_emb(x: torch.Tensor, what: str = "emb map") -> None:
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(
            f"expected a floating {what} [B, D, H, W], got shape {tuple(x.shape)} dtype {x.dtype}"
        )


# ------------------------------------------------------------------------------------ Token-EDA (ids)


def replace_synonym(
    ids: torch.Tensor,
    table: torch.Tensor,
    prob: float = 0.25,
    *,
    generator: torch.Generator | None = None,
    counts: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace each id independently with probability ``prob`` by one of its synonyms, picked uniformly
    among the columns of ``table`` [K, t] (:func:`~mimkit.tokens.codebook.synonym_table`).

    ``counts`` [K] (:func:`~mimkit.tokens.codebook.synonym_counts`) limits the pick to the first
    ``counts[id]`` columns, so that a synonym list shorter than ``t`` is still sampled uniformly."""
    if table.ndim != 2 or table.shape[1] < 1:
        raise ValueError(f"expected a synonym table [K, t], got shape {tuple(table.shape)}")
    if not 0.0 <= prob <= 1.0:
        raise ValueError(f"prob must be in [0, 1], got {prob}")
    table = table.to(ids.device)
    check_ids(ids, table.shape[0])
    flat = ids.long()
    replace = uniform(tuple(ids.shape), generator, ids.device) < prob
    position = uniform(tuple(ids.shape), generator, ids.device)
    columns = table.shape[1] if counts is None else counts.to(ids.device)[flat]
    column = (position * columns).long().clamp_(max=table.shape[1] - 1)
    if counts is not None:
        column = torch.minimum(column, columns - 1)
    return torch.where(replace, table[flat, column], flat).to(ids.dtype)


class SwapParams(NamedTuple):
    side: torch.Tensor  # [B] long, block side s (0 = no swap)
    first: torch.Tensor  # [B, 2] long, (row, col) of the first block's top-left corner
    second: torch.Tensor  # [B, 2] long, (row, col) of the second block's top-left corner


def swap_code_params(
    batch: int,
    height: int,
    width: int,
    scale: float = 0.25,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> SwapParams:
    """SwapCode's draw, per sample: side ``s = floor(min(H, W) * U(0, scale))``, then two top-left corners
    uniform over rows [0, H-1-s] and columns [0, W-1-s] (inclusive), drawn again until they are more than
    ``s`` apart (Euclidean). Rejection runs in rounds over the whole batch, not a loop per sample."""
    if not 0.0 <= scale <= 1.0:
        raise ValueError(f"swap scale must be in [0, 1], got {scale}")
    device = draw_device(generator, device)
    short = min(height, width)
    largest = max(math.ceil(short * scale) - 1, 0)
    if math.hypot(height - 1 - largest, width - 1 - largest) <= largest:
        raise ValueError(
            f"swap scale {scale} allows blocks of side {largest} on a {height}x{width} grid, where no two "
            f"corners are more than {largest} apart; use a smaller scale"
        )
    side = (uniform((batch,), generator, device, torch.float64) * (short * scale)).floor().long()
    side = side.clamp_(max=largest)
    span = torch.stack([height - side, width - side], dim=1)  # number of valid corner rows / columns
    first = torch.zeros(batch, 2, dtype=torch.long, device=device)
    second = torch.zeros_like(first)
    pending = torch.ones(batch, dtype=torch.bool, device=device)
    while bool(pending.any()):
        a = (uniform((batch, 2), generator, device, torch.float64) * span).long()
        b = (uniform((batch, 2), generator, device, torch.float64) * span).long()
        accept = pending & ((a - b).square().sum(1) > side.square())  # |a - b| > s, in integers
        first[accept], second[accept] = a[accept], b[accept]
        pending &= ~accept
    return SwapParams(side, first, second)


def apply_swap_code(ids: torch.Tensor, params: SwapParams) -> torch.Tensor:
    """Exchange each sample's two ``s x s`` blocks of ``ids`` [B, ..., H, W] as SeiT does: the first
    block is overwritten from the original second block, then the second block from the original first
    block, so where the blocks overlap the second write wins (defined, if not a true swap)."""
    batch, height, width = ids.shape[0], ids.shape[-2], ids.shape[-1]
    device = ids.device
    side, first, second = (p.to(device) for p in params)
    rows = torch.arange(height, device=device).view(1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, width)
    s = side.view(batch, 1, 1)
    r1, c1 = first[:, 0].view(batch, 1, 1), first[:, 1].view(batch, 1, 1)
    r2, c2 = second[:, 0].view(batch, 1, 1), second[:, 1].view(batch, 1, 1)

    def inside(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (rows >= r) & (rows < r + s) & (cols >= c) & (cols < c + s)

    into_first, into_second = inside(r1, c1), inside(r2, c2)
    source_row = torch.where(into_second, rows - r2 + r1, torch.where(into_first, rows - r1 + r2, rows))
    source_col = torch.where(into_second, cols - c2 + c1, torch.where(into_first, cols - c1 + c2, cols))
    source = (source_row * width + source_col).view(batch, 1, height * width)
    flat = ids.reshape(batch, -1, height * width)
    return flat.gather(2, source.expand(-1, flat.shape[1], -1)).view(ids.shape)


def swap_code(
    ids: torch.Tensor,
    scale: float = 0.25,
    *,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, SwapParams]:
    """SwapCode on ids [B, H, W]: per sample, swap two random ``s x s`` blocks (see
    :func:`swap_code_params` and :func:`apply_swap_code`); ``s = 0`` leaves the sample unchanged."""
    params = swap_code_params(
        ids.shape[0], ids.shape[-2], ids.shape[-1], scale, generator=generator, device=ids.device
    )
    out = apply_swap_code(ids, params)
    return (out, params) if return_params else out


def token_eda(
    ids: torch.Tensor,
    table: torch.Tensor | None,
    rc_prob: float,
    sc_prob: float,
    *,
    replace_prob: float = 0.25,
    swap_scale: float = 0.25,
    counts: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    return_choice: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Token-EDA: per sample, ReplaceSynonym with probability ``rc_prob``, SwapCode with ``sc_prob``,
    otherwise unchanged. The choice [B] (0 replace, 1 swap, 2 identity; see ``EDA_CHOICES``) is returned
    with ``return_choice``. Both ops run on the whole batch and each sample keeps its chosen result."""
    _check_probabilities(rc_prob, sc_prob, names=("rc_prob", "sc_prob"))
    if rc_prob > 0 and table is None:
        raise ValueError("token_eda with rc_prob > 0 needs a synonym table")
    u = uniform((ids.shape[0],), generator, ids.device)
    choice = torch.full_like(u, 2, dtype=torch.long)
    choice[u < rc_prob + sc_prob] = 1
    choice[u < rc_prob] = 0
    out = ids.clone()
    if rc_prob > 0:
        replaced = replace_synonym(ids, table, replace_prob, generator=generator, counts=counts)
        out = torch.where(per_sample(choice == 0, ids), replaced, out)
    if sc_prob > 0:
        swapped = swap_code(ids, swap_scale, generator=generator)
        out = torch.where(per_sample(choice == 1, ids), swapped, out)
    return (out, choice) if return_choice else out


# ---------------------------------------------------------------------------------- colour (emb maps)


def emb_noise(
    x: torch.Tensor,
    scale: float = 1.0,
    std: float = 1.0,
    *,
    fraction: float = 0.5,
    generator: torch.Generator | None = None,
    return_selected: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Emb-Noise: exactly ``int(B * fraction)`` random samples get ``x + scale * N(0, 1)[D, 1, 1] +
    std * N(0, 1)[D, H, W]`` (a per-channel offset plus per-position noise, in the codebook's absolute
    units); the others are returned bit-identical. Unlike SeiT, ``x`` itself is not modified.
    ``return_selected`` also gives the [B] bool mask of the noised samples."""
    check_emb(x)
    batch, dim, height, width = x.shape
    chosen = _pick_exactly(batch, fraction, generator, x.device)
    n = chosen.shape[0]
    offset = torch.randn(n, dim, 1, 1, generator=generator, device=x.device, dtype=x.dtype)
    noise = torch.randn(n, dim, height, width, generator=generator, device=x.device, dtype=x.dtype)
    out = x.clone()
    out[chosen] = x[chosen] + (offset * scale + noise * std)
    return (out, _selected_mask(batch, chosen)) if return_selected else out


def color_adapt(
    x: torch.Tensor,
    *,
    fraction: float = 0.5,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    return_selected: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ColorAdapt (AdaIN with the reversed batch as style): sample i's channels are standardised by their
    own mean and unbiased std over (H, W) and given those of sample j = B-1-i,
    ``x' = (x - mu_i) / (sigma_i + eps) * sigma_j + mu_j``; exactly ``int(B * fraction)`` random samples
    are replaced by x', the others returned bit-identical, ``x`` itself unmodified.

    SeiT has no ``eps``, so a constant channel gives NaN there; here it becomes ``mu_j``."""
    check_emb(x)
    batch, _, height, width = x.shape
    if height * width < 2:
        raise ValueError(f"color_adapt needs at least 2 positions per map for a std, got {height}x{width}")
    chosen = _pick_exactly(batch, fraction, generator, x.device)
    partner = batch - 1 - chosen
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True)  # unbiased, as torch.std by default
    out = x.clone()
    out[chosen] = (x[chosen] - mean[chosen]) / (std[chosen] + eps) * std[partner] + mean[partner]
    return (out, _selected_mask(batch, chosen)) if return_selected else out


def colour_choice(
    x: torch.Tensor,
    noise_prob: float,
    coloradapt_prob: float,
    *,
    noise_scale: float = 1.0,
    noise_std: float = 1.0,
    eps: float = 1e-5,
    generator: torch.Generator | None = None,
    return_choice: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, str]:
    """One of Emb-Noise (``noise_prob``), ColorAdapt (``coloradapt_prob``) or identity (the rest) for the
    whole BATCH, as SeiT's ``RandomChoice``; identity returns ``x`` itself. ``return_choice`` also gives
    the branch's name (one of ``COLOUR_CHOICES``)."""
    _check_probabilities(noise_prob, coloradapt_prob, names=("noise_prob", "coloradapt_prob"))
    u = float(uniform((1,), generator, x.device))
    if u < noise_prob:
        choice, out = "noise", emb_noise(x, noise_scale, noise_std, generator=generator)
    elif u < noise_prob + coloradapt_prob:
        choice, out = "coloradapt", color_adapt(x, eps=eps, generator=generator)
    else:
        choice, out = "identity", x
    return (out, choice) if return_choice else out


# ---------------------------------------------------------------------------------- Mixup / CutMix


def _check_mixup_batch(x: torch.Tensor, target: torch.Tensor) -> None:
    check_emb(x)
    if x.shape[0] % 2:
        raise ValueError(
            f"token Mixup/CutMix pairs sample i with B-1-i and needs an even batch, got {x.shape[0]}"
        )
    if target.shape != (x.shape[0],):
        raise ValueError(f"expected class ids [B] = [{x.shape[0]}], got shape {tuple(target.shape)}")


def token_mixup(
    x: torch.Tensor,
    target: torch.Tensor,
    *,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 1.0,
    label_smoothing: float = 0.1,
    switch_prob: float = 0.5,
    prob: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup/CutMix of emb maps [B, D, H, W] with class ids [B] by timm's ``Mixup`` in mode "batch"
    (one lambda for the batch, partner = reversed batch); returns (mixed maps, soft targets [B, classes]).

    Defaults are SeiT's base path (CutMix only, label smoothing 0.1); TokenAdapt uses mixup_alpha 0.8.
    timm draws from numpy's global RNG, not a torch generator: seed ``np.random`` to reproduce a draw.
    ``x`` is not modified (timm mixes in place, so a copy is mixed)."""
    _check_mixup_batch(x, target)
    mixer = Mixup(
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        prob=prob,
        switch_prob=switch_prob,
        mode="batch",
        label_smoothing=label_smoothing,
        num_classes=num_classes,
    )
    return mixer(x.clone(), target)


# ----------------------------------------------------------------------------------- module wrappers


class TokenEDA(nn.Module):
    """:func:`token_eda` with its synonym table and probabilities held (as non-persistent buffers, so
    they follow ``.to(device)`` but stay out of checkpoints)."""

    def __init__(
        self,
        table: torch.Tensor | None,
        rc_prob: float = 0.25,
        sc_prob: float = 0.25,
        *,
        replace_prob: float = 0.25,
        swap_scale: float = 0.25,
        counts: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        _check_probabilities(rc_prob, sc_prob, names=("rc_prob", "sc_prob"))
        self.rc_prob, self.sc_prob = rc_prob, sc_prob
        self.replace_prob, self.swap_scale = replace_prob, swap_scale
        self.register_buffer("table", table, persistent=False)
        self.register_buffer("counts", counts, persistent=False)

    def forward(self, ids: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return token_eda(
            ids,
            self.table,
            self.rc_prob,
            self.sc_prob,
            replace_prob=self.replace_prob,
            swap_scale=self.swap_scale,
            counts=self.counts,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"rc_prob={self.rc_prob}, sc_prob={self.sc_prob}, replace_prob={self.replace_prob}, "
            f"swap_scale={self.swap_scale}"
        )


class ColourChoice(nn.Module):
    """:func:`colour_choice` with its probabilities and noise magnitudes held."""

    def __init__(
        self,
        noise_prob: float = 0.5,
        coloradapt_prob: float = 0.25,
        *,
        noise_scale: float = 1.0,
        noise_std: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        _check_probabilities(noise_prob, coloradapt_prob, names=("noise_prob", "coloradapt_prob"))
        self.noise_prob, self.coloradapt_prob = noise_prob, coloradapt_prob
        self.noise_scale, self.noise_std, self.eps = noise_scale, noise_std, eps

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return colour_choice(
            x,
            self.noise_prob,
            self.coloradapt_prob,
            noise_scale=self.noise_scale,
            noise_std=self.noise_std,
            eps=self.eps,
            generator=generator,
        )

    def extra_repr(self) -> str:
        return (
            f"noise_prob={self.noise_prob}, coloradapt_prob={self.coloradapt_prob}, "
            f"noise_scale={self.noise_scale}, noise_std={self.noise_std}"
        )


class TokenMixup(nn.Module):
    """:func:`token_mixup` with its settings held; draws from numpy's global RNG (timm)."""

    def __init__(
        self,
        num_classes: int,
        *,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 1.0,
        label_smoothing: float = 0.1,
        switch_prob: float = 0.5,
        prob: float = 1.0,
    ) -> None:
        super().__init__()
        self.mixer = Mixup(
            mixup_alpha=mixup_alpha,
            cutmix_alpha=cutmix_alpha,
            prob=prob,
            switch_prob=switch_prob,
            mode="batch",
            label_smoothing=label_smoothing,
            num_classes=num_classes,
        )

    def forward(self, x: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_mixup_batch(x, target)
        return self.mixer(x.clone(), target)

    def extra_repr(self) -> str:
        m = self.mixer
        return (
            f"num_classes={m.num_classes}, mixup_alpha={m.mixup_alpha}, cutmix_alpha={m.cutmix_alpha}, "
            f"label_smoothing={m.label_smoothing}, switch_prob={m.switch_prob}, prob={m.mix_prob}"
        )
