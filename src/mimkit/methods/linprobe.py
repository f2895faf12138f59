"""Linear probing (MAE's protocol): a frozen encoder, BatchNorm without affine, a Linear layer, LARS
(mae_lut.md section 4, latent_mim.md section 11). A module whose forward(batch) returns a StepOutput, so the
one engine trains it; its settings are the config's ``method`` section (``method=linprobe``, with
``method.checkpoint`` the encoder to evaluate)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.configs import POOLS, Config, checked
from mimkit.data.loader import FeatureDataset, ViewDataset
from mimkit.data.sources import ImageSource
from mimkit.data.transforms import BICUBIC, RandomCropIds, Views, eval_view, to_normalized
from mimkit.distributed import DistEnv
from mimkit.eval.features import extract_features
from mimkit.methods.base import StepOutput, Trainable
from mimkit.models.vit import ViTEncoder


@dataclass
class LinearProbeConfig:
    name: str = "linprobe"
    checkpoint: str = ""  # run folder, .pt checkpoint, .safetensors export or official file (required)
    weights: str = "student"  # student | teacher
    pool: str | None = checked(None, choices=POOLS, null=" for the method's")  # None: cls (mean: Latent MIM)
    min_crop_scale: float = checked(
        0.08, low=0, high=1, low_open=True
    )  # RandomResizedCrop(scale=(min_crop_scale, 1)) + flip
    # fast mode: features are extracted once (cache_passes augmented passes over the training set, or
    # the evaluation view if 0) and the probe is trained on them; the full mode augments every epoch
    cached: bool = False
    cache_passes: int = checked(1, low=0)
    num_classes: int | None = None  # None: from the training labels


class LinearProbe(Trainable):
    """A frozen encoder (always in eval mode, no gradient), then BatchNorm1d(affine=False, eps 1e-6) and a
    Linear layer (trunc-normal std 0.01). Batches carry images, or cached features under 'features'."""

    name: ClassVar[str] = "linprobe"
    Config: ClassVar[type] = LinearProbeConfig

    def __init__(self, encoder: ViTEncoder, cfg: LinearProbeConfig, num_classes: int, pool: str) -> None:
        super().__init__()
        self.cfg, self.pool, self.num_classes = cfg, pool, num_classes
        self.encoder = encoder.requires_grad_(False).eval()
        self.head = nn.Sequential(
            nn.BatchNorm1d(encoder.embed_dim, affine=False, eps=1e-6),
            nn.Linear(encoder.embed_dim, num_classes),
        )
        nn.init.trunc_normal_(self.head[1].weight, std=0.01)
        nn.init.zeros_(self.head[1].bias)

    def train(self, mode: bool = True) -> LinearProbe:
        super().train(mode)
        self.encoder.eval()
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder.features(images, self.pool)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).float())

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        feats = batch["features"] if "features" in batch else self.features(batch["image"])
        logits = self.head(feats.float())
        loss = F.cross_entropy(logits.float(), batch["label"])
        return StepOutput(loss, {"train_acc": (logits.argmax(1) == batch["label"]).float().mean()})

    def param_groups(self, weight_decay: float, decay_tokens: bool = False) -> list[dict]:
        return [{"params": list(self.head.parameters()), "weight_decay": weight_decay}]

    def train_transform(self, data: Any) -> Views:
        """MAE's probe augmentation: RandomResizedCrop (bicubic) and flip, at the size and normalisation of
        the encoder's input spec (what it was pre-trained on, whatever ``data`` says); for id grids a
        random crop."""
        spec = self.encoder.input_spec
        if spec.kind == "token_ids":  # ids are cropped, never resized or mirrored
            return Views(image=RandomCropIds(spec.img_size))
        crop = T.RandomResizedCrop(
            spec.img_size, scale=(self.cfg.min_crop_scale, 1.0), interpolation=BICUBIC, antialias=True
        )
        return Views(image=T.Compose([crop, T.RandomHorizontalFlip(), *to_normalized(spec)]))

    def eval_transform(self, data: Any) -> Views:
        """The evaluation view: the encoder's input spec, centre-cropped at ``data.crop_pct`` (the spec's
        unless the run gives another; see :func:`mimkit.runs.classify.task_config`)."""
        spec = replace(self.encoder.input_spec, crop_pct=data.crop_pct)
        return eval_view(spec.eval_size, spec)

    @classmethod
    def build(cls, encoder: ViTEncoder, info: dict, cfg: LinearProbeConfig, num_classes: int) -> LinearProbe:
        return cls(encoder, cfg, num_classes, cfg.pool or info["probe_pool"])


def cached_features(
    module: LinearProbe, source: ImageSource, cfg: Config, env: DistEnv, dtype: Any
) -> FeatureDataset:
    """The fast mode's training set: the frozen encoder's features of ``cache_passes`` augmented passes
    (each pass its own augmentation seed), or of the evaluation view when it is 0. The probe then sees
    these fixed views every epoch instead of fresh ones, so it is cheaper and slightly weaker."""
    passes = max(1, module.cfg.cache_passes)
    feats, labels = [], []
    for p in range(passes):
        transform = (
            module.train_transform(cfg.data) if module.cfg.cache_passes else module.eval_transform(cfg.data)
        )
        f, y = extract_features(
            module.encoder,
            ViewDataset(source, transform, seed=cfg.run.seed + 1000 * p),
            env,
            pool=module.pool,
            batch_size=cfg.eval.batch_size,
            num_workers=cfg.data.num_workers,
            autocast_dtype=dtype,
        )
        feats.append(f)
        labels.append(y)
    return FeatureDataset(torch.cat(feats), torch.cat(labels), seed=cfg.run.seed)
