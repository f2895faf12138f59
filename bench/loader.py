"""The training loader alone, images per second by worker count, on an image folder of JPEGs: how many
cores a GPU needs to be kept fed. Each sample goes through the real path of a method's training view
(PIL decoding, the crop and flip, normalisation, per-sample seeds, the mask noise), the real loader
(`make_loader`, collation) and the dataset's device stage as the engine applies it (on a GPU; without one,
only decoding on the device is timed, on the CPU). ``--normalize``
compares float views normalised in the workers with uint8 views normalised on the device
(data.normalize); ``--decode-size`` adds reduced JPEG decoding (data.decode_size); ``--decode
cpu,device`` adds decoding and views on the device (data.decode; the GPU when there is one). Prints one
JSON object.

    python bench/loader.py                                   # 1,024 demo CIFAR-10 images at 224 px
    python bench/loader.py --size 512 --decode-size 256      # larger JPEGs, decoded at half size
    python bench/loader.py --decode cpu,device --normalize device
    python bench/loader.py --root /data/imagenet/train --images 20000 --workers 0,4,8,16
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from mimkit.configs import DataConfig, build_config
from mimkit.data.loader import EncodedDataset, EpochSampler, ViewDataset, default_workers, make_loader
from mimkit.data.source_spec import build_source
from mimkit.data.sources import demo_source
from mimkit.data.transforms import DeviceNormalize
from mimkit.methods import build_method


def make_jpeg_folder(root: Path, count: int, size: int, quality: int) -> Path:
    """``count`` JPEGs of ``size`` px in class folders: the embedded CIFAR-10 demo images (2,000, taken
    again in turn past that) upsampled bicubically, so the files are photo-like in size and content."""
    demo = demo_source("train")
    for i in range(count):
        pixels, label = demo.load(i % len(demo))
        folder = root / demo.classes[label]
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(pixels.permute(1, 2, 0).numpy()).resize((size, size), Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=quality)
    return root


def measure(dataset: ViewDataset, workers: int, batch: int, epochs: int, device: torch.device) -> float:
    """Images per second over ``epochs`` passes after one warm-up batch (workers started), with the
    dataset's device stage applied as training does: decoding on the device always (on the CPU when
    there is no GPU), the normalisation of uint8 batches only on a GPU."""
    sampler = EpochSampler(len(dataset), shuffle=True, seed=0)
    loader = make_loader(
        dataset,
        sampler,
        batch_size=batch,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    stage = dataset.device_stage
    if stage is not None and (device.type == "cuda" or isinstance(dataset, EncodedDataset)):
        stage = copy.deepcopy(stage).to(device)  # as the engine does: the workers get the dataset's own
    else:
        stage = None  # a CPU cannot stand in for a GPU's normalisation of uint8 batches: not timed
    seen, start = 0, None
    for epoch in range(epochs + 1):
        sampler.set_epoch(epoch)
        for i, out in enumerate(loader):
            if stage is not None:
                out = stage(out)
            if start is None and epoch == 0 and i == 0:
                start = time.perf_counter()  # the first batch pays for starting the workers
                continue
            seen += len(out["label"])
    if device.type == "cuda":
        torch.cuda.synchronize()
    return seen / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", help="an image folder (default: one made of CIFAR-10 JPEGs)")
    parser.add_argument("--images", type=int, default=1024, help="JPEGs to make when --root is not given")
    parser.add_argument("--size", type=int, default=224, help="side of the JPEGs made, and of the crop")
    parser.add_argument("--quality", type=int, default=90)
    parser.add_argument("--method", default="mae", help="whose training view to time")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=1, help="timed passes over the folder")
    parser.add_argument("--workers", help="comma-separated worker counts (default: 0 up to the cores)")
    parser.add_argument(
        "--normalize", default="loader,device", help="data.normalize settings to compare (comma-separated)"
    )
    parser.add_argument(
        "--decode-size", type=int, help="also time data.decode_size=N (reduced JPEG decoding) beside full"
    )
    parser.add_argument("--crop", type=int, default=224, help="the training view's output side")
    parser.add_argument(
        "--decode", default="cpu", help="data.decode settings to compare (cpu, device; comma-separated)"
    )
    args = parser.parse_args()

    cores = default_workers()
    counts = [int(w) for w in args.workers.split(",")] if args.workers else sorted({0, 1, cores})
    torch.set_num_threads(1)  # the main process only collates: as in training, the cores go to workers
    with tempfile.TemporaryDirectory() as tmp:
        root = (
            Path(args.root)
            if args.root
            else make_jpeg_folder(Path(tmp), args.images, args.size, args.quality)
        )
        cfg = build_config(
            None, [f"method={args.method}", f"model.img_size={args.crop}", "model.arch=vit_tiny"]
        )
        method = build_method(cfg)
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results = []
        settings = [
            (decode, size, normalize)
            for decode in args.decode.split(",")
            for size in ((None, args.decode_size) if args.decode_size and decode == "cpu" else (None,))
            for normalize in (args.normalize.split(",") if decode == "cpu" else ("device",))
        ]
        for decode, decode_size, normalize in settings:
            source = build_source(str(root), image_size=args.size, decode_size=decode_size)
            data = DataConfig(normalize=normalize, decode=decode)
            views = method.train_transform(data)
            layouts = getattr(views, "layouts", {})
            finish = DeviceNormalize(data.mean, data.std, layouts) if normalize == "device" else None
            if decode == "device":
                dataset: ViewDataset = EncodedDataset(source, views, finish=finish)
            else:
                dataset = ViewDataset(source, views, device_stage=finish)
            for workers in counts:
                rate = measure(dataset, workers, args.batch, args.epochs, device)
                results.append(
                    {
                        "decode": decode,
                        "normalize": normalize,
                        "decode_size": decode_size,
                        "workers": workers,
                        "images_per_s": round(rate, 1),
                        "images_per_s_per_core": round(rate / max(workers, 1), 1),
                    }
                )
    print(
        json.dumps(
            {
                "method": args.method,
                "images": len(source),
                "jpeg_side": args.size,
                "crop": args.crop,
                "batch": args.batch,
                "cores": cores,
                "cpu": os.uname().machine,
                "torch": torch.__version__,
                "device": str(device),
                "loader": results,
            }
        )
    )


if __name__ == "__main__":
    main()
