"""Fine-tuning (MAE's recipe): the encoder as a classifier with learnable positions (resampled if the
size changes), mean pooling + fc_norm or cls, drop path rising over the blocks, layer-wise lr decay,
RandAugment, random erasing, Mixup/CutMix with label smoothing, and an optional model EMA. Trained by the
one engine; its settings are the config's ``method`` section (``method=finetune``)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from timm.data import Mixup, create_transform
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_layer_decay
from torch import nn
from torchvision.transforms import v2 as T

from mimkit.configs import Config, checked
from mimkit.data.token_augment import TokenEDA, TokenMixup
from mimkit.data.transforms import Views, as_ids, eval_view
from mimkit.methods.base import StepOutput, Trainable
from mimkit.methods.ema import EMATeacher
from mimkit.methods.token_views import (
    TokenViews,
    resolve_tokenadapt,
    validate_choice_probabilities,
    views_codebook,
)
from mimkit.models.input_spec import InputSpec
from mimkit.models.pos_embed import resample_pos_embed
from mimkit.models.vit import LayerNorm6, ViTEncoder
from mimkit.tokens.codebook import (
    build_synonyms,
    embed,
    load_synonyms,
    synonym_counts,
    synonym_table,
)


@dataclass
class FinetuneConfig:
    name: str = "finetune"
    # run folder, .pt checkpoint, .safetensors export or official file (required); "scratch": a new
    # encoder of the model section (a supervised run from scratch, as SeiT's)
    checkpoint: str = ""
    weights: str = "student"  # student | teacher
    # None: the checkpoint's; another size resamples the position table
    img_size: int | None = checked(None, low=1, null=" for the checkpoint's")
    # avg: mean of the patch tokens + a new fc_norm (the encoder's norm is dropped) | avg_norm: that mean
    # through the encoder's own final norm (SeiT++'s classifier) | cls
    pool: str = checked("avg", choices=("avg", "avg_norm", "cls"))
    drop_path: float = checked(0.1, low=0, high=1, high_open=True)  # rising linearly over the blocks to this
    # lr scale ld^(depth + 1 - layer id); ids: stem 0, block i -> i + 1, head last
    layer_decay: float = checked(0.75, low=0, high=1, low_open=True)
    head_init_std: float = 2e-5
    min_crop_scale: float = checked(0.08, low=0, high=1, low_open=True)
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"  # timm's RandAugment spec; null: none
    reprob: float = 0.25  # random erasing
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    model_ema: bool = False
    model_ema_decay: float = 0.9999
    num_classes: int | None = None
    # token-id encoders (SeiT++): the views of mimkit.methods.token_views, made on the device; mixup and
    # cutmix above are the base path's, min_crop_scale its crop; rand_augment and reprob do not apply
    codebook: str | None = None  # a codebook file; None: the training token dataset's
    noise_prob: float = checked(0.75, low=0, high=1)  # per batch: Emb-Noise with this probability,
    coloradapt_prob: float = checked(
        0.25, low=0, high=1
    )  # else ColorAdapt with this one (SeiT++ fine-tuning)
    tokenadapt: str | None = None  # TokenAdapt weights (file or run); None: no TokenAdapt path
    tokenadapt_mixup: float = 0.8  # Mixup / CutMix of the TokenAdapt path, in its feature space
    tokenadapt_cutmix: float = 1.0
    # Token-EDA per sample (SeiT: 0.25 / 0.25), with the first 5 synonyms of each code
    eda_rc_prob: float = checked(0.0, low=0, high=1)  # synonym replacement (each id w.p. 0.25)
    eda_sc_prob: float = checked(0.0, low=0, high=1)  # swap two square blocks
    # a synonym JSON (SeiT's released synonyms.json: keys "0".."K-1", ranked id lists); None: the top-5
    # cosine neighbours of each codebook row (how SeiT built its file is not published)
    synonyms: str | None = None

    def validate(self) -> None:
        validate_choice_probabilities(self, "noise_prob", "coloradapt_prob")
        validate_choice_probabilities(self, "eda_rc_prob", "eda_sc_prob")

    def validate_with(self, cfg: Config) -> None:
        """Mixup and CutMix pair the images of a batch (of each half, with a TokenAdapt path)."""
        mixing = (
            self.mixup > 0
            or self.cutmix > 0
            or (self.tokenadapt and self.tokenadapt_mixup + self.tokenadapt_cutmix > 0)
        )
        if self.tokenadapt and cfg.optim.batch_size % 2:
            raise ValueError(
                f"the TokenAdapt path takes half of each batch: 'optim.batch_size' must be even; got "
                f"{cfg.optim.batch_size}"
            )
        multiple = 4 if self.tokenadapt else 2
        if mixing and cfg.optim.batch_size % multiple:
            where, must = ("a batch", "even")
            if self.tokenadapt:
                where, must = "each half of a batch", "a multiple of 4"
            raise ValueError(
                f"Mixup/CutMix pair images within {where}: 'optim.batch_size' must be {must}; "
                f"got {cfg.optim.batch_size}"
            )


def token_synonyms(path: str | None, codebook: torch.Tensor) -> dict[int, list[int]]:
    """Token-EDA's synonyms: the file ``method.synonyms`` (checked against the codebook's K ids, so a file
    of another tokenizer is an error before training starts), else the top-5 cosine neighbours of each
    codebook row."""
    if not path:
        return build_synonyms(codebook, k=5)
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"method.synonyms: '{path}' is not a file (a synonym JSON such as SeiT's synonyms.json; null "
            "builds them from the codebook)"
        )
    try:
        return load_synonyms(path, vocab_size=codebook.shape[0])
    except (OSError, ValueError) as err:
        raise ValueError(f"method.synonyms: {err}") from err


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
        # a pre-training mask token (MTM) has no use in a classifier
        spec = replace(encoder.spec, drop_path_rate=cfg.drop_path, mask_token=False)
        if cfg.img_size is not None:
            spec = replace(spec, img_size=cfg.img_size)
        model = ViTEncoder(spec)
        state = {k: v for k, v in encoder.state_dict().items() if k != "mask_token"}
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], model.grid_size)
        model.load_state_dict(state)
        given = input_spec or encoder.input_spec
        size = spec.img_size
        if size != given.img_size:  # the same normalisation and crop at the new size
            given = replace(given, img_size=size, eval_size=size, grid=None)
        model.input_spec = given
        model.pos_embed.requires_grad_(True)
        if cfg.pool == "avg":
            model.global_pool, model.norm, model.fc_norm = "avg", nn.Identity(), LayerNorm6(model.embed_dim)
        elif cfg.pool == "avg_norm":  # the pre-trained final norm, applied after the mean
            model.global_pool, model.fc_norm, model.norm = "avg", model.norm, nn.Identity()
        model.head = nn.Linear(model.embed_dim, num_classes)
        model.num_classes = num_classes
        nn.init.trunc_normal_(model.head.weight, std=cfg.head_init_std)
        nn.init.zeros_(model.head.bias)
        self.model = model
        # token inputs: ids (SeiT++), or ids that the codebook turns into the vectors the stem takes (SeiT)
        self.tokens = model.stem.kind in ("token_ids", "token_embeddings")
        self.vectors = model.stem.kind == "token_embeddings"
        self.codebook: torch.Tensor | None = None  # the token views' (use_data)
        self.synonyms: dict[int, list[int]] | None = None  # Token-EDA's (use_data)
        self.mixup = None
        if (cfg.mixup > 0 or cfg.cutmix > 0) and not self.tokens:  # tokens are mixed by the views
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
            self.ema = EMATeacher(model, cfg.model_ema_decay, cosine=False)

    def logits(self, images: torch.Tensor, ema: bool = False) -> torch.Tensor:
        """Class logits; a continuous-input model given id grids (its evaluation view) embeds them with
        the codebook first."""
        if self.vectors and not images.is_floating_point():
            images = embed(images, self.codebook)
        return (self.ema.module if ema else self.model)(images)

    def forward(self, batch: dict[str, torch.Tensor]) -> StepOutput:
        images, labels = batch["image"], batch["label"]
        if self.vectors and not images.is_floating_point():
            images = embed(images, self.codebook)
        if self.training and "soft_target" in batch:  # mixed by the token views
            loss = SoftTargetCrossEntropy()(self.model(images).float(), batch["soft_target"])
            return StepOutput(loss, {})
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
        rest (fc_norm, head) last; no decay for 1-D tensors, positions and cls (the MAE recipe). A token-id
        stem's embedding table and its norm go at the full lr, as in SeiT++ (they sit outside its
        patch embedding there)."""
        groups = param_groups_layer_decay(
            self.model,
            weight_decay,
            no_weight_decay_list=self.model.no_weight_decay(),
            layer_decay=self.cfg.layer_decay,
        )
        if not self.tokens:
            return groups
        stem = self.model.stem
        if self.vectors:  # a conv stem only: timm's groups as they are
            return groups
        full_lr = {id(p) for m in (stem.embedding, stem.embedding_norm) for p in m.parameters()}
        moved: dict[float, list] = {}
        for group in groups:
            kept = [p for p in group["params"] if id(p) not in full_lr]
            for p in group["params"]:
                if id(p) in full_lr:
                    moved.setdefault(group["weight_decay"], []).append(p)
            group["params"] = kept
        groups = [g for g in groups if g["params"]]
        groups += [{"params": ps, "weight_decay": wd, "lr_scale": 1.0} for wd, ps in moved.items()]
        return groups

    def use_data(self, source: Any) -> None:
        if not self.tokens:
            return
        vocab = getattr(source, "vocab_size", None) if self.vectors else self.model.stem.vocab_size
        self.codebook = views_codebook(self.cfg.codebook, source, vocab)
        width = self.model.stem.proj.in_channels if self.vectors else None
        if width is not None and self.codebook.shape[1] != width:
            raise ValueError(
                f"the codebook's vectors have {self.codebook.shape[1]} dimensions but the encoder's stem "
                f"takes {width} (model.token_dim)"
            )
        if self.cfg.synonyms or self.cfg.eda_rc_prob:  # a given file is read and checked before training
            self.synonyms = token_synonyms(self.cfg.synonyms, self.codebook)

    def batch_transform(self) -> TokenViews | None:
        """Token inputs: SeiT++'s fine-tuning views (colour per batch, base crop + CutMix/Mixup, the
        TokenAdapt path with its own mixing, re-quantised), with soft targets when mixing."""
        if not self.tokens:
            return None
        if self.codebook is None:
            raise ValueError("the token views need the codebook: call use_data(source) first")
        cfg = self.cfg
        tokenadapt = resolve_tokenadapt(cfg.tokenadapt) if cfg.tokenadapt else None

        def mixer(mixup: float, cutmix: float) -> TokenMixup | None:
            if mixup <= 0 and cutmix <= 0:
                return None
            return TokenMixup(
                self.num_classes, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=cfg.label_smoothing
            )

        mixers = [mixer(cfg.mixup, cfg.cutmix)]
        if tokenadapt is not None:
            mixers.append(mixer(cfg.tokenadapt_mixup, cfg.tokenadapt_cutmix))
        eda = None
        if cfg.eda_rc_prob or cfg.eda_sc_prob:
            synonyms = self.synonyms
            if synonyms is None:
                synonyms = token_synonyms(cfg.synonyms, self.codebook)
            eda = TokenEDA(
                synonym_table(synonyms, 5),
                cfg.eda_rc_prob,
                cfg.eda_sc_prob,
                counts=synonym_counts(synonyms, 5),
            )
        return TokenViews(
            self.codebook,
            self.model.stem.img_size[0],
            min_scale=cfg.min_crop_scale,
            noise_prob=cfg.noise_prob,
            coloradapt_prob=cfg.coloradapt_prob,
            tokenadapt=tokenadapt,
            mixers=None if all(m is None for m in mixers) else tuple(mixers),
            eda=eda,
            requantize=not self.vectors,
        )

    def train_transform(self, data: Any) -> Views:
        """timm's training transform: RandomResizedCrop (bicubic), flip, RandAugment, normalize, random
        erasing (on PIL images, as timm expects), at the size and normalisation of the model's input spec.
        Token ids: the stored grid as it is (the token views crop on the device)."""
        spec = self.model.input_spec
        if self.tokens:
            return Views(image=as_ids)
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
