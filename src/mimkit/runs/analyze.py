"""`mimkit analyze`: the papers' analyses of one or several checkpoints on the same images, written as one
self-contained HTML report with the numbers beside it as JSON."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from mimkit.analysis.attention import attention_maps, mean_attention_distance, query_maps
from mimkit.analysis.reconstruction import (
    reconstruct_pixels,
    reconstruct_tokens,
    to_unit_range,
)
from mimkit.analysis.report import CheckpointAnalysis, prepare_folder, write_report
from mimkit.analysis.segmentation import segment
from mimkit.analysis.spectrum import spectra, token_spectrum
from mimkit.checkpoint import resolve_checkpoint
from mimkit.configs import ConfigError
from mimkit.data.source_spec import recorded_tokenizer, source_for, tokenized_for
from mimkit.data.sources import Subset
from mimkit.data.token_sources import TokenizedImages, check_input
from mimkit.data.transforms import eval_view, tokenizer_view
from mimkit.distributed import pick_device
from mimkit.interop.load import load_encoder, load_method
from mimkit.interop.official import read
from mimkit.methods.base import Method
from mimkit.methods.mtm import MTM
from mimkit.models.tokenizer import load_tokenizer, tokenizer_file
from mimkit.progress import progress as progress_bar
from mimkit.runs.tokenizer_lifecycle import image_batches

STAGES = ("images", "attention", "spectrum", "reconstruction", "segmentation")


def default_queries(grid: tuple[int, int]) -> list[int]:
    """Three query patches: the centre and two off-centre ones on the diagonal (row-major indices)."""
    gh, gw = grid
    cells = [(gh // 2, gw // 2), (gh // 4, gw // 4), ((3 * gh) // 4, (3 * gw) // 4)]
    return list(dict.fromkeys(r * gw + c for r, c in cells))


def checkpoint_label(path: str, taken: set[str]) -> str:
    """A short name for a checkpoint in the report: its run folder's name (or file stem), made unique."""
    p = Path(path)
    name = p.name if p.is_dir() else (p.parent.name if p.stem == "last" and p.parent.name else p.stem)
    label, i = name or str(p), 2
    while label in taken:
        label, i = f"{name}-{i}", i + 1
    taken.add(label)
    return label


class Loaded(NamedTuple):
    method: Method | None  # None for an encoder export
    encoder: Any
    cfg: Any  # None for an encoder export
    step: int | None
    has_decoder: bool  # an official file may hold the encoder only (its decoder is then random)
    official: bool  # an official file, whose config is rebuilt from its weights (and key=value settings)
    says_norm_pix: bool  # whether the file states norm_pix_loss (an official one without 'args' does not)


def _load(path: str, weights: str, overrides: list[str]) -> Loaded:
    if resolve_checkpoint(path).suffix == ".safetensors":
        encoder, info = load_encoder(path, weights)
        return Loaded(None, encoder, None, info.get("step"), False, False, False)
    # the settings complete official files only (read twice, and only when there are settings)
    official = bool(overrides) and "config" not in read(resolve_checkpoint(path))
    method, cfg, ckpt = load_method(path, overrides if official else None)
    if "config" in ckpt and "model" in ckpt:  # a mimkit checkpoint: the whole method, its config
        return Loaded(method, method.export_encoder(weights), cfg, ckpt.get("step"), True, False, True)
    payload = next((ckpt[k] for k in ("model", "state_dict") if isinstance(ckpt.get(k), dict)), ckpt)
    decoder = any(k.removeprefix("module.").startswith("decoder") for k in payload)
    says = hasattr(ckpt.get("args"), "norm_pix_loss")
    return Loaded(method, method.export_encoder(weights), cfg, None, decoder, True, says)  # no step saved


def _read(source: Any, view: Any, count: int, batch_size: int, device: torch.device) -> torch.Tensor | None:
    """``count`` inputs spread evenly over a source, through a view (an unreadable one is named on stderr
    and left out); None when none is readable."""
    picked = Subset(source, count, spread=True)
    batches = [b["image"] for b in image_batches(picked, view, batch_size=batch_size, num_workers=0)]
    return torch.cat(batches).to(device) if batches else None


