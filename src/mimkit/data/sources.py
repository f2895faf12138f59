"""Where images come from: an image folder (ImageFolder layout with labels, or flat without), .npz
arrays (``x`` uint8 [N, H, W, 3], optional ``y``), the embedded demo set, synthetic images, or a token
dataset (images stored as grids of codebook ids, :mod:`mimkit.tokens`).

A source is map-style: ``len(source)``, ``source.load(i) -> (uint8 [3, H, W] tensor, label)`` (a token
source: an int64 [H, W] id grid; ``source.kind`` says which); label is -1 when the source has none.
Problems with the source itself (missing path, no images, wrong arrays) are
errors when it is built; a single unreadable image raises :class:`UnreadableImage` from ``load``, which the
loader reports by path and skips.

Token sources (a token dataset, or images tokenized as they are built) are
:mod:`mimkit.data.token_sources`; a source spec (``demo:train``, a folder, ``tokens:PATH``, ``SRC#val=F``)
becomes a source in :mod:`mimkit.data.source_spec`.
"""

from __future__ import annotations

import copy
import io
import os
import sys
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from mimkit.tokens.records import check_label_range

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
DEMO_FILE = Path(__file__).parent / "demo" / "cifar10_demo.npz"
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class UnreadableImage(Exception):
    """One image could not be decoded; the message starts with its path."""


class ImageSource:
    kind: str = "pixels"  # what load() returns, in InputSpec's words: "pixels" or "token_ids"
    classes: tuple[str, ...] = ()
    name: str = ""
    # True when the class names are only the label numbers "0".."max label" (a .npz without 'class_names')
    classes_from_labels: bool = False

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        raise NotImplementedError

    def load_encoded(self, index: int) -> tuple[torch.Tensor, int]:
        """For decoding on the training device: a JPEG file's bytes as uint8 [N], or (any other image) what
        :meth:`load` gives, decoded [C, H, W]."""
        return self.load(index)

    def path_of(self, index: int) -> str:
        """What names sample ``index`` in a message."""
        return f"{self.name}[{index}]"

    @property
    def has_labels(self) -> bool:
        return bool(self.classes)


