"""A tokenizer's life (mimkit.runs.tokenizer_lifecycle): it learns on real images and is pruned, its
reconstructions are measured and a tokenizer that learnt nothing is named, decoding checks what it is
given, and ViT-VQGAN weights import."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data.source_spec import build_source
from mimkit.data.sources import Subset, demo_source
from mimkit.data.transforms import tokenizer_view
from mimkit.interop.vitvqgan import to_vitvqgan
from mimkit.models.tokenizer import (
    load_tokenizer,
    save_tokenizer,
)
from mimkit.runs.tokenize import tokenize
from mimkit.runs.tokenizer_lifecycle import (
    decode_grid,
    import_vitvqgan,
    reconstruction_report,
    tokenizer_warnings,
    train_tokenizer,
)
from tests.models.test_tokenizer import small_tokenizer
from tests.runs.test_tokenize import _other_tokenizer


def test_reconstruction_quality_is_measured_over_the_classes_beside_the_mean_image(demo_tokenizer):
    source = build_source("demo:val")  # stored class by class: the first 50 images are all airplanes
    view = tokenizer_view(32, demo_tokenizer.mean, demo_tokenizer.std)
    spec = demo_tokenizer
    report = reconstruction_report(
        demo_tokenizer.model, source, view, spec, None, torch.device("cpu"), count=20
    )
    assert report["psnr_images"] == 20
    # every class is in the sample, so its mean image is a poor fit: far below the tokenizer
    assert report["psnr_mean_image"] < report["psnr"] - 6
    labels = np.asarray(source.y)[Subset(source, 20, spread=True).indices]
    assert len(set(labels.tolist())) == 10


def test_a_tokenizer_that_learnt_nothing_is_named():
    bad = {"psnr": 13.3, "psnr_mean_image": 12.96, "codes_used": 5, "codebook_size": 384, "perplexity": 3.2}
    assert tokenizer_warnings(bad) == [
        "the tokenizer's reconstruction PSNR 13.30 dB is not clearly above the mean image's 12.96 dB (by at "
        "least 3 dB): it learnt little, its decodes look alike, and models trained on its ids learn little; "
        "train it longer",
        "the tokenizer's codes collapsed: 5 of 384 used, worth 3.2 equally used codes (perplexity); its ids "
        "carry little about the images",
    ]
    good = {"psnr": 22.2, "psnr_mean_image": 12.4, "codes_used": 384, "codebook_size": 384, "perplexity": 340}
    assert tokenizer_warnings(good) == []


def test_decode_refuses_another_tokenizers_tokens_and_never_writes_over_its_inputs(tmp_path, capsys):
    from mimkit.cli import main

    other = _other_tokenizer(tmp_path / "other")
    tokenize("demo", "demo:val", str(tmp_path / "t"), max_images=8, progress=False)
    assert (
        main(["tokenizer", "decode", str(other), str(tmp_path / "t"), "--out", str(tmp_path / "g.png")]) == 2
    )
    assert "was made by another tokenizer than" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    tokenizer_pt = other / "tokenizer.pt"
    before = tokenizer_pt.read_bytes()
    assert main(["tokenizer", "decode", str(other), str(tmp_path / "t"), "--out", str(tokenizer_pt)]) == 2
    assert f"--out '{tokenizer_pt}' is the input" in capsys.readouterr().err
    assert tokenizer_pt.read_bytes() == before
    assert main(["tokenizer", "decode", "demo", str(tmp_path / "t"), "--out", str(tmp_path / "g.png")]) == 0


TOKENIZER = [
    "method=vq_tokenizer",
    "model.arch=vit_tiny",
    "model.img_size=32",
    "model.patch_size=4",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "method.codebook_size=128",
    "data.train=demo:train",
    "data.max_images=256",
    "data.mean=[0,0,0]",
    "data.std=[1,1,1]",
    "data.num_workers=0",
    "data.crop_pct=1.0",
    "optim.batch_size=32",
    "optim.lr=2e-3",
    "optim.warmup_epochs=0",
    "optim.weight_decay=0",
    "run.progress=false",
    "run.log_every=1",
    "eval.knn=false",
    "eval.batch_size=128",
]


@pytest.mark.slow
def test_tokenizer_learns_on_real_images_and_is_pruned(tmp_path: Path) -> None:
    cfg = build_config(None, [*TOKENIZER, "optim.epochs=4", f"run.out={tmp_path / 'tok'}"])
    summary = train_tokenizer(cfg)
    rows = [json.loads(line) for line in (tmp_path / "tok" / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0]["loss_l2"], np.mean([r["loss_l2"] for r in rows[-3:]])
    assert last < 0.5 * first, (first, last)
    assert rows[-1]["psnr"] > rows[0]["psnr"] + 3
    report = summary["tokenizer"]
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.model.pruned and loaded.model.vocab_size == report["codes_used"] <= 128
    assert loaded.mean == (0.0, 0.0, 0.0)
    # compact ids: every kept code is used by the training images, and they cover 0..K'-1
    source = build_source("demo:train", max_images=256)
    images = torch.stack(
        [tokenizer_view(32, loaded.mean, loaded.std)(source.load(i)[0])["image"] for i in range(256)]
    )
    ids = loaded.model.encode(images)
    assert ids.shape == (256, 8, 8) and int(ids.max()) < loaded.model.vocab_size
    assert torch.equal(torch.unique(ids), torch.arange(loaded.model.vocab_size))
    assert (tmp_path / "tok" / "reconstructions.png").stat().st_size > 1000
    spec = checkpoint.load(tmp_path / "tok" / "last.pt")["input_spec"]  # what it takes: [0, 1] pixels
    assert spec["kind"] == "pixels" and spec["mean"] == [0.0] * 3 and spec["patch_size"] == 4
    # a tokenizer run has no encoder to analyse: one line, and no report folder left behind
    assert main(["analyze", str(tmp_path / "tok"), "--images", "4"]) == 2
    assert not (tmp_path / "tok" / "analysis").exists()


def test_decode_checks_that_records_and_images_line_up(tmp_path: Path) -> None:
    tok = small_tokenizer(seed=7)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    t = str(tmp_path / "tokenizer.pt")
    tokenize(t, "demo:val", str(tmp_path / "d"), num_workers=0, max_images=40, progress=False)
    good = decode_grid(t, str(tmp_path / "d"), str(tmp_path / "g.png"), images="demo:val", count=16)
    assert good["psnr_images"] == 16
    with pytest.raises(ValueError, match="the records do not line up with the images of 'demo:train'"):
        decode_grid(t, str(tmp_path / "d"), str(tmp_path / "g.png"), images="demo:train", count=16)


def test_import_vitvqgan_prunes_to_the_codes_the_images_use(tmp_path: Path) -> None:
    original = small_tokenizer(codebook=64, seed=8)
    torch.save(to_vitvqgan(original), tmp_path / "vq.pt")
    import_vitvqgan(
        str(tmp_path / "vq.pt"), "demo:val", str(tmp_path / "imp"), num_heads=2, max_images=50, num_workers=0
    )
    imported = load_tokenizer(tmp_path / "imp").model
    assert imported.pruned and imported.vocab_size <= 64
    view = tokenizer_view(32, (0.0,) * 3, (1.0,) * 3)
    images = demo_source("val")
    x = torch.stack([view(images.load(i)[0])["image"] for i in range(50)])
    full = original.encode(x)
    assert torch.equal(imported.kept_codes[imported.encode(x)], full)
    assert imported.vocab_size == len(torch.unique(full))


def test_import_vitvqgan_with_a_released_codebook_gives_its_ids(tmp_path: Path) -> None:
    original = small_tokenizer(codebook=64, seed=9)
    torch.save(to_vitvqgan(original), tmp_path / "vq.pt")
    rows = [40, 3, 17, 8, 63, 0]  # a release's compact table: some codes, in its own order, stored raw
    released = original.full_codebook()[rows] * torch.tensor([[2.0], [0.5], [1.0], [3.0], [1.0], [1.5]])
    torch.save(released.clone(), tmp_path / "codebook.ckpt")
    import_vitvqgan(
        str(tmp_path / "vq.pt"),
        "demo:val",
        str(tmp_path / "imp"),
        num_heads=2,
        max_images=20,
        num_workers=0,
        codebook=str(tmp_path / "codebook.ckpt"),
    )
    imported = load_tokenizer(tmp_path / "imp").model
    assert imported.kept_codes.tolist() == rows and imported.vocab_size == 6
    x = torch.rand(4, 3, 32, 32)
    full = original.full_codebook()
    expected = (torch.nn.functional.normalize(original.features(x), dim=-1) @ full[rows].T).argmax(-1)
    assert torch.equal(imported.encode(x).flatten(1), expected)
    other = small_tokenizer(codebook=64, seed=10)
    with pytest.raises(ValueError, match=r"6 of 6 codebook rows match no code of this tokenizer"):
        other.match_codebook(released)