def _decoder_of(
    source: Any, trained_on: str | None, grid: tuple[int, int], tokenizer: str | None = None
) -> tuple[Any, str | None]:
    """ids -> images in [0, 1] through the tokenizer of the token data, or why there is none."""
    try:
        path = recorded_tokenizer([source], trained_on, tokenizer)
    except FileNotFoundError as err:
        return None, str(err)
    if path is None:
        return None, "no tokenizer is recorded by the token data: token grids cannot be shown as images"
    if not tokenizer_file(path).exists():
        return None, f"the token data records its tokenizer at '{path}', which is gone"
    tok = load_tokenizer(path)
    if (tok.model.shape.grid,) * 2 != tuple(grid):
        return None, (
            f"the tokenizer decodes {tok.model.shape.grid}x{tok.model.shape.grid} grids; the encoder "
            f"reads {grid[0]}x{grid[1]}"
        )

    def decode(ids: torch.Tensor) -> torch.Tensor:
        return to_unit_range(tok.model.decode(ids.cpu()), tok.mean, tok.std)

    decode.pixels_per_cell = tok.model.shape.patch_size  # type: ignore[attr-defined]
    return decode, None


def _real_images(source: Any, count: int, size: int) -> torch.Tensor | None:
    """The images a token model's inputs were tokenized from, when they were given as images (the same
    spread sample as the inputs, at the tokenizer's input size, in [0, 1]); None for token data."""
    if not isinstance(source, TokenizedImages):
        return None
    unit = tokenizer_view(size, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    picked = Subset(source.source, count, spread=True)
    readable = [i for i in range(len(picked)) if picked.indices[i] not in source.unreadable]
    images = [unit(picked.load(i)[0])["image"] for i in readable]
    return torch.stack(images) if images else None


def _check_settings(
    path: str, encoder: Any, *, layer: int, queries: Sequence[int] | None, ks: Sequence[int], upsample: int
) -> None:
    """The settings that depend on the encoder, checked before any forward pass."""
    depth, (gh, gw) = len(encoder.blocks), encoder.grid_size
    if not -depth <= layer < depth:
        raise ConfigError(f"--layer {layer} is outside the {depth} blocks of '{path}'")
    for q in queries or ():
        if not 0 <= q < gh * gw:
            raise ConfigError(f"query patch {q} is outside the {gh}x{gw} grid (0..{gh * gw - 1}) of '{path}'")
    scale = upsample if encoder.input_spec.kind == "pixels" else 1
    patches = gh * gw * scale**2
    if max(ks) > patches:
        raise ConfigError(f"--ks {max(ks)} is more clusters than the {patches} patches of '{path}'")


def analyze_checkpoint(
    path: str,
    label: str,
    *,
    data: str | None,
    images: int,
    stats_images: int,
    layer: int,
    queries: Sequence[int] | None,
    ks: Sequence[int],
    upsample: int,
    weights: str,
    norm_pix: bool | None,
    overrides: list[str],
    seed: int,
    batch_size: int,
    device: torch.device,
    bar: Any,
    tokenizer: str | None = None,
) -> tuple[CheckpointAnalysis, str]:
    loaded = _load(path, weights, overrides)
    method, encoder, cfg = loaded.method, loaded.encoder, loaded.cfg
    spec = encoder.input_spec
    if spec.kind == "token_embeddings":
        raise ValueError(
            f"'{path}' takes codebook vectors (a SeiT classifier's encoder); analyses take pixel or token-id "
            "encoders"
        )
    _check_settings(path, encoder, layer=layer, queries=queries, ks=ks, upsample=upsample)
    data_given = bool(data)
    data = data or (cfg and (cfg.eval.val or cfg.data.train)) or None
    if not data:
        raise ConfigError(f"mimkit analyze needs --data: '{path}' names no evaluation data of its own")
    trained_on = cfg.data.train if cfg is not None else None
    tokenizer = tokenizer or (cfg.data.tokenizer if cfg is not None else None)
    key = "--data" if data_given else "eval.val" if cfg is not None and cfg.eval.val else "data.train"
    read = source_for(key, data, image_size=spec.eval_size)
    (source,) = tokenized_for(spec, [read], trained_on, tokenizer)
    check_input(spec, source)
    encoder.to(device)
    if method is not None:
        method.to(device)
    grid, patch = tuple(encoder.grid_size), encoder.patch_size
    tokens = spec.kind == "token_ids"
    out = CheckpointAnalysis(
        label=label,
        checkpoint=str(path),
        method=cfg.method.name if cfg is not None else "export",
        input_kind=spec.kind,
        grid=grid,
        patch_size=patch,
        distance_unit="cells" if tokens else "px",
        step=loaded.step,
    )
    if overrides and not loaded.official:
        out.notes.append(
            f"the settings {' '.join(overrides)} complete official files; this checkpoint states its "
            "own config"
        )
    bar.set_postfix_str(f"{label}: images")
    view = eval_view(spec.eval_size, spec)
    shown = _read(source, view, images, batch_size, device)
    if shown is None:
        raise ValueError(f"none of the {images} inputs read from '{data}' is readable")
    stats_set = _read(source, view, stats_images, batch_size, device) if stats_images else None
    stats_set = shown if stats_set is None else stats_set
    out.image_count, out.stats_count = shown.shape[0], stats_set.shape[0]
    side = (spec.img_size, spec.img_size)  # of the id grid the encoder reads
    decode, why = _decoder_of(source, trained_on, side, tokenizer) if tokens else (None, None)
    if tokens:
        size = spec.img_size * getattr(decode, "pixels_per_cell", 1)
        real = _real_images(source, images, size)
        out.images = real if real is not None else decode(shown) if decode is not None else None
        out.images_are = "the images" if real is not None else "the tokenizer's decodes of the tokens"
        out.pixels_per_unit = getattr(decode, "pixels_per_cell", None)
    else:
        out.images = to_unit_range(shown, spec.mean, spec.std).cpu()
    bar.update(1)

    bar.set_postfix_str(f"{label}: attention")
    out.distance = mean_attention_distance(encoder, stats_set, batch_size=batch_size)
    out.layer = layer % len(encoder.blocks)
    out.queries = list(queries) if queries is not None else default_queries(grid)
    (chosen,) = attention_maps(encoder, shown, blocks=[out.layer])
    out.cls_maps = query_maps(chosen, grid, [None], prefix_tokens=encoder.num_prefix_tokens)[0].cpu()
    out.query_maps = query_maps(chosen, grid, out.queries, prefix_tokens=encoder.num_prefix_tokens).cpu()
    bar.update(1)

    bar.set_postfix_str(f"{label}: spectrum")
    if stats_set.shape[0] >= 2:
        out.spectrum_mean, out.spectrum_cls, out.token_spectrum = spectra(
            encoder, stats_set, batch_size=batch_size
        )
        if stats_set.shape[0] <= encoder.embed_dim:
            out.notes.append(
                f"the spectrum of {stats_set.shape[0]} images has at most {stats_set.shape[0] - 1} non-zero "
                f"values of {encoder.embed_dim}: give --stats-images above the width for the whole spectrum"
            )
    else:
        out.notes.append("the feature spectrum needs at least 2 images")
        out.token_spectrum = token_spectrum(encoder, stats_set, batch_size=batch_size)
    bar.update(1)

    bar.set_postfix_str(f"{label}: reconstruction")
    noise = torch.rand(shown.shape[0], encoder.num_patches, generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)
    predicts = isinstance(method, MTM) or (hasattr(method, "reconstruct") and not tokens)
    if method is None:
        out.reconstruction_note = "an encoder export has no decoder: no reconstructions"
    elif not predicts:
        out.reconstruction_note = f"{out.method} predicts latents, not pixels or tokens: no reconstructions"
    elif not loaded.has_decoder:
        out.reconstruction_note = "the file holds no decoder weights: no reconstructions"
    elif weights != "student":
        out.reconstruction_note = "reconstructions use the student's decoder: shown for --weights student"
    elif isinstance(method, MTM):
        ratio = float(method.mask_ratio(0.5))
        rec = reconstruct_tokens(method, shown, decode=decode, noise=noise, mask_ratio=ratio)
        out.reconstruction = rec.images
        # the accuracy over the images averaged for the statistics: the few shown are too few to tell
        gen = torch.Generator().manual_seed(seed)
        stats_noise = torch.rand(stats_set.shape[0], encoder.num_patches, generator=gen).to(device)
        hits = cells = 0.0
        for start in range(0, stats_set.shape[0], batch_size):  # logits are N x L x cells x K: in batches
            part = slice(start, start + batch_size)
            done = reconstruct_tokens(method, stats_set[part], noise=stats_noise[part], mask_ratio=ratio)
            masked = float(done.mask.sum())
            hits, cells = hits + done.accuracy * masked, cells + masked
        accuracy = hits / cells if cells else float("nan")
        out.reconstruction_info = {
            "mask_ratio": ratio,
            "masked_token_accuracy": accuracy,
            "accuracy_images": stats_set.shape[0],
        }
        if rec.images is None:
            out.reconstruction_note = (
                f"masked-token accuracy {100 * accuracy:.1f}% at ratio {ratio:.2f} on {stats_set.shape[0]} "
                f"images; {why}"
            )
    else:
        if norm_pix is not None:
            method.cfg.norm_pix_loss = norm_pix
        elif not loaded.says_norm_pix:
            out.notes.append(
                f"the file does not say whether it was trained with norm_pix_loss; assumed "
                f"{method.cfg.norm_pix_loss} (--norm-pix on|off sets it)"
            )
        out.reconstruction = reconstruct_pixels(method, shown, noise)
        out.reconstruction_info = {"mask_ratio": method.cfg.mask_ratio, "norm_pix": method.cfg.norm_pix_loss}
    bar.update(1)

    bar.set_postfix_str(f"{label}: segmentation")
    out.segmentation = segment(encoder, shown, ks=ks, upsample=1 if tokens else upsample, seed=seed)
    if tokens and upsample != 1:
        out.notes.append("upsampled input applies to pixel encoders: the token grid is clustered as it is")
    if why and (out.reconstruction_note is None or why not in out.reconstruction_note):
        out.notes.append(why)
    bar.update(1)
    return out, data


@contextlib.contextmanager
def _removed_if_failed(made: list[Path]) -> Iterator[None]:
    """The folders a report was to go in, removed again (when still empty) if it fails before writing."""
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                folder.rmdir()
            except OSError:
                break  # not empty (or gone): leave it and the folders above
        raise


def analyze(
    checkpoints: Sequence[str],
    *,
    data: str | None = None,
    out: str | None = None,
    images: int = 6,
    stats_images: int = 1024,
    layer: int = -1,
    queries: Sequence[int] | None = None,
    ks: Sequence[int] = (3, 4, 5),
    upsample: int = 1,
    weights: str = "student",
    norm_pix: bool | None = None,
    overrides: Sequence[str] = (),
    seed: int = 0,
    batch_size: int = 64,
    device: str = "auto",
    progress: bool = True,
    tokenizer: str | None = None,
) -> dict[str, Any]:
    """Every analysis of each checkpoint on the same images (``data``, else the first checkpoint's
    eval.val, else its data.train), written to ``out`` (default: RUN/analysis for one run folder, else
    ./analysis). ``norm_pix`` overrides whether MAE / LUT predictions are per-patch normalised (None: as
    the checkpoint says); ``overrides`` (key=value) complete the configs of official files (mimkit
    checkpoints state their own). Returns the paths written and the numbers of the summary table."""
    if not checkpoints:
        raise ConfigError("mimkit analyze needs at least one checkpoint")
    if images < 1:
        raise ConfigError(f"--images must be at least 1; got {images}")
    if stats_images < 1:  # 0 used to mean "the shown images", silently
        raise ConfigError(f"--stats-images must be at least 1 (images averaged); got {stats_images}")
    if not ks or min(ks) < 1:
        raise ConfigError(f"--ks must be positive cluster counts; got {list(ks)}")
    if upsample < 1:
        raise ConfigError(f"--upsample must be a positive integer; got {upsample}")
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1; got {batch_size}")
    for path in checkpoints:
        resolve_checkpoint(path)  # a missing one is named before any work
    target = (
        Path(out)
        if out
        else (
            Path(checkpoints[0]) / "analysis"
            if len(checkpoints) == 1 and Path(checkpoints[0]).is_dir()
            else Path("analysis")
        )
    )
    made = [d for d in (target / "figures", target, *target.parents) if not d.exists()]  # deepest first
    prepare_folder(target)  # an unwritable folder is named before any work
    dev = pick_device(device)
    taken: set[str] = set()
    items = []
    with (
        _removed_if_failed(made),
        progress_bar(len(checkpoints) * len(STAGES), "analyzing", "step", enabled=progress) as bar,
    ):
        for path in checkpoints:
            item, used = analyze_checkpoint(
                str(path),
                checkpoint_label(str(path), taken),
                data=data,
                images=images,
                stats_images=stats_images,
                layer=layer,
                queries=queries,
                ks=ks,
                upsample=upsample,
                weights=weights,
                norm_pix=norm_pix,
                overrides=list(overrides),
                seed=seed,
                batch_size=batch_size,
                device=dev,
                bar=bar,
                tokenizer=tokenizer,
            )
            data = data or used  # every checkpoint sees the first one's images
            items.append(item)
        bar.set_postfix_str("writing the report")
        settings = {
            "images": images,
            "stats_images": stats_images,
            "layer_shown": layer,
            "ks": list(ks),
            "upsample": upsample,
            "weights": weights,
            "norm_pix": "as saved" if norm_pix is None else norm_pix,
            "seed": seed,
        }
        paths = write_report(items, target, data=str(data), settings=settings)
    summary = [
        {
            "label": a.label,
            "attention_distance_mean": None if a.distance is None else float(a.distance.renorm.mean()),
            "distance_unit": a.distance_unit,
            "pixels_per_unit": a.pixels_per_unit,
            "effective_rank_mean": None if a.spectrum_mean is None else a.spectrum_mean.effective_rank,
        }
        for a in items
    ]
    return {
        "report": str(paths["html"]),
        "json": str(paths["json"]),
        "figures": str(paths["figures"]),
        "checkpoints": summary,
    }
