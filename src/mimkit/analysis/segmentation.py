"""Unsupervised segmentation by clustering one image's patch features, and their t-SNE (Latent MIM's
evidence that its patch features carry the image's parts). Procedure (no reference code exists): the
last block's patch tokens, L2-normalised, Ward hierarchical clustering cut at several k (nested
partitions of one dendrogram), t-SNE of the same features coloured by cluster."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.hierarchy import cut_tree, linkage
from sklearn.manifold import TSNE
from torch import nn

from mimkit.analysis.batches import as_batches
from mimkit.eval.features import evaluating


def upsampled_encoder(encoder: nn.Module, factor: int) -> nn.Module:
    """A copy of a pixel encoder that takes images ``factor`` times larger, for a finer patch grid: the
    same weights, its sin-cos position table resampled bicubically to the new grid (timm's
    ``set_input_size``). The spec leaves open whether the table is resampled or regenerated on finer
    coordinates; resampling is what timm does for any ViT."""
    if factor == 1:
        return encoder
    if factor < 1:
        raise ValueError(f"the upsampling factor must be a positive integer; got {factor}")
    if encoder.stem.kind != "pixels":
        raise ValueError(
            f"upsampled input applies to pixel encoders; this one takes {encoder.stem.kind.replace('_', ' ')}"
        )
    bigger = copy.deepcopy(encoder)
    bigger.set_input_size(img_size=encoder.patch_embed.img_size[0] * factor)
    return bigger


@torch.no_grad()
def patch_features(
    encoder: nn.Module,
    images: torch.Tensor | Iterable[torch.Tensor],
    *,
    upsample: int = 1,
    final_norm: bool = False,
    batch_size: int = 64,
) -> torch.Tensor:
    """The last block's patch tokens, cls excluded: [N, L, D] (float32, CPU). Before the final norm by
    default (the feature Latent MIM's nearest-neighbour evaluation reads); ``upsample`` feeds pixel
    images ``upsample`` times larger (bilinear) for an ``upsample``-times finer grid."""
    model = upsampled_encoder(encoder, upsample)
    out = []
    with evaluating(model):
        for batch in as_batches(images, batch_size):
            if upsample != 1:
                batch = F.interpolate(batch, scale_factor=upsample, mode="bilinear", align_corners=False)
            tokens = model.forward_visible(batch, norm=final_norm)
            out.append(tokens[:, model.num_prefix_tokens :].float().cpu())
    if not out:
        raise ValueError("patch features need images")
    return torch.cat(out)


def cluster_patches(features: torch.Tensor, ks: Sequence[int] = (3, 4, 5)) -> dict[int, np.ndarray]:
    """Ward clustering of one image's patch features [L, D] (L2-normalised first), cut at each k: {k:
    labels [L] in 0..k-1}. The cuts come from one dendrogram, so each partition refines the coarser."""
    if features.dim() != 2:
        raise ValueError(f"expected one image's patch features [L, D]; got {tuple(features.shape)}")
    length = features.shape[0]
    for k in ks:
        if not 1 <= k <= length:
            raise ValueError(f"cannot cut {length} patches into {k} clusters")
    z = F.normalize(features.double(), dim=-1).numpy()
    tree = linkage(z, method="ward")
    # the spec names fcluster(maxclust), which can return fewer than k clusters when merge heights tie;
    # cut_tree cuts the same dendrogram into exactly k
    order = sorted({int(k) for k in ks})
    below = [k for k in order if k < length]  # scipy's cut_tree mislabels a cut into L clusters
    cuts = cut_tree(tree, n_clusters=below) if below else np.zeros((length, 0), dtype=np.int64)
    out: dict[int, np.ndarray] = {}
    coarser = None
    for i, k in enumerate(order):
        labels = cuts[:, i].astype(np.int64) if k < length else np.arange(length, dtype=np.int64)
        out[k] = labels if coarser is None else _inherit(labels, coarser)
        coarser = out[k]
    return {int(k): out[int(k)] for k in ks}


def _inherit(finer: np.ndarray, coarser: np.ndarray) -> np.ndarray:
    """Relabel a finer cut so that the largest part of each coarser cluster keeps that cluster's label
    and the parts split off take new ones: a region keeps its colour from one k to the next."""
    out = np.empty_like(finer)
    fresh = int(coarser.max()) + 1
    for parent in np.unique(coarser):
        children, sizes = np.unique(finer[coarser == parent], return_counts=True)
        for rank, child in enumerate(children[np.argsort(-sizes, kind="stable")]):
            out[finer == child] = parent if rank == 0 else fresh
            fresh += rank > 0
    return out


def tsne_embedding(features: torch.Tensor, *, seed: int = 0) -> np.ndarray:
    """A 2-D t-SNE of one image's patch features [L, D] (L2-normalised, as clustered): [L, 2].
    scikit-learn's defaults, except the perplexity, lowered below L for small grids, and the exact
    gradient (no approximation) up to 300 patches, past ViT-B's 14 x 14 grid; Barnes-Hut above."""
    z = F.normalize(features.double(), dim=-1).numpy()
    perplexity = min(30.0, max(1.0, (z.shape[0] - 1) / 3))
    method = "exact" if z.shape[0] <= 300 else "barnes_hut"
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, method=method)
    return tsne.fit_transform(z)


class Segmentation(NamedTuple):
    labels: dict[int, np.ndarray]  # k -> [N, gh, gw] cluster labels
    embedding: np.ndarray  # [N, L, 2] t-SNE of each image's patches
    grid: tuple[int, int]


def segment(
    encoder: nn.Module,
    images: torch.Tensor,
    *,
    ks: Sequence[int] = (3, 4, 5),
    upsample: int = 1,
    final_norm: bool = False,
    seed: int = 0,
) -> Segmentation:
    """Per image: patch features, their clustering at each k, and their t-SNE."""
    feats = patch_features(encoder, images, upsample=upsample, final_norm=final_norm)
    gh, gw = (side * upsample for side in encoder.grid_size)
    labels: dict[int, list[np.ndarray]] = {int(k): [] for k in ks}
    embedding = []
    for f in feats:
        for k, lab in cluster_patches(f, ks).items():
            labels[k].append(lab.reshape(gh, gw))
        embedding.append(tsne_embedding(f, seed=seed))
    return Segmentation({k: np.stack(v) for k, v in labels.items()}, np.stack(embedding), (gh, gw))
