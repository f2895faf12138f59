"""One self-contained HTML report of the analyses of one or several checkpoints side by side: every
figure is a PNG drawn with matplotlib and embedded in the page as a data URI, so the page opens from a
single file with no network. The same PNGs are written beside it, and the numbers as JSON."""

from __future__ import annotations

import base64
import html
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from mimkit.analysis.attention import AttentionDistance
from mimkit.analysis.reconstruction import Reconstruction
from mimkit.analysis.segmentation import Segmentation
from mimkit.analysis.spectrum import Spectrum
from mimkit.tokens.records import write_atomic

CLUSTER_COLOURS = colormaps["tab10"].colors


@dataclass
class CheckpointAnalysis:
    """Everything the report shows of one checkpoint (the fields left None were not computed, and
    ``notes`` says why)."""

    label: str
    checkpoint: str
    method: str
    input_kind: str
    grid: tuple[int, int]
    patch_size: int
    distance_unit: str  # "px" or "cells": what the encoder's grid counts
    step: int | None = None
    # pixels of the original image per distance unit: 1 for pixel encoders, the tokenizer's cell size for
    # token encoders (None when no tokenizer is known): plots and tables then speak in pixels for all
    pixels_per_unit: float | None = 1.0
    images_are: str = "the images"  # what the maps are drawn over
    distance: AttentionDistance | None = None
    spectrum_mean: Spectrum | None = None
    spectrum_cls: Spectrum | None = None
    token_spectrum: torch.Tensor | None = None
    images: torch.Tensor | None = None  # [n, C, H, W] in [0, 1]: what the maps are drawn over
    layer: int = -1  # the block whose attention maps are shown
    queries: list[int] = field(default_factory=list)
    cls_maps: torch.Tensor | None = None  # [n, heads, gh, gw]
    query_maps: torch.Tensor | None = None  # [Q, n, heads, gh, gw]
    reconstruction: Reconstruction | None = None
    reconstruction_info: dict[str, Any] = field(default_factory=dict)
    reconstruction_note: str | None = None  # why there is no reconstruction, or what it could not show
    segmentation: Segmentation | None = None
    image_count: int = 0  # images shown
    stats_count: int = 0  # images averaged
    notes: list[str] = field(default_factory=list)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def _hwc(image: torch.Tensor) -> np.ndarray:
    return image.detach().float().cpu().permute(1, 2, 0).clamp(0, 1).numpy()


def _upsampled(grid: torch.Tensor, size: tuple[int, int], mode: str) -> np.ndarray:
    return F.interpolate(grid[None, None].float(), size=size, mode=mode).squeeze().cpu().numpy()


def _off(ax: Any) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def in_pixels(a: CheckpointAnalysis) -> bool:
    return a.distance is not None and a.pixels_per_unit is not None


def distance_figure(items: list[CheckpointAnalysis]) -> Figure:
    """Mean attention distance per block: the head mean as a line, each head as a dot; renormalised
    after dropping cls on the left, raw on the right. Every model whose unit is known in pixels (a token
    model's cells times its tokenizer's cell size) shares one pixel axis; the others get a row in cells."""
    rows = [
        ("px", [(i, a) for i, a in enumerate(items) if in_pixels(a)]),
        ("cells", [(i, a) for i, a in enumerate(items) if a.distance is not None and not in_pixels(a)]),
    ]
    rows = [r for r in rows if r[1]] or [("px", [])]
    fig = Figure(figsize=(11, 4 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), 2, squeeze=False))
    for (unit, members), row in zip(rows, axes, strict=True):
        for ax, variant, title in zip(
            row, ("renorm", "raw"), ("cls dropped, rows renormalised", "cls dropped, raw"), strict=True
        ):
            for i, a in members:
                scale = a.pixels_per_unit if unit == "px" else 1.0
                d = getattr(a.distance, variant).numpy() * scale
                layers = np.arange(1, d.shape[0] + 1)
                colour = f"C{i}"
                via = f" (cells x {scale:g} px)" if unit == "px" and a.distance_unit == "cells" else ""
                ax.plot(layers, d.mean(axis=1), "-o", color=colour, label=a.label + via)
                for h in range(d.shape[1]):
                    ax.scatter(layers, d[:, h], s=8, color=colour, alpha=0.35)
            ax.set_title(f"mean attention distance ({title})", fontsize=10)
            ax.set_xlabel("block")
            ax.grid(alpha=0.3)
        label = "px of the input image" if unit == "px" else "token cells; no tokenizer known"
        row[0].set_ylabel(f"distance ({label})")
        row[0].legend(fontsize=8)
    return fig