class ArraySource(ImageSource):
    """Images held in memory as a uint8 [N, H, W, C] array (workers share it copy-on-write)."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray | None,
        classes: Sequence[str],
        name: str,
        *,
        classes_from_labels: bool = False,
    ) -> None:
        self.x, self.y, self.classes, self.name = x, y, tuple(classes), name
        self.classes_from_labels = classes_from_labels

    def __len__(self) -> int:
        return len(self.x)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        img = torch.from_numpy(np.ascontiguousarray(self.x[index])).permute(2, 0, 1)
        return img, int(self.y[index]) if self.y is not None else -1


def _read_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None, tuple[str, ...]]:
    """The arrays of one .npz; ``classes`` is empty when the file stores no 'class_names'. A file that
    cannot be read as a .npz at all (truncated, not a zip, a .npy under another name) is one ValueError
    naming it, since it is the source that is wrong, not one image."""
    try:
        with open(path, "rb") as head:
            magic = head.read(6)
        if not magic.startswith((b"PK", b"\x93NUMPY")):  # else NumPy would try it as a pickle
            raise ValueError("not a zip archive, which a .npz is" if magic else "the file is empty")
        f = np.load(path, allow_pickle=False)
        if not isinstance(f, np.lib.npyio.NpzFile):
            raise ValueError("a single array (.npy), not named arrays")
        with f:
            files = sorted(f.files)
            x = f["x"] if "x" in files else None
            y = f["y"] if "y" in files else None
            classes = tuple(str(c) for c in f["class_names"]) if "class_names" in files else ()
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as err:
        reason = str(err) if type(err) is ValueError else f"{type(err).__name__}: {err}"
        raise ValueError(f"{path}: not a readable .npz file ({reason})") from err
    if x is None:
        raise ValueError(f"{path}: expected an array 'x' (uint8 [N, H, W, 3]); found {files}")
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: 'x' must be uint8 [N, H, W, 3]; got {x.dtype} {list(x.shape)}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    if y is not None:
        if y.shape != (len(x),):
            raise ValueError(f"{path}: 'y' must have shape [{len(x)}] to match 'x'; got {list(y.shape)}")
        if len(y) and (y.dtype.kind not in "iu" or (y.dtype.kind == "u" and int(y.max()) > 2**62)):
            raise ValueError(f"{path}: 'y' must hold integer class indices; got {y.dtype}")  # no 0.7 -> 0
        y = y.astype(np.int64)
    return x, y, classes


def npz_source(paths: Sequence[Path]) -> ArraySource:
    """One source of the concatenated files. Without 'class_names' in any of them, the classes are named
    "0".."max label" (:attr:`ImageSource.classes_from_labels`), which :func:`check_same_classes` compares
    by how far the labels reach rather than by name."""
    parts = [_read_npz(p) for p in paths]
    shapes = {p[0].shape[1:] for p in parts}
    if len(shapes) > 1:
        raise ValueError(
            f"npz files have different image shapes {sorted(shapes)}: {', '.join(map(str, paths))}"
        )
    labelled = [p[1] is not None for p in parts]
    if any(labelled) and not all(labelled):
        raise ValueError(f"some npz files have labels 'y' and some do not: {', '.join(map(str, paths))}")
    x = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
    y = np.concatenate([p[1] for p in parts]) if all(labelled) else None
    named = {p[2] for p in parts if p[2]}
    if len(named) > 1:
        listed = "; ".join(f"{path} ({_listing(p[2])})" for path, p in zip(paths, parts, strict=True) if p[2])
        raise ValueError(f"npz files name different classes: {listed}")
    name = ",".join(str(p) for p in paths)
    if named and y is None:  # class names without labels name nothing: the source is unlabelled
        print(f"note: {name}: 'class_names' but no labels 'y': read as unlabelled images", file=sys.stderr)
        named = set()
    from_labels = not named and y is not None and len(y) > 0
    if y is not None:  # before classes are numbered from the labels: a label of 10**12 must not be
        check_label_range(y, next(iter(named)) if named else (), name)
    classes: tuple[str, ...] = ()
    if named:
        classes = named.pop()
    elif from_labels:
        classes = tuple(str(c) for c in range(max(int(y.max()), 0) + 1))
    return ArraySource(x, y, classes, name, classes_from_labels=from_labels)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    """Names joined by commas; a long list shows its ends and its length."""
    if len(names) <= limit:
        return ", ".join(names)
    return f"{', '.join(names[:5])}, ..., {', '.join(names[-2:])} ({len(names)} classes)"


def check_same_classes(train: ImageSource, evaluated: ImageSource) -> None:
    """Labels are class indices, so the source a model or memory bank learns from and the source it is
    measured on must name the same classes in the same order: otherwise every label after the first
    difference means another class, and the accuracy is wrong without any error.

    Names numbered from the labels (a .npz without 'class_names': "0".."max label") only say how far the
    labels reach, and a split may lack the top labels. Such a list therefore matches another numbered list
    of any length, and a named list at least as long as it (every label is then a class of the other);
    store 'class_names' in the .npz to have it checked by name."""
    a, b = train.classes, evaluated.classes
    if a == b:
        return
    numbered = [s for s in (train, evaluated) if s.classes_from_labels]
    if len(numbered) == 2:
        return
    if numbered:
        counted = numbered[0]
        other = evaluated if counted is train else train
        if len(counted.classes) <= len(other.classes):
            return
        reason = (
            f"'{counted.name}' has labels up to {len(counted.classes) - 1} but '{other.name}' names only "
            f"{len(other.classes)} classes"
        )
    else:
        only_a = [c for c in a if c not in set(b)]
        only_b = [c for c in b if c not in set(a)]
        reason = "; ".join(
            f"only in '{name}': {_listing(only)}"
            for name, only in ((train.name, only_a), (evaluated.name, only_b))
            if only
        )
        reason = reason or "the same names in another order"
        reason += " (labels are indices into these lists, so they would mean different classes)"
    raise ValueError(
        f"classes differ between '{train.name}' ({_listing(a)}) and '{evaluated.name}' "
        f"({_listing(b)}): {reason}"
    )


def demo_source(split: str) -> ArraySource:
    """2,000 training and 500 held-out CIFAR-10 images (200 / 50 per class), embedded in the package."""
    if split not in ("train", "val"):
        raise ValueError(f"the demo source has splits 'demo:train' and 'demo:val'; got 'demo:{split}'")
    with np.load(DEMO_FILE, allow_pickle=False) as f:
        return ArraySource(f[f"x_{split}"], f[f"y_{split}"], CIFAR10_CLASSES, f"demo:{split}")


class SyntheticSource(ImageSource):
    """Deterministic random images whose colour depends on the class, so features can separate them."""

    def __init__(self, size: int = 256, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> None:
        self.size, self.image_size, self.seed = size, image_size, seed
        self.classes = tuple(f"class{c}" for c in range(num_classes))
        self.name = f"synthetic:{size}"
        palette = torch.Generator().manual_seed(seed)
        self.colours = torch.randint(40, 216, (num_classes, 3, 1, 1), generator=palette)

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        if not 0 <= index < self.size:
            raise IndexError(index)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        label = index % len(self.classes)
        noise = torch.randint(-40, 41, (3, self.image_size, self.image_size), generator=g)
        return (self.colours[label] + noise).clamp(0, 255).to(torch.uint8), label


def _decode(path: str, decode_size: int | None = None, data: bytes | None = None) -> torch.Tensor:
    # PIL rather than torchvision.io: torchvision deprecates its decoders from 0.29 on, and PIL reads
    # every format ImageFolder users have. ``data``: the file's bytes, already read
    buffer = io.BytesIO(data) if data is not None else None
    try:
        with Image.open(buffer if buffer is not None else path) as im:
            if decode_size is not None:
                # JPEG only (a no-op for other formats): the smallest DCT scale whose sides stay >= size
                im.draft(None, (decode_size, decode_size))
            arr = _to_rgb(im, path)
    except UnreadableImage:
        raise
    except Exception as err:
        # PIL names a buffer by its repr, an address that changes per call: the message names the file
        said = str(err).replace(repr(buffer), repr(path)) if buffer is not None else str(err)
        raise UnreadableImage(f"{path}: {type(err).__name__}: {said}") from err
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)


def _to_rgb(im: Any, path: str) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image. Pillow's own ``convert("RGB")`` clips 16-bit and 32-bit grey
    pixels to 255 (a 16-bit microscopy image comes out almost white), so those modes are scaled here:
    ``I;16*`` and ``I`` with values in 0..65535 by round(v / 257), ``F`` with values in 0..1 by
    round(v * 255); other ``I`` or ``F`` ranges have no agreed meaning and are unreadable (named and
    skipped) rather than guessed."""
    mode = im.mode
    if not (mode.startswith("I;16") or mode in ("I", "F")):
        return np.asarray(im.convert("RGB"))
    values = np.asarray(im)
    if values.size == 0:
        raise UnreadableImage(f"{path}: no pixels")
    if mode == "F":
        lo, hi = float(values.min()), float(values.max())
        if not (np.isfinite(values).all() and lo >= 0.0 and hi <= 1.0):
            raise UnreadableImage(
                f"{path}: float pixels (mode F) must lie in 0..1 to be scaled to 8 bits; found {lo:g}..{hi:g}"
            )
        grey = np.rint(values.astype(np.float64) * 255.0).astype(np.uint8)
    else:
        wide = values.astype(np.int64)
        lo, hi = int(wide.min()), int(wide.max())
        if lo < 0 or hi > 65535:
            raise UnreadableImage(
                f"{path}: 32-bit integer pixels (mode {mode}) range {lo}..{hi}, outside the 16-bit 0..65535 "
                "that is scaled to 8 bits; convert the image to 8 or 16 bits"
            )
        grey = ((wide + 128) // 257).astype(np.uint8)  # round(v / 257): 257 is odd, so no ties
    return np.repeat(grey[:, :, None], 3, axis=2)


class FolderSource(ImageSource):
    """ImageFolder layout (one sub-folder per class, labels in sorted folder order) or a flat folder of
    images (no labels). Files are found recursively inside each class folder. Every non-hidden sub-folder
    is a class, an empty one too (with a warning): the label of a class depends on its name alone, so a
    split that happens to have no images of one class keeps the labels of the others. ``decode_size``:
    JPEGs are decoded at the smallest of 1/2, 1/4, 1/8 scale whose shorter side stays at least this many
    pixels (None: full size)."""

    def __init__(self, root: Path, decode_size: int | None = None) -> None:
        self.root, self.name, self.decode_size = root, str(root), decode_size
        entries = sorted(os.scandir(root), key=lambda e: e.name)
        class_dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
        files: list[str] = []
        labels: list[int] = []
        classes: list[str] = []
        empty: list[tuple[int, os.DirEntry]] = []
        for label, d in enumerate(class_dirs):
            found = _images_under(d.path)
            labels.extend([label] * len(found))
            files.extend(found)
            if not found:
                empty.append((label, d))
        if files:
            classes = [d.name for d in class_dirs]
            for label, d in empty:
                print(
                    f"warning: class folder '{d.path}' has no images; class '{d.name}' keeps label {label}",
                    file=sys.stderr,
                    flush=True,
                )
        else:  # flat layout
            files = [e.path for e in entries if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)]
            labels = [-1] * len(files)
        if not files:
            raise ValueError(
                f"no images found under '{root}' (looked for {', '.join(IMAGE_EXTENSIONS)} "
                "directly inside it or in class sub-folders)"
            )
        self.files, self.labels, self.classes = files, np.asarray(labels, dtype=np.int64), tuple(classes)

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            return _decode(path, self.decode_size), int(self.labels[index])
        except OSError as err:
            raise UnreadableImage(f"{path}: {err}") from err

    def load_encoded(self, index: int) -> tuple[torch.Tensor, int]:
        path = self.files[index]
        try:
            data = Path(path).read_bytes()
        except OSError as err:
            raise UnreadableImage(f"{path}: {err}") from err
        if data[:3] != JPEG_MAGIC:
            return _decode(path, self.decode_size, data), int(self.labels[index])
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), int(self.labels[index])

    def path_of(self, index: int) -> str:
        return self.files[index]


