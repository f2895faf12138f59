"""SeiT++'s training views of token grids, made on the device for a whole batch (a
:class:`~mimkit.methods.base.BatchTransform`): ids -> Token-EDA (SeiT; optional) -> codebook vectors ->
one colour augmentation for the batch (Emb-Noise, ColorAdapt or none) -> the batch split in two halves,
the first cropped in token space (random resized crop, bicubic) and the second through TokenAdapt (lift,
pixel-like geometry, invert), each optionally mixed (CutMix / Mixup with soft targets) -> re-quantised to
ids (SeiT++), or left as vectors (SeiT's continuous-input classifier). Without TokenAdapt weights the
whole batch takes the first path.

The random draws come from one generator per batch seeded from the samples' seeds (a function of run
seed, epoch and index), so a resumed run sees the same views. Mixup/CutMix draw from numpy's global RNG
(timm's ``Mixup``), which checkpoints save and restore.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from timm.data.mixup import mixup_target

from mimkit.data.loader import per_sample_uniform
from mimkit.data.sources import codebook_of
from mimkit.methods.base import BatchTransform
from mimkit.tokens.augment import TokenEDA, TokenMixup, colour_choice, random_resized_crop
from mimkit.tokens.codebook import embed, load_codebook, requantize
from mimkit.tokens.tokenadapt import TokenAdapt, load_tokenadapt, tokenadapt_view


def validate_choice_probabilities(cfg: Any, first: str, second: str) -> None:
    """Two per-batch (or per-sample) choices drawn from one uniform, ``first`` below p1, ``second``
    below p1 + p2: each must lie in [0, 1] and together they must not exceed 1."""
    for name in (first, second):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"'method.{name}' must lie in [0, 1]; got {getattr(cfg, name)}")
    if getattr(cfg, first) + getattr(cfg, second) > 1:
        raise ValueError(f"'method.{first}' + 'method.{second}' must not exceed 1")


def batch_generator(batch: dict[str, torch.Tensor], device: torch.device) -> torch.Generator | None:
    """One generator for the batch's draws, seeded from its samples' seeds; None (torch's global RNG)
    for a batch that carries none."""
    seeds = batch.get("seed")
    if seeds is None:
        return None
    # hashed first: the seeds are linear in the index, and a plain sum would repeat across batches
    hashed = (per_sample_uniform(torch.as_tensor(seeds), 2) * (1 << 24)).long()
    generator = torch.Generator(device=device)
    generator.manual_seed(int((hashed[:, 0] << 24 | hashed[:, 1]).sum()) % (1 << 63))
    return generator


def views_codebook(path: str | None, source: Any, vocab_size: int) -> torch.Tensor:
    """The codebook the views move ids through: the file ``path``, else the training data's (a token
    dataset's, or that of the tokenizer reading the images)."""
    if path:
        codebook = load_codebook(path)
    else:
        codebook = codebook_of(source)
        if codebook is None:
            raise ValueError(
                f"'{source.name}' carries no codebook, which the token views need to move ids through the "
                "code space: set method.codebook=PATH (the tokenizer's codebook file)"
            )
    if codebook.shape[0] != vocab_size:
        raise ValueError(f"the codebook has {codebook.shape[0]} rows but the encoder embeds {vocab_size} ids")
    return codebook


def resolve_tokenadapt(path: str) -> TokenAdapt:
    """TokenAdapt weights from a file, or from the ``tokenadapt.ckpt`` of a `mimkit tokenadapt train` run."""
    file = Path(path) / "tokenadapt.ckpt" if Path(path).is_dir() else Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"TokenAdapt weights '{file}' do not exist (method.tokenadapt; null runs without the "
            "TokenAdapt path)"
        )
    return load_tokenadapt(file)