def _distance_text(a: CheckpointAnalysis, value: float) -> str:
    if in_pixels(a) and a.distance_unit == "cells":
        return f"{value * a.pixels_per_unit:.2f} px ({value:.2f} cells)"
    return f"{value:.2f} {a.distance_unit}"


def spectrum_figure(items: list[CheckpointAnalysis]) -> Figure:
    """Singular values (log scale) of the centred covariance of mean-pooled and cls features, and the
    per-image token-level spectrum."""
    fig = Figure(figsize=(15, 4))
    axes = fig.subplots(1, 3)
    for i, a in enumerate(items):
        for ax, spectrum in zip(axes[:2], (a.spectrum_mean, a.spectrum_cls), strict=True):
            if spectrum is not None:
                v = spectrum.values.numpy()
                ax.semilogy(
                    np.arange(1, len(v) + 1),
                    np.maximum(v, 1e-30),
                    color=f"C{i}",
                    label=f"{a.label} (eff. rank {spectrum.effective_rank:.1f})",
                )
        if a.token_spectrum is not None:
            v = a.token_spectrum.numpy()
            axes[2].semilogy(np.arange(1, len(v) + 1), np.maximum(v, 1e-30), color=f"C{i}", label=a.label)
    titles = ("mean-pooled features", "cls features", "per-image patch tokens (normalised, averaged)")
    for ax, title in zip(axes, titles, strict=True):
        top = ax.get_ylim()[1]
        ax.set_ylim(bottom=max(ax.get_ylim()[0], top * 1e-10))  # values past the rank: rounding noise
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("index k")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("singular value of the covariance")
    return fig


def _unit_max(m: torch.Tensor) -> torch.Tensor:
    return m / m.max().clamp_min(1e-12)


def _colour_bar(fig: Figure, axes: Any) -> None:
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0, 1), cmap="inferno"), ax=axes, fraction=0.02, pad=0.01)
    bar.set_label("attention / the map's maximum", fontsize=7)
    bar.ax.tick_params(labelsize=6)


def attention_figure(a: CheckpointAnalysis) -> Figure:
    """One row per image: the image with the query patches marked, then what cls and each query patch
    attend to (the heads' mean) in the chosen block, each map scaled to its maximum (one colour bar). A
    query's dot, its column title and its column's frame share one colour."""
    n = a.cls_maps.shape[0]
    cols = 2 + len(a.queries)
    fig = Figure(figsize=(1.9 * cols + 0.6, 1.9 * n))
    block = f"block {a.layer + 1}" + ("" if a.distance is None else f" of {a.distance.renorm.shape[0]}")
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    gh, gw = a.grid
    colours = [CLUSTER_COLOURS[i % len(CLUSTER_COLOURS)] for i in range(len(a.queries))]
    for r in range(n):
        image = a.images[r] if a.images is not None else None
        size = tuple(image.shape[-2:]) if image is not None else (gh * 8, gw * 8)
        maps = [a.cls_maps[r].mean(0)] + [a.query_maps[q, r].mean(0) for q in range(len(a.queries))]
        ax = axes[r, 0]
        if image is not None:
            ax.imshow(_hwc(image))
        for q, colour in zip(a.queries, colours, strict=True):
            y, x = (q // gw + 0.5) * size[0] / gh, (q % gw + 0.5) * size[1] / gw
            ax.scatter([x - 0.5], [y - 0.5], s=30, color=colour, edgecolors="white", linewidths=0.8)
        if r == 0:
            ax.set_title("queries", fontsize=8)
        for c, m in enumerate(maps, start=1):
            ax = axes[r, c]
            if image is not None:
                ax.imshow(_hwc(image))
            heat = _upsampled(_unit_max(m), size, "bilinear")
            ax.imshow(heat, cmap="inferno", vmin=0, vmax=1, alpha=0.65 if image is not None else 1)
            if c >= 2:  # a query's column: framed in its dot's colour
                for spine in ax.spines.values():
                    spine.set_edgecolor(colours[c - 2])
                    spine.set_linewidth(2.5)
            if r == 0:
                if c == 1:
                    ax.set_title(f"cls, {block}", fontsize=8)
                else:
                    ax.set_title(f"\u25cf patch {a.queries[c - 2]}", fontsize=8, color=colours[c - 2])
        for ax in axes[r]:
            _off(ax)
    _colour_bar(fig, axes)
    return fig


def heads_figure(a: CheckpointAnalysis) -> Figure:
    """Every head's map for the first image: cls on the first row, the first query patch on the second;
    each map scaled to its maximum (one colour bar)."""
    heads = a.cls_maps.shape[1]
    rows = [("cls", a.cls_maps[0])]
    if a.queries:
        rows.append((f"patch {a.queries[0]}", a.query_maps[0, 0]))
    fig = Figure(figsize=(1.5 * heads + 0.6, 1.6 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), heads, squeeze=False))
    for r, (name, maps) in enumerate(rows):
        for h in range(heads):
            axes[r, h].imshow(_unit_max(maps[h]).cpu().numpy(), cmap="inferno", vmin=0, vmax=1)
            axes[r, h].set_title(f"{name}, head {h}", fontsize=7)
            _off(axes[r, h])
    _colour_bar(fig, axes)
    return fig


