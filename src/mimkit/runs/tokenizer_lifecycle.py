"""A VQ tokenizer's lifecycle: train it (`mimkit tokenizer train`) or import ViT-VQGAN weights (`mimkit
tokenizer import`), keep the codes its images use, measure its reconstructions, and look at what its ids
keep (`mimkit tokenizer encode` / `decode`). Tokenizing a whole dataset with it is
:mod:`mimkit.runs.tokenize`.

Images reach the tokenizer squashed to its square input (SeiT resizes every image to exactly 256 x 256
before tokenizing, aspect ratio not kept, so that every record has the same grid), bicubic, in the pixel
normalisation it was trained with.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import torch
from torchvision.utils import make_grid, save_image

from mimkit.checkpoint import check_output, is_npz, is_png
from mimkit.configs import Config
from mimkit.data.loader import EpochSampler, ViewDataset, make_loader
from mimkit.data.source_spec import build_source, source_paths
from mimkit.data.sources import ImageSource, Subset
from mimkit.data.transforms import Views, tokenizer_view
from mimkit.distributed import DistEnv, pick_device
from mimkit.interop.load import load_method
from mimkit.interop.vitvqgan import load_vitvqgan
from mimkit.models.tokenizer import (
    LoadedTokenizer,
    VQTokenizer,
    load_tokenizer,
    perplexity,
    psnr,
    save_tokenizer,
    tokenizer_file,
)
from mimkit.progress import progress as progress_bar
from mimkit.runs.lock import RunLock
from mimkit.runs.pretrain import pretrain_then
from mimkit.tokens.codebook import load_codebook
from mimkit.tokens.dataset import open_tokens
from mimkit.tokens.records import codebook_signature, same_codebook, write_atomic

SAMPLE_IMAGES = 256  # reconstruction PSNR and the decoded grid are measured on this many images


class OnDevice(NamedTuple):
    loaded: LoadedTokenizer
    model: VQTokenizer
    device: torch.device
    view: Views


def tokenizer_on(tokenizer_path: str, device: str) -> OnDevice:
    """A saved tokenizer on the chosen device, with the view its images need."""
    loaded = load_tokenizer(tokenizer_path)
    dev = pick_device(device, 0)
    model = loaded.model.to(dev)
    return OnDevice(loaded, model, dev, tokenizer_view(model.shape.img_size, loaded.mean, loaded.std))


def save_grid(images: torch.Tensor, png: Path | str, nrow: int) -> None:
    """A PNG grid of [0, 1] images; small ones are shown larger (nearest) to be seen."""
    images = images.clamp(0, 1).float().cpu()
    scale = max(1, 96 // images.shape[-1])
    images = images.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    write_atomic(Path(png), lambda f: save_image(grid, f, format="png"))  # a full disk names the file


def image_batches(
    source: ImageSource,
    view: Views,
    *,
    start: int = 0,
    stop: int | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    skipped: list[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Batches of images ``start..stop`` of a source in order, decoded by loader workers; unreadable images
    are named on stderr, added to ``skipped`` and left out."""
    stop = len(source) if stop is None else stop
    part = Subset(source, range(start, stop))
    loader = make_loader(
        ViewDataset(part, view),
        EpochSampler(len(part), shuffle=False, pad=False),
        batch_size=batch_size,
        num_workers=num_workers,
        drop_last=False,
    )
    for batch in loader:
        for message in batch["skipped"]:
            print(f"warning: skipped unreadable image {message}", file=sys.stderr, flush=True)
        if skipped is not None:
            skipped.extend(batch["skipped"])
        if "image" in batch:
            batch["index"] = batch["index"] + start
            yield batch


# -- mimkit tokenizer train --------------------------------------------------------------------------
def train_tokenizer(cfg: Config, env: DistEnv | None = None) -> dict[str, Any]:
    """Train (or resume) a tokenizer run, then keep the codes it uses on its training images: the run
    folder's ``tokenizer.pt`` encodes to compact ids 0..K'-1 (SeiT's 391-row table from 8,192 codes)."""
    if cfg.method.name != "vq_tokenizer":
        raise ValueError(
            f"`mimkit tokenizer train` trains method=vq_tokenizer; the config says '{cfg.method.name}'"
        )
    return pretrain_then(cfg, env, finish_tokenizer)


