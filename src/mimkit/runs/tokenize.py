"""Tokenizing a dataset (`mimkit tokenize`): an image source through a saved tokenizer into a token
dataset, written shard by shard so that a stopped run resumes, refused when a resumed run would mix two
datasets, and ended by a report (bytes per image in both formats, codebook use, reconstruction PSNR).
The tokenizer itself (training, import, encode / decode) is :mod:`mimkit.runs.tokenizer_lifecycle`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mimkit.data.source_spec import build_source
from mimkit.data.sources import ImageSource, Subset, UnreadableImage
from mimkit.data.transforms import Views
from mimkit.models.tokenizer import LoadedTokenizer, VQTokenizer, perplexity, tokenizer_file, tokenizer_record
from mimkit.progress import progress as progress_bar
from mimkit.runs.lock import RunLock
from mimkit.runs.tokenizer_lifecycle import (
    image_batches,
    reconstruction_report,
    tokenizer_on,
    tokenizer_warnings,
)
from mimkit.tokens.compact import HEADER
from mimkit.tokens.compact_writer import CompactWriter
from mimkit.tokens.dataset import TOKENIZE_RECORD, convert, open_tokens
from mimkit.tokens.records import TokenDataset, codebook_signature, same_codebook
from mimkit.tokens.seit_writer import check_seit_target
from mimkit.train.log import write_json


def source_bytes(spec: str, source: ImageSource) -> tuple[int, str]:
    """The bytes the source's images take where they are read from, and what was counted."""
    if spec.startswith(("demo:", "synthetic")):
        first = source.load(0)[0]
        return len(source) * first.numel(), "raw uint8 pixels"
    files = getattr(source, "files", None)
    if files is not None:
        return sum(Path(f).stat().st_size for f in files), "image files"
    names = [Path(p) for p in source.name.split(",")]
    if all(p.suffix == ".npz" and p.is_file() for p in names):
        return sum(p.stat().st_size for p in names), ".npz files (compressed)"
    first = source.load(0)[0]
    return len(source) * first.numel(), "raw uint8 pixels"


