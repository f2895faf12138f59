"""Storage against accuracy on real images (SeiT's claim): at equal storage, does training on VQ tokens beat
training on pixels because many more images fit, and does SeiT++'s masked token modeling (MTM) before
fine-tuning lift token training further? Trains every arm at a few storage budgets with mimkit's own
commands and prints one JSON object; writes a plot (PNG).

    python bench/storage_accuracy.py                      # CIFAR-10 train parts 0-2, held out: part 3
    python bench/storage_accuracy.py --quick              # the pipeline in minutes (numbers mean little)
    python bench/storage_accuracy.py --train data/cifar-10-batches-py \
        --heldout data/cifar-10-batches-py/test_batch        # the CIFAR-10 download: its test images held out
    python bench/storage_accuracy.py --tokenizer runs/tok --budgets 0.1,0.5,tokens --steps 600

Protocol
--------
Data. ``--train`` (a mimkit data source: .npz files, a CIFAR download, an image folder; labelled) is the
pool. Its images are put in one fixed order (a permutation seeded by ``--seed``); the subset at every budget
and in every format is a prefix of that order, so a smaller subset is always inside a larger one. Held
out: ``--heldout-images`` images of ``--heldout`` (a permutation seeded by ``--seed`` + 1; 0 takes them
all), never trained on, the same images for every run (pixel arms read them as stored, token arms as the
tokenizer's ids of them). Images that are not ``--img-size`` square are squashed to it (bicubic).

Storage. The pool is written once in each format and measured on disk: PNG files (Pillow's default
compression) and JPEG files (quality ``--jpeg-quality``, Pillow's default 4:2:0 subsampling), one file per
image in an ImageFolder (labels are the class folders: no bytes counted for them); SeiT's format
(``mimkit tokenize --to seit``), counting every file the dataset needs: ``.data.bin.gz``,
``.index.npy.gz``, ``-label.txt``, ``-class-to-id.json``, ``-meta.json`` and ``codebook.ckpt``. The
tokenizer's weights are not counted (as in SeiT: one tokenizer serves any number of datasets). A budget
of B bytes holds the longest prefix of the pool that fits in B: for image files, whose sizes are known,
exactly; for SeiT's format (one gzip stream), from the estimate n = floor((B - fixed) / per_image), with
per_image the pool's measured bytes per record of the files that grow with the records and fixed the
bytes that do not (codebook, meta and class files), lowered until the written subset fits, then raised
while one more record still fits. n is at most the pool. Budgets are in MB (10^6
bytes), or ``tokens`` (the whole pool in SeiT's format) and ``full`` (the whole pool as PNG files, where
every arm has every image).

Tokenizer. Trained once on the pool by ``mimkit tokenizer train --config tokenizer_cifar10`` (32 px, 4 px
per token: 8 x 8 ids, 384 codes before pruning) for ``--tokenizer-epochs`` epochs (the recipe: 6), or
given (``--tokenizer RUN``). Its reconstruction PSNR on the held-out images (decode of the ids the token
arms read, on the [0, 1] scale, clamped; mean over images) is reported beside the PSNR of their mean image.

Arms, each a mimkit command (the bench has no training loop of its own); one encoder for all: a ViT
``--width`` wide, ``--depth`` blocks, ``--heads`` heads, trained from scratch. Every arm gets the same
number of optimizer steps, ``--steps``, at every budget (up to the rounding of whole epochs): batch
``--batch`` (the subset's size when smaller; where one pass over the subset would take more than the
steps, the batch grows to ceil(n / steps), so every image is seen once; rounded up to even, as Mixup and
CutMix pair the images of a batch), epochs = max(1, round(steps / (n // batch))), a cosine schedule over
the run, warmup the recipe's share of it.

- ``png`` / ``jpeg``: ``mimkit finetune scratch --config finetune_cifar10`` on the subset's image files
  (patch 4 px: 8 x 8 patches; the recipe's RandAugment, random erasing, Mixup/CutMix, smoothing, AdamW
  blr 1e-3, wd 0.05; layer decay off and head init std 0.02, as for a model from scratch).
- ``seit``: ``mimkit finetune scratch --config seit_vit_base_imagenet`` on the subset in SeiT's format:
  SeiT's supervised recipe (codebook vectors through its stem adapter, Token-EDA, Emb-Noise / ColorAdapt,
  CutMix, AdamW lr 7.5e-4 x batch / 512, wd 0.1) at this size: the encoder above, 8 x 8 cells, SeiT's
  adapter (kernel 4, stride 2, padding 1, as mimkit fixes it) making 4 x 4 patches, model EMA off (its
  0.99996 decay is the initial weights after a few hundred steps; SeiT evaluates the raw model anyway).
- ``seitpp``: ``mimkit pretrain --config mtm_cifar10`` (MTM on the same subset; decoder 128 x 2 as
  ``mtm_demo``) for round(steps x ``--mtm-share``) steps (default half), then ``mimkit finetune RUN
  --config finetune_mtm_cifar10`` (SeiT++'s fine-tuning: Emb-Noise / ColorAdapt, random resized crop,
  CutMix, layer decay 0.75, the square-root lr rule) for the rest: the two together take the same number
  of steps as the other arms, each half under the batch rule above. Id patches of one cell (8 x 8). Where
  one pass over the subset takes more steps than a half, each half's batch grows to see every image once,
  so SeiT++ sees up to twice the images of the other arms in the same steps (``images_seen`` per row).
- ``seitpp_scratch``: the ablation that isolates MTM: ``mimkit finetune scratch --config
  finetune_mtm_cifar10``, SeiT++'s fine-tuning with the same encoder and id patches, from scratch for all
  the steps (layer decay off and head init std 0.02, as for the pixel arms).

Evaluation: top-1 of every run on the held-out images (each run's own evaluation at its end: the full
32 px image, or all 8 x 8 ids), with the binomial standard error sqrt(p (1 - p) / n_heldout). Beside the
curve, the PNG classifier with the most images evaluated on the tokenizer's reconstructions of the
held-out images: how much the tokenizer's loss alone costs a pixel model. Every pixel arm is scored on the
held-out images as they are (lossless), the JPEG arm too, though it trained on JPEG files. ``warnings``
(also printed last) name a tokenizer that learnt little and every run whose top-1 is at chance level.

Work folder (``--work``): the pool's files, the tokenizer, the token datasets, every run folder; a run
whose ``summary.json`` holds its result is not run again, an interrupted one resumes (mimkit's own
resume), so re-running the same command after an interruption continues. Run folders are named by arm,
images and a digest of their settings: changing ``--steps`` (or any setting) trains anew beside them.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

CIFAR = Path("/work/shared/data/cifar10")
MB = 1_000_000
ARMS = ("png", "jpeg", "seit", "seitpp", "seitpp_scratch")
LABELS = {
    "png": "pixels, PNG",
    "jpeg": "pixels, JPEG q{q}",
    "seit": "tokens, SeiT (supervised)",
    "seitpp": "tokens, SeiT++ (MTM + fine-tune)",
    "seitpp_scratch": "tokens, SeiT++'s fine-tuning from scratch (no MTM)",
}
SEIT_NAME = "tokens"  # SeiT's files are NAME-token.data.bin.gz and its siblings
SEIT_GROWING = ("-token.data.bin.gz", "-token.index.npy.gz", "-label.txt")  # bytes that grow with records
SEIT_FIXED = ("codebook.ckpt", "-class-to-id.json", "-meta.json")  # and those that do not


class BenchError(RuntimeError):
    """A problem the user can fix; printed as one line."""


# ---------------------------------------------------------------------------------------------------
# budget arithmetic


def images_for_budget(budget: float, per_image: float, fixed: float = 0.0, pool: int | None = None) -> int:
    """Images that a budget of ``budget`` bytes holds: floor((budget - fixed) / per_image), at most
    ``pool``, at least 0."""
    if per_image <= 0:
        raise ValueError(f"bytes per image must be positive; got {per_image}")
    n = max(0, math.floor((budget - fixed) / per_image))
    return min(n, pool) if pool is not None else n


def prefix_fitting(sizes: np.ndarray, budget: float, n: int) -> int:
    """The largest m <= n whose first m file sizes sum to at most ``budget``."""
    total = np.concatenate([[0], np.cumsum(sizes[:n], dtype=np.int64)])
    return int(np.searchsorted(total, budget, side="right")) - 1


def seit_bytes(folder: Path) -> tuple[int, int]:
    """(bytes that grow with the records, bytes that do not) of the SeiT dataset in ``folder``: the files
    a reader needs (data, index, labels; class names, meta, codebook), not a report written beside them."""
    growing = fixed = 0
    for p in folder.iterdir():
        if p.name.endswith(SEIT_GROWING):
            growing += p.stat().st_size
        elif p.name.endswith(SEIT_FIXED):
            fixed += p.stat().st_size
    return growing, fixed


def parse_budgets(text: str) -> list[str]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part not in ("tokens", "full"):
            try:
                if float(part) <= 0:
                    raise ValueError
            except ValueError:
                raise BenchError(
                    f"--budgets: '{part}' is not a positive number of MB, 'tokens' or 'full'"
                ) from None
        out.append(part)
    if not out:
        raise BenchError("--budgets: give at least one budget")
    return out


def budget_label(budget: str, nbytes: float) -> str:
    """'0.25 MB', or the named budget with the bytes it stands for: "'tokens' (2.73 MB)"."""
    return f"{budget} MB" if budget not in ("tokens", "full") else f"'{budget}' ({nbytes / MB:.2f} MB)"


# ---------------------------------------------------------------------------------------------------
# the pool and the held-out images


def load_images(
    spec: str, flag: str, img_size: int
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], list[str]]:
    """(uint8 [N, S, S, 3], int64 labels [N], class names, the unreadable images) of a mimkit data source."""
    import torch  # noqa: F401  (mimkit's sources hand out tensors)
    from PIL import Image

    from mimkit.data.source_spec import build_source
    from mimkit.data.sources import UnreadableImage

    try:
        source = build_source(spec, image_size=img_size)
    except FileNotFoundError as err:
        raise BenchError(f"{flag}: {err}") from None
    except ValueError as err:
        raise BenchError(f"{flag} '{spec}': {err}") from None
    if not source.has_labels:
        raise BenchError(f"{flag} '{spec}' has no labels; every arm trains or is scored on labels")
    x = getattr(source, "x", None)
    y = getattr(source, "y", None)
    if x is not None and y is not None and x.shape[1:] == (img_size, img_size, 3):
        return np.asarray(x), np.asarray(y, dtype=np.int64), tuple(source.classes), []
    images = np.empty((len(source), img_size, img_size, 3), dtype=np.uint8)
    labels = np.empty(len(source), dtype=np.int64)
    kept, skipped = 0, []
    for i in range(len(source)):
        try:
            img, label = source.load(i)
        except UnreadableImage as err:  # reported by path and counted, as mimkit's loaders do
            print(f"warning: {flag}: skipped unreadable image {err}", file=sys.stderr)
            skipped.append(str(err))
            continue
        arr = img.permute(1, 2, 0).numpy()
        if arr.shape[:2] != (img_size, img_size):
            arr = np.asarray(Image.fromarray(arr).resize((img_size, img_size), Image.BICUBIC))
        images[kept], labels[kept] = arr, label
        kept += 1
    if skipped:
        print(f"warning: {flag}: {len(skipped)} of {len(source)} images unreadable, skipped", file=sys.stderr)
    if not kept:
        raise BenchError(f"{flag} '{spec}': none of its {len(source)} images could be read")
    return images[:kept], labels[:kept], tuple(source.classes), skipped


def folder_names(classes: tuple[str, ...]) -> list[str]:
    """Class folder names whose sorted order is the label order (an ImageFolder's labels): the class
    names when they already are, else the names prefixed with their label."""
    safe = all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", c) for c in classes)
    if safe and list(classes) == sorted(classes) and len(set(classes)) == len(classes):
        return list(classes)
    width = len(str(len(classes) - 1))
    return [f"{i:0{width}d}_{re.sub(r'[^A-Za-z0-9._-]', '_', c)}" for i, c in enumerate(classes)]


def write_files(
    x: np.ndarray, y: np.ndarray, names: list[str], folder: Path, fmt: str, quality: int
) -> np.ndarray:
    """One file per image (PNG or JPEG) in class folders, named by the image's place in the pool; their
    sizes in bytes."""
    from PIL import Image
    from tqdm import tqdm

    tmp = folder.with_name(folder.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        (tmp / name).mkdir(parents=True)
    sizes = np.empty(len(x), dtype=np.int64)
    suffix, kwargs = (".png", {}) if fmt == "png" else (".jpg", {"quality": quality})
    for i in tqdm(range(len(x)), desc=f"writing {fmt} files", unit="img", mininterval=2, file=sys.stderr):
        path = tmp / names[y[i]] / f"{i:07d}{suffix}"
        Image.fromarray(x[i]).save(path, **kwargs)
        sizes[i] = path.stat().st_size
    tmp.rename(folder)
    return sizes


def pixel_subset(pool_dir: Path, names: list[str], y: np.ndarray, n: int, dst: Path) -> Path:
    """An ImageFolder of the first n images of the pool (hard links, or copies where links fail); every
    class folder exists, an empty one too, so labels keep their numbers."""
    if n == len(y):
        return pool_dir
    if dst.exists():
        return dst
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    for name in names:
        (tmp / name).mkdir(parents=True)
    files = {int(p.stem): p for p in pool_dir.glob("*/*")}
    for i in range(n):
        src = files[i]
        target = tmp / src.parent.name / src.name
        try:
            os.link(src, target)
        except OSError:
            shutil.copy2(src, target)
    tmp.rename(dst)
    return dst


# ---------------------------------------------------------------------------------------------------
# running mimkit


class Runner:
    """mimkit's commands as child processes (each shows its own progress on stderr; its stdout goes to
    a log file), with the mimkit this script imported, and token caches inside the work folder."""

    def __init__(self, work: Path, device: str, num_workers: int | None) -> None:
        import mimkit

        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        here = str(Path(mimkit.__file__).resolve().parents[1])
        self.env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        self.env["MIMKIT_CACHE"] = str(work / "cache")
        self.common = [f"run.device={device}"]
        if num_workers is not None:
            self.common.append(f"data.num_workers={num_workers}")

    def __call__(self, name: str, args: list[str], overrides: bool = True) -> None:
        cmd = [sys.executable, "-m", "mimkit", *args, *(self.common if overrides else [])]
        log = self.logs / f"{name}.log"
        with open(log, "ab") as out:
            out.write(f"\n$ {' '.join(cmd)}\n".encode())
            out.flush()
            child, fd = _spawn(cmd, out, self.env)
            try:
                shown_config = _relay(fd, out)
                code = child.wait()
            except KeyboardInterrupt:  # the child got the same Ctrl-C: it saves its run and exits
                code = child.wait()
            finally:
                os.close(fd)
        if shown_config:
            print(f"(its resolved config: {log})", file=sys.stderr)
        if code in (130, 143):
            raise KeyboardInterrupt
        if code != 0:
            raise BenchError(f"'{name}' failed (exit {code}): see the lines above and {log}")


CONFIG_LINE = re.compile(rb"^(\s+\S.*|[a-z_]+:\s*|recipe: .*)$")  # the resolved config a run prints at start


def _spawn(cmd: list[str], out: Any, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Start a child whose stderr we read from the returned descriptor: a pseudo-terminal when ours is a
    terminal (so that the child draws its progress bars, at our width), else a pipe."""
    if not sys.stderr.isatty():
        child = subprocess.Popen(cmd, stdout=out, stderr=subprocess.PIPE, env=env)
        return child, os.dup(child.stderr.fileno())
    import fcntl
    import pty
    import termios
    import tty

    master, slave = pty.openpty()
    tty.setraw(slave)  # newlines pass as they are
    size = struct.pack("HHHH", 24, 100, 0, 0)
    with contextlib.suppress(OSError):
        ours = fcntl.ioctl(sys.stderr.fileno(), termios.TIOCGWINSZ, b"\0" * 8)
        if struct.unpack("HHHH", ours)[1]:  # a terminal of known width
            size = ours
    fcntl.ioctl(slave, termios.TIOCSWINSZ, size)
    child = subprocess.Popen(cmd, stdout=out, stderr=slave, env=env)
    os.close(slave)
    return child, master


