"""From a source spec to a source: ``demo:train``, ``synthetic:N``, a folder, .npz files or a CIFAR
download (comma-separated, globs allowed), a token dataset, a held-out split of any of them
(``SOURCE#train=F`` / ``SOURCE#val=F``); and, for a token model, which tokenizer reads its images
(the one given, or the one its token data record).
"""

from __future__ import annotations

import glob
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mimkit.configs import split_spec
from mimkit.data import cifar
from mimkit.data.sources import (
    ArraySource,
    FolderSource,
    ImageSource,
    Subset,
    SyntheticSource,
    demo_source,
    npz_source,
)
from mimkit.data.token_sources import TokenizedImages, TokenSource, tokenizer_of
from mimkit.models.input_spec import InputSpec
from mimkit.tokens.dataset import is_token_dataset, open_tokens


def _is_tokens(path: str) -> bool:
    try:
        return is_token_dataset(os.path.expanduser(path))
    except OSError:
        return False


def recorded_tokenizer(
    sources: Sequence[ImageSource], trained_on: str | None = None, tokenizer: str | None = None
) -> str | None:
    """The tokenizer to read images with for a token model: ``tokenizer`` when given (``--tokenizer``, or
    the model's ``data.tokenizer``), else the one that the token data among ``sources`` records, else the
    one of the data the model was trained on (``trained_on``), if any says."""
    if tokenizer:
        return tokenizer
    found = next((t for s in sources if (t := tokenizer_of(s))), None)
    if found is None and trained_on:
        try:
            train = build_source(trained_on, max_images=1)
        except (OSError, ValueError):  # the training data is not here: nothing to learn the tokenizer from
            return None
        found = tokenizer_of(train)
    return found


def tokenized_for(
    spec: InputSpec,
    sources: Sequence[ImageSource],
    trained_on: str | None = None,
    tokenizer: str | None = None,
) -> list[ImageSource]:
    """The sources as a token encoder takes them: images are tokenized by ``tokenizer`` (see
    :func:`recorded_tokenizer`); the rest is returned as it is (and images stay images when no tokenizer
    is known: check_input says so)."""
    if spec.kind == "pixels" and tokenizer:
        raise ValueError(
            f"a tokenizer ('{tokenizer}') reads images for token models, but this encoder takes pixels: "
            "leave --tokenizer (data.tokenizer) unset"
        )
    if spec.kind == "pixels" or all(s.kind != "pixels" for s in sources):
        return list(sources)
    tokenizer = recorded_tokenizer(sources, trained_on, tokenizer)
    if tokenizer is None:
        return list(sources)
    return [TokenizedImages(s, tokenizer) if s.kind == "pixels" else s for s in sources]


def _expanded(part: str) -> list[str]:
    """One part of a source spec: a glob's matches, sorted, or the path itself."""
    return sorted(glob.glob(os.path.expanduser(part))) if glob.has_magic(part) else [part]


def source_paths(spec: str) -> list[Path]:
    """The files and folders a source spec reads (for output-path checks): its comma-separated parts, globs
    expanded, a held-out split's base, a token dataset's path; none for demo and synthetic sources."""
    base = split_spec(str(spec))[0].removeprefix("tokens:")
    found: list[Path] = []
    for part in (p.strip() for p in base.split(",") if p.strip()):
        if part.startswith(("demo:", "synthetic")):
            continue
        found.extend(Path(p) for p in _expanded(part) if Path(p).exists())
    return found


def source_for(key: str, spec: str | None, **kwargs: Any) -> ImageSource:
    """:func:`build_source` of a config key's value, an error naming the key: the user may not know that a
    recipe set it (``data.train: data path 'data/cifar-10-batches-py' does not exist``)."""
    if not spec:
        raise ValueError(f"{key} is not set: give {key}=SOURCE (a folder, .npz files, a CIFAR download, ...)")
    try:
        return build_source(spec, **kwargs)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{key}: {err}") from err
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from err


SPLIT_SEED = 0  # the held-out split is the same for every run, whatever its seed


def labels_of(source: ImageSource) -> np.ndarray | None:
    """Every label of a source without reading its images (None when it does not know them so)."""
    for labels in (
        getattr(source, "labels", None),
        getattr(source, "y", None),
        getattr(getattr(source, "dataset", None), "labels", None),
    ):
        if labels is not None:
            return np.asarray(labels)
    return None