class TokenViews(BatchTransform):
    """The SeiT++ pipeline of a batch of id grids ``batch["image"]`` [B, H, W] to training id grids
    [B, size, size]. ``mixers`` (fine-tuning: base-path and TokenAdapt-path Mixup/CutMix) add soft
    targets ``batch["soft_target"]`` [B, classes] from ``batch["label"]``."""

    def __init__(
        self,
        codebook: torch.Tensor,
        size: int,
        *,
        min_scale: float,
        noise_prob: float = 0.0,
        coloradapt_prob: float = 0.0,
        tokenadapt: TokenAdapt | None = None,
        mixers: tuple[TokenMixup | None, ...] | None = None,
        eda: TokenEDA | None = None,
        requantize: bool = True,
    ) -> None:
        super().__init__()
        self.register_buffer("codebook", codebook.float().clone(), persistent=False)
        self.size, self.scale = size, (min_scale, 1.0)
        self.noise_prob, self.coloradapt_prob = noise_prob, coloradapt_prob
        if tokenadapt is not None and (tokenadapt.vocab_size, tokenadapt.token_dim) != tuple(codebook.shape):
            raise ValueError(
                f"TokenAdapt predicts {tokenadapt.vocab_size} codes of {tokenadapt.token_dim} dimensions but "
                f"the codebook has {codebook.shape[0]} of {codebook.shape[1]}: it was trained for another "
                "tokenizer"
            )
        self.tokenadapt = tokenadapt
        self.mixers = tuple(mixers) if mixers is not None else ()  # no state: held as plain attributes
        self.eda, self.requantize = eda, requantize

    @property
    def multiple(self) -> int:
        """What the batch size must be a multiple of: 2 for two halves, 4 when a half is mixed in pairs,
        2 when the whole batch is."""
        mixing = any(m is not None for m in self.mixers)
        if self.tokenadapt is not None:
            return 4 if mixing else 2
        return 2 if mixing else 1

    def _trimmed(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A batch that lost unreadable samples (the loader skips them) may not split or pair any more:
        its last samples are left out of this step, said once."""
        size = batch["image"].shape[0]
        keep = size - size % self.multiple
        if keep == size:
            return batch
        if keep == 0:
            raise ValueError(
                f"a batch of {size} samples cannot be split and paired (multiple {self.multiple})"
            )
        warnings.warn(
            f"token views: a batch of {size} samples (some were unreadable) is cut to {keep} so that it "
            "splits and pairs",
            stacklevel=2,
        )
        return {
            k: v[:keep] if torch.is_tensor(v) and v.ndim and v.shape[0] == size else v
            for k, v in batch.items()
        }

    def _colour(self, emb: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        if not (self.noise_prob or self.coloradapt_prob):
            return emb
        return colour_choice(emb, self.noise_prob, self.coloradapt_prob, generator=generator)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        batch = self._trimmed(batch)
        ids = batch["image"]
        generator = batch_generator(batch, ids.device)
        if self.eda is not None:  # per sample: synonym replacement, a block swap, or nothing
            ids = self.eda(ids, generator=generator)
        emb = embed(ids, self.codebook)
        # SeiT++ colours the whole batch before the split; SeiT (vectors out) after its crop, which its
        # loader makes, so the noise and the channel statistics are those of the crop the model sees
        colour_first = self.requantize
        if colour_first:
            emb = self._colour(emb, generator)
        labels = batch.get("label")
        halves = [emb] if self.tokenadapt is None else list(emb.chunk(2))
        half_labels = [labels] if labels is None or self.tokenadapt is None else list(labels.chunk(2))
        soft: list[torch.Tensor | None] = [None] * len(halves)

        def mixer(i: int) -> Callable[[torch.Tensor], torch.Tensor] | None:
            if i >= len(self.mixers) or self.mixers[i] is None:
                return None

            def mix(x: torch.Tensor) -> torch.Tensor:
                if half_labels[i] is None:
                    raise ValueError("Mixup/CutMix of token views needs the batch's labels")
                x, soft[i] = self.mixers[i](x, half_labels[i])
                return x

            return mix

        base = random_resized_crop(halves[0], self.size, self.scale, generator=generator)
        if not colour_first:
            base = self._colour(base, generator)
        if (mix := mixer(0)) is not None:
            base = mix(base)
        out = [base]
        if self.tokenadapt is not None:
            ta_ids = tokenadapt_view(
                halves[1], self.tokenadapt, self.size, self.scale, generator=generator, mix=mixer(1)
            )
            out.append(embed(ta_ids, self.codebook))
        if self.requantize:  # every path through the codebook and back (duplicate rows -> the first id)
            out = [requantize(x, self.codebook) for x in out]
        batch = {**batch, "image": torch.cat(out)}
        active = next((m for m in self.mixers if m is not None), None)
        if active is not None:  # a path left unmixed gets its labels as (smoothed) soft targets too
            classes, smoothing = active.mixer.num_classes, active.mixer.label_smoothing
            batch["soft_target"] = torch.cat(
                [
                    t if t is not None else mixup_target(y, classes, lam=1.0, smoothing=smoothing)
                    for t, y in zip(soft, half_labels, strict=True)
                ]
            )
        return batch

    def extra_repr(self) -> str:
        return (
            f"size={self.size}, scale={self.scale}, noise_prob={self.noise_prob}, "
            f"coloradapt_prob={self.coloradapt_prob}, tokenadapt={self.tokenadapt is not None}, "
            f"mix={[m is not None for m in self.mixers]}, eda={self.eda is not None}, "
            f"requantize={self.requantize}"
        )
