"""Storage of token datasets against pixels: bytes per image as raw pixels, PNG, JPEG (q90, q75), SeiT's
format and ours (split into shards and header); for both formats the one-time cost of their decoded
cache (gunzip of SeiT's stream; zstd of our chunks) and the records read per second on one core from it
(``read(i)`` in a random order and ``read_many`` of 256), and ours decoded directly from its shards
without a cache; entropy bounds of the tokens. Prints one JSON object. Speeds are best-of-N rounds that
alternate between the formats, and are only as steady as the machine is idle.

    python bench/storage.py --tokens runs/tok/cifar_part3          # a dataset our tokenizer wrote
    python bench/storage.py --proxy 5000                           # k-means proxy tokens (no tokenizer)

``--images`` are the images the tokens were made from, in the same order (default: CIFAR-10
train_part3). Proxy tokens: MiniBatchKMeans (510 clusters, seed 0) of the 2x2x3 pixel patches of
2,000 images of train_part0, then one id per patch of each image (a 16x16 grid; ids 0..509, all within
SeiT's escape coding).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from mimkit.tokens.compact import HEADER
from mimkit.tokens.dataset import TokenDataset, open_tokens, write_tokens
from mimkit.tokens.seit_files import DEFAULT_VOCAB as SEIT_VOCAB

CIFAR = Path("/work/shared/data/cifar10")
PROXY_CLUSTERS = SEIT_VOCAB  # 510, ids 0..509: the most SeiT's escape coding holds
PROXY_FIT_IMAGES = 2000


def proxy_tokens(images: np.ndarray, fit_file: Path) -> tuple[np.ndarray, np.ndarray]:
    """(ids [N, H/2, W/2], codebook [510, 12]): k-means of 2x2x3 patches fitted on ``fit_file``. The
    codebook is not stored: both formats' byte counts exclude it."""
    from sklearn.cluster import MiniBatchKMeans

    def patches(x: np.ndarray) -> np.ndarray:
        n, h, w, c = x.shape
        p = x.reshape(n, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        return p.reshape(n, h // 2, w // 2, 4 * c).astype(np.float32) / 255

    fit = np.load(fit_file)["x"]
    pick = np.random.default_rng(0).permutation(len(fit))[:PROXY_FIT_IMAGES]
    km = MiniBatchKMeans(PROXY_CLUSTERS, random_state=0, n_init=1, batch_size=4096, max_iter=20)
    km.fit(patches(fit[pick]).reshape(-1, 12))
    p = patches(images)
    ids = km.predict(p.reshape(-1, 12)).reshape(p.shape[:3]).astype(np.int64)
    return ids, km.cluster_centers_.astype(np.float32)


def image_bytes(images: np.ndarray, folder: Path) -> dict[str, float]:
    """Bytes per image as raw pixels, PNG files (Pillow's default compression) and JPEG files."""
    out: dict[str, float] = {"raw_pixels": float(np.prod(images.shape[1:]))}
    for name, kwargs, suffix in (
        ("png", {}, ".png"),
        ("jpeg_q90", {"quality": 90}, ".jpg"),
        ("jpeg_q75", {"quality": 75}, ".jpg"),
    ):
        sub = folder / name
        sub.mkdir()
        for i, x in enumerate(images):
            Image.fromarray(x).save(sub / f"{i:06d}{suffix}", **kwargs)
        out[name] = sum(p.stat().st_size for p in sub.iterdir()) / len(images)
    return out


def entropy(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def conditional_entropy(context: np.ndarray, x: np.ndarray) -> float:
    """H(X | context) from counts, in bits: H(context, X) - H(context)."""
    _, joint = np.unique(np.stack([context, x]), axis=1, return_counts=True)
    _, ctx = np.unique(context, return_counts=True)
    return entropy(joint) - entropy(ctx)


def token_entropy(ids: np.ndarray) -> dict[str, Any]:
    """Bits per token (and bytes per image) of order-0 and neighbour-conditioned empirical entropies.
    H(X | left, up) counts each (left, up) pair as its own context: with sparse contexts it is an
    optimistic bound; H(X | left) and H(X | up) are better estimated."""
    left = conditional_entropy(ids[:, :, :-1].ravel(), ids[:, :, 1:].ravel())
    up = conditional_entropy(ids[:, :-1, :].ravel(), ids[:, 1:, :].ravel())
    k = int(ids.max()) + 1
    both = (
        ids[:, 1:, :-1].ravel() * k + ids[:, :-1, 1:].ravel()
    )  # left, up of cell (r, c): (r, c-1), (r-1, c)
    both_h = conditional_entropy(both, ids[:, 1:, 1:].ravel())
    cells = ids.shape[1] * ids.shape[2]
    bits = {
        "order0": entropy(np.bincount(ids.ravel())),
        "given_left": left,
        "given_up": up,
        "given_left_up": both_h,
    }
    return {
        "bits_per_token": bits,
        "bytes_per_image": {name: b * cells / 8 for name, b in bits.items()},
        "codes_used": int((np.bincount(ids.ravel()) > 0).sum()),
    }


def cache_build_seconds(paths: dict[str, Path], rounds: int) -> dict[str, float]:
    """Seconds per 1,000 records to open each dataset from a cold cache (SeiT: gunzip of the stream into
    its cache file; ours: every record decoded and checked into its cache file), best of ``rounds``
    alternating rounds. Each cache is dropped before and after its timing."""
    best = {name: math.inf for name in paths}
    for _ in range(rounds):
        for name, path in paths.items():
            open_tokens(path).drop_cache()
            start = time.perf_counter()
            ds = open_tokens(path)
            seconds = time.perf_counter() - start
            best[name] = min(best[name], 1000 * seconds / len(ds))
            ds.drop_cache()
    return best


def decode_speed(datasets: dict[str, TokenDataset], records: int, rounds: int) -> dict[str, Any]:
    """Records per second on one thread, best of ``rounds`` rounds that alternate between the datasets
    (a busy machine slows them alike): ``read(i)`` in a random order, and ``read_many`` of batches of
    256 in the same order (what a DataLoader's batched fetch does)."""
    torch.set_num_threads(1)
    n = len(next(iter(datasets.values())))
    order = np.random.default_rng(0).permutation(n)[:records]
    as_list = order.tolist()
    single = {name: 0.0 for name in datasets}
    batched = {name: 0.0 for name in datasets}
    for ds in datasets.values():
        ds.read(0)  # maps opened
        ds.read_many(order)  # pages of the cache (and shards) in memory
    for _ in range(rounds):
        for name, ds in datasets.items():
            start = time.perf_counter()
            for i in as_list:
                ds.read(i)
            single[name] = max(single[name], len(order) / (time.perf_counter() - start))
            start = time.perf_counter()
            for b in range(0, len(order), 256):
                ds.read_many(order[b : b + 256])
            batched[name] = max(batched[name], len(order) / (time.perf_counter() - start))
    ratio = single["mimkit"] / single["seit"] if "seit" in single else None
    return {
        "records_timed": len(order),
        "rounds": rounds,
        "read_per_s": single,
        "read_many_256_per_s": batched,
        "mimkit_to_seit_read_speed": ratio,
        "mimkit_to_seit_read_many_speed": batched["mimkit"] / batched["seit"] if "seit" in batched else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--tokens", help="an existing token dataset (SeiT or mimkit format)")
    source.add_argument("--proxy", type=int, metavar="N", help="k-means proxy tokens of N images")
    parser.add_argument(
        "--images", default=str(CIFAR / "train_part3.npz"), help=".npz with x uint8 [N,H,W,3]"
    )
    parser.add_argument("--fit-images", default=str(CIFAR / "train_part0.npz"), help="proxy k-means data")
    parser.add_argument("--limit", type=int, help="use the first N records/images only")
    parser.add_argument("--speed-records", type=int, default=5000, help="records timed per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with np.load(args.images) as z:
        images, labels = z["x"], (z["y"] if "y" in z.files else None)
    given = None
    if args.proxy:
        n = min(args.proxy, args.limit or args.proxy, len(images))
        images = images[:n]
        labels = labels[:n] if labels is not None else None
        ids, _ = proxy_tokens(images, Path(args.fit_images))
        vocab, source = PROXY_CLUSTERS, f"proxy: k-means {PROXY_CLUSTERS} of 2x2x3 patches"
    else:
        given = open_tokens(args.tokens)
        n = min(len(given), args.limit or len(given))
        ids = given.read_many(np.arange(n))
        labels = given.labels[:n] if given.labels is not None else None
        vocab, source = given.vocab_size, str(given.path)
        images = images[:n] if len(images) >= n else None

    result: dict[str, Any] = {
        "source": source,
        "images_file": args.images if images is not None else None,
        "records": n,
        "grid": list(ids.shape[1:]),
        "vocab_size": vocab,
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        os.environ["MIMKIT_CACHE"] = str(folder / "cache")  # the caches made here go with the folder
        sizes: dict[str, float] = image_bytes(images, folder) if images is not None else {}
        # SeiT's escape coding holds ids 0..509: a larger vocabulary has no SeiT figures
        seit = (
            write_tokens(
                folder / "seit" / "tokens-token.data.bin.gz", ids, labels, to="seit", vocab_size=vocab
            )
            if vocab <= SEIT_VOCAB
            else None
        )
        ours = write_tokens(folder / "mimkit", ids, labels, vocab_size=vocab)
        ours.drop_cache()
        if seit is not None:
            seit.drop_cache()
            sizes["seit"] = seit.stored_bytes() / n
            sizes["seit_data_bin_gz"] = seit.path.stat().st_size / n
        sizes["mimkit"] = ours.stored_bytes() / n
        sizes["mimkit_shards"] = (
            sum(p.stat().st_size for p in ours.files() if p.name.startswith("shard-")) / n
        )
        sizes["mimkit_header"] = (folder / "mimkit" / HEADER).stat().st_size / n
        if given is not None:
            sizes[f"given_{given.format}_all_records"] = given.stored_bytes() / len(given)
        result["bytes_per_image"] = sizes
        result["mimkit_to_seit"] = sizes["mimkit"] / sizes["seit"] if seit is not None else None
        result["mimkit_shards_to_seit"] = sizes["mimkit_shards"] / sizes["seit"] if seit is not None else None
        result["mimkit_codec"] = ours.header["codec"]
        paths = {"seit": seit.path, "mimkit": ours.path} if seit is not None else {"mimkit": ours.path}
        result["cache_build_s_per_1000"] = cache_build_seconds(paths, args.rounds)
        timed = {name: open_tokens(path) for name, path in paths.items()}
        timed["mimkit_direct"] = open_tokens(ours.path, cache=False)
        result["decode"] = decode_speed(timed, min(n, args.speed_records), args.rounds)
        result["token_entropy"] = token_entropy(ids)
        cells = math.prod(ids.shape[1:])
        result["bits_per_token"] = {
            name: 8 * sizes[name] / cells for name in ("seit", "mimkit", "mimkit_shards") if name in sizes
        }
        for ds in timed.values():
            ds.close()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