def reconstruction_figure(r: Reconstruction, original: str = "original") -> Figure:
    """Columns of images; rows: original (for a token model: its tokens, decoded), masked input,
    prediction, prediction with the visible patches pasted back."""
    rows = (
        (original, r.original),
        ("masked", r.masked),
        ("prediction", r.prediction),
        ("visible pasted", r.pasted),
    )
    n = r.original.shape[0]
    fig = Figure(figsize=(1.6 * n, 1.7 * len(rows)))
    axes = np.atleast_2d(fig.subplots(len(rows), n, squeeze=False))
    for i, (name, images) in enumerate(rows):
        for j in range(n):
            axes[i, j].imshow(_hwc(images[j]))
            _off(axes[i, j])
        axes[i, 0].set_ylabel(name, fontsize=8)
    return fig


def segmentation_figure(a: CheckpointAnalysis) -> Figure:
    """One row per image: the image, the clusters at each k blended over it, and the t-SNE of the patch
    features coloured by the finest cut."""
    seg = a.segmentation
    ks = sorted(seg.labels)
    n = seg.embedding.shape[0]
    cols = 2 + len(ks)
    fig = Figure(figsize=(1.9 * cols, 1.9 * n))
    axes = np.atleast_2d(fig.subplots(n, cols, squeeze=False))
    palette = np.array(CLUSTER_COLOURS)
    for r in range(n):
        image = _hwc(a.images[r]) if a.images is not None else None
        size = image.shape[:2] if image is not None else (seg.grid[0] * 8, seg.grid[1] * 8)
        if image is not None:
            axes[r, 0].imshow(image)
        for c, k in enumerate(ks, start=1):
            labels = _upsampled(torch.from_numpy(seg.labels[k][r]), size, "nearest").astype(int)
            colours = palette[labels % len(palette)]
            shown = 0.45 * image + 0.55 * colours if image is not None else colours
            axes[r, c].imshow(shown)
            if r == 0:
                axes[r, c].set_title(f"k = {k}", fontsize=8)
        finest = seg.labels[ks[-1]][r].reshape(-1)
        points = seg.embedding[r]
        axes[r, -1].scatter(points[:, 0], points[:, 1], s=6, c=palette[finest % len(palette)])
        if r == 0:
            axes[r, -1].set_title(f"t-SNE (k = {ks[-1]})", fontsize=8)
        for ax in axes[r]:
            _off(ax)
    return fig


def _spectrum_json(s: Spectrum | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "values": s.values.tolist(),
        "effective_rank": s.effective_rank,
        "rankme": s.rankme,
        "images": s.images,
    }


