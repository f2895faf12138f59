"""One feature extraction for every evaluation and analysis: an encoder (or any function of an image
batch) over a labelled source, sharded across ranks and gathered back in source order."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mimkit.data.loader import EpochSampler, ViewDataset, make_loader
from mimkit.data.sources import ImageSource
from mimkit.data.token_sources import check_input
from mimkit.distributed import DistEnv, all_gather_rows
from mimkit.progress import progress


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode (no dropout, no drop-path) for the block, then back to its own mode."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    dataset: ViewDataset,
    env: DistEnv,
    *,
    pool: str = "cls",
    batch_size: int = 256,
    num_workers: int | None = 0,
    autocast_dtype: torch.dtype | None = None,
    encode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    out_dim: int | None = None,
    skipped: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [N, D] (float32, on the CPU) and labels [N] of every readable image, in source order;
    under DDP each rank encodes a shard and all ranks receive everything. ``encode`` replaces
    ``encoder.features(images, pool)`` (a classifier's logits, say; ``out_dim`` is then their width).
    Each unreadable image is named on stderr (by the rank that met it) and left out; ``skipped``, when
    given, receives this rank's messages (:func:`count_all` totals them over the ranks)."""
    spec = getattr(encoder, "input_spec", None)
    if spec is not None:
        check_input(spec, dataset.source)
        if spec.kind == "token_embeddings" and encode is None:
            raise ValueError(
                "this encoder takes codebook vectors (SeiT): its features are read through a classifier that "
                "embeds the ids with its codebook (mimkit finetune); k-NN and linear probes take pixel or "
                "token-id encoders"
            )
    sampler = EpochSampler(len(dataset), shuffle=False, rank=env.rank, world_size=env.world_size, pad=False)
    loader = make_loader(
        dataset,
        sampler,
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=False,
        pin_memory=env.device.type == "cuda",
    )
    feats, labels, indices = [], [], []
    name = getattr(getattr(dataset, "source", None), "name", "images")
    bar = progress(len(sampler), f"features of {name}", "img", enabled=env.is_main)
    with evaluating(encoder), bar:
        for batch in loader:
            bar.update(len(batch["index"]))
            for message in batch.get("skipped", []):
                print(f"warning: skipped unreadable image {message}", file=sys.stderr, flush=True)
            if skipped is not None:
                skipped.extend(batch.get("skipped", []))
            if "label" not in batch:
                continue
            images = batch["image"].to(env.device, non_blocking=True)
            with torch.autocast(env.device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                f = encode(images) if encode is not None else encoder.features(images, pool=pool)
            feats.append(f.float())
            labels.append(batch["label"].to(env.device))
            indices.append(batch["index"].to(env.device))
    dim = out_dim or encoder.embed_dim
    feats_t = torch.cat(feats) if feats else torch.zeros(0, dim, device=env.device)
    labels_t = torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long, device=env.device)
    index_t = torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long, device=env.device)
    feats_t, labels_t, index_t = (all_gather_rows(t, env) for t in (feats_t, labels_t, index_t))
    order = torch.argsort(index_t)
    return feats_t[order].cpu(), labels_t[order].cpu()


def count_all(n: int, env: DistEnv) -> int:
    """The sum of ``n`` over the ranks (every rank must call it)."""
    if not env.enabled:
        return n
    return int(all_gather_rows(torch.tensor([n], device=env.device), env).sum())


def topk_accuracy(
    scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)
) -> dict[str, float]:
    out = {}
    for k in ks:
        if k > scores.shape[1]:
            continue
        hit = (scores.topk(k, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
        out[f"top{k}"] = round(100.0 * hit, 3)
    out["chance_top1"] = chance_top1(labels)
    return out


def chance_top1(labels: torch.Tensor) -> float:
    """The top-1 of always answering the most common class of the evaluated labels (100 / classes when
    they are balanced): what an encoder that learnt nothing scores."""
    if labels.numel() == 0:
        return float("nan")
    counts = torch.bincount(labels.long().clamp_min(0))
    return round(100.0 * counts.max().item() / labels.numel(), 3)


def chance_warning(result: dict[str, Any], what: str) -> str | None:
    """One line when a top-1 is not told apart from chance: within 3 standard errors of the most common
    class's share, over the images evaluated."""
    top1, chance = result.get("top1"), result.get("chance_top1")
    images = result.get("val_images") or result.get("images")
    if top1 is None or chance is None or not images or chance != chance:  # NaN: nothing evaluated
        return None
    p = chance / 100
    margin = 300 * math.sqrt(p * (1 - p) / images)
    if top1 > chance + margin:
        return None
    return (
        f"{what} top-1 {top1:.2f}% is at chance level: always answering the most common class scores "
        f"{chance:.2f}% on these {images} images (3 standard errors: {margin:.2f} points)"
    )


def classify(
    module: nn.Module,
    predict: Callable[[torch.Tensor], torch.Tensor],
    source: ImageSource,
    transform: Any,
    env: DistEnv,
    *,
    batch_size: int,
    num_workers: int | None,
    dtype: torch.dtype | None,
) -> dict[str, float]:
    """Top-1 / top-5 of ``predict(images) -> logits`` (a method of ``module``) on a labelled source."""
    logits, labels = extract_features(
        module,
        ViewDataset(source, transform),
        env,
        batch_size=batch_size,
        num_workers=num_workers,
        autocast_dtype=dtype,
        encode=predict,
        out_dim=module.num_classes,
    )
    return {**topk_accuracy(logits, labels), "images": len(labels)}
