"""SeiT++'s training views of token grids, made on the device for a whole batch (a
:class:`~mimkit.methods.base.BatchTransform`): ids -> Token-EDA (SeiT; optional) -> codebook vectors ->
one colour augmentation for the batch (Emb-Noise, ColorAdapt or none) -> the batch split in two halves,
the first cropped in token space (random resized crop, bicubic) and the second through TokenAdapt (lift,
pixel-like geometry, invert), each optionally mixed (CutMix / Mixup with soft targets) -> re-quantised to
ids (SeiT++), or left as vectors (SeiT's continuous-input classifier). Without TokenAdapt weights the
whole batch takes the first path.

The views run in fp32 (the engine calls them outside the autocast of the forward pass). The reference
makes them inside its fp16 autocast block, so its codebook lookup, crops, TokenAdapt and re-quantisation
distances run in fp16 where autocast casts them: a departure on purpose, since fp16 nearest-code search
flips near ties (about 0.2% of the ids of a cropped view with the demo tokenizer's codebook).

The random draws come from one generator per batch seeded from the samples' seeds (a function of run
seed, epoch and index), so a resumed run sees the same views. Mixup/CutMix draw from numpy's global RNG
(timm's ``Mixup``), which checkpoints save and restore.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target

from mimkit.data.loader import per_sample_uniform
from mimkit.data.token_augment import TokenEDA, TokenMixup, colour_choice, draw_device
from mimkit.data.token_geometry import CropBoxes, random_resized_crop, resized_crop, rrc_params
from mimkit.data.token_sources import codebook_of
from mimkit.methods.base import BatchTransform
from mimkit.models.tokenadapt import TokenAdapt, load_tokenadapt
from mimkit.tokens.codebook import embed, load_codebook, requantize


def validate_choice_probabilities(cfg: Any, first: str, second: str) -> None:
    """Two per-batch (or per-sample) choices drawn from one uniform, ``first`` below p1, ``second``
    below p1 + p2 (each declared in [0, 1] on its field): together they must not exceed 1."""
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


# ----------------------------------------------------------------------------------------------------
# TokenAdapt's geometry in f-space

# The augmentation in ``f``-space (:func:`feature_augment`) is SeiT++'s: horizontal flip (p 0.5); then,
# with p 0.5, five affine ops in turn, each with its own p 0.5 and its own bilinear resampling with fill 0
# and torchvision's fill mask (rotation U(-30, 30) degrees, x- and y-translation up to 20 % of the width
# and height, x- and y-shear U(0, 15) degrees, one-sided as the reference's); then a random resized crop
# per sample (bicubic).
# Like torchvision on a 4-D tensor, the flip and the affine ops draw one set of parameters for the whole
# batch; unlike torchvision, translations are kept as fractions rather than rounded to whole positions, so
# that one draw is the same geometry at every resolution (which pairs pixel and feature augmentations when
# TokenAdapt is trained).

# SeiT++'s f-space geometry (token_transform.build_geo_transform)
FLIP_PROB = 0.5
AFFINE_PROB = 0.5  # RandomApply around the five ops
OP_PROB = 0.5  # each op's own gate
MAX_ROTATION = 30.0  # degrees, U(-30, 30)
MAX_TRANSLATE = 0.2  # fraction of the width (x) or height (y), U(-0.2, 0.2)
MAX_SHEAR = 15.0  # degrees, U(0, 15): one-sided


class AffineParams(NamedTuple):
    """Per-sample values of the five affine ops; 0 where an op is not applied. Angles and shears in
    degrees (torchvision's conventions), translations as fractions of the width (x) and height (y)."""

    angle: torch.Tensor  # [B]
    translate: torch.Tensor  # [B, 2] (x, y)
    shear: torch.Tensor  # [B, 2] (x, y)


class GeoParams(NamedTuple):
    """One draw of :func:`feature_augment`: flip, affine ops, then crop boxes on the map they were drawn
    for (:func:`scale_boxes` carries them to a finer map of the same image)."""

    flip: torch.Tensor  # [B] bool
    affine: AffineParams
    boxes: CropBoxes


def feature_augment_params(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.2, 1.0),
    *,
    per_sample: bool = False,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> GeoParams:
    """Draw :func:`feature_augment`'s parameters for ``batch`` maps of ``height`` x ``width``: the flip
    and the affine ops once for the whole batch (torchvision's law on a 4-D tensor) or, with
    ``per_sample``, independently per sample; the crop boxes always per sample (:func:`rrc_params`)."""
    device = draw_device(generator, device)
    n = batch if per_sample else 1
    u = torch.rand((n, 12), generator=generator, device=device).expand(batch, -1)
    gates = (u[:, 2:7] < OP_PROB) & (u[:, 1:2] < AFFINE_PROB)
    angle = (u[:, 7] * 2 - 1) * MAX_ROTATION * gates[:, 0]
    translate = (u[:, 8:10] * 2 - 1) * MAX_TRANSLATE * gates[:, 1:3]
    shear = u[:, 10:12] * MAX_SHEAR * gates[:, 3:5]
    boxes = rrc_params(batch, height, width, scale, generator=generator, device=device)
    return GeoParams(u[:, 0] < FLIP_PROB, AffineParams(angle, translate, shear), boxes)


def scale_boxes(boxes: CropBoxes, factor: int) -> CropBoxes:
    """Crop boxes of a map carried to one ``factor`` times finer (the f-space boxes of a pixel crop)."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"boxes scale by a whole factor >= 1; got {factor!r}")
    return CropBoxes(*(b * factor for b in boxes))


def _affine_theta(
    angle: torch.Tensor, translate: torch.Tensor, shear: torch.Tensor, height: int, width: int
) -> torch.Tensor:
    """[B, 2, 3] matrices for ``F.affine_grid`` (align_corners False) of torchvision's affine about the
    map's centre: output -> input, in the normalised coordinates of a ``height`` x ``width`` map."""
    rot, sx, sy = (torch.deg2rad(t.double()) for t in (angle, shear[:, 0], shear[:, 1]))
    tx, ty = translate[:, 0].double() * width, translate[:, 1].double() * height  # pixels
    # the forward map R(angle) SHy(sy) SHx(sx) is [[a, b], [c, d]] (det 1); its inverse is [[d, -b], [-c, a]]
    a = torch.cos(rot - sy) / torch.cos(sy)
    b = -(a * torch.tan(sx) + torch.sin(rot))
    c = torch.sin(rot - sy) / torch.cos(sy)
    d = torch.cos(rot) - c * torch.tan(sx)
    m00, m01, m10, m11 = d, -b, -c, a
    m02, m12 = -(m00 * tx + m01 * ty), -(m10 * tx + m11 * ty)
    theta = torch.stack(
        [
            torch.stack([m00, m01 * height / width, m02 * 2 / width], dim=1),
            torch.stack([m10 * width / height, m11, m12 * 2 / height], dim=1),
        ],
        dim=1,
    )
    return theta


def affine_warp(x: torch.Tensor, params: AffineParams) -> torch.Tensor:
    """SeiT++'s five affine ops on maps [B, C, H, W], in its order (rotation, x-translation,
    y-translation, x-shear, y-shear), each its own bilinear resampling with fill 0 as a separate
    torchvision ``RandomAffine`` is (its fill mask included, so border cells match it); a sample whose
    value for an op is 0 is left untouched by it."""
    if x.ndim != 4 or not x.is_floating_point():
        raise ValueError(f"expected floating maps [B, C, H, W]; got {tuple(x.shape)} {x.dtype}")
    batch, _, height, width = x.shape
    angle, translate, shear = (p.to(x.device) for p in params)
    zero, zeros = torch.zeros_like(angle), torch.zeros_like(translate)
    ops = [
        (angle, (angle, zeros, zeros)),
        (translate[:, 0], (zero, translate * translate.new_tensor([1.0, 0.0]), zeros)),
        (translate[:, 1], (zero, translate * translate.new_tensor([0.0, 1.0]), zeros)),
        (shear[:, 0], (zero, zeros, shear * shear.new_tensor([1.0, 0.0]))),
        (shear[:, 1], (zero, zeros, shear * shear.new_tensor([0.0, 1.0]))),
    ]
    for value, (a, t, s) in ops:
        on = value != 0
        if not bool(on.any()):
            continue
        theta = _affine_theta(a, t, s, height, width)
        grid = F.affine_grid(theta.to(x.dtype), [batch, 1, height, width], align_corners=False)
        # torchvision's fill: a channel of ones is resampled with the maps and the result blended with
        # the fill (0) by it, so cells that straddle the border are dimmed once more (by the share of
        # their bilinear footprint that fell outside), not only zero-padded
        ones = x.new_ones(batch, 1, height, width)
        warped = F.grid_sample(
            torch.cat([x, ones], 1),
            grid.to(x.dtype),
            mode="bilinear",
            padding_mode="zeros",
            align_corners=False,
        )
        warped = warped[:, :-1] * warped[:, -1:]
        x = torch.where(on.view(-1, 1, 1, 1), warped.to(x.dtype), x)
    return x


def apply_geometry(x: torch.Tensor, params: GeoParams, size: int | tuple[int, int]) -> torch.Tensor:
    """The deterministic part of :func:`feature_augment`: flip, the affine ops, then each sample's crop
    box resized to ``size`` (bicubic). Works on any maps the boxes fit (features, or images)."""
    x = torch.where(params.flip.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)
    return resized_crop(affine_warp(x, params.affine), params.boxes, size)


def feature_augment(
    feat: torch.Tensor,
    size: int | tuple[int, int],
    scale: tuple[float, float] = (0.2, 1.0),
    *,
    generator: torch.Generator | None = None,
    return_params: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, GeoParams]:
    """SeiT++'s geometry of f-space maps [B, D, H, W] (one half-batch) to [B, D, size, size]: flip, the
    gated affine ops (one draw for the whole tensor), a random resized crop per sample with area
    fraction in ``scale``. ``generator`` (on the maps' device) makes the draw reproducible."""
    params = feature_augment_params(
        feat.shape[0], feat.shape[-2], feat.shape[-1], scale, generator=generator, device=feat.device
    )
    out = apply_geometry(feat, params, size)
    return (out, params) if return_params else out


@torch.no_grad()
def tokenadapt_view(
    emb: torch.Tensor,
    ta: TokenAdapt,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    *,
    generator: torch.Generator | None = None,
    mix: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """SeiT++'s TokenAdapt path of an emb map [B, D, G, G]: f, :func:`feature_augment` to 2 * ``size``,
    ``mix`` (fine-tuning's Mixup/CutMix, in f-space), g, argmax -> ids [B, size, size]."""
    feat = feature_augment(ta.lift(emb), 2 * size, scale, generator=generator)
    if mix is not None:
        feat = mix(feat)
    return ta.invert(feat)


# ----------------------------------------------------------------------------------------------------
# the views


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