def numbers(a: CheckpointAnalysis) -> dict[str, Any]:
    """The raw numbers of one checkpoint's analyses (strict JSON: NaN becomes null)."""
    out: dict[str, Any] = {
        "label": a.label,
        "checkpoint": a.checkpoint,
        "method": a.method,
        "step": a.step,
        "input": {"kind": a.input_kind, "grid": list(a.grid), "patch_size": a.patch_size},
        "distance_unit": a.distance_unit,
        "pixels_per_unit": a.pixels_per_unit,
        "images_are": a.images_are,
        "images_shown": a.image_count,
        "images_averaged": a.stats_count,
        "notes": a.notes,
    }
    if a.distance is not None:
        out["attention_distance"] = {
            "renorm": a.distance.renorm.tolist(),
            "raw": a.distance.raw.tolist(),
            "renorm_layer_mean": a.distance.renorm.mean(1).tolist(),
            "raw_layer_mean": a.distance.raw.mean(1).tolist(),
            "images": a.distance.images,
        }
    out["spectrum"] = {
        "mean": _spectrum_json(a.spectrum_mean),
        "cls": _spectrum_json(a.spectrum_cls),
        "tokens": None if a.token_spectrum is None else a.token_spectrum.tolist(),
    }
    if a.reconstruction_info:
        mask = None if a.reconstruction is None else a.reconstruction.mask.tolist()
        out["reconstruction"] = {**a.reconstruction_info, "mask": mask}
    if a.reconstruction_note:
        out["reconstruction_note"] = a.reconstruction_note
    if a.segmentation is not None:
        out["segmentation"] = {
            "grid": list(a.segmentation.grid),
            "labels": {str(k): v.tolist() for k, v in a.segmentation.labels.items()},
            "tsne": a.segmentation.embedding.tolist(),
        }
    if a.cls_maps is not None:
        out["attention_maps"] = {"block": a.layer + 1, "queries": a.queries}  # blocks from 1, as plotted
    return _finite(out)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if np.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite(v) for v in x]
    return x


def _masked_token_text(a: CheckpointAnalysis) -> str:
    accuracy = a.reconstruction_info.get("masked_token_accuracy")
    if accuracy is None:
        return ""
    images = a.reconstruction_info.get("accuracy_images")
    on = f" on {images} images" if images else ""
    return f"{100 * accuracy:.1f}% at ratio {a.reconstruction_info['mask_ratio']:.2f}{on}"


def _summary_rows(items: list[CheckpointAnalysis]) -> str:
    rows = []
    for a in items:
        d = a.distance
        cells = [
            html.escape(a.label),
            html.escape(a.method),
            "" if a.step is None else str(a.step),
            f"{a.input_kind} {a.grid[0]}x{a.grid[1]}",
            "" if d is None else _distance_text(a, float(d.renorm[-1].mean())),
            "" if d is None else _distance_text(a, float(d.renorm.mean())),
            "" if d is None else _distance_text(a, float(d.raw.mean())),
            "" if a.spectrum_mean is None else f"{a.spectrum_mean.effective_rank:.1f}",
            "" if a.spectrum_mean is None else f"{a.spectrum_mean.rankme:.1f}",
            "" if a.spectrum_cls is None else f"{a.spectrum_cls.effective_rank:.1f}",
            _masked_token_text(a),
        ]
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return "\n".join(rows)


STYLE = """
body { font-family: sans-serif; margin: 24px; color: #222; }
.side { display: grid; gap: 24px; align-items: start; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 14px; margin: 14px 0 4px; }
table { border-collapse: collapse; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 4px 8px; text-align: right; }
td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; }
.note { color: #a33; font-size: 13px; }
p.help { font-size: 13px; color: #555; max-width: 1000px; }
"""


def prepare_folder(out: str | Path) -> Path:
    """OUT/figures, created, emptied of an earlier report's PNGs and shown to be writable."""
    figures = Path(out) / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for stale in [*figures.glob("*.png"), *figures.glob(".*.tmp*"), *Path(out).glob(".report.*.tmp*")]:
        stale.unlink()  # an earlier report's figures, and what a killed writer left
    probe = figures / ".writable"
    probe.write_bytes(b"")
    probe.unlink()
    return figures


