"""View transforms on uint8 [C, H, W] tensors (torchvision transforms v2). A method's training views are
part of its recipe; evaluation uses one deterministic view."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from mimkit.models.input_spec import InputSpec

BICUBIC = InterpolationMode.BICUBIC


def to_normalized(data: Any) -> list[Callable]:
    """uint8 -> float in [0, 1] -> (x - mean) / std. ``data``: anything with ``mean`` and ``std``, a data
    config or an encoder's input spec; a spec of token inputs takes no images, which is said here rather
    than as a shape error deep in the encoder. Training data resolved to ``normalize="device"``
    (:func:`training_data`) keeps uint8 here: :class:`DeviceNormalize` does the same on the device."""
    kind = getattr(data, "kind", "pixels")
    if kind != "pixels":
        raise ValueError(f"this encoder takes {kind}, not images; image views and evaluations need pixels")
    if getattr(data, "normalize", "loader") == "device":
        return []
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(mean=list(data.mean), std=list(data.std))]


def training_data(data: Any, device: torch.device, kind: str = "pixels") -> Any:
    """``data`` (a DataConfig) with ``data.normalize`` resolved for training on ``device``: auto is
    "device" on GPUs and wherever the device decodes (uint8 batches are a quarter of the bytes to pass
    between processes and to copy to the GPU, and the workers skip the float work), else "loader"; token
    inputs are never normalised, nor decoded on the device."""
    where = data.normalize
    if kind != "pixels":
        if data.decode == "device":
            raise ValueError(
                f"data.decode=device decodes images; this model reads {kind}: use data.decode=cpu"
            )
        where = "loader"
    elif where == "auto":
        where = "device" if device.type == "cuda" or data.decode == "device" else "loader"
    return dataclasses.replace(data, normalize=where)


IMAGES, PATCH_ROWS = "images", "patch_rows"  # the layouts a view's uint8 entry may have


class DeviceNormalize(nn.Module):
    """:func:`to_normalized` on the device, for the uint8 entries of a training batch, each in the layout
    its views declare (:attr:`Views.layouts`): ``images`` [B, C, H, W] (channels at dim 1) or ``patch_rows``
    [B, L, p*p*C] (channels innermost: :func:`patchify`'s layout, Latent MIM's gapped patches). The same
    float32 operations in the same order as the loader's, so the numbers are the same; entries of other
    dtypes pass unchanged. It may run on the loader's batch: the images move to this module's device
    first."""

    def __init__(self, mean: Sequence[float], std: Sequence[float], layouts: dict[str, str]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(list(mean), dtype=torch.float32), persistent=False)
        self.register_buffer("std", torch.as_tensor(list(std), dtype=torch.float32), persistent=False)
        self.layouts = dict(layouts)

    def forward(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        channels = len(self.mean)
        for key, value in batch.items():
            if not (torch.is_tensor(value) and value.dtype == torch.uint8):
                continue
            layout = self.layouts.get(key)
            value = value.to(self.mean.device, non_blocking=True)
            if layout == IMAGES and value.ndim == 4 and value.shape[1] == channels:
                shape = (1, channels, 1, 1)
                x = value.to(torch.float32).mul_(1.0 / 255)
            elif layout == PATCH_ROWS and value.ndim == 3 and value.shape[-1] % channels == 0:
                shape = (1, 1, 1, channels)
                x = value.to(torch.float32).mul_(1.0 / 255).unflatten(-1, (-1, channels))
            else:
                expected = {
                    IMAGES: f"images [B, {channels}, H, W]",
                    PATCH_ROWS: f"patch rows [B, L, p*p*{channels}]",
                }.get(layout, "an entry its views declare a layout for")
                raise ValueError(
                    f"batch entry '{key}': uint8 of shape {list(value.shape)}; expected {expected} to "
                    "normalise on the device"
                )
            out[key] = x.sub_(self.mean.view(shape)).div_(self.std.view(shape)).reshape(value.shape)
        return out

    def extra_repr(self) -> str:
        return f"mean={self.mean.tolist()}, std={self.std.tolist()}, layouts={self.layouts}"


def mae_crop(img_size: int, min_scale: float, data: Any) -> T.Compose:
    """MAE's view: RandomResizedCrop(scale=(min_scale, 1), bicubic), horizontal flip, normalize."""
    return T.Compose(
        [
            T.RandomResizedCrop(img_size, scale=(min_scale, 1.0), interpolation=BICUBIC, antialias=True),
            T.RandomHorizontalFlip(),
            *to_normalized(data),
        ]
    )


class Views:
    """Named pipelines applied to the same image: ``Views(image=...)`` -> {"image": tensor}. ``layouts``:
    the layout of each image entry, for what finishes it on the device (``images`` unless said:
    ``patch_rows`` for patches flattened in the loader)."""

    def __init__(
        self, *, layouts: dict[str, str] | None = None, **pipelines: Callable[[torch.Tensor], torch.Tensor]
    ) -> None:
        self.pipelines = pipelines
        self.layouts = {name: IMAGES for name in pipelines} | dict(layouts or {})

    def __call__(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: pipeline(img) for name, pipeline in self.pipelines.items()}

    def __repr__(self) -> str:
        return f"Views({', '.join(self.pipelines)})"