def tokenize(
    tokenizer_path: str,
    data: str,
    dst: str,
    *,
    to: str = "mimkit",
    shard_size: int = 10_000,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str = "auto",
    max_images: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize the images of ``data`` into a token dataset at ``dst``. The dataset is written shard by
    shard in mimkit's format (a run stopped at any point resumes at its first missing shard); with
    ``to="seit"`` it is converted at the end into SeiT's files, ``dst`` then being the
    ``NAME-token.data.bin.gz`` path. Ends with a report (printed, and as JSON beside the dataset)."""
    if to not in ("mimkit", "seit"):
        raise ValueError(f"--to must be 'mimkit' or 'seit'; got {to!r}")
    if shard_size < 1:
        raise ValueError(f"--shard-size must be at least 1; got {shard_size}")
    target = Path(dst)
    if to == "seit" and not target.name.endswith("-token.data.bin.gz"):
        raise ValueError(f"a SeiT dataset is named NAME-token.data.bin.gz; got '{dst}'")
    shards_dir = (
        target if to == "mimkit" else target.with_name(target.name[: -len(".data.bin.gz")] + ".shards")
    )
    loaded, tokenizer, dev, view = tokenizer_on(tokenizer_path, device)
    if not tokenizer.pruned:
        print("note: this tokenizer was not pruned; ids index its whole codebook", file=sys.stderr)
    source = build_source(data, image_size=tokenizer.shape.img_size, max_images=max_images)
    grid = tokenizer.shape.grid
    report_path = (
        shards_dir / "tokenize_report.json"
        if to == "mimkit"
        else target.with_name(target.name.replace("-token.data.bin.gz", "-tokenize_report.json"))
    )
    # a run killed after the SeiT files were renamed into place, before its shards were removed
    converted = to == "seit" and target.exists() and (shards_dir / HEADER).is_file()
    if to == "seit" and not converted:  # before any work: the name, vocabulary and folder's codebook fit
        check_seit_target(target, tokenizer.codebook().cpu(), tokenizer.vocab_size)
    with RunLock(shards_dir):
        for path in leftovers(shards_dir, target if to == "seit" else None):
            path.unlink(missing_ok=True)
            print(f"note: removed {path}, left by a process killed while writing it", file=sys.stderr)
        check_same_run(shards_dir, source, shard_size, tokenizer_path, tokenizer)
        writer = CompactWriter(
            shards_dir,
            grid=(grid, grid),
            vocab_size=tokenizer.vocab_size,
            codebook=tokenizer.codebook().cpu(),
            classes=source.classes,
            meta={
                # SeiT's files sit beside the shards folder, so one relative path serves both layouts
                **tokenizer_record(tokenizer_path, shards_dir.parent if to == "seit" else shards_dir),
                "tokenizer_shape": dict(tokenizer.shape.__dict__),
                "source": source.name,
            },
            shard_size=shard_size,
        )
        n_shards = -(-len(source) // shard_size)
        done = set(writer.done_shards())
        skipped: list[str] = []
        start = time.time()
        tokenized_now = 0
        bar = progress_bar(len(source), "tokenizing", "img", enabled=progress)
        bar.update(sum(min(shard_size, len(source) - k * shard_size) for k in done if k < n_shards))
        for k in range(n_shards):
            if k in done:
                continue
            ids_parts, labels_parts = [], []
            for batch in image_batches(
                source,
                view,
                start=k * shard_size,
                stop=min(len(source), (k + 1) * shard_size),
                batch_size=batch_size,
                num_workers=num_workers,
                skipped=skipped,
            ):
                ids_parts.append(tokenizer.encode(batch["image"].to(dev)).cpu().numpy())
                labels_parts.append(batch["label"].numpy())
                bar.update(len(ids_parts[-1]))
            ids = np.concatenate(ids_parts) if ids_parts else np.zeros((0, grid, grid), np.int64)
            labels = np.concatenate(labels_parts) if labels_parts else np.zeros(0, np.int64)
            writer.write_shard(k, ids, labels if source.has_labels else None)  # no -1 "labels"
            tokenized_now += len(ids)
        bar.close()
        dataset = shards = writer.finish()
        seconds = time.time() - start
        if converted:
            dataset = converted_before(shards, target)
        elif to == "seit":
            dataset = convert(shards_dir, target, to="seit")
        report = tokenize_report(dataset, data, source, tokenizer, loaded, view, dev, skipped, seconds)
        report["tokenized_now"] = tokenized_now  # 0: the dataset was complete already
        write_json(report_path, report)
        if to == "seit":
            shards.drop_cache()
            shutil.rmtree(shards_dir)
    print(format_report(report, report_path), file=sys.stderr)
    return report


def converted_before(shards: TokenDataset, target: Path) -> TokenDataset:
    """The SeiT dataset an earlier run of the same tokenize wrote from these shards before it was
    stopped (it renames the data file into place last, then removes the shards): checked record by
    record, labels and codebook too, so that only that run's output is taken as done."""
    try:
        there = open_tokens(target, cache=False)
        same = (
            len(there) == len(shards)
            and there.grid == shards.grid
            and (there.labels is None) == (shards.labels is None)
            and (there.labels is None or np.array_equal(there.labels, shards.labels))
            and there.codebook is not None
            and shards.codebook is not None
            and torch.equal(there.codebook, shards.codebook)
            and all(
                np.array_equal(ids, there.read_many(np.arange(start, start + len(ids))))
                for start, ids in shards.chunks()
            )
        )
    except (ValueError, OSError) as err:
        same, why = False, str(err)
    else:
        why = "other records"
    if not same:
        raise ValueError(
            f"'{target}' already exists and is not what these shards ({target.name[: -len('.data.bin.gz')]}"
            f".shards) convert to ({why}); remove it (and its index) or write to another name"
        )
    print(
        f"note: {target} was written before the last run stopped; its shards are removed now", file=sys.stderr
    )
    return there


SAMPLED_IMAGES = 64  # images whose pixels fingerprint a source for a resumed tokenize


def images_sha256(source: ImageSource, count: int = SAMPLED_IMAGES) -> str:
    """A fingerprint of a source's content: sha256 of the pixels of ``count`` images spread over it (an
    unreadable one counts by its position), so that a source changed in place (same name, same count)
    between a kill and a rerun is told apart."""
    digest = hashlib.sha256()
    picked = Subset(source, count, spread=True)
    for i in range(len(picked)):
        try:
            image, label = picked.load(i)
            digest.update(image.numpy().tobytes() + str(label).encode())
        except UnreadableImage:
            digest.update(f"unreadable {picked.indices[i]}".encode())
    return digest.hexdigest()


def _same(key: str, before: Any, now: Any) -> bool:
    return same_codebook(before, now) if key == "codebook_signature" else before == now


def leftovers(shards_dir: Path, seit_target: Path | None) -> list[Path]:
    """Temporary files (``.NAME.tmpPID``) a killed tokenize left: in its shards folder, and beside a SeiT
    target those of this dataset's own files (``.NAME-...``; the folder's codebook is shared, so its
    temporary is left alone). Called holding the shards folder's lock: no other run writes them."""
    temporary = re.compile(r"\..+\.tmp\d*")
    found = [p for p in shards_dir.iterdir() if temporary.fullmatch(p.name)] if shards_dir.is_dir() else []
    if seit_target is not None and seit_target.parent.is_dir():
        name = seit_target.name[: -len("-token.data.bin.gz")]
        own = re.compile(re.escape(f".{name}-") + r".+\.tmp\d*")
        found += [p for p in seit_target.parent.iterdir() if own.fullmatch(p.name)]
    return sorted(found)


def check_same_run(
    folder: Path, source: ImageSource, shard_size: int, tokenizer_path: str, tokenizer: VQTokenizer
) -> None:
    """A folder being tokenized records what it is made of (``tokenize.json``); a later run that resumes
    it must tokenize the same images the same way, or its shards would mix two datasets: the source's
    name, size and a fingerprint of its pixels, the shard size, and the tokenizer's path and codebook."""
    record = folder / TOKENIZE_RECORD
    now = {
        "source": source.name,
        "images": len(source),
        "images_sha256": images_sha256(source),
        "shard_size": shard_size,
        "tokenizer": str(tokenizer_file(tokenizer_path).resolve()),
        "codebook_signature": list(codebook_signature(tokenizer.codebook())),
    }
    if record.is_file():
        before = json.loads(record.read_text())
        changed = [  # a record written before a key was kept does not name it: not compared
            f"{key} {before.get(key)!r} there, {value!r} now"
            for key, value in now.items()
            if key in before and not _same(key, before[key], value)
        ]
        if changed:
            raise ValueError(
                f"'{folder}' holds tokens of another run ({'; '.join(changed)}); resuming it would mix two "
                "datasets: give another output folder, or remove this one"
            )
    elif any(p.name != ".lock" for p in folder.iterdir()):
        raise ValueError(
            f"'{folder}' already holds files that no `mimkit tokenize` run wrote; give an empty or new folder"
        )
    else:
        write_json(record, now)


def tokenize_report(
    dataset: Any,
    data: str,
    source: ImageSource,
    tokenizer: VQTokenizer,
    loaded: LoadedTokenizer,
    view: Views,
    device: torch.device,
    skipped: list[str],
    seconds: float,
) -> dict[str, Any]:
    """Images, bytes per image in both formats and against the source, codebook use, reconstruction PSNR."""
    n = len(dataset)
    counts = np.zeros(dataset.vocab_size, dtype=np.int64)
    for _, ids in dataset.chunks():
        counts += np.bincount(ids.ravel(), minlength=dataset.vocab_size)
    with tempfile.TemporaryDirectory() as tmp:
        other_to = "seit" if dataset.format == "mimkit" else "mimkit"
        other_path = Path(tmp) / ("tokens-token.data.bin.gz" if other_to == "seit" else "tokens")
        other = convert(dataset.path, other_path, to=other_to)
        sizes = {
            dataset.format: dataset.stored_bytes() / max(n, 1),
            other_to: other.stored_bytes() / max(n, 1),
        }
        other.drop_cache()  # a temporary dataset: its decoded cache goes with it
        other.close()
    src_bytes, counted = source_bytes(data, source)
    quality = reconstruction_report(tokenizer, source, view, loaded, None, device)
    report = {
        "dataset": str(dataset.path),
        "format": dataset.format,
        "images": n,
        "skipped_images": len(skipped),
        "grid": list(dataset.grid),
        "vocab_size": dataset.vocab_size,
        "bytes_per_image": {"mimkit": sizes["mimkit"], "seit": sizes["seit"]},
        "mimkit_to_seit": sizes["mimkit"] / sizes["seit"],
        "source": {
            "name": source.name,
            "bytes_per_image": src_bytes / max(len(source), 1),
            "counted": counted,
        },
        "ratio_to_source": sizes[dataset.format] / (src_bytes / max(len(source), 1)),
        "codes_used": int((counts > 0).sum()),
        "perplexity": perplexity(torch.from_numpy(counts)),
        **quality,
        "seconds": round(seconds, 1),
    }
    report["warnings"] = tokenizer_warnings(report)
    return report


def format_report(report: dict[str, Any], path: Path) -> str:
    b = report["bytes_per_image"]
    done = (
        f"tokenized {report['images']} images ({report['skipped_images']} skipped) into {report['dataset']} "
        f"in {report['seconds']} s"
        if report.get("tokenized_now", report["images"])
        else f"{report['dataset']} was complete already ({report['images']} images; nothing to tokenize)"
    )
    return (
        f"{done}: {report['grid'][0]}x{report['grid'][1]} ids of {report['vocab_size']} "
        f"codes ({report['codes_used']} used, perplexity {report['perplexity']:.1f}); bytes per image: "
        f"mimkit {b['mimkit']:.1f}, SeiT {b['seit']:.1f} (mimkit/SeiT {report['mimkit_to_seit']:.3f}), "
        f"source {report['source']['bytes_per_image']:.1f} ({report['source']['counted']}; tokens are "
        f"{100 * report['ratio_to_source']:.2f}% of it); reconstruction PSNR {report['psnr']:.2f} dB on "
        f"{report['psnr_images']} images (the mean image: {report['psnr_mean_image']:.2f} dB); report: {path}"
    ) + "".join(f"\nwarning: {line}" for line in report.get("warnings", ()))
