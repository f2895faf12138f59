"""Turn a trained tokenizer run into the tokenizer shipped with mimkit (``tokenizer: demo``).

The shipped one was made on a 2-core CPU in about 7 minutes with::

    mimkit tokenizer train --config tokenizer_cifar10 optim.epochs=6 \\
        "data.train=cifar10/train_part[1-2].npz" --out runs/tokenizer_demo
    python tools/make_demo_tokenizer.py runs/tokenizer_demo

where ``cifar10/train_part1.npz`` and ``train_part2.npz`` hold 25,000 CIFAR-10 training images (2,500 per
class), none of them in the demo set (``demo:train`` and ``demo:val`` come from other training images).
This script states that provenance in the file (instead of the paths of the machine that trained it),
measures the reconstruction on the held-out ``demo:val`` images, and writes
``src/mimkit/data/demo/tokenizer.pt``.
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import torch

from mimkit.checkpoint import load
from mimkit.data.source_spec import build_source
from mimkit.data.transforms import tokenizer_view
from mimkit.models.tokenizer import DEMO_TOKENIZER, load_tokenizer, save_tokenizer, tokenizer_file
from mimkit.runs.tokenizer_lifecycle import reconstruction_report, tokenizer_warnings

TRAINED_ON = "CIFAR-10 training images, 25,000 (2,500 per class), none of the demo set's"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="the `mimkit tokenizer train` run folder (or its tokenizer.pt)")
    parser.add_argument("--out", default=str(DEMO_TOKENIZER))
    args = parser.parse_args()
    state = load(tokenizer_file(args.run))
    loaded = load_tokenizer(args.run)
    tokenizer = loaded.model
    view = tokenizer_view(tokenizer.shape.img_size, loaded.mean, loaded.std)
    spec = SimpleNamespace(mean=loaded.mean, std=loaded.std)
    held_out = build_source("demo:val")
    quality = reconstruction_report(tokenizer, held_out, view, spec, None, torch.device("cpu"), count=500)
    report = {
        **{k: v for k, v in state["report"].items() if k not in ("psnr", "psnr_images", "count_seconds")},
        **quality,
        "psnr_on": "demo:val (held out)",
    }
    report["warnings"] = tokenizer_warnings(report)
    save_tokenizer(
        tokenizer,
        args.out,
        mean=loaded.mean,
        std=loaded.std,
        counts=state["counts"],
        trained_on=TRAINED_ON,
        report=report,
    )
    print(f"wrote {args.out}: {report}")


if __name__ == "__main__":
    main()