def _relay(fd: int, log: Any) -> bool:
    """Copy a child's stderr to the log, and to our stderr without the resolved config it prints before
    its start line (``mimkit: ...``); everything after that passes. True when config lines were held."""
    held, pending, preamble = False, b"", True
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # a pseudo-terminal whose child has gone
            chunk = b""
        if not chunk:
            break
        log.write(chunk)
        pending += chunk
        parts = re.split(rb"([\r\n])", pending)
        pending = parts.pop()  # an unfinished piece waits for its end
        for text, end in zip(parts[::2], parts[1::2], strict=True):
            if preamble and text.startswith(b"mimkit:"):
                preamble = False
            if preamble and end == b"\n" and CONFIG_LINE.match(text):
                held = True
                continue
            sys.stderr.buffer.write(text + end)
        sys.stderr.buffer.flush()
    if pending:
        sys.stderr.buffer.write(pending)
    return held


def digest(parts: list[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:8]


def summary_of(run: Path) -> dict[str, Any] | None:
    path = run / "summary.json"
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    return None if summary.get("stopped_early") else summary


def schedule(n: int, batch: int, steps: int, warmup_share: float) -> list[str]:
    """About ``steps`` optimizer steps on n images: batch ``batch`` (n when smaller), grown to ceil(n /
    steps) where one pass over the images would take more steps; epochs = max(1, round(steps / (n //
    batch))); warmup the recipe's share of the epochs. The batch is even (Mixup/CutMix pair its images), the
    subset's last image left out of each epoch where that takes it past n."""
    bs = max(min(batch, n), math.ceil(n / steps))
    bs += bs % 2
    if bs > n:
        bs = max(2, n - n % 2)
    iters = n // bs
    epochs = max(1, round(steps / iters))
    return [
        f"optim.batch_size={bs}",
        f"optim.epochs={epochs}",
        f"optim.warmup_epochs={round(epochs * warmup_share, 4)}",
    ]


def batch_of(settings: list[str]) -> int:
    """The batch a run's settings give (``schedule`` puts it there)."""
    return next(int(s.split("=", 1)[1]) for s in settings if s.startswith("optim.batch_size="))


def warmup_share(recipe: str) -> float:
    from mimkit.configs import build_config

    optim = build_config(recipe, []).optim
    return optim.warmup_epochs / optim.epochs


# ---------------------------------------------------------------------------------------------------
# the bench


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--train", default=str(CIFAR / "train_part[0-2].npz"), help="the pool (labelled)")
    parser.add_argument(
        "--heldout", default=str(CIFAR / "train_part3.npz"), help="held-out images (labelled)"
    )
    parser.add_argument(
        "--heldout-images", type=int, default=5000, help="a seeded subset of --heldout; 0: all"
    )
    parser.add_argument("--pool-images", type=int, default=0, help="use only this many pool images; 0: all")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--work", default="runs/storage_accuracy", help="work folder (resumable)")
    parser.add_argument("--budgets", default="0.25,1,tokens,full", help="MB, 'tokens' or 'full'")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"some of {','.join(ARMS)}")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps per arm and budget")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--mtm-share", type=float, default=0.5, help="SeiT++: the steps' share of MTM")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--jpeg-quality", type=int, default=90)
    parser.add_argument(
        "--tokenizer", help="reuse a tokenizer: a run folder, its tokenizer.pt, or 'demo' (the shipped one)"
    )
    parser.add_argument("--tokenizer-epochs", type=int, default=2, help="when the bench trains it")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--num-workers", type=int, help="loader processes per run (mimkit's default)")
    parser.add_argument("--plot", help="the PNG plot (default: WORK/storage_accuracy.png)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="try the pipeline: 2,000 pool and 500 held-out images, budgets 0.1,tokens, 20 steps of 32, "
        "a 1-epoch tokenizer, work folder WORK-quick",
    )
    args = parser.parse_args()
    if args.quick:
        args.pool_images = args.pool_images or 2000
        args.heldout_images = min(args.heldout_images, 500) if args.heldout_images else 500
        if args.budgets == parser.get_default("budgets"):
            args.budgets = "0.1,tokens"
        if args.steps == parser.get_default("steps"):
            args.steps = 20
        if args.batch == parser.get_default("batch"):
            args.batch = 32
        if args.tokenizer_epochs == parser.get_default("tokenizer_epochs"):
            args.tokenizer_epochs = 1
        if args.work == parser.get_default("work"):
            args.work += "-quick"
    try:
        result = bench(args)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
    print(json.dumps(result, indent=2))
    for line in result["warnings"]:  # last, where a reader of the terminal sees them
        print(f"warning: {line}", file=sys.stderr)
    return 0


def bench(args: argparse.Namespace) -> dict[str, Any]:
    start = time.time()
    budgets = parse_budgets(args.budgets)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown or not arms:
        near = [m for u in unknown for m in difflib.get_close_matches(u, ARMS, n=1)]
        hint = f" (did you mean {', '.join(near)}?)" if near else ""
        raise BenchError(f"--arms: unknown {unknown}{hint}; choose among {', '.join(ARMS)}")
    if not 0 < args.mtm_share < 1 and "seitpp" in arms:
        raise BenchError(f"--mtm-share must lie in (0, 1); got {args.mtm_share}")
    least = dict(steps=2, batch=2, width=1, depth=1, heads=1, heldout_images=0, pool_images=0)
    for name, low in least.items():
        if getattr(args, name) < low:
            raise BenchError(f"--{name.replace('_', '-')} must be at least {low}; got {getattr(args, name)}")
    if "seitpp" in arms and not 1 <= round(args.steps * args.mtm_share) < args.steps:
        raise BenchError(
            f"--steps {args.steps} x --mtm-share {args.mtm_share} leaves SeiT++ without an MTM or a "
            "fine-tuning step; give more steps or another share"
        )
    if args.width % args.heads:
        raise BenchError(f"--width {args.width} is not a multiple of --heads {args.heads}")
    if args.img_size % 8:
        raise BenchError(f"--img-size {args.img_size} must be a multiple of 8 (8 x 8 patches or tokens)")
    from mimkit.models.tokenizer import load_tokenizer, perplexity, psnr, tokenizer_file
    from mimkit.runs.tokenizer_lifecycle import tokenizer_warnings
    from mimkit.tokens.dataset import open_tokens, write_tokens

    if args.tokenizer and not tokenizer_file(args.tokenizer).is_file():
        raise BenchError(
            f"--tokenizer: no tokenizer at '{tokenizer_file(args.tokenizer)}' (a `mimkit tokenizer train` "
            "run folder, its tokenizer.pt, or 'demo')"
        )
    work = Path(args.work)
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    os.environ["MIMKIT_CACHE"] = str(work / "cache")  # decoded token caches stay in the work folder
    run = Runner(work, args.device, args.num_workers)

    # -- the pool and held-out images, in their fixed order ------------------------------------------
    setup = {
        "train": args.train,
        "heldout": args.heldout,
        "pool_images": args.pool_images,
        "heldout_images": args.heldout_images,
        "img_size": args.img_size,
        "seed": args.seed,
        "jpeg_quality": args.jpeg_quality,
    }
    setup_file = data / "setup.json"
    if setup_file.is_file() and json.loads(setup_file.read_text()) != setup:
        raise BenchError(
            f"{work} holds the data of another setup ({setup_file}); give another --work or remove it"
        )
    pool_npz, heldout_npz = data / "pool.npz", data / "heldout.npz"
    unreadable_file = data / "unreadable.json"  # images the sources could not read, skipped, by path
    if not (pool_npz.is_file() and heldout_npz.is_file()):
        hx, hy, hclasses, h_unreadable = load_images(args.heldout, "--heldout", args.img_size)
        x, y, classes, unreadable = load_images(args.train, "--train", args.img_size)
        unreadable_file.write_text(json.dumps({"--train": unreadable, "--heldout": h_unreadable}, indent=2))
        if tuple(hclasses) != tuple(classes):
            raise BenchError(
                f"--heldout names other classes than --train ({list(hclasses)[:5]}... against "
                f"{list(classes)[:5]}...)"
            )
        order = np.random.default_rng(args.seed).permutation(len(x))
        if args.pool_images:
            order = order[: args.pool_images]
        pick = np.random.default_rng(args.seed + 1).permutation(len(hx))
        if args.heldout_images:
            pick = np.sort(pick[: args.heldout_images])
        names = folder_names(classes)
        np.savez(heldout_npz.with_suffix(".partial.npz"), x=hx[pick], y=hy[pick], class_names=np.array(names))
        heldout_npz.with_suffix(".partial.npz").rename(heldout_npz)
        np.savez(pool_npz.with_suffix(".partial.npz"), x=x[order], y=y[order], class_names=np.array(names))
        pool_npz.with_suffix(".partial.npz").rename(pool_npz)
        setup_file.write_text(json.dumps(setup, indent=2))
    with np.load(pool_npz) as z:
        x, y, names = z["x"], z["y"], [str(c) for c in z["class_names"]]
    skipped = json.loads(unreadable_file.read_text()) if unreadable_file.is_file() else {}
    with np.load(heldout_npz) as z:
        n_heldout = len(z["y"])
    n_pool = len(y)
    print(f"pool: {n_pool} images of {len(names)} classes; held out: {n_heldout}", file=sys.stderr)

    sizes: dict[str, np.ndarray] = {}
    pool_dirs = {"png": data / "png", "jpeg": data / f"jpeg_q{args.jpeg_quality}"}
    for fmt, folder in pool_dirs.items():
        size_file = data / f"{folder.name}_sizes.npy"
        if not size_file.is_file():
            shutil.rmtree(folder, ignore_errors=True)
            np.save(
                size_file.with_suffix(".partial.npy"),
                write_files(x, y, names, folder, fmt, args.jpeg_quality),
            )
            size_file.with_suffix(".partial.npy").rename(size_file)
        sizes[fmt] = np.load(size_file)
    del x

    # -- the tokenizer and the tokens of the pool and the held-out images ----------------------------
    if args.tokenizer:
        tok_path = tokenizer_file(args.tokenizer)
        trained = None
    else:
        tok_run = work / f"tokenizer_e{args.tokenizer_epochs}_seed{args.seed}"
        tok_path = tok_run / "tokenizer.pt"
        trained = {"recipe": "tokenizer_cifar10", "epochs": args.tokenizer_epochs, "run": str(tok_run)}
        if not tok_path.is_file():
            print(f"training the tokenizer ({tok_run})", file=sys.stderr)
            t0 = time.time()
            share = warmup_share("tokenizer_cifar10")
            run(
                "tokenizer",
                [
                    "tokenizer", "train", "--config", "tokenizer_cifar10", "--out", str(tok_run),
                    f"data.train={pool_npz}", f"model.img_size={args.img_size}",
                    f"optim.epochs={args.tokenizer_epochs}",
                    f"optim.warmup_epochs={round(args.tokenizer_epochs * share, 4)}",
                    f"run.seed={args.seed}",
                ],
            )  # fmt: skip
            (tok_run / "bench_seconds.txt").write_text(f"{time.time() - t0:.1f}\n")
        seconds_file = tok_run / "bench_seconds.txt"
        trained["seconds"] = float(seconds_file.read_text()) if seconds_file.is_file() else None
    tok_id = hashlib.sha256(tok_path.read_bytes()).hexdigest()[:10]
    tokens = work / f"tokens_{tok_id}"
    tokens.mkdir(exist_ok=True)
    seit_pool = tokens / "pool" / f"{SEIT_NAME}-token.data.bin.gz"
    heldout_tokens = tokens / "heldout"
    for name, src, dst, fmt in (
        ("tokenize_pool", pool_npz, seit_pool, "seit"),
        ("tokenize_heldout", heldout_npz, heldout_tokens, "mimkit"),
    ):
        done = dst.parent / f".{dst.name}.done"
        if not done.is_file():
            for p in (dst.parent if fmt == "seit" else dst,):
                shutil.rmtree(p, ignore_errors=True)
            run(name, ["tokenize", str(tok_path), str(src), str(dst), "--to", fmt], overrides=False)
            done.write_text("")
    pool_tokens = open_tokens(seit_pool)
    growing, fixed = seit_bytes(seit_pool.parent)
    token_dim = int(pool_tokens.codebook.shape[1])

    # the tokenizer on the held-out images: PSNR of what the token arms read, and the reconstructions
    import torch

    loaded = load_tokenizer(tok_path)
    held = open_tokens(heldout_tokens)
    ids = torch.from_numpy(held.read_many(np.arange(len(held))))
    mean = torch.tensor(loaded.mean).view(1, -1, 1, 1)
    std = torch.tensor(loaded.std).view(1, -1, 1, 1)
    with torch.no_grad():
        recon = torch.cat(
            [loaded.model.decode(ids[i : i + 500]) * std + mean for i in range(0, len(ids), 500)]
        )
    with np.load(heldout_npz) as z:
        originals = torch.from_numpy(z["x"]).permute(0, 3, 1, 2).float() / 255
        heldout_labels, class_names = z["y"], z["class_names"]
    recon = recon.clamp(0, 1)
    tokenizer_report = {
        "path": str(tok_path),
        "trained_here": trained,
        "grid": list(pool_tokens.grid),
        "vocab_size": pool_tokens.vocab_size,
        "psnr_heldout_db": round(float(psnr(recon, originals).mean()), 2),
        "psnr_heldout_mean_image_db": round(
            float(psnr(originals.mean(0, keepdim=True).expand_as(originals), originals).mean()), 2
        ),
        "heldout_images": len(originals),
    }
    counts = torch.bincount(ids.reshape(-1).long(), minlength=pool_tokens.vocab_size)
    spread = perplexity(counts)
    tokenizer_report["perplexity_heldout"] = round(spread, 1)
    warnings = [
        f"tokenizer: {line}"
        for line in tokenizer_warnings(
            {
                "psnr": tokenizer_report["psnr_heldout_db"],
                "psnr_mean_image": tokenizer_report["psnr_heldout_mean_image_db"],
                "perplexity": spread,
                "codes_used": int((counts > 0).sum()),
                "codebook_size": pool_tokens.vocab_size,
            }
        )
    ]
    warnings += [
        f"{flag}: {len(paths)} unreadable images skipped (listed in the JSON's protocol)"
        for flag, paths in skipped.items()
        if paths
    ]
    recon_npz = tokens / "heldout_reconstructions.npz"
    if not recon_npz.is_file():
        as_uint8 = (recon * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        np.savez(recon_npz.with_suffix(".partial.npz"), x=as_uint8, y=heldout_labels, class_names=class_names)
        recon_npz.with_suffix(".partial.npz").rename(recon_npz)
    del recon, originals, ids
    print(
        f"tokenizer {tok_path}: held-out PSNR {tokenizer_report['psnr_heldout_db']} dB (their mean image: "
        f"{tokenizer_report['psnr_heldout_mean_image_db']} dB)",
        file=sys.stderr,
    )

    # -- bytes and images per budget ------------------------------------------------------------------
    per_image = {
        "png": float(sizes["png"].mean()),
        "jpeg": float(sizes["jpeg"].mean()),
        "seit": growing / n_pool,
    }
    full_bytes = {"png": int(sizes["png"].sum()), "jpeg": int(sizes["jpeg"].sum()), "seit": growing + fixed}
    budget_bytes = {
        b: float(full_bytes["seit"])
        if b == "tokens"
        else float(full_bytes["png"])
        if b == "full"
        else float(b) * MB
        for b in budgets
    }

    subsets: dict[tuple[str, int], dict[str, Any]] = {}

    def subset(fmt: str, budget: float) -> dict[str, Any]:
        """The largest prefix of the pool that fits ``budget`` in format ``fmt``, written and measured."""
        if fmt in ("png", "jpeg"):  # every file's size is known: the largest prefix that fits, exactly
            n = prefix_fitting(sizes[fmt], budget, n_pool)
            if (fmt, n) not in subsets and n > 0:
                folder = pixel_subset(
                    pool_dirs[fmt], names, y, n, data / "subsets" / f"{pool_dirs[fmt].name}_n{n}"
                )
                subsets[(fmt, n)] = {"n": n, "path": str(folder), "bytes": int(sizes[fmt][:n].sum())}
            return subsets.get((fmt, n), {"n": n, "path": None, "bytes": 0})
        # a SeiT file is one gzip stream, whose size is known once written: from the estimate, lower n
        # until the subset fits, then raise it while one more record still fits
        n = images_for_budget(budget, per_image["seit"], fixed, n_pool)
        while n > 0 and seit_subset(n)["bytes"] > budget:
            n -= max(1, math.ceil((seit_subset(n)["bytes"] - budget) / per_image["seit"]))
        if n <= 0:
            return {"n": 0, "path": None, "bytes": 0}
        while n < n_pool and seit_subset(n + 1)["bytes"] <= budget:
            n += 1
        return seit_subset(n)

    def seit_subset(n: int) -> dict[str, Any]:
        """The pool's first n token grids in SeiT's format, written once and measured."""
        if ("seit", n) not in subsets:
            if n == n_pool:
                path = seit_pool
            else:
                path = tokens / "subsets" / f"seit_n{n}" / f"{SEIT_NAME}-token.data.bin.gz"
                if not path.is_file():
                    shutil.rmtree(path.parent, ignore_errors=True)
                    write_tokens(
                        path,
                        pool_tokens.read_many(np.arange(n)),
                        pool_tokens.labels[:n],
                        to="seit",
                        codebook=pool_tokens.codebook,
                        classes=pool_tokens.classes,
                        meta=pool_tokens.meta,
                    )
            subsets[("seit", n)] = {"n": n, "path": str(path), "bytes": sum(seit_bytes(path.parent))}
        return subsets[("seit", n)]

    # -- the runs -----------------------------------------------------------------------------------
    model = [
        "model.arch=vit_tiny",
        f"model.embed_dim={args.width}",
        f"model.depth={args.depth}",
        f"model.num_heads={args.heads}",
    ]
    common = [f"run.seed={args.seed}", "run.log_every=10"]
    shares = {
        r: warmup_share(r)
        for r in ("finetune_cifar10", "seit_vit_base_imagenet", "mtm_cifar10", "finetune_mtm_cifar10")
    }
    grid = pool_tokens.grid[0]
    heldout_tokens_spec = str(heldout_tokens)
    runs_dir = work / "runs"
    done_runs: dict[tuple[str, int], dict[str, Any]] = {}
    plan = [(b, arm) for b in budgets for arm in arms]

    def classifier(arm: str, sub: dict[str, Any]) -> dict[str, Any]:
        n, path = sub["n"], sub["path"]
        if arm in ("png", "jpeg"):
            recipe = "finetune_cifar10"
            settings = [
                *model,
                f"model.img_size={args.img_size}",
                f"model.patch_size={args.img_size // 8}",
                "method.layer_decay=1.0",
                "method.head_init_std=0.02",
                "data.crop_pct=1.0",
                *schedule(n, args.batch, args.steps, shares[recipe]),
                *common,
            ]
            data_args = [f"data.train={path}", f"eval.val={heldout_npz}"]
        elif arm == "seit":
            recipe = "seit_vit_base_imagenet"
            settings = [
                *model,
                f"model.img_size={grid}",
                "model.patch_size=2",
                f"model.token_dim={token_dim}",
                "method.model_ema=false",
                *schedule(n, args.batch, args.steps, shares[recipe]),
                *common,
            ]
            data_args = [f"data.train={path}", f"eval.val={heldout_tokens_spec}", "data.tokenizer=null"]
        elif arm == "seitpp_scratch":  # SeiT++ without its MTM half: what the pre-training adds
            recipe = "finetune_mtm_cifar10"
            settings = [
                *model,
                f"model.img_size={grid}",
                "model.patch_size=1",
                "model.stem=token_ids",
                f"model.token_dim={token_dim}",
                "method.layer_decay=1.0",
                "method.head_init_std=0.02",
                *schedule(n, args.batch, args.steps, shares[recipe]),
                *common,
            ]
            data_args = [f"data.train={path}", f"eval.val={heldout_tokens_spec}", "data.tokenizer=null"]
        else:
            return seitpp(sub)
        reads = [] if arm in ("png", "jpeg") else [tok_id]  # token runs: the tokenizer's ids are their data
        name = f"{arm}_n{n}_{digest([recipe, *settings, *reads])}"
        out = runs_dir / name
        summary = summary_of(out)
        if summary is None or "top1" not in summary:
            run(name, ["finetune", "scratch", "--config", recipe, "--out", str(out), *settings, *data_args])
            summary = summary_of(out)
        return {
            "run": str(out),
            "recipe": recipe,
            "settings": settings,
            "summary": summary,
            "images_seen": summary["steps"] * batch_of(settings),
            "seconds": summary["seconds"],
        }

    def seitpp(sub: dict[str, Any]) -> dict[str, Any]:
        n, path = sub["n"], sub["path"]
        mtm_steps = round(args.steps * args.mtm_share)
        mtm_settings = [
            *model,
            f"model.img_size={grid}",
            "model.patch_size=1",
            f"model.token_dim={token_dim}",
            "method.decoder_embed_dim=128",
            "method.decoder_depth=2",
            "method.decoder_num_heads=4",
            "eval.knn=false",
            "eval.baseline=false",
            "eval.every_epochs=0",
            *schedule(n, args.batch, mtm_steps, shares["mtm_cifar10"]),
            *common,
        ]
        mtm_name = f"seitpp_mtm_n{n}_{digest(['mtm_cifar10', *mtm_settings, tok_id])}"
        mtm_out = runs_dir / mtm_name
        data_args = [f"data.train={path}", f"eval.val={heldout_tokens_spec}", "data.tokenizer=null"]
        if summary_of(mtm_out) is None:
            run(
                mtm_name,
                ["pretrain", "--config", "mtm_cifar10", "--out", str(mtm_out), *mtm_settings, *data_args],
            )
        ft_settings = [
            *schedule(n, args.batch, args.steps - mtm_steps, shares["finetune_mtm_cifar10"]),
            *common,
        ]
        name = f"seitpp_n{n}_{digest([mtm_name, 'finetune_mtm_cifar10', *ft_settings])}"
        out = runs_dir / name
        summary = summary_of(out)
        if summary is None or "top1" not in summary:
            run(
                name,
                [
                    "finetune",
                    str(mtm_out),
                    "--config",
                    "finetune_mtm_cifar10",
                    "--out",
                    str(out),
                    *ft_settings,
                    *data_args,
                ],
            )
            summary = summary_of(out)
        mtm = summary_of(mtm_out)  # there: its run finished above, or the fine-tuning could not start from it
        return {
            "run": str(out),
            "recipe": "mtm_cifar10 + finetune_mtm_cifar10",
            "settings": {"mtm": mtm_settings, "finetune": ft_settings},
            "summary": summary,
            "mtm_run": str(mtm_out),
            "mtm_steps": mtm["steps"],
            "mtm_masked_token_acc": (mtm.get("last_logged") or {}).get("masked_token_acc"),
            # both halves: the same steps as the other arms, up to twice their images (see schedule)
            "images_seen": summary["steps"] * batch_of(ft_settings) + mtm["steps"] * batch_of(mtm_settings),
            "seconds": summary["seconds"] + mtm["seconds"],
        }

    rows = []
    for k, (b, arm) in enumerate(plan):
        fmt = "seit" if arm.startswith("seit") else arm
        sub = subset(fmt, budget_bytes[b])
        row: dict[str, Any] = {
            "budget": b,
            "budget_bytes": int(budget_bytes[b]),
            "arm": arm,
            "images": sub["n"],
            "stored_bytes": sub["bytes"],
            "bytes_per_image": round(sub["bytes"] / sub["n"], 1) if sub["n"] else None,
        }
        if sub["n"] < 10:  # too few to train on
            row.update(top1=None, se=None, note="fewer than 10 images fit")
            rows.append(row)
            continue
        print(
            f"[{k + 1}/{len(plan)}] {arm} at {budget_label(b, budget_bytes[b])}: {sub['n']} images,"
            f" {sub['bytes']:,} bytes",
            file=sys.stderr,
        )
        key = (arm, sub["n"])
        if key not in done_runs:
            done_runs[key] = classifier(arm, sub)
        result = done_runs[key]
        summary = result["summary"]
        p = summary["top1"] / 100
        row.update(
            top1=round(summary["top1"], 2),
            se=round(100 * math.sqrt(p * (1 - p) / n_heldout), 2),
            steps=summary["steps"] + (result.get("mtm_steps") or 0),
            images_seen=result["images_seen"],
            epochs=summary.get("epochs"),
            seconds=round(result["seconds"], 1),
            run=result["run"],
        )
        if arm == "seitpp":
            row.update(mtm_steps=result["mtm_steps"], mtm_masked_token_acc=result["mtm_masked_token_acc"])
        if summary.get("warnings"):  # the run's own: a top-1 at chance level
            row["warnings"] = summary["warnings"]
            where = f"{arm} at {budget_label(b, budget_bytes[b])}"
            warnings += [f"{where}: {line}" for line in summary["warnings"]]
        rows.append(row)

    # -- the tokenizer's loss, as a pixel model sees it ----------------------------------------------
    diagnostics: dict[str, Any] = {}
    png_rows = [r for r in rows if r["arm"] == "png" and r.get("top1") is not None]
    if png_rows:
        best = max(png_rows, key=lambda r: r["images"])
        src = Path(best["run"])
        copy = src.with_name(f"{src.name}_on_reconstructions_{tok_id}")
        summary = summary_of(copy)
        if summary is None or "top1" not in summary:
            copy.mkdir(exist_ok=True)
            for f in ("last.pt", "config.yaml"):
                shutil.copy2(src / f, copy / f)
            settings = done_runs[("png", best["images"])]["settings"]
            sub_path = data / "subsets" / f"{pool_dirs['png'].name}_n{best['images']}"
            train = pool_dirs["png"] if best["images"] == n_pool else sub_path
            run(
                copy.name,
                ["finetune", "scratch", "--config", "finetune_cifar10", "--out", str(copy), *settings,
                 f"data.train={train}", f"eval.val={recon_npz}"],
            )  # fmt: skip
            summary = summary_of(copy)
        p = summary["top1"] / 100
        diagnostics["png_classifier_on_reconstructions"] = {
            "classifier": best["run"],
            "images_trained_on": best["images"],
            "top1_on_originals": best["top1"],
            "top1_on_reconstructions": round(summary["top1"], 2),
            "se": round(100 * math.sqrt(p * (1 - p) / n_heldout), 2),
        }

    plot = Path(args.plot) if args.plot else work / "storage_accuracy.png"
    draw(plot, rows, budget_bytes, tokenizer_report, diagnostics, args, n_heldout)
    return {
        "protocol": {
            "pool": args.train,
            "pool_images": n_pool,
            "unreadable_skipped": skipped,
            "heldout": args.heldout,
            "heldout_images": n_heldout,
            "heldout_choice": f"numpy default_rng({args.seed + 1}).permutation, first {n_heldout}, sorted",
            "pool_order": f"numpy default_rng({args.seed}).permutation; every subset is a prefix",
            "encoder": {"width": args.width, "depth": args.depth, "heads": args.heads},
            "steps_per_arm": args.steps,
            "batch": args.batch,
            "seitpp_split": {
                "mtm": round(args.steps * args.mtm_share),
                "finetune": args.steps - round(args.steps * args.mtm_share),
            },
            "seed": args.seed,
            "se": "binomial: sqrt(p (1 - p) / heldout_images)",
            "counted": {
                "png/jpeg": "the image files (ImageFolder; labels are folder names)",
                "seit": "every file of the dataset: data.bin.gz, index.npy.gz, label.txt, class-to-id.json, "
                "meta.json, codebook.ckpt; not the tokenizer",
            },
        },
        "tokenizer": tokenizer_report,
        "bytes_per_image_in_pool": {k: round(v, 1) for k, v in per_image.items()},
        "seit_fixed_bytes": fixed,
        "pool_bytes": full_bytes,
        "budgets_bytes": {b: int(v) for b, v in budget_bytes.items()},
        "rows": rows,
        "diagnostics": diagnostics,
        "plot": str(plot),
        "warnings": warnings,
        "wall_seconds": round(time.time() - start, 1),
    }


def draw(
    path: Path,
    rows: list[dict[str, Any]],
    budget_bytes: dict[str, float],
    tokenizer: dict[str, Any],
    diagnostics: dict[str, Any],
    args: argparse.Namespace,
    n_heldout: int,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6), dpi=100)
    styles = {
        "png": ("C0", "o", "-"),
        "jpeg": ("C1", "s", "-"),
        "seit": ("C2", "^", "-"),
        "seitpp": ("C3", "D", "-"),
        "seitpp_scratch": ("C3", "v", "--"),
    }
    for arm, (color, marker, line) in styles.items():
        pts = sorted(
            (budget_bytes[r["budget"]] / MB, r["top1"], r["se"], r["images"], r["stored_bytes"] / MB)
            for r in rows
            if r["arm"] == arm and r.get("top1") is not None
        )
        if not pts:
            continue
        xs, ys, es, ns, stored = zip(*pts, strict=True)
        label = LABELS[arm].format(q=args.jpeg_quality)
        ax.errorbar(
            xs, ys, yerr=es, color=color, marker=marker, ls=line, ms=5, capsize=3, lw=1.4, label=label
        )
        for x, yv, n, used in zip(xs, ys, ns, stored, strict=True):
            text = f"{n:,}" if used > x / 2 else f"{n:,} (all, {used:.2f} MB)"  # the pool ran out first
            ax.annotate(text, (x, yv), textcoords="offset points", xytext=(4, -10), fontsize=6.5, color=color)
    recon = diagnostics.get("png_classifier_on_reconstructions")
    if recon:
        ax.axhline(
            recon["top1_on_reconstructions"],
            color="C0",
            ls=":",
            lw=1,
            label=f"PNG model ({recon['images_trained_on']:,} images) on the tokenizer's reconstructions",
        )
    ax.set_xscale("log")
    ax.set_xlabel("storage budget (MB, log scale); numbers: images that fit")
    ax.set_ylabel(f"top-1 on {n_heldout:,} held-out images (%) ± SE")
    grid, quality, floor = (
        tokenizer["grid"],
        tokenizer["psnr_heldout_db"],
        tokenizer["psnr_heldout_mean_image_db"],
    )
    ax.set_title(
        f"Storage vs accuracy: ViT {args.width}x{args.depth}, {args.steps} steps per run\n"
        f"tokenizer {grid[0]}x{grid[1]} ids, held-out PSNR {quality:.1f} dB (mean image: {floor:.1f} dB)",
        fontsize=9,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7.5, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