def held_out_indices(source: ImageSource, fraction: float, part: str) -> list[int]:
    """A fixed, class-stratified held-out split: in each class (all images when unlabelled) a seeded
    permutation's first round(F x n) images are held out (at least one, and one left for training, where
    a class has two)."""
    labels = labels_of(source)
    labels = np.zeros(len(source), np.int64) if labels is None else np.asarray(labels)
    rng = np.random.default_rng(SPLIT_SEED)
    held = np.zeros(len(source), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = min(max(1, round(fraction * len(members))), max(len(members) - 1, 1))
        held[rng.permutation(members)[:count]] = True
    return np.flatnonzero(held if part == "val" else ~held).tolist()


def build_source(
    spec: str,
    *,
    image_size: int = 32,
    max_images: int | None = None,
    decode_size: int | None = None,
    tokenizer: str | None = None,
) -> ImageSource:
    """``demo:train`` | ``demo:val`` | ``synthetic[:N]`` | a folder | .npz file(s), comma-separated and
    glob patterns allowed (``cifar10/train_part[0-2].npz``) | a token dataset: ``tokens:PATH``, or a path
    recognised as one (a ``NAME-token.data.bin.gz`` file, or a folder that mimkit's token format or one
    such file makes) | ``SOURCE#train=F`` / ``SOURCE#val=F``: a source without / with its held-out
    fraction F (:func:`held_out_indices`). ``decode_size``: a folder's JPEGs are decoded reduced.
    ``tokenizer`` (a token model's ``data.tokenizer``): images are tokenized by it once, as they are read."""
    spec = str(spec).strip()
    base, part, fraction = split_spec(spec)
    if part is not None:  # the base source says its own notes when it is built
        whole = build_source(base, image_size=image_size, decode_size=decode_size)
        source: ImageSource = Subset(whole, held_out_indices(whole, fraction, part))
        source.name = spec
    else:
        source = _stored_source(spec, image_size, decode_size)
    if max_images is not None:
        source = Subset(source, max_images)
    if tokenizer and source.kind == "pixels":
        source = TokenizedImages(source, tokenizer)
    return source


def _stored_source(spec: str, image_size: int, decode_size: int | None) -> ImageSource:
    """The source a spec names, before any split, subset or tokenizer."""
    if spec.startswith("tokens:"):
        source: ImageSource = TokenSource(open_tokens(spec.split(":", 1)[1]))
    elif "," not in spec and not glob.has_magic(spec) and _is_tokens(spec):
        source = TokenSource(open_tokens(spec))
    elif spec.startswith("demo:"):
        source = demo_source(spec.split(":", 1)[1])
    elif spec == "synthetic" or spec.startswith("synthetic:"):
        size = spec.split(":", 1)[1] if ":" in spec else "256"
        if not size.isdigit() or int(size) < 1:
            raise ValueError(f"'{spec}': expected synthetic:N with N a positive number of images")
        source = SyntheticSource(int(size), image_size=image_size)
    else:
        paths: list[Path] = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            expanded = _expanded(part)
            if not expanded or not Path(expanded[0]).exists():
                raise FileNotFoundError(f"data path '{part}' does not exist")
            paths.extend(Path(p) for p in expanded)
        if not paths:
            raise ValueError("no data path given")
        cifar_folder = cifar.find_folder(paths[0]) if len(paths) == 1 else None
        if all(p.suffix == ".npz" and p.is_file() for p in paths):
            source = npz_source(paths)
        elif cifar_folder is not None or all(cifar.is_batch_file(p) for p in paths):
            files = cifar.training_files(cifar_folder) if cifar_folder is not None else paths
            source = ArraySource(*cifar.read_batches(files), spec)
        elif len(paths) == 1 and paths[0].is_dir():
            source = FolderSource(paths[0], decode_size)
        else:
            raise ValueError(
                f"'{spec}': expected one image folder, one or more .npz files, or a CIFAR download (its "
                "folder, or batch files of it)"
            )
    if decode_size is not None:
        if not isinstance(source, FolderSource):
            note = f"note: data.decode_size applies to an image folder's JPEGs; '{spec}' is decoded as stored"
            print(note, file=sys.stderr)
        elif decode_size < image_size:
            print(
                f"note: data.decode_size={decode_size} is below the model's input ({image_size} px): large "
                "JPEGs are cut into crops from a picture smaller than the input",
                file=sys.stderr,
            )
    return source