def finish_tokenizer(out: Path, cfg: Config, device: torch.device) -> dict[str, Any]:
    """Keep the codes the trained tokenizer gives its training images (:func:`prune_on`)."""
    method, _, _ = load_method(out / "last.pt")
    source = build_source(cfg.data.train, image_size=cfg.model.img_size, max_images=cfg.data.max_images)
    return prune_on(
        method.tokenizer.to(device).eval(),
        method.spec.mean,
        method.spec.std,
        source,
        out,
        device,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        progress=cfg.run.progress,
    )


def prune_on(
    tokenizer: VQTokenizer,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    source: ImageSource,
    out: Path,
    device: torch.device,
    *,
    batch_size: int = 256,
    num_workers: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Count the codes an (unpruned) tokenizer gives the images of ``source``, keep the used ones, save
    ``out/tokenizer.pt``, and measure PSNR and write ``out/reconstructions.png`` on the first images."""
    view = tokenizer_view(tokenizer.shape.img_size, mean, std)
    counts = torch.zeros(tokenizer.shape.codebook_size, dtype=torch.long, device=device)
    start = time.time()
    bar = progress_bar(len(source), "counting codes", "img", enabled=progress)
    for batch in image_batches(source, view, batch_size=batch_size, num_workers=num_workers):
        ids = tokenizer.encode(batch["image"].to(device))
        counts += torch.bincount(ids.flatten(), minlength=counts.numel())
        bar.update(len(ids))
    bar.close()
    kept = tokenizer.prune(counts.cpu())
    out.mkdir(parents=True, exist_ok=True)
    spec = SimpleNamespace(mean=mean, std=std)
    quality = reconstruction_report(tokenizer, source, view, spec, out / "reconstructions.png", device)
    report = {
        "codebook_size": tokenizer.shape.codebook_size,
        "codes_used": int(kept.numel()),
        "perplexity": perplexity(counts),
        "counted_images": int(counts.sum()) // (tokenizer.shape.grid**2),
        "count_seconds": round(time.time() - start, 1),
        **quality,
    }
    report["warnings"] = tokenizer_warnings(report)
    save_tokenizer(
        tokenizer,
        out / "tokenizer.pt",
        mean=mean,
        std=std,
        counts=counts[kept].cpu(),
        trained_on=source.name,
        report=report,
    )
    print(
        f"tokenizer: {report['codes_used']} of {report['codebook_size']} codes used (perplexity "
        f"{report['perplexity']:.1f}), reconstruction PSNR {report['psnr']:.2f} dB (the mean image: "
        f"{report['psnr_mean_image']:.2f} dB) on {report['psnr_images']} images spread over the source; "
        f"wrote {out / 'tokenizer.pt'} and {out / 'reconstructions.png'}",
        file=sys.stderr,
    )
    for line in report["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    return {"tokenizer": report}


def import_vitvqgan(
    weights: str,
    data: str,
    out: str,
    *,
    img_size: int | None = None,
    num_heads: int | None = None,
    device: str = "auto",
    max_images: int | None = None,
    num_workers: int | None = None,
    codebook: str | None = None,
) -> dict[str, Any]:
    """A ViT-VQGAN state dict (enhancing-transformers' layout, as SeiT's tokenizer) as a mimkit
    tokenizer: loaded with every key checked, then pruned to the codes that ``data``'s images use (SeiT's
    391 of 8,192), so that its ids are compact and fit SeiT's format; or, given a released ``codebook``
    (SeiT's ``codebook.ckpt``), to exactly its rows in its order, so that new images get the release's
    ids (``data`` then only measures PSNR). It takes RGB in [0, 1]."""
    dev = pick_device(device, 0)
    tokenizer = load_vitvqgan(weights, img_size=img_size, num_heads=num_heads).to(dev)
    source = build_source(data, image_size=tokenizer.shape.img_size, max_images=max_images)
    folder = Path(out)
    with RunLock(folder):
        if codebook is None:
            return prune_on(tokenizer, (0.0,) * 3, (1.0,) * 3, source, folder, dev, num_workers=num_workers)
        # the ids of a released dataset: keep exactly its codebook's rows, in its order
        tokenizer.match_codebook(load_codebook(codebook))
        mean, std = (0.0,) * 3, (1.0,) * 3
        view = tokenizer_view(tokenizer.shape.img_size, mean, std)
        spec = SimpleNamespace(mean=mean, std=std)
        quality = reconstruction_report(tokenizer, source, view, spec, folder / "reconstructions.png", dev)
        report = {
            "codebook_size": tokenizer.shape.codebook_size,
            "codes_used": tokenizer.vocab_size,
            **quality,
        }
        report["warnings"] = tokenizer_warnings(report)
        save_tokenizer(
            tokenizer, folder / "tokenizer.pt", mean=mean, std=std, matched=codebook, report=report
        )
        return {"tokenizer": report}


@torch.no_grad()
def reconstruction_report(
    tokenizer: VQTokenizer,
    source: ImageSource,
    view: Views,
    spec: Any,
    grid_png: Path | None,
    device: torch.device,
    *,
    ids: torch.Tensor | None = None,
    count: int = SAMPLE_IMAGES,
) -> dict[str, Any]:
    """PSNR of decode(encode(x)) against the tokenizer's view of x, on the [0, 1] scale, for ``count``
    readable images spread over the source (a folder or file stored class by class shows every class),
    beside the PSNR of the sample's mean image (what a tokenizer that learnt nothing scores); with ``ids``
    (the first records of a token dataset made from ``source``: record k is its k-th readable image)
    decode(ids) of the first images instead, after checking that the records are these images' tokens.
    A PNG of 32 originals beside their reconstructions."""
    mean = torch.tensor(spec.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, device=device).view(1, -1, 1, 1)
    sample = Subset(source, count, spread=ids is None)
    batch = next(image_batches(sample, view, batch_size=count, num_workers=0))
    images = batch["image"].to(device)
    encoded = tokenizer.encode(images)
    if ids is not None:
        ids = ids[: len(images)].to(device)
        agree = float((ids == encoded[: len(ids)]).float().mean()) if len(ids) else 0.0
        if len(ids) < len(images) or agree < 0.99:  # a code on a cosine tie may flip, not more
            raise ValueError(
                f"the records do not line up with the images of '{source.name}' (only {100 * agree:.1f}% "
                "of the ids agree with the tokenizer's encoding of them): give the images the tokens were "
                "made from, in the same order"
            )
        encoded = ids
    recon = tokenizer.decode(encoded) * std + mean
    originals = images * std + mean
    values = psnr(recon, originals)
    mean_image = psnr(originals.mean(0, keepdim=True).expand_as(originals), originals)
    if grid_png is not None:
        shown = torch.linspace(0, len(images) - 1, min(32, len(images)), device=device).round().long()
        pairs = torch.stack([originals[shown], recon[shown]], dim=1).flatten(0, 1)
        save_grid(pairs, grid_png, nrow=16)
    return {
        "psnr": float(values.mean()),
        "psnr_mean_image": float(mean_image.mean()),
        "psnr_images": len(values),
    }


PSNR_MARGIN_DB = 3.0  # a tokenizer's reconstructions must beat the mean image by this much to count
MIN_PERPLEXITY = 8.0  # fewer equally used codes than this: the codebook collapsed


def tokenizer_warnings(report: dict[str, Any]) -> list[str]:
    """What makes a tokenizer's ids worthless to train on, one line each: reconstructions no better than
    the images' mean (the decoder learnt the average, every image looks alike), or a collapsed codebook."""
    found = []
    quality, baseline = report.get("psnr"), report.get("psnr_mean_image")
    if quality is not None and baseline is not None and quality < baseline + PSNR_MARGIN_DB:
        found.append(
            f"the tokenizer's reconstruction PSNR {quality:.2f} dB is not clearly above the mean image's "
            f"{baseline:.2f} dB (by at least {PSNR_MARGIN_DB:g} dB): it learnt little, its decodes look "
            "alike, and models trained on its ids learn little; train it longer"
        )
    used, size, spread = report.get("codes_used"), report.get("codebook_size"), report.get("perplexity")
    if spread is not None and spread < MIN_PERPLEXITY:
        of = f" of {size}" if size else ""
        found.append(
            f"the tokenizer's codes collapsed: {used}{of} used, worth {spread:.1f} equally used codes "
            "(perplexity); its ids carry little about the images"
        )
    return found


# -- mimkit tokenizer encode / decode ----------------------------------------------------------------
def encode_ids(
    tokenizer_path: str, data: str, out: str, *, max_images: int | None = None, device: str = "auto"
) -> dict[str, Any]:
    """The id grids of a few images as a .npz (``ids`` [N, h, w], ``y``), for a look or a quick test;
    a dataset to train on is made by :func:`tokenize`. Never written over its images, and written
    beside then renamed, so that a failure leaves no partial file under its name."""
    inputs = [tokenizer_file(tokenizer_path), *source_paths(data)]
    target = check_output(out, inputs, "--out", kind=("an .npz of id grids", is_npz))
    _, tokenizer, dev, view = tokenizer_on(tokenizer_path, device)
    source = build_source(data, image_size=tokenizer.shape.img_size, max_images=max_images)
    ids, labels = [], []
    for batch in image_batches(source, view):
        ids.append(tokenizer.encode(batch["image"].to(dev)).cpu().numpy().astype(np.int16))
        labels.append(batch["label"].numpy())
    grids = np.concatenate(ids)
    # a file object: NumPy adds no '.npz' to the name
    write_atomic(target, lambda f: np.savez(f, ids=grids, y=np.concatenate(labels)))
    return {"images": len(grids), "grid": list(grids.shape[1:]), "path": out}


# -- mimkit tokenizer decode ------------------------------------------------------------------------
def decode_grid(
    tokenizer_path: str,
    tokens: str,
    out: str,
    *,
    images: str | None = None,
    count: int = 32,
    device: str = "auto",
) -> dict[str, Any]:
    """A PNG of the first ``count`` records decoded to images; with ``images`` (the source they were made
    from, same order) each original beside its reconstruction, and their PSNR."""
    inputs = [tokenizer_file(tokenizer_path), *source_paths(tokens), *source_paths(images or "")]
    check_output(out, inputs, "--out", kind=("a PNG image", is_png))
    loaded, tokenizer, dev, view = tokenizer_on(tokenizer_path, device)
    dataset = open_tokens(tokens)
    if tuple(dataset.grid) != (tokenizer.shape.grid,) * 2 or dataset.vocab_size != tokenizer.vocab_size:
        raise ValueError(
            f"'{tokens}' has {dataset.grid[0]}x{dataset.grid[1]} grids of {dataset.vocab_size} codes; the "
            f"tokenizer makes {tokenizer.shape.grid}x{tokenizer.shape.grid} grids of {tokenizer.vocab_size}"
        )
    stored, own = dataset.codebook, codebook_signature(tokenizer.codebook())
    if stored is not None and not same_codebook(codebook_signature(stored), own):
        raise ValueError(
            f"'{tokens}' was made by another tokenizer than '{tokenizer_path}' (their codebooks differ): "
            "decoded through it, its ids would show other images"
        )
    count = min(count, len(dataset))
    ids = torch.from_numpy(np.stack([dataset.read(i) for i in range(count)]))
    if images is None:
        mean = torch.tensor(loaded.mean, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(loaded.std, device=dev).view(1, -1, 1, 1)
        save_grid(tokenizer.decode(ids.to(dev)) * std + mean, out, nrow=8)
        return {"images": count, "png": out}
    source = build_source(images, image_size=tokenizer.shape.img_size)
    report = reconstruction_report(tokenizer, source, view, loaded, Path(out), dev, ids=ids, count=count)
    return {**report, "png": out}
