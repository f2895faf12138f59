"""The evaluations that train: linear probing and fine-tuning. Each is a module whose forward(batch) returns
a StepOutput, like a pre-training method, so the one engine trains it (progress, TensorBoard,
metrics.jsonl, atomic checkpoints, exact resume); its settings are the config's ``method`` section
(``method=linprobe`` or ``method=finetune``, with ``method.checkpoint`` the encoder to evaluate).

Recipes (mae_lut.md section 4, latent_mim.md section 11): the linear probe is a frozen encoder, BatchNorm
without affine, a Linear layer, LARS; fine-tuning makes the position table learnable, pools by mean +
fc_norm (or cls), rises drop path over the blocks, decays the lr by layer, and trains with RandAugment,
random erasing, Mixup/CutMix and label smoothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.checkpoint import seed_all
from mimkit.configs import Config, ConfigError
from mimkit.data.loader import ViewDataset
from mimkit.data.sources import ImageSource, build_source
from mimkit.data.transforms import BICUBIC, Views, eval_view, to_normalized
from mimkit.eval.knn import extract_features, topk_accuracy
from mimkit.methods.base import StepOutput
from mimkit.models.pos_embed import resample_pos_embed
from mimkit.models.vit import POOLS, LayerNorm6, ViTEncoder

# the pooling each method's probe reads by default: MAE and LUT probe the cls token (MAE's recipe);
# Latent MIM trains its cls only as decoder context, so its probe reads the mean of the patch tokens
DEFAULT_PROBE_POOL = {"latent_mim": "mean"}


@dataclass
class LinearProbeConfig:
    name: str = "linprobe"
    checkpoint: str = ""  # run folder, .pt checkpoint, .safetensors export or official file (required)
    weights: str = "student"  # student | teacher
    pool: str | None = None  # cls | mean | mean_prenorm; None: cls (mean for Latent MIM)
    min_crop_scale: float = 0.08  # RandomResizedCrop(scale=(min_crop_scale, 1)) + flip
    # fast mode: features are extracted once (cache_passes augmented passes over the training set, or
    # the evaluation view if 0) and the probe is trained on them; the full mode augments every epoch
    cached: bool = False
    cache_passes: int = 1
    num_classes: int | None = None  # None: from the training labels

    def validate(self) -> None:
        if self.pool is not None and self.pool not in POOLS:
            raise ValueError(f"'method.pool' must be one of {', '.join(POOLS)}; got {self.pool!r}")
        if self.cache_passes < 0:
            raise ValueError(f"'method.cache_passes' must be >= 0; got {self.cache_passes}")
        if not 0 < self.min_crop_scale <= 1:
            raise ValueError(f"'method.min_crop_scale' must lie in (0, 1]; got {self.min_crop_scale}")


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


class FeatureDataset(ViewDataset):
    """Cached features in the loader's (epoch, index) protocol; nothing random is left to seed, and the
    tensors are in memory, so the engine reads them in-process."""

    in_memory = True

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, seed: int) -> None:
        self.features, self.labels, self.seed = features, labels, seed

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, key: tuple[int, int] | int) -> dict[str, Any]:
        index = key[1] if isinstance(key, tuple) else key
        return {"features": self.features[index], "label": int(self.labels[index]), "index": index}


class LinearProbe(nn.Module):
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

    def param_groups(self, weight_decay: float) -> list[dict]:
        return [{"params": list(self.head.parameters()), "weight_decay": weight_decay}]

    def train_transform(self, data: Any) -> Views:
        """MAE's probe augmentation: RandomResizedCrop (bicubic) and flip."""
        size = self.encoder.patch_embed.img_size[0]
        crop = T.RandomResizedCrop(
            size, scale=(self.cfg.min_crop_scale, 1.0), interpolation=BICUBIC, antialias=True
        )
        return Views(image=T.Compose([crop, T.RandomHorizontalFlip(), *to_normalized(data)]))

    @classmethod
    def build(cls, encoder: ViTEncoder, info: dict, cfg: LinearProbeConfig, num_classes: int) -> LinearProbe:
        return cls(encoder, cfg, num_classes, cfg.pool or DEFAULT_PROBE_POOL.get(info["method"], "cls"))


