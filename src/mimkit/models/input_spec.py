"""What an encoder takes as input, stated once and saved with it, so that every consumer (k-NN, probe,
fine-tune, export, analysis) feeds it the right thing instead of guessing from the config it was trained
with: pixels with a normalisation, or a grid of token ids, or a grid of token embeddings."""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, fields
from typing import Any

from mimkit.configs import ARCHS, DataConfig, ModelConfig

KINDS = ("pixels", "token_ids", "token_embeddings")


def _int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"InputSpec.{name} must be an integer >= {minimum}; got {value!r}")
    return value


def _floats(name: str, value: Any) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"InputSpec.{name} must be a sequence of numbers; got {value!r}") from None
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"InputSpec.{name} must be finite; got {value!r}")
    return out


@dataclass(frozen=True, kw_only=True)
class InputSpec:
    """What an encoder takes. Sizes are in the input's own units: pixels for images, grid cells (tokens)
    for token inputs, so one encoder geometry reads the same way for both.

    - ``kind``: "pixels" ([N, C, H, W] floats), "token_ids" ([N, H, W] integers) or "token_embeddings"
      ([N, C, H, W] floats, C the embedding width).
    - ``channels``: 3 for RGB; the embedding width for token embeddings; 1 for token ids.
    - ``mean``, ``std``: the per-channel normalisation of pixel inputs; empty for token inputs.
    - ``img_size``: the training input side; ``eval_size`` (default ``img_size``) and ``crop_pct``: an
      evaluation resizes to ``eval_size / crop_pct`` then centre-crops ``eval_size``.
    - ``patch_size``: input units per patch side; ``grid``: patches per side (h, w), derived if omitted.
    - ``vocab_size``: the number of token ids (token ids only).
    - ``codebook_signature``: for token inputs, the identity of the codebook the training tokens came from
      (:func:`mimkit.tokens.records.codebook_signature`, one number per code, compared with a tolerance):
      ids of another tokenizer mean other codes even when the vocabulary size agrees. None when not known
      (checkpoints written before it was recorded).
    """

    kind: str
    channels: int
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    img_size: int
    eval_size: int | None = None
    crop_pct: float = 0.875
    patch_size: int
    grid: tuple[int, int] | None = None
    vocab_size: int | None = None
    codebook_signature: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            near = difflib.get_close_matches(str(self.kind), KINDS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ValueError(f"InputSpec.kind must be one of {', '.join(KINDS)}; got {self.kind!r}{hint}")
        _int("channels", self.channels)
        _int("img_size", self.img_size)
        _int("patch_size", self.patch_size)

        def set_(name: str, value: Any) -> None:  # normalise a field of this frozen instance
            object.__setattr__(self, name, value)

        set_("mean", _floats("mean", self.mean))
        set_("std", _floats("std", self.std))
        set_("eval_size", self.img_size if self.eval_size is None else _int("eval_size", self.eval_size))
        for name in ("img_size", "eval_size"):
            if getattr(self, name) % self.patch_size:
                raise ValueError(
                    f"InputSpec.{name} ({getattr(self, name)}) is not divisible by patch_size "
                    f"({self.patch_size})"
                )
        side = self.img_size // self.patch_size
        grid = (side, side) if self.grid is None else tuple(self.grid)
        if grid != (side, side):
            raise ValueError(
                f"InputSpec.grid must be img_size / patch_size per side, ({side}, {side}); got {self.grid!r}"
            )
        set_("grid", grid)
        if isinstance(self.crop_pct, bool) or not isinstance(self.crop_pct, (int, float)):
            raise ValueError(f"InputSpec.crop_pct must be a number in (0, 1]; got {self.crop_pct!r}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"InputSpec.crop_pct must lie in (0, 1]; got {self.crop_pct}")
        set_("crop_pct", float(self.crop_pct))
        if self.kind == "pixels":
            if len(self.mean) != self.channels or len(self.std) != self.channels:
                raise ValueError(
                    f"a pixel InputSpec needs mean and std of {self.channels} values (one per channel); "
                    f"got mean {self.mean} and std {self.std}"
                )
            if min(self.std) <= 0:
                raise ValueError(f"InputSpec.std must be positive; got {self.std}")
        elif self.mean or self.std:
            raise ValueError(f"mean and std normalise pixels; a {self.kind} InputSpec has none")
        if self.kind == "token_ids":
            if self.channels != 1:
                raise ValueError(
                    f"a token_ids InputSpec has channels 1 (one id per cell); got {self.channels}"
                )
            _int("vocab_size", self.vocab_size)
        elif self.vocab_size is not None:
            raise ValueError(f"vocab_size applies to token ids only; a {self.kind} InputSpec has none")
        if self.codebook_signature is not None:
            if self.kind == "pixels":
                raise ValueError("codebook_signature identifies a tokenizer; a pixel InputSpec has none")
            set_("codebook_signature", _floats("codebook_signature", self.codebook_signature))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def resize_size(self) -> int:
        """The side an evaluation resizes to before centre-cropping ``eval_size``."""
        return int(self.eval_size / self.crop_pct)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python values only (lists, not tuples), so a checkpoint holding it loads with
        ``torch.load(weights_only=True)`` and it writes as JSON or YAML."""
        return {
            "kind": self.kind,
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
            "img_size": self.img_size,
            "eval_size": self.eval_size,
            "crop_pct": self.crop_pct,
            "patch_size": self.patch_size,
            "grid": list(self.grid),
            "vocab_size": self.vocab_size,
            # only when known: readers of before it was recorded refuse unknown keys
            **({"codebook_signature": list(self.codebook_signature)} if self.codebook_signature else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InputSpec:
        """The inverse of :meth:`to_dict`; an unknown or missing key is an error that names it."""
        if not isinstance(data, Mapping):
            raise ValueError(f"an InputSpec is read from a mapping; got {type(data).__name__}")
        known = [f.name for f in fields(cls)]
        for key in data:
            if key not in known:
                near = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"unknown InputSpec key {key!r}{hint} (known: {', '.join(known)})")
        missing = [f.name for f in fields(cls) if f.default is MISSING and f.name not in data]
        if missing:
            raise ValueError(f"InputSpec is missing {', '.join(map(repr, missing))}")
        return cls(**data)

    @classmethod
    def from_config(cls, model: ModelConfig, data: DataConfig) -> InputSpec:
        """The pixel spec of mimkit's ``model`` and ``data`` config sections (a patch size of None is the
        arch's)."""

        patch = model.patch_size
        if patch is None:
            if model.arch not in ARCHS:
                raise ValueError(f"unknown encoder arch {model.arch!r} (known: {', '.join(ARCHS)})")
            patch = ARCHS[model.arch].patch_size
        return cls(
            kind="pixels",
            channels=len(data.mean),
            mean=data.mean,
            std=data.std,
            img_size=model.img_size,
            eval_size=model.img_size,
            crop_pct=data.crop_pct,
            patch_size=patch,
        )