JPEG_MAGIC = b"\xff\xd8\xff"


def full_size(source: ImageSource) -> ImageSource:
    """``source`` as it reads without reduced JPEG decoding (``decode_size``): the same files, not scanned
    again."""
    if isinstance(source, Subset):
        inner = full_size(source.source)
        if inner is source.source:
            return source
        out = copy.copy(source)
        out.source = inner
        return out
    if getattr(source, "decode_size", None) is None:
        return source
    out = copy.copy(source)
    out.decode_size = None
    return out


def decode_batch(
    encoded: Sequence[torch.Tensor], names: Sequence[str], device: torch.device
) -> tuple[list[torch.Tensor | None], list[str]]:
    """Images [3, H, W] uint8 on ``device`` from :meth:`ImageSource.load_encoded`'s entries: the JPEGs in
    one batched call of torchvision's decoder on the device (nvJPEG on GPUs), the rest moved as they are.
    A batch the decoder refuses is decoded one by one, those it cannot read (CMYK, say) by PIL; what
    neither reads is None, with a message naming it."""
    images: list[torch.Tensor | None] = [
        e.to(device, non_blocking=True) if e.ndim == 3 else None for e in encoded
    ]
    jpegs = [i for i, e in enumerate(encoded) if e.ndim == 1]
    failed: list[str] = []
    if not jpegs:
        return images, failed
    with warnings.catch_warnings():  # torchvision announces that its decoders move to TorchCodec
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            decoded = decode_jpeg([encoded[i] for i in jpegs], mode=ImageReadMode.RGB, device=device)
            for i, image in zip(jpegs, decoded, strict=True):
                images[i] = image
            return images, failed
        except RuntimeError:
            pass
        for i in jpegs:
            try:
                images[i] = decode_jpeg(encoded[i], mode=ImageReadMode.RGB, device=device)
            except RuntimeError:
                try:
                    images[i] = _decode(names[i], data=encoded[i].numpy().tobytes()).to(device)
                except UnreadableImage as err:
                    failed.append(str(err))
    return images, failed


