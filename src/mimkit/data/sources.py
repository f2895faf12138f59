"""Where images come from: an image folder (ImageFolder layout with labels, or flat without), .npz
arrays (``x`` uint8 [N, H, W, 3], optional ``y``), the embedded demo set, synthetic images, or a token
dataset (images stored as grids of codebook ids, :mod:`mimkit.tokens`).

A source is map-style: ``len(source)``, ``source.load(i) -> (uint8 [3, H, W] tensor, label)`` (a token
source: an int64 [H, W] id grid; ``source.kind`` says which); label is -1 when the source has none.
Problems with the source itself (missing path, no images, wrong arrays) are
errors when it is built; a single unreadable image raises :class:`UnreadableImage` from ``load``, which the
loader reports by path and skips.
"""

from __future__ import annotations

import copy
import glob
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

from mimkit.configs import ModelConfig, split_spec
from mimkit.data import cifar
from mimkit.data.transforms import tokenizer_view
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import load_tokenizer, recorded_tokenizer_path
from mimkit.progress import progress
from mimkit.tokens.dataset import TokenDataset, TokenRecordError, is_token_dataset, open_tokens
from mimkit.tokens.records import check_label_range, codebook_signature, same_codebook

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


def _is_tokens(path: str) -> bool:
    try:
        return is_token_dataset(os.path.expanduser(path))
    except OSError:
        return False


def _images_under(folder: str) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames.sort()
        found.extend(
            os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTENSIONS)
        )
    return found


class TokenSource(ImageSource):
    """A token dataset (SeiT's format or mimkit's) as a source: ``load(i)`` gives record i's id grid.
    A damaged record is reported by file and record index and skipped, as an unreadable image is."""

    kind = "token_ids"

    def __init__(self, dataset: TokenDataset) -> None:
        self.dataset, self.name = dataset, f"tokens:{dataset.path}"
        self.grid, self.vocab_size = tuple(dataset.grid), dataset.vocab_size
        labels = dataset.labels
        if dataset.classes:
            self.classes = tuple(dataset.classes)
        elif labels is not None and len(labels):
            self.classes = tuple(str(c) for c in range(int(labels.max()) + 1))
            self.classes_from_labels = True

    def __len__(self) -> int:
        return len(self.dataset)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        try:
            ids = self.dataset.read(index)
        except TokenRecordError as err:
            raise UnreadableImage(str(err)) from err
        labels = self.dataset.labels
        return torch.from_numpy(ids), int(labels[index]) if labels is not None else -1


LARGE_TO_TOKENIZE = 100_000  # images a token model's source tokenizes at start without a note


class TokenizedImages(ImageSource):
    """Images as a token model takes them, tokenized by a tokenizer (a token model's ``data.tokenizer``, or
    the one its token data record): all at once when built, in batches, with progress, so that training
    and evaluation read ready id grids (SeiT tokenizes every image once, un-augmented, as here). An image
    that cannot be read is named once and stays unreadable."""

    kind = "token_ids"

    def __init__(self, source: ImageSource, tokenizer: str | Path, *, batch_size: int = 256) -> None:
        if source.kind != "pixels":
            raise ValueError(f"'{source.name}' is already a token dataset; only images are tokenized")
        try:
            loaded = load_tokenizer(tokenizer)
        except FileNotFoundError as err:
            hint = "give the tokenizer with --tokenizer PATH (data.tokenizer=PATH)"
            raise FileNotFoundError(f"{err}; {hint}") from err
        self.source, self.tokenizer_path = source, str(tokenizer)
        model = loaded.model
        view = tokenizer_view(model.shape.img_size, loaded.mean, loaded.std)
        side = model.shape.grid
        self.codebook = model.codebook().detach().clone()  # what the token views move ids through
        self.grid, self.vocab_size = (side, side), int(self.codebook.shape[0])
        self.classes, self.classes_from_labels = source.classes, source.classes_from_labels
        self.name = f"{source.name} (tokenized by {tokenizer})"
        self.ids = np.zeros((len(source), side, side), np.int16 if self.vocab_size < 2**15 else np.int32)
        self.labels = np.full(len(source), -1, np.int64)
        self.unreadable: dict[int, str] = {}
        talk = os.environ.get("RANK", "0") == "0"  # under torchrun every rank tokenizes; one says so
        if len(source) > LARGE_TO_TOKENIZE and talk:
            print(
                f"note: tokenizing the {len(source)} images of '{source.name}' in this process first; "
                "for a set this large, `mimkit tokenize` once (in parallel, resumable) and give the tokens",
                file=sys.stderr,
            )
        bar = progress(
            len(source), f"tokenizing {source.name}", "img", enabled=talk and len(source) > 2 * batch_size
        )
        with torch.no_grad(), bar:
            for start in range(0, len(source), batch_size):
                images, kept = [], []
                for index in range(start, min(start + batch_size, len(source))):
                    try:
                        image, label = source.load(index)
                    except UnreadableImage as err:
                        self.unreadable[index] = str(err)
                        continue
                    images.append(view(image)["image"])
                    kept.append(index)
                    self.labels[index] = label
                if kept:
                    self.ids[kept] = model.encode(torch.stack(images)).numpy()
                bar.update(min(batch_size, len(source) - start))

    def __len__(self) -> int:
        return len(self.source)

    def load(self, index: int) -> tuple[torch.Tensor, int]:
        if index in self.unreadable:
            raise UnreadableImage(self.unreadable[index])
        return torch.from_numpy(self.ids[index].astype(np.int64)), int(self.labels[index])

    def path_of(self, index: int) -> str:
        return self.source.path_of(index)


