"""`mimkit tokenadapt train`: learn TokenAdapt for a trained tokenizer's tokens on the images it tokenizes,
then write ``tokenadapt.ckpt`` (SeiT++'s official layout, what token-dataset training loads) and the token
accuracy on held-out images beside two baselines, so a run shows what it learned."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

from mimkit.configs import Config
from mimkit.data.device import to_device
from mimkit.data.source_spec import build_source
from mimkit.data.sources import ImageSource, Subset
from mimkit.distributed import DistEnv
from mimkit.interop.load import load_method
from mimkit.methods.tokenadapt import TokenAdaptMethod, load_paired_tokenizer
from mimkit.models.tokenadapt import load_tokenadapt, save_tokenadapt
from mimkit.runs.pretrain import pretrain_then
from mimkit.runs.tokenizer_lifecycle import image_batches

WEIGHTS = "tokenadapt.ckpt"


def follow_tokenizer(cfg: Config) -> None:
    """The images are read at the tokenizer's size: ``model.img_size`` (and the patch) are set from it."""
    if cfg.method.name != "tokenadapt":
        raise ValueError(
            f"`mimkit tokenadapt train` trains method=tokenadapt; the config says '{cfg.method.name}'"
        )
    shape = load_paired_tokenizer(cfg.method.tokenizer).model.shape
    if cfg.model.img_size != shape.img_size:
        print(
            f"note: model.img_size follows the tokenizer: {shape.img_size} (was {cfg.model.img_size})",
            file=sys.stderr,
        )
    cfg.model.img_size, cfg.model.patch_size = shape.img_size, shape.patch_size


def train_tokenadapt(cfg: Config, env: DistEnv | None = None) -> dict[str, Any]:
    """Train (or resume) a TokenAdapt run, then write its weights in the official layout and measure it
    on ``eval.val`` (else on the training images, and said so)."""
    follow_tokenizer(cfg)
    return pretrain_then(cfg, env, finish_tokenadapt)


def finish_tokenadapt(out: Path, cfg: Config, device: torch.device) -> dict[str, Any]:
    """``out/tokenadapt.ckpt`` from the run's last checkpoint (read back with the checking loader), and
    the accuracies of :func:`evaluate_tokenadapt`."""
    method, _, _ = load_method(out / "last.pt")
    path = save_tokenadapt(method.tokenadapt, out / WEIGHTS)
    load_tokenadapt(path)  # what a user will load must load
    held_out = bool(cfg.eval.val)
    source = build_source(cfg.eval.val or cfg.data.train, image_size=cfg.model.img_size)
    report = evaluate_tokenadapt(
        method,
        Subset(source, cfg.method.eval_images),
        device,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
    )
    report.update(images_from=source.name, held_out=held_out, weights=str(path))
    where = "held-out" if held_out else "training (no eval.val given)"
    print(
        f"TokenAdapt: token accuracy {report['token_acc']:.2f}% on {report['images']} {where} images of "
        f"{source.name} (the same geometry on the emb map, re-quantised: {report['warp_baseline_acc']:.2f}%; "
        f"ids left as they were: {report['identity_baseline_acc']:.2f}%); wrote {path}",
        file=sys.stderr,
    )
    return {"tokenadapt": report}


@torch.no_grad()
def evaluate_tokenadapt(
    method: TokenAdaptMethod,
    source: ImageSource,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
) -> dict[str, Any]:
    """Token accuracy (%) of the paired augmentation on ``source``'s images (one fixed draw per image),
    with the two baselines that need no TokenAdapt: the geometry applied to the emb map and
    re-quantised, and the ids left unchanged."""
    method = method.to(device).eval()
    views = method.batch_transform().to(device).eval()
    sums = {"acc": 0.0, "warp_acc": 0.0, "identity_acc": 0.0}
    images = 0
    view = method.train_transform(None)
    for batch in image_batches(source, view, batch_size=batch_size, num_workers=num_workers):
        step = method(views(to_device(batch, device)))
        n = len(batch["image"])
        for key in sums:
            sums[key] += float(step.metrics[key]) * n
        images += n
    if images == 0:
        raise ValueError(f"'{source.name}' has no readable images to measure TokenAdapt on")
    return {
        "images": images,
        "token_acc": 100 * sums["acc"] / images,
        "warp_baseline_acc": 100 * sums["warp_acc"] / images,
        "identity_baseline_acc": 100 * sums["identity_acc"] / images,
    }
