"""Sources of token ids: a token dataset read as a source (:class:`TokenSource`), images tokenized once
as they are built (:class:`TokenizedImages`), and what an encoder checks of such a source before its
first batch: the tokenizer and codebook its ids come from, the vocabulary and grid (:func:`check_input`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

from mimkit.configs import ModelConfig
from mimkit.data.sources import ImageSource, UnreadableImage
from mimkit.data.transforms import tokenizer_view
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import load_tokenizer, recorded_tokenizer_path
from mimkit.progress import progress
from mimkit.tokens.dataset import TokenDataset, TokenRecordError
from mimkit.tokens.records import codebook_signature, same_codebook


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