def tokenizer_of(source: ImageSource) -> str | None:
    """The tokenizer a source's ids come from: the one tokenizing its images, or the one a token dataset
    says it was made with (its header's meta, found where it was or beside the dataset), if it says."""
    if getattr(source, "tokenizer_path", None):
        return source.tokenizer_path
    dataset = getattr(source, "dataset", None)
    meta = getattr(dataset, "meta", None) or {}
    if not meta:
        return None
    where = Path(dataset.path)
    return recorded_tokenizer_path(meta, where if where.is_dir() else where.parent)


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


def codebook_of(source: ImageSource) -> torch.Tensor | None:
    """The codebook a source's ids index: the tokenizer's reading its images, or a token dataset's."""
    codebook = getattr(source, "codebook", None)
    return codebook if codebook is not None else getattr(getattr(source, "dataset", None), "codebook", None)


def codebook_fingerprint(source: ImageSource) -> tuple[float, ...] | None:
    """The identity of the tokenizer a source's ids come from (:func:`codebook_signature` of its codebook),
    when it has one."""
    codebook = codebook_of(source)
    return None if codebook is None else codebook_signature(codebook)


def check_input(spec: InputSpec, source: ImageSource) -> None:
    """An encoder meets the source it is fed before the first batch: images for a pixel encoder, token ids
    from the same vocabulary, on a grid at least as large as its input, for a token encoder (whose views
    turn them into codebook vectors when it takes vectors)."""
    if spec.kind == "pixels" and source.kind == "token_ids":
        raise ValueError(
            f"this encoder takes pixels, but '{source.name}' is a token dataset; give it images, or "
            "evaluate a token model on tokens"
        )
    if spec.kind == "token_ids":
        if source.kind != "token_ids":
            raise ValueError(
                f"this encoder takes token ids (a {spec.img_size}x{spec.img_size} grid of {spec.vocab_size} "
                f"codes), but '{source.name}' holds images and no tokenizer is known for it (images are "
                "tokenized on the fly by the tokenizer a token dataset records); tokenize them with "
                "`mimkit tokenize`"
            )
        if source.vocab_size != spec.vocab_size:
            raise ValueError(
                f"'{source.name}' has {source.vocab_size} codes but the encoder embeds {spec.vocab_size}: "
                "its ids would mean other codes (was it made by another tokenizer?)"
            )
        if min(source.grid) < spec.img_size:
            raise ValueError(
                f"'{source.name}' has {source.grid[0]}x{source.grid[1]} id grids, smaller than the "
                f"encoder's {spec.img_size}x{spec.img_size} input"
            )
    if spec.kind == "token_embeddings":  # SeiT: the ids of a token dataset through its codebook
        if source.kind != "token_ids":
            raise ValueError(
                f"this encoder takes the codebook vectors of token grids, but '{source.name}' holds images; "
                "tokenize them first with `mimkit tokenize`"
            )
        if min(source.grid) < spec.img_size:
            raise ValueError(
                f"'{source.name}' has {source.grid[0]}x{source.grid[1]} id grids, smaller than the "
                f"encoder's {spec.img_size}x{spec.img_size} input"
            )
    if spec.kind != "pixels" and spec.codebook_signature:  # the same K is not the same tokenizer
        found = codebook_fingerprint(source)
        if found is not None and not same_codebook(found, spec.codebook_signature):
            try:
                made_by = getattr(source, "tokenizer_path", None) or tokenizer_of(source)
            except (OSError, ValueError):
                made_by = None
            named = f" ('{made_by}')" if made_by else ""
            raise ValueError(
                f"'{source.name}' was made by another tokenizer{named} than this encoder's training tokens "
                "(their codebooks differ): its ids mean other codes; give tokens or a --tokenizer of the "
                "model's own tokenizer (the run's data.tokenizer, or the one its training tokens record)"
            )


def needs_vocab(model: ModelConfig) -> bool:
    """A token-id model left to take its vocabulary from the data (model.vocab_size null)."""
    return model.stem == "token_ids" and model.vocab_size is None


def vocab_from_data(model: ModelConfig, source: ImageSource) -> None:
    """Set a token-id model's vocabulary from its training token dataset when the config leaves it to the
    data; the config saved with the run then states it."""
    if not needs_vocab(model):
        return
    vocab = getattr(source, "vocab_size", None)
    if vocab is None:
        raise ValueError(
            f"model.stem=token_ids needs token data, but '{source.name}' holds images; tokenize them first "
            "with `mimkit tokenize` (or set model.vocab_size)"
        )
    model.vocab_size = int(vocab)


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