class FineTune(nn.Module):
    """The encoder as a classifier: learnable positions (resampled if the size changes), mean pooling +
    fc_norm or the cls token, a Linear head (trunc-normal std 2e-5), drop path, layer-wise lr decay (timm's
    groups), Mixup/CutMix with label smoothing in the step, and an optional model EMA."""

    name: ClassVar[str] = "finetune"
    Config: ClassVar[type] = FinetuneConfig

    def __init__(self, encoder: ViTEncoder, cfg: FinetuneConfig, num_classes: int) -> None:
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        spec = {**encoder.spec, "drop_path_rate": cfg.drop_path}
        if cfg.img_size is not None:
            spec["img_size"] = cfg.img_size
        model = ViTEncoder(**spec)
        state = encoder.state_dict()
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.grid_size)
        model.load_state_dict(state)
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
            from timm.utils import ModelEmaV2

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

    def param_groups(self, weight_decay: float) -> list[dict]:
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
        erasing (on PIL images, as timm expects)."""
        size = self.model.patch_embed.img_size[0]
        timm_transform = create_transform(
            size,
            is_training=True,
            scale=(self.cfg.min_crop_scale, 1.0),
            auto_augment=self.cfg.rand_augment,
            interpolation="bicubic",
            re_prob=self.cfg.reprob,
            re_mode="pixel",
            re_count=1,
            mean=tuple(data.mean),
            std=tuple(data.std),
        )
        _posterize_compat(timm_transform)
        return Views(image=T.Compose([T.ToPILImage(), timm_transform]))

    @classmethod
    def build(cls, encoder: ViTEncoder, info: dict, cfg: FinetuneConfig, num_classes: int) -> FineTune:
        return cls(encoder, cfg, num_classes)


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, with 0 bits kept giving the black image older Pillow gave (Pillow 11+ refuses 0,
    which timm's increasing posterize asks for at magnitude 10)."""
    from PIL import Image, ImageOps

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


TASKS: dict[str, type[nn.Module]] = {LinearProbe.name: LinearProbe, FineTune.name: FineTune}


def classify(
    module: nn.Module,
    predict: Any,
    source: ImageSource,
    transform: Any,
    env: Any,
    *,
    batch_size: int,
    num_workers: int,
    dtype: Any,
) -> dict[str, float]:
    """Top-1 / top-5 of ``predict(images) -> logits`` (a method of ``module``) on a labelled source."""
    logits, labels = extract_features(
        module,
        ViewDataset(source, transform),
        env,
        batch_size=batch_size,
        num_workers=num_workers,
        autocast_dtype=dtype,
        encode=predict,
        out_dim=module.num_classes,
    )
    return topk_accuracy(logits, labels)