def write_report(
    items: list[CheckpointAnalysis], out: str | Path, *, data: str, settings: dict[str, Any]
) -> dict[str, Path]:
    """Write OUT/report.html (self-contained), OUT/report.json and OUT/figures/*.png; returns the paths."""
    out = Path(out)
    figures = prepare_folder(out)
    embedded: dict[str, str] = {}

    def add(name: str, fig: Figure) -> str:
        png = _png(fig)
        write_atomic(figures / f"{name}.png", lambda f: f.write(png))
        embedded[name] = base64.b64encode(png).decode("ascii")
        return f'<img alt="{html.escape(name)}" src="data:image/png;base64,{embedded[name]}">'

    def per_checkpoint(title: str, help_text: str, draw: Any, key: str) -> str:
        """The checkpoints side by side, one column each across the page."""
        columns = f"repeat({len(items)}, minmax(0, 1fr))"
        parts = [f"<h2>{title}</h2><p class='help'>{help_text}</p>"]
        parts.append(f"<div class='side' style='grid-template-columns: {columns}'>")
        for i, a in enumerate(items):
            fig = draw(a)
            body = (
                add(f"{key}_{i}_{_slug(a.label)}", fig)
                if isinstance(fig, Figure)
                else f"<p class='note'>{html.escape(fig)}</p>"
            )
            parts.append(f"<div><h3>{html.escape(a.label)}</h3>{body}</div>")
        return "".join(parts) + "</div>"

    sections = [
        "<h2>Summary</h2><table><tr><th>checkpoint</th><th>method</th><th>step</th><th>input</th>"
        "<th>attention distance, last block</th><th>attention distance, all blocks</th>"
        "<th>same, raw</th><th>effective rank (mean)</th><th>RankMe (mean)</th>"
        "<th>effective rank (cls)</th><th>masked-token accuracy</th></tr>"
        + _summary_rows(items)
        + "</table>"
        + "<p class='help'>Distances in pixels of the input image; a token model's cells count as its "
        "tokenizer's cell size (a 4-px cell: 1 cell = 4 px). MTM's masked-token accuracy: how often the most "
        "likely id is the token's, on the masked patches of the images averaged for the statistics, at the "
        "median of its mask-ratio distribution.</p>",
        "<h2>Mean attention distance</h2><p class='help'>Per block and head, averaged over the query "
        "patches of every analysed image; the distance between patch centres is weighted by attention. "
        "Broader attention means larger values.</p>" + add("attention_distance", distance_figure(items)),
        "<h2>Singular value spectrum</h2><p class='help'>Singular values of the centred feature covariance "
        "over the analysed images; a flatter spectrum means less dimensional collapse. The effective rank "
        "is exp of the entropy of the normalised values.</p>" + add("spectrum", spectrum_figure(items)),
        per_checkpoint(
            "Attention maps",
            "What the cls token and each marked query patch attend to (mean over heads), in the block named "
            "above each grid (numbered from 1, as in the distance plot; --layer), each map scaled to its "
            "maximum. A query's dot, its column title and its column's frame share a colour. Drawn over the "
            "images; for a token model given token data, over the tokenizer's decodes of its tokens.",
            lambda a: attention_figure(a) if a.cls_maps is not None else "not computed",
            "attention_maps",
        ),
        per_checkpoint(
            "Attention maps per head",
            "The first image: every head's map for cls and for the first query patch.",
            lambda a: heads_figure(a) if a.cls_maps is not None else "not computed",
            "attention_heads",
        ),
        per_checkpoint(
            "Reconstructions",
            "The same masks for every checkpoint of one grid. MAE / LUT under norm_pix_loss: each predicted "
            "patch is brought back with the mean and std of the true patch (what the loss normalised by), so "
            "its colour and contrast come from the image, not the model. MTM: the most likely token ids, "
            "decoded by the tokenizer.",
            lambda a: (
                reconstruction_figure(
                    a.reconstruction, "tokens, decoded" if a.input_kind == "token_ids" else "original"
                )
                if a.reconstruction is not None
                else a.reconstruction_note or "not computed"
            ),
            "reconstruction",
        ),
        per_checkpoint(
            "Patch-clustering segmentation and t-SNE",
            "Ward clustering of each image's L2-normalised last-block patch features, cut at each k "
            "(nested partitions of one tree); t-SNE of the same features coloured by the finest cut.",
            lambda a: segmentation_figure(a) if a.segmentation is not None else "not computed",
            "segmentation",
        ),
    ]
    notes = [f"<li>{html.escape(a.label)}: {html.escape(n)}</li>" for a in items for n in a.notes]
    if notes:
        sections.append("<h2>Notes</h2><ul class='note'>" + "".join(notes) + "</ul>")
    listing = "".join(
        f"<li>{html.escape(a.label)}: {html.escape(a.checkpoint)} ({html.escape(a.method)})</li>"
        for a in items
    )
    page = (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mimkit analysis</title>"
        f"<style>{STYLE}</style></head><body><h1>mimkit analysis</h1><ul>{listing}</ul>"
        f"<p class='help'>Images: {html.escape(data)}. Settings: "
        f"{html.escape(json.dumps(settings))}.</p>" + "".join(sections) + "</body></html>"
    )
    paths = {"html": out / "report.html", "json": out / "report.json", "figures": figures}
    write_atomic(paths["html"], lambda f: f.write(page.encode("utf-8")))
    report = {"data": data, "settings": settings, "checkpoints": [numbers(a) for a in items]}
    text = json.dumps(report, indent=1, allow_nan=False) + "\n"
    write_atomic(paths["json"], lambda f: f.write(text.encode("utf-8")))
    return paths


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in label)[:40]
