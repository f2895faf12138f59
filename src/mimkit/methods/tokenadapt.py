"""TokenAdapt as something the engine trains (``mimkit tokenadapt train``): learn f and g so that a
geometric augmentation done in f-space gives the tokens the tokenizer would give the augmented image.

SeiT++ does not release its TokenAdapt training code; the paper describes paired supervision from
pixels, which is what this does. For an image x at the tokenizer's size S (grid G = S / patch), one
draw A of SeiT++'s geometry per sample (flip; with p 0.5 the five gated affine ops; a random resized
crop) is applied twice: to the pixels, giving the target ids T(A(x)), and in f-space to the lifted
codebook vectors of T(x) (2G x 2G, the crop box drawn there and carried to pixels, translations as
fractions), so the prediction g(A(f(E[T(x)]))) is logits over the K codes on the G x G grid. The loss is
the cross-entropy over all positions.

g is trained at the grid it is used at, ``out_grid`` U (SeiT++ on ImageNet: the tokenizer's 32 cells, the
model's 28): the f-space crop is resized to 2U and the target T(A(x)) is taken to U x U as the token views'
crop path takes a grid to the model's (codebook vectors, bicubic, re-quantised). On CIFAR-10 with the demo
tokenizer (README), g trained at G scores 26.4% used at U = 7/8 G, and 27.3% trained at U.

The frozen tokenizer stays outside the optimizer and the checkpoint: it lives in the device-side batch
transform (:class:`PairedViews`), which makes the pairs. Logged beside the loss: the token accuracy, and
two baselines on the same pairs: the same geometry applied to the emb map of T(x) and re-quantised
(what token-space augmentation does without TokenAdapt), and the ids of x left as they were.

f and g are this section (width, depth, MLP ratio; heads are 64 wide, as the official attention's, so
that the SeiT++ code loads the result); the ``model`` section is not used, and the images are read at the
tokenizer's size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torchvision.transforms import v2 as T

from mimkit.configs import checked
from mimkit.data.token_geometry import CropBoxes
from mimkit.data.transforms import BICUBIC, Views, to_normalized
from mimkit.methods.base import BatchTransform, Method, StepOutput
from mimkit.methods.token_views import (
    AffineParams,
    GeoParams,
    apply_geometry,
    batch_generator,
    feature_augment_params,
    scale_boxes,
)
from mimkit.models.enhancing import DEFAULT_HEAD_DIM
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenadapt import TokenAdapt
from mimkit.models.tokenizer import LoadedTokenizer, VQTokenizer, load_tokenizer
from mimkit.tokens.codebook import embed, requantize


@dataclass
class TokenAdaptConfig:
    name: str = "tokenadapt"
    # a `mimkit tokenizer train` run folder or its tokenizer.pt: the tokens TokenAdapt learns (K = its codes)
    tokenizer: str | None = None
    # f and g's width; heads are 64 wide as the official attention's, so width is a multiple of 64 (>= 128:
    # the official layout drops the output projection of a single head)
    width: int = 384
    depth: int = checked(1, low=1)
    mlp_ratio: float = 4.0
    # the grid g is trained at and its stored position table: set it to the token model's grid (SeiT++'s
    # file: 28 for a 32-cell tokenizer), what g outputs in MTM and fine-tuning; None: the tokenizer's grid
    out_grid: int | None = checked(None, low=1, null=" for the tokenizer's grid")
    # the paired crop's area fraction U(min_crop_scale, 1)
    min_crop_scale: float = checked(0.2, low=0, high=1, low_open=True)
    eval_images: int = checked(
        1000, low=1
    )  # the accuracy at the end is measured on this many eval.val images

    def validate(self) -> None:
        if self.width < 2 * DEFAULT_HEAD_DIM or self.width % DEFAULT_HEAD_DIM:
            raise ValueError(
                f"'method.width' must be a multiple of {DEFAULT_HEAD_DIM} (the official head width) and at "
                f"least {2 * DEFAULT_HEAD_DIM}; got {self.width}"
            )
        hidden = self.width * self.mlp_ratio
        if self.mlp_ratio <= 0 or hidden != int(hidden):
            raise ValueError(f"'method.mlp_ratio' must give a whole MLP width; got {self.mlp_ratio}")


def load_paired_tokenizer(path: str | None) -> LoadedTokenizer:
    """The tokenizer TokenAdapt learns (``method.tokenizer``, required), on the CPU (also while a method
    is built on the meta device to check a config). Its patch must be even: a token is 2 x 2 cells of
    f-space."""
    if not path:
        raise ValueError(
            "'method.tokenizer' is not set: TokenAdapt learns the tokens of a trained tokenizer; give "
            "method.tokenizer=PATH (a `mimkit tokenizer train` run folder or its tokenizer.pt)"
        )
    with torch.device("cpu"):
        try:
            loaded = load_tokenizer(path)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"method.tokenizer: {err}") from err
    if loaded.model.shape.patch_size % 2:
        raise ValueError(
            f"the tokenizer at '{path}' has {loaded.model.shape.patch_size} px tokens; TokenAdapt's f-space "
            "has 2 x 2 cells per token, so the patch size must be even"
        )
    return loaded


def _geo_entries(params: GeoParams) -> dict[str, torch.Tensor]:
    return {
        "geo_flip": params.flip,
        "geo_angle": params.affine.angle,
        "geo_translate": params.affine.translate,
        "geo_shear": params.affine.shear,
        "geo_boxes": torch.stack(list(params.boxes), dim=1),
    }


def _geo_params(batch: dict[str, torch.Tensor]) -> GeoParams:
    affine = AffineParams(batch["geo_angle"], batch["geo_translate"], batch["geo_shear"])
    return GeoParams(batch["geo_flip"], affine, CropBoxes(*batch["geo_boxes"].unbind(1)))


class PairedViews(BatchTransform):
    """Images [B, C, S, S] (the tokenizer's view) -> the pairs a step trains on: ``emb`` [B, D, G, G], the
    codebook vectors of the tokenizer's ids of the images; ``target`` [B, G, G], its ids of the augmented
    images; the geometry (``geo_*``) that f-space must apply; and the two baselines' ids (``ids``: left as
    they were, ``warped``: the geometry applied to ``emb`` and re-quantised). One draw per sample, from a
    generator seeded by the samples' seeds."""

    def __init__(
        self,
        tokenizer: VQTokenizer,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        min_scale: float,
        out_grid: int | None = None,
    ) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.out_grid = out_grid or tokenizer.shape.grid
        self.register_buffer("codebook", tokenizer.codebook().float().clone(), persistent=False)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.scale = (min_scale, 1.0)

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        images = batch["image"].float()
        shape = self.tokenizer.shape
        cells = 2 * shape.grid  # f-space side
        params = feature_augment_params(
            images.shape[0],
            cells,
            cells,
            self.scale,
            per_sample=True,
            generator=batch_generator(batch, images.device),
            device=images.device,
        )
        in_pixels = params._replace(boxes=scale_boxes(params.boxes, shape.img_size // cells))
        # pixels in [0, 1], as a torchvision augmentation of the image (zero fill is black)
        augmented = apply_geometry(images * self.std + self.mean, in_pixels, shape.img_size).clamp(0, 1)
        ids = self.tokenizer.encode(images)
        emb = embed(ids, self.codebook)
        finer = F.interpolate(emb, scale_factor=2, mode="nearest")
        out = 2 * self.out_grid  # the f-space crop is resized to twice the grid g outputs
        warped = requantize(F.avg_pool2d(apply_geometry(finer, params, out), 2), self.codebook)
        target = self.tokenizer.encode((augmented - self.mean) / self.std)
        return {
            **batch,
            "emb": emb,
            "ids": self.to_out_grid(ids),
            "warped": warped,
            "target": self.to_out_grid(target),
            **_geo_entries(params),
        }

    def to_out_grid(self, ids: torch.Tensor) -> torch.Tensor:
        """Id grids of the tokenizer's grid taken to g's output grid as the token views' crop path takes a
        grid to the model's (codebook vectors resized bicubically, re-quantised): no tokenizer gives ids at
        another grid, and this is what the other half of an MTM batch sees at that grid."""
        if ids.shape[-1] == self.out_grid:
            return ids
        size = (self.out_grid, self.out_grid)
        emb = F.interpolate(embed(ids, self.codebook), size=size, mode="bicubic", align_corners=False)
        return requantize(emb, self.codebook)


class TokenAdaptMethod(Method):
    """Trains a :class:`TokenAdapt` for a tokenizer's tokens; it has no encoder to evaluate by k-NN
    (``encoders()`` is empty). The tokenizer is kept out of the module tree (a tuple), so that it is
    neither trained nor saved."""

    name = "tokenadapt"
    Config = TokenAdaptConfig

    def __init__(self, tokenadapt: TokenAdapt, loaded: LoadedTokenizer, cfg: TokenAdaptConfig) -> None:
        super().__init__()
        self.cfg, self.tokenadapt, self.loaded = cfg, tokenadapt, loaded
        shape = loaded.model.shape
        self.spec = InputSpec(
            kind="pixels",
            channels=shape.channels,
            mean=tuple(loaded.mean),
            std=tuple(loaded.std),
            img_size=shape.img_size,
            crop_pct=1.0,
            patch_size=shape.patch_size,
        )

    @classmethod
    def build(cls, model_cfg: Any, method_cfg: TokenAdaptConfig, data_cfg: Any = None) -> TokenAdaptMethod:
        loaded = load_paired_tokenizer(method_cfg.tokenizer)
        tok = loaded.model
        tokenadapt = TokenAdapt(
            tok.vocab_size,
            token_dim=tok.shape.code_dim,
            width=method_cfg.width,
            num_heads=method_cfg.width // DEFAULT_HEAD_DIM,
            mlp_ratio=method_cfg.mlp_ratio,
            in_grid=tok.shape.grid,
            out_grid=method_cfg.out_grid or tok.shape.grid,
            depth=method_cfg.depth,
        )
        return cls(tokenadapt, loaded, method_cfg)

    def encoders(self) -> dict:
        return {}

    def input_spec(self) -> InputSpec:
        return self.spec

    def train_transform(self, data: Any) -> Views:
        """The images as the tokenizer sees them (squashed to its size, its normalisation): the records of
        a token dataset it makes. The augmentation is the batch transform's."""
        size = self.spec.img_size
        return Views(
            image=T.Compose(
                [T.Resize((size, size), interpolation=BICUBIC, antialias=True), *to_normalized(self.spec)]
            )
        )

    def batch_transform(self) -> PairedViews:
        return PairedViews(
            self.loaded.model,
            self.spec.mean,
            self.spec.std,
            self.cfg.min_crop_scale,
            self.tokenadapt.out_grid,
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        target = batch["target"]
        feat = apply_geometry(self.tokenadapt.lift(batch["emb"]), _geo_params(batch), 2 * target.shape[-1])
        logits = self.tokenadapt.invert_logits(feat).float()
        loss = F.cross_entropy(logits, target)
        with torch.no_grad():
            metrics = {
                "acc": (logits.argmax(1) == target).float().mean(),
                "warp_acc": (batch["warped"] == target).float().mean(),
                "identity_acc": (batch["ids"] == target).float().mean(),
            }
        return StepOutput(loss, metrics)


__all__ = ["PairedViews", "TokenAdaptConfig", "TokenAdaptMethod", "load_paired_tokenizer"]