def train_classifier(
    cfg: Config, env: Any = None, loaded: tuple[ViTEncoder, dict] | None = None
) -> dict[str, Any]:
    """Train a linear probe or fine-tune (``cfg.method``) with the engine, then report top-1/top-5 on
    eval.val. Writes the run folder like ``pretrain`` (last.pt, metrics.jsonl, tb/, summary.json).
    ``loaded``: the (encoder, info) of ``load_encoder`` when the caller has read the checkpoint already;
    it is used if it holds the weights the config asks for. data.train and eval.val must name the same
    classes (checked before training: a label is a class index, so otherwise the accuracy is wrong)."""
    from mimkit.checkpoint import load_encoder
    from mimkit.data.sources import check_same_classes
    from mimkit.train.distributed import barrier, init_distributed
    from mimkit.train.engine import Trainer
    from mimkit.train.log import write_json
    from mimkit.train.pretrain import autocast_dtype, run_dir, start_run
    from mimkit.train.runlock import RunLock

    task = cfg.method
    if task.name not in TASKS:
        raise ConfigError(f"'method' must be linprobe or finetune here; got {task.name!r}")
    if not task.checkpoint:
        raise ConfigError(f"{task.name} needs 'method.checkpoint': the run, checkpoint or export to evaluate")
    if not cfg.eval.val:
        raise ConfigError(f"{task.name} needs 'eval.val': labelled images to measure the accuracy on")
    env = env or init_distributed(cfg.run.device)
    if loaded is not None and loaded[1]["weights"] == task.weights:
        encoder, info = loaded
    else:
        encoder, info = load_encoder(task.checkpoint, task.weights)
    # the encoder's own input normalisation; the image size is the checkpoint's unless fine-tuning sets one
    cfg.data.mean, cfg.data.std = tuple(info["mean"]), tuple(info["std"])
    size = getattr(task, "img_size", None) or info["img_size"]
    source = build_source(cfg.data.train, image_size=size, max_images=cfg.data.max_images)
    if not source.has_labels:
        raise ConfigError(f"data.train '{source.name}' has no labels; {task.name} needs them")
    val = build_source(cfg.eval.val, image_size=size)
    if not val.has_labels:
        raise ConfigError(f"eval.val '{val.name}' has no labels; {task.name} needs them to measure accuracy")
    check_same_classes(source, val)
    num_classes = task.num_classes or len(source.classes)
    mixing = task.name == "finetune" and (task.mixup > 0 or task.cutmix > 0)
    if mixing and cfg.optim.batch_size % 2:
        raise ConfigError(
            "Mixup/CutMix pair images within a batch: 'optim.batch_size' must be even; "
            f"got {cfg.optim.batch_size}"
        )
    torch.manual_seed(cfg.run.seed)  # the same head on every rank
    module = TASKS[task.name].build(encoder, info, task, num_classes)
    seed_all(cfg.run.seed + env.rank)  # drop path and Mixup differ across ranks, and repeat across runs
    out = run_dir(cfg)
    with RunLock(out, env):  # one run per folder, for the whole run
        trainer = Trainer(module, cfg, env, out)
        dtype = autocast_dtype(trainer)
        eval_kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, dtype=dtype)
        if getattr(task, "cached", False):
            dataset = cached_features(module, source, cfg, env, dtype)
        else:
            dataset = ViewDataset(source, module.train_transform(cfg.data), seed=cfg.run.seed)
        start_run(
            cfg,
            trainer,
            out,
            f"mimkit: {task.name} of {task.checkpoint} ({info['method']}, {task.weights}) on {source.name} "
            f"({len(dataset)} samples, {num_classes} classes), effective batch {trainer.eff_batch}, lr "
            f"{trainer.base_lr:.3g}; writing to {out}",
        )
        summary: dict[str, Any] = {"protocol": task.name, "checkpoint": task.checkpoint}
        summary["weights"] = task.weights
        summary.update(trainer.fit(dataset))
        view = eval_view(size, cfg.data)
        if not summary["stopped_early"]:
            summary.update({"method": info["method"], "val": val.name, "epochs": cfg.optim.epochs})
            summary.update(classify(module, module.logits, val, view, env, **eval_kwargs))
            if getattr(module, "ema", None) is not None:
                ema = classify(module, lambda x: module.logits(x, ema=True), val, view, env, **eval_kwargs)
                summary.update({f"ema_{k}": v for k, v in ema.items()})
        if env.is_main:
            write_json(out / "summary.json", summary)
    barrier(env)
    return summary


def cached_features(
    module: LinearProbe, source: ImageSource, cfg: Config, env: Any, dtype: Any
) -> FeatureDataset:
    """The fast mode's training set: the frozen encoder's features of ``cache_passes`` augmented passes
    (each pass its own augmentation seed), or of the evaluation view when it is 0. The probe then sees
    these fixed views every epoch instead of fresh ones, so it is cheaper and slightly weaker."""
    passes = max(1, module.cfg.cache_passes)
    feats, labels = [], []
    for p in range(passes):
        transform = (
            module.train_transform(cfg.data)
            if module.cfg.cache_passes
            else eval_view(module.encoder.patch_embed.img_size[0], cfg.data)
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


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """One Markdown table (and the same rows as JSON) of evaluation results; returns the Markdown."""
    header = ["checkpoint", "method", "weights", "protocol", "budget", "top-1", "top-5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        top5 = f"{r['top5']:.2f}" if r.get("top5") is not None else "-"
        cells = [
            r["checkpoint"],
            r["method"],
            r["weights"],
            r["protocol"],
            r["budget"],
            f"{r['top1']:.2f}",
            top5,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    (out / "table.json").write_text(json.dumps(rows, indent=2))
    return markdown
