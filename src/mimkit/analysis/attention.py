"""Attention maps and mean attention distance (LUT's evidence that its encoder attends more broadly than
MAE's). The attention is read from the encoder's own blocks, not from a copy of them: while recording,
each block runs timm's explicit attention path, and a hook on its attention dropout reads the softmax
that the block goes on to use."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import nn

from mimkit.analysis.batches import as_batches
from mimkit.eval.features import evaluating


@contextmanager
def recorded_attention(
    encoder: nn.Module,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    *,
    blocks: Sequence[int] | None = None,
) -> Iterator[list[torch.Tensor]]:
    """Within the block, every forward of ``encoder`` appends the softmax attention [N, heads, T, T]
    (T = prefix tokens + patches) of each of ``blocks`` (default: all; negative counts from the end) to
    the yielded list, in block order, or what ``reduce`` makes of it (so that the full maps of every block
    need not be held at once). Those blocks' fused (scaled-dot-product) path is switched off meanwhile so
    the probabilities exist; it is restored after."""
    records: list[torch.Tensor] = []
    keep = reduce or (lambda attn: attn)
    depth = len(encoder.blocks)
    chosen = range(depth) if blocks is None else [b + depth if b < 0 else b for b in blocks]
    for b in chosen:
        if not 0 <= b < depth:
            raise ValueError(f"block {b} is outside the encoder's {depth} blocks")
    attentions = [encoder.blocks[b].attn for b in sorted(set(chosen))]
    for attn in attentions:
        if not hasattr(attn, "fused_attn") or not isinstance(getattr(attn, "attn_drop", None), nn.Module):
            raise TypeError(
                f"{type(attn).__name__} has no explicit attention path to record (expected timm's "
                "Attention, with fused_attn and attn_drop)"
            )
    fused = [attn.fused_attn for attn in attentions]
    handles = [
        attn.attn_drop.register_forward_pre_hook(lambda _m, args: records.append(keep(args[0].detach())))
        for attn in attentions
    ]
    try:
        for attn in attentions:
            attn.fused_attn = False
        yield records
    finally:
        for attn, was in zip(attentions, fused, strict=True):
            attn.fused_attn = was
        for handle in handles:
            handle.remove()


@torch.no_grad()
def attention_maps(
    encoder: nn.Module, images: torch.Tensor, *, blocks: Sequence[int] | None = None
) -> torch.Tensor:
    """The full (unmasked) forward's attention of ``blocks`` (default: every block; ViT-B at 224 px holds
    about 22 MB per image for all twelve): [blocks, N, heads, T, T], float32."""
    with evaluating(encoder), recorded_attention(encoder, blocks=blocks) as records:
        encoder.forward_visible(images)
    return torch.stack(records).float()


def patch_distances(grid: tuple[int, int], patch_size: float = 1.0) -> torch.Tensor:
    """[L, L] Euclidean distances between patch centres, in units of ``patch_size`` per patch (pixels
    for a pixel encoder), patches row-major."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.flatten(), cols.flatten()], dim=1).double() * patch_size
    return torch.cdist(centres, centres)


def _row_distances(
    attn: torch.Tensor, grid: tuple[int, int], patch_size: float, prefix_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query patch of attention rows [..., T, T], with the prefix rows and columns dropped: the
    sum over key patches of attention x distance, and the attention's sum (float64, [..., L] each)."""
    length = grid[0] * grid[1]
    if attn.shape[-1] != attn.shape[-2] or attn.shape[-1] != prefix_tokens + length:
        raise ValueError(
            f"expected attention [..., {prefix_tokens + length}, {prefix_tokens + length}] for a "
            f"{grid[0]}x{grid[1]} grid with {prefix_tokens} prefix token(s); got {tuple(attn.shape)}"
        )
    patches = attn[..., prefix_tokens:, prefix_tokens:].double()
    dist = patch_distances(grid, patch_size).to(patches.device)
    return (patches * dist).sum(dim=-1), patches.sum(dim=-1)


def attention_distance(
    attn: torch.Tensor,
    grid: tuple[int, int],
    patch_size: float = 1.0,
    *,
    prefix_tokens: int = 1,
    renorm: bool = True,
) -> torch.Tensor:
    """Mean attention distance of attention rows [..., T, T]: for each query patch, the sum over key
    patches of attention x distance, averaged over the query patches -> [...]. The prefix (cls) rows and
    columns are dropped; with ``renorm`` each remaining row is rescaled to sum to 1 (else the attention a
    patch pays to cls counts as distance 0)."""
    weighted, mass = _row_distances(attn, grid, patch_size, prefix_tokens)
    rows = weighted / mass.clamp_min(1e-12) if renorm else weighted
    return rows.mean(dim=-1).float()


class AttentionDistance(NamedTuple):
    renorm: torch.Tensor  # [depth, heads]: cls dropped, rows renormalised
    raw: torch.Tensor  # [depth, heads]: cls dropped, rows as they are
    images: int


@torch.no_grad()
def mean_attention_distance(
    encoder: nn.Module, images: torch.Tensor | Iterable[torch.Tensor], *, batch_size: int = 64
) -> AttentionDistance:
    """Mean attention distance per (block, head), averaged over all the images (a tensor or batches of
    them), in the encoder's input units (pixels, or token cells for a token encoder)."""
    grid, patch = tuple(encoder.grid_size), encoder.patch_size
    prefix = encoder.num_prefix_tokens

    def both(attn: torch.Tensor) -> torch.Tensor:  # [N, H, T, T] -> [2, H], summed over the images
        weighted, mass = _row_distances(attn, grid, patch, prefix)  # one pass for both variants
        renorm = (weighted / mass.clamp_min(1e-12)).mean(dim=-1)
        return torch.stack([renorm.float().sum(dim=0), weighted.mean(dim=-1).float().sum(dim=0)])

    total, count = None, 0
    with evaluating(encoder):
        for batch in as_batches(images, batch_size):
            with recorded_attention(encoder, reduce=both) as records:
                encoder.forward_visible(batch)
            sums = torch.stack(records)  # [depth, 2, H]
            total = sums if total is None else total + sums
            count += batch.shape[0]
    if total is None:
        raise ValueError("mean attention distance needs at least one image")
    mean = (total / count).cpu()
    return AttentionDistance(mean[:, 0], mean[:, 1], count)


def query_maps(
    attn: torch.Tensor, grid: tuple[int, int], queries: Iterable[int | None], *, prefix_tokens: int = 1
) -> torch.Tensor:
    """From one block's attention [N, heads, T, T], what each query attends to among the patches:
    [Q, N, heads, gh, gw]. A query is a patch index (row-major), or None for the cls token."""
    queries = list(queries)
    rows = [0 if q is None else prefix_tokens + int(q) for q in queries]
    length = grid[0] * grid[1]
    for q in queries:
        if q is not None and not 0 <= int(q) < length:
            raise ValueError(f"query patch {q} is outside the {grid[0]}x{grid[1]} grid (0..{length - 1})")
    maps = attn[:, :, rows, prefix_tokens:]  # [N, H, Q, L]
    return maps.permute(2, 0, 1, 3).reshape(len(rows), attn.shape[0], attn.shape[1], *grid)