def _images_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


class Subset(ImageSource):
    """Some samples of a source, keeping what a token source carries (grid, vocabulary, codebook,
    tokenizer): the first ``n``, with ``spread`` ``n`` evenly spaced over it (so that a source stored
    class by class shows every class), or those at the given indices."""

    def __init__(self, source: ImageSource, n: int | Sequence[int], *, spread: bool = False) -> None:
        if not isinstance(n, int):
            self.indices = [int(i) for i in n]
        elif spread and min(n, len(source)) > 1:
            count = min(n, len(source))
            self.indices = [round(i * (len(source) - 1) / (count - 1)) for i in range(count)]
        else:
            self.indices = list(range(min(n, len(source))))
        self.source, self.n = source, len(self.indices)
        self.kind = source.kind
        self.grid, self.vocab_size = getattr(source, "grid", None), getattr(source, "vocab_size", None)
        self.dataset = getattr(source, "dataset", None)  # a token dataset's codebook and meta
        self.tokenizer_path = getattr(source, "tokenizer_path", None)  # a token dataset's: via .dataset
        self.classes = source.classes
        first = isinstance(n, int) and not spread
        self.name = f"{source.name}[:{self.n}]" if first else f"{source.name}[{self.n} of {len(source)}]"
        self.classes_from_labels = source.classes_from_labels

    def __len__(self) -> int:
        return self.n

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        if index >= self.n:
            raise IndexError(index)
        return self.source.load(self.indices[index])

    def load_encoded(self, index: int) -> tuple[torch.Tensor, int]:
        if index >= self.n:
            raise IndexError(index)
        return self.source.load_encoded(self.indices[index])

    def path_of(self, index: int) -> str:
        return self.source.path_of(self.indices[index])
