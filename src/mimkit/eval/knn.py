"""Nearest-neighbour classification on frozen features. ``knn``: the DINO protocol (L2-normalised
features, the k most similar training images vote with weight exp(similarity / T)). ``lmim_nn``: the
Latent MIM reference's "NN" figure, a leave-one-out 1-nearest-neighbour within the evaluation set."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mimkit.data.loader import ViewDataset
from mimkit.data.sources import ImageSource, check_same_classes
from mimkit.distributed import DistEnv
from mimkit.eval.features import chance_top1, count_all, extract_features, topk_accuracy


@torch.no_grad()
def knn_predict(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    query_feats: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> torch.Tensor:
    """Class scores [Q, C] from a temperature-weighted vote of the k nearest (cosine) training features."""
    bank = F.normalize(train_feats.float(), dim=1)
    k = min(k, bank.shape[0])
    scores = []
    for start in range(0, query_feats.shape[0], chunk):
        q = F.normalize(query_feats[start : start + chunk].float(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(q.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        scores.append(votes)
    return torch.cat(scores) if scores else torch.zeros(0, num_classes)


@torch.no_grad()
def loo_nearest(feats: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """For each row, the index of its most cosine-similar other row (itself excluded). The reference takes
    the second of its top-2 hits, which is the same unless an exact duplicate outranks the query itself."""
    bank = F.normalize(feats.float(), dim=1)
    if bank.shape[0] < 2:
        raise ValueError("leave-one-out nearest neighbour needs at least 2 images")
    nearest = []
    for start in range(0, bank.shape[0], chunk):
        sim = bank[start : start + chunk] @ bank.T
        rows = torch.arange(sim.shape[0])
        sim[rows, rows + start] = -float("inf")
        nearest.append(sim.argmax(dim=1))
    return torch.cat(nearest)


def check_knn_sources(
    train: ImageSource, val: ImageSource, hint: str = "use an ImageFolder layout or .npz files with 'y'"
) -> None:
    """Both sources labelled, with the same classes; ``hint`` says how to fix a missing label."""
    for role, source in (("memory bank", train), ("query set", val)):
        if not source.has_labels:
            raise ValueError(f"k-NN needs labels, but the {role} '{source.name}' has none ({hint})")
    check_same_classes(train, val)


def knn_evaluate(
    encoder: nn.Module,
    train: ImageSource,
    val: ImageSource,
    transform: Any,
    env: DistEnv,
    *,
    k: int = 20,
    temperature: float = 0.07,
    pool: str = "cls",
    batch_size: int = 256,
    num_workers: int | None = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 of a k-NN classifier with ``train`` as the memory bank and ``val`` as the queries; both
    must name the same classes (:func:`check_same_classes`). Unreadable images are named on stderr, left
    out, and counted in ``skipped_images``."""
    check_knn_sources(train, val)
    kwargs = dict(pool=pool, batch_size=batch_size, num_workers=num_workers, autocast_dtype=autocast_dtype)
    skipped: list[str] = []
    bank, bank_labels = extract_features(
        encoder, ViewDataset(train, transform), env, skipped=skipped, **kwargs
    )
    queries, query_labels = extract_features(
        encoder, ViewDataset(val, transform), env, skipped=skipped, **kwargs
    )
    num_classes = max(len(train.classes), len(val.classes), int(bank_labels.max()) + 1)
    scores = knn_predict(bank, bank_labels, queries, num_classes=num_classes, k=k, temperature=temperature)
    return {
        "protocol": "knn",
        "k": k,
        "temperature": temperature,
        "pool": pool,
        "train": train.name,
        "val": val.name,
        "train_images": len(bank),
        "val_images": len(queries),
        "skipped_images": count_all(len(skipped), env),
        **topk_accuracy(scores, query_labels),
    }


def loo_nn_evaluate(
    encoder: nn.Module,
    val: ImageSource,
    transform: Any,
    env: DistEnv,
    *,
    pool: str = "mean_prenorm",
    batch_size: int = 256,
    num_workers: int | None = 0,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, Any]:
    """Latent MIM's NN accuracy: each image of ``val`` is labelled by its nearest other image of ``val``
    (cosine; by default the mean of the patch tokens before the final norm, as the reference). No memory
    bank and no vote; top-1 only. Unreadable images are named on stderr, left out, and counted in
    ``skipped_images``."""
    if not val.has_labels:
        raise ValueError(f"nearest-neighbour accuracy needs labels, but '{val.name}' has none")
    kwargs = dict(pool=pool, batch_size=batch_size, num_workers=num_workers, autocast_dtype=autocast_dtype)
    skipped: list[str] = []
    feats, labels = extract_features(encoder, ViewDataset(val, transform), env, skipped=skipped, **kwargs)
    hit = (labels[loo_nearest(feats)] == labels).float().mean().item()
    return {
        "protocol": "lmim_nn",
        "pool": pool,
        "val": val.name,
        "val_images": len(feats),
        "skipped_images": count_all(len(skipped), env),
        "top1": round(100.0 * hit, 3),
        "chance_top1": chance_top1(labels),
    }
