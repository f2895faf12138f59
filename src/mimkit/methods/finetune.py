"""Fine-tuning (MAE's recipe): the encoder as a classifier with learnable positions (resampled if the
size changes), mean pooling + fc_norm or cls, drop path rising over the blocks, layer-wise lr decay,
RandAugment, random erasing, Mixup/CutMix with label smoothing, and an optional model EMA. Trained by the
one engine; its settings are the config's ``method`` section (``method=finetune``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from timm.utils import ModelEmaV2
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.configs import Config
from mimkit.data.transforms import Views, eval_view
from mimkit.methods.base import StepOutput, Trainable
from mimkit.models.input_spec import InputSpec
from mimkit.models.pos_embed import resample_pos_embed
from mimkit.models.vit import LayerNorm6, ViTEncoder


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    checkpoint: str = ""  # run folder, .pt checkpoint, .safetensors export or official file (required)
    weights: str = "student"  # student | teacher
    img_size: int | None = None  # None: the checkpoint's; another size resamples the position table
    pool: str = "avg"  # avg: mean of the patch tokens + a new fc_norm (the encoder's norm is dropped) | cls
    drop_path: float = 0.1  # rising linearly over the blocks to this value
    layer_decay: float = 0.75  # lr scale ld^(depth + 1 - layer id); ids: stem 0, block i -> i + 1, head last
    head_init_std: float = 2e-5
    min_crop_scale: float = 0.08
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null: none
    reprob: float = 0.25  # random erasing
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    num_classes: int | None = None

    def validate(self) -> None:
        if self.pool not in ("avg", "cls"):
            raise ValueError(f"'method.pool' must be avg or cls; got {self.pool!r}")
        if not 0 < self.layer_decay <= 1:
            raise ValueError(f"'method.layer_decay' must lie in (0, 1]; got {self.layer_decay}")
        if not 0 <= self.drop_path < 1:
            raise ValueError(f"'method.drop_path' must lie in [0, 1); got {self.drop_path}")
        if self.img_size is not None and self.img_size < 1:
            raise ValueError(
                f"'method.img_size' must be at least 1 (or null for the checkpoint's); got {self.img_size}"
            )
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"'method.min_crop_scale' must lie in (0, 1]; got {self.min_crop_scale}")

    def validate_with(self, cfg: Config) -> None:
        """Mixup and CutMix pair the images of a batch."""
        if (self.mixup > 0 or self.cutmix > 0) and cfg.optim.batch_size % 2:
            raise ValueError(
                "Mixup/CutMix pair images within a batch: 'optim.batch_size' must be even; "
                f"got {cfg.optim.batch_size}"
            )


class FineTune(Trainable):
    """The encoder as a classifier: learnable positions (resampled if the size changes), mean pooling +
    fc_norm or the cls token, a Linear head (trunc-normal std 2e-5), drop path, layer-wise lr decay (timm's
    groups), Mixup/CutMix with label smoothing in the step, and an optional model EMA."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type] = FinetuneConfig

    def __init__(
        self, encoder: ViTEncoder, cfg: FinetuneConfig, num_classes: int, input_spec: InputSpec | None = None
    ) -> None:
        """``input_spec``: what the classifier takes (the encoder's by default, or a task's with another
        evaluation crop), at the fine-tuning size."""
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        spec = {**encoder.spec, "drop_path_rate": cfg.drop_path}
        if cfg.img_size is not None:
            spec["img_size"] = cfg.img_size
        model = ViTEncoder(**spec)
        state = encoder.state_dict()
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.grid_size)
        model.load_state_dict(state)
        given = input_spec or encoder.input_spec
        size = spec["img_size"]
        if size != given.img_size:  # the same normalisation and crop at the new size
            given = replace(given, img_size=size, eval_size=size, grid=None)
        model.input_spec = given
        model.pos_embed.requires_grad_(True)
        if cfg.pool == "avg":
            model.global_pool, model.norm, model.fc_norm = "avg", nn.Identity(), LayerNorm6(model.embed_dim)
        model.head = nn.Linear(model.embed_dim, num_classes)
        model.num_classes = num_classes
        nn.init.trunc_normal_(model.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(model.head.bias)
        self.model = model
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(
                mixup_alpha=cfg.mixup,
                cutmix_alpha=cfg.cutmix,
                label_smoothing=cfg.label_smoothing,
                num_classes=num_classes,
            )
        self.ema = None
        if cfg.model_ema:
            # the copy is a submodule (so checkpoints save and resume it) but only ever moves by update():
            # without gradients it stays out of the optimizer and out of DDP's reduction buckets, which
            # would otherwise wait for gradients it never gets
            self.ema = ModelEmaV2(model, decay=cfg.model_ema_decay).requires_grad_(False)

    def logits(self, images: torch.Tensor, ema: bool = False) -> torch.Tensor:
        return (self.ema.module if ema else self.model)(images)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        images, labels = batch["image"], batch["label"]
        if self.training and self.mixup is not None:
            images, soft = self.mixup(images, labels)
            loss = SoftTargetCrossEntropy()(self.model(images).float(), soft)
            return StepOutput(loss, {})
        logits = self.model(images).float()
        loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
        return StepOutput(loss, {"train_acc": (logits.argmax(1) == labels).float().mean()})

    def after_step(self, progress: float) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def param_groups(self, weight_decay: float, decay_tokens: bool = False) -> list[dict]:
        """timm's layer-decay groups: stem (cls, positions, patch embedding) id 0, block i -> i + 1, the
        rest (fc_norm, head) last; no decay for 1-D tensors, positions and cls (the MAE recipe)."""
        return param_groups_layer_decay(
            self.model,
            weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=self.cfg.layer_decay,
        )

    def train_transform(self, data: Any) -> Views:
        """timm's training transform: RandomResizedCrop (bicubic), flip, RandAugment, normalize, random
        erasing (on PIL images, as timm expects), at the size and normalisation of the model's input spec."""
        spec = self.model.input_spec
        timm_transform = create_transform(
            spec.img_size,
            is_training=True,
            scale=(self.cfg.min_crop_scale, 1.0),
            auto_augment=self.cfg.rand_augment,
            interpolation="bicubic",
            re_prob=self.cfg.reprob,
            re_mode="pixel",
            re_count=1,
            mean=spec.mean,
            std=spec.std,
        )
        _posterize_compat(timm_transform)
        return Views(image=T.Compose([T.ToPILImage(), timm_transform]))

    def eval_transform(self, data: Any) -> Views:
        """The evaluation view: the model's input spec, centre-cropped at ``data.crop_pct`` (the
        checkpoint's unless the run gives another; see :func:`mimkit.runs.classify.task_config`)."""
        spec = replace(self.model.input_spec, crop_pct=data.crop_pct)
        return eval_view(spec.eval_size, spec)

    @classmethod
    def build(cls, encoder: ViTEncoder, info: dict, cfg: FinetuneConfig, num_classes: int) -> FineTune:
        return cls(encoder, cfg, num_classes, info.get("input_spec"))


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits kept giving the black image older Pillow gave (Pillow 11+ refuses 0,
    which timm's increasing posterize asks for at magnitude 10)."""
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _posterize_compat(transform: Any) -> None:
    for t in getattr(transform, "transforms", []):
        for op in getattr(t, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = _posterize