class MaskNoise:
    """A sample's mask noise ``U[0, 1)`` of shape [num_patches] (the image is ignored), drawn in the loader
    from the per-sample seeded generator as I-JEPA's mask collator does: a sample's mask is then a function
    of (seed, epoch, index) alone, whatever its batch, process or world size, so runs resume exactly on
    another number of processes. Place it after the image pipelines of a :class:`Views` (they run in
    order), so that it leaves their random draws as they were."""

    def __init__(self, num_patches: int) -> None:
        self.num_patches = num_patches

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        return torch.rand(self.num_patches)

    def __repr__(self) -> str:
        return f"MaskNoise(num_patches={self.num_patches})"


def simple_crop(img_size: int, padding: int) -> T.Compose:
    """DeiT III's "simple random crop" (LUT's views): shorter side to img_size (bicubic), random crop with
    reflect padding, horizontal flip."""
    return T.Compose(
        [
            T.Resize(img_size, interpolation=BICUBIC, antialias=True),
            T.RandomCrop(img_size, padding=padding, padding_mode="reflect"),
            T.RandomHorizontalFlip(),
        ]
    )


def strong_colour(blur_sigma: tuple[float, float]) -> T.Compose:
    """LUT's second view on top of the crop: colour jitter (p 0.8) then exactly one of grayscale, solarize
    (threshold 128) and Gaussian blur (sigma uniform in ``blur_sigma``)."""
    kernel = 2 * math.ceil(3 * blur_sigma[1]) + 1
    return T.Compose(
        [
            T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
            T.RandomChoice(
                [
                    T.Grayscale(num_output_channels=3),
                    T.RandomSolarize(threshold=128, p=1.0),
                    T.GaussianBlur(kernel, sigma=tuple(blur_sigma)),
                ]
            ),
        ]
    )


class CenterCropIds:
    """The centre size x size cells of an id grid [H, W] (SeiT's evaluation crop, 32 -> 28): ids cannot be
    resized, only cropped."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h, w = ids.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"cannot centre-crop {self.size}x{self.size} from an id grid of {h}x{w}")
        top, left = (h - self.size) // 2, (w - self.size) // 2
        return ids[..., top : top + self.size, left : left + self.size].long()

    def __repr__(self) -> str:
        return f"CenterCropIds(size={self.size})"


class RandomCropIds:
    """A random size x size window of an id grid [H, W], as long ids: the one geometric augmentation that
    is exact on ids (a mirrored grid is not the grid of the mirrored image; SeiT++ flips through
    TokenAdapt)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, ids: torch.Tensor) -> torch.Tensor:
        h, w = ids.shape[-2:]
        if h < self.size or w < self.size:
            raise ValueError(f"cannot crop {self.size}x{self.size} from an id grid of {h}x{w}")
        top = int(torch.randint(h - self.size + 1, ()))
        left = int(torch.randint(w - self.size + 1, ()))
        return ids[..., top : top + self.size, left : left + self.size].long()

    def __repr__(self) -> str:
        return f"RandomCropIds(size={self.size})"


def as_ids(ids: torch.Tensor) -> torch.Tensor:
    """A stored id grid (uint8 / uint16) as the long tensor an embedding takes."""
    return ids.long()


def eval_view(img_size: int, data: Any) -> Views:
    """{"image"}: resize the shorter side to img_size / crop_pct, center-crop img_size, normalize.
    ``data``: anything with ``mean``, ``std`` and ``crop_pct``; evaluations of an encoder pass its input
    spec (and its ``eval_size``), so they see what it was trained on whatever a recipe says. A spec of
    token ids: the centre img_size x img_size cells of the source's id grids (under "image", the entry
    an encoder reads whatever its input); for a spec of token embeddings the same ids, which a SeiT
    classifier turns into codebook vectors itself."""
    if getattr(data, "kind", "pixels") in ("token_ids", "token_embeddings"):  # the latter: ids the
        return Views(image=CenterCropIds(img_size))  # classifier embeds with its codebook
    return Views(
        image=T.Compose(
            [
                T.Resize(int(img_size / data.crop_pct), interpolation=BICUBIC, antialias=True),
                T.CenterCrop(img_size),
                *to_normalized(data),
            ]
        )
    )


def tokenizer_view(size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> Views:
    """{"image"}: squashed to size x size (bicubic), normalised as the tokenizer was trained."""
    spec = InputSpec(kind="pixels", channels=len(mean), mean=mean, std=std, img_size=size, patch_size=1)
    return Views(
        image=T.Compose([T.Resize((size, size), interpolation=BICUBIC, antialias=True), *to_normalized(spec)])
    )
