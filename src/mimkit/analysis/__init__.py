"""The analyses the MIM papers argue with, each a function from an encoder (or a method) and images to
arrays, usable without the command line: attention maps and mean attention distance, the singular value
spectrum, reconstructions, patch-clustering segmentation and t-SNE; and the HTML report of all of them
(`mimkit analyze`)."""

from mimkit.analysis.attention import (
    AttentionDistance,
    attention_distance,
    attention_maps,
    mean_attention_distance,
    patch_distances,
    query_maps,
    recorded_attention,
)
from mimkit.analysis.reconstruction import (
    Reconstruction,
    TokenReconstruction,
    denormalize_patches,
    reconstruct_pixels,
    reconstruct_tokens,
    to_unit_range,
)
from mimkit.analysis.report import CheckpointAnalysis, write_report
from mimkit.analysis.segmentation import (
    Segmentation,
    cluster_patches,
    patch_features,
    segment,
    tsne_embedding,
    upsampled_encoder,
)
from mimkit.analysis.spectrum import (
    Spectra,
    Spectrum,
    effective_rank,
    feature_spectrum,
    rankme,
    singular_spectrum,
    spectra,
    token_spectrum,
)

__all__ = [
    "AttentionDistance",
    "CheckpointAnalysis",
    "Reconstruction",
    "Segmentation",
    "Spectra",
    "Spectrum",
    "TokenReconstruction",
    "attention_distance",
    "attention_maps",
    "cluster_patches",
    "denormalize_patches",
    "effective_rank",
    "feature_spectrum",
    "mean_attention_distance",
    "patch_distances",
    "patch_features",
    "query_maps",
    "rankme",
    "reconstruct_pixels",
    "reconstruct_tokens",
    "recorded_attention",
    "segment",
    "singular_spectrum",
    "spectra",
    "to_unit_range",
    "token_spectrum",
    "tsne_embedding",
    "upsampled_encoder",
    "write_report",
]
