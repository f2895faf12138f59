"""Patch clustering and t-SNE (mimkit.analysis.segmentation) on planted clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits

from mimkit.analysis import (
    cluster_patches,
    patch_features,
    segment,
    tsne_embedding,
    upsampled_encoder,
)
from tests.analysis.test_attention import images_for, pixel_encoder, with_attention_dropout
from tests.models.test_tokenizer import small_token_encoder


def assert_partition(labels: np.ndarray, k: int, length: int) -> None:
    assert labels.shape == (length,)
    assert sorted(set(labels.tolist())) == list(range(k))


def test_cluster_patches_gives_nested_partitions_of_k_clusters():
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    ks = (5, 2, 3, 8, 16)  # a cut into every patch, beside coarser ones
    cuts = cluster_patches(features, ks)
    assert list(cuts) == list(ks)
    for k in ks:
        assert_partition(cuts[k], k, 16)
    assert sorted(cuts[16].tolist()) == list(range(16))
    for coarse, fine in itertools.combinations(sorted(ks), 2):
        for label in set(cuts[fine].tolist()):
            assert len(set(cuts[coarse][cuts[fine] == label].tolist())) == 1, (coarse, fine)


def test_cluster_patches_recovers_planted_clusters():
    """Three directions, each point at a length of 1 or 20: clustered by direction (the features are
    L2-normalised), not by length."""
    gen = torch.Generator().manual_seed(3)
    directions = torch.eye(8)[[0, 3, 6]] + 0.2
    planted = torch.randperm(15, generator=gen) % 3
    lengths = torch.where(torch.arange(15) % 2 == 0, 1.0, 20.0)[:, None]
    features = (directions[planted] + 0.02 * torch.randn(15, 8, generator=gen)) * lengths
    labels = cluster_patches(features, (3,))[3]
    planted = planted.numpy()
    for i, j in itertools.combinations(range(15), 2):
        assert (labels[i] == labels[j]) == (planted[i] == planted[j])


def test_cluster_patches_keeps_a_clusters_label_on_its_largest_part():
    """From one k to the next, the largest part of each coarser cluster keeps the cluster's label, so a
    region keeps its colour across the cuts."""
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(5))
    ks = (2, 3, 4, 6)
    cuts = cluster_patches(features, ks)
    for coarse, fine in itertools.pairwise(ks):
        for parent in range(coarse):
            inside = cuts[fine][cuts[coarse] == parent]
            children, sizes = np.unique(inside, return_counts=True)
            assert parent in children.tolist(), (coarse, fine, parent)
            assert sizes[children.tolist().index(parent)] == sizes.max()


def test_cluster_patches_is_ward_not_single_linkage():
    """A chain of 8 evenly spaced points and one a little further off its end: single linkage's first
    split takes off the lone point, Ward's cuts the chain near its middle (far less within-cluster
    variance)."""
    positions = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8.5]) * 0.05  # angles on the unit circle
    features = torch.stack([positions.cos(), positions.sin()], dim=1)
    labels = cluster_patches(features, (2,))[2]
    sizes = np.bincount(labels)
    assert sizes.min() >= 3, labels
    assert len(set(labels[:3].tolist())) == 1 and len(set(labels[-3:].tolist())) == 1


@pytest.mark.parametrize("ks", [(17,), (2, 17), (0,)])
def test_cluster_patches_rejects_impossible_cuts(ks):
    with pytest.raises(ValueError):
        cluster_patches(torch.randn(16, 8), ks)


@pytest.fixture
def one_thread():
    """t-SNE's OpenMP loops slow down by orders of magnitude when their threads compete with other
    processes for the cores; one thread keeps the tests' time steady."""
    with threadpool_limits(limits=1):
        yield


def test_tsne_embedding_is_finite_and_seeded(one_thread):
    features = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    a = tsne_embedding(features, seed=0)
    assert a.shape == (16, 2) and np.isfinite(a).all()
    np.testing.assert_allclose(tsne_embedding(features, seed=0), a)


def test_segment_on_an_upsampled_grid(one_thread):
    encoder = pixel_encoder(16)  # a 2 x 2 grid, 4 x 4 upsampled: few points for t-SNE
    pos = encoder.pos_embed.detach().clone()
    images = images_for(encoder, 2)
    seg = segment(encoder, images, ks=(2, 3), upsample=2)
    assert seg.grid == (4, 4)
    assert set(seg.labels) == {2, 3}
    for k, labels in seg.labels.items():
        assert labels.shape == (2, 4, 4)
        for per_image in labels:
            assert sorted(set(per_image.flatten().tolist())) == list(range(k))
    assert seg.embedding.shape == (2, 16, 2) and np.isfinite(seg.embedding).all()
    # the encoder itself is untouched
    assert encoder.grid_size == (2, 2) and torch.equal(encoder.pos_embed, pos)


def test_upsampled_encoder_keeps_the_weights_on_a_finer_grid():
    encoder = pixel_encoder()
    assert upsampled_encoder(encoder, 1) is encoder
    bigger = upsampled_encoder(encoder, 2)
    assert bigger is not encoder and bigger.grid_size == (8, 8)
    torch.testing.assert_close(bigger.blocks[1].attn.qkv.weight, encoder.blocks[1].attn.qkv.weight)
    with torch.no_grad():
        assert bigger.forward_visible(torch.randn(1, 3, 64, 64)).shape == (1, 65, 64)
    with pytest.raises(ValueError):
        upsampled_encoder(encoder, 0)
    with pytest.raises(ValueError):
        upsampled_encoder(small_token_encoder(), 2)


def test_patch_features_are_the_last_blocks_patch_tokens():
    encoder = with_attention_dropout(pixel_encoder())
    images = images_for(encoder, 3)
    encoder.train()
    feats = patch_features(encoder, images, batch_size=2)
    assert encoder.training
    encoder.eval()
    with torch.no_grad():
        expected = encoder.forward_visible(images, norm=False)[:, 1:]
        normed = encoder.forward_features(images)[:, 1:]
    assert feats.shape == (3, 16, 64)
    torch.testing.assert_close(feats, expected)
    torch.testing.assert_close(patch_features(encoder, images, final_norm=True), normed)
    assert not torch.allclose(expected, normed)
    encoder.train()
    big = patch_features(encoder, images, upsample=2)
    assert big.shape == (3, 64, 64)
    torch.testing.assert_close(patch_features(encoder, images, upsample=2), big)
    # images twice the size (bilinear) through the encoder on the finer grid
    bigger = upsampled_encoder(encoder, 2).eval()
    larger = F.interpolate(images, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(big, bigger.forward_visible(larger, norm=False)[:, 1:])
