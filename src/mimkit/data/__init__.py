"""Data sources, view transforms and loaders."""

from mimkit.data.loader import EpochSampler, ViewDataset, collate, make_loader, seeded
from mimkit.data.source_spec import build_source
from mimkit.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    SyntheticSource,
    UnreadableImage,
    demo_source,
)
from mimkit.data.transforms import Views, eval_view, mae_crop

__all__ = [
    "ArraySource",
    "EpochSampler",
    "FolderSource",
    "ImageSource",
    "SyntheticSource",
    "UnreadableImage",
    "ViewDataset",
    "Views",
    "build_source",
    "collate",
    "demo_source",
    "eval_view",
    "mae_crop",
    "make_loader",
    "seeded",
]
