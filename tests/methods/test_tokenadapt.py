"""`mimkit tokenadapt train`: paired pixel/token supervision through the one engine. The loss falls, the run
writes an official-layout tokenadapt.ckpt that loads back, the summary reports the accuracy beside its
baselines, and a resumed run ends bit-identical to a straight one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data.source_spec import build_source
from mimkit.data.token_geometry import CropBoxes
from mimkit.methods import build_method
from mimkit.methods.token_views import AffineParams, GeoParams
from mimkit.methods.tokenadapt import PairedViews
from mimkit.models.tokenadapt import load_tokenadapt
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, save_tokenizer
from mimkit.tokens.codebook import embed, requantize

CODES = 24


def tiny_tokenizer(folder: Path, patch: int = 4) -> Path:
    """A 16 px tokenizer saved as a run folder holds it: random weights, the codebook k-means centres of
    demo images' features (so that the ids vary as a trained tokenizer's do). Its ids are a fixed function
    of the image, which is all TokenAdapt needs to learn from."""
    torch.manual_seed(0)
    shape = TokenizerShape(
        img_size=16, patch_size=patch, embed_dim=32, depth=1, num_heads=2, codebook_size=CODES, code_dim=8
    )
    tokenizer = VQTokenizer(shape, kmeans_init=True).train()
    source = build_source("demo:train", max_images=64)
    images = torch.stack([source.load(i)[0] for i in range(len(source))]).float() / 255
    with torch.no_grad():
        tokenizer(F.interpolate(images, size=16, mode="bicubic", antialias=True))  # the k-means init
    save_tokenizer(tokenizer.eval(), folder / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    return folder


def overrides(tokenizer: Path, *extra: str) -> list[str]:
    return [
        "method=tokenadapt",
        f"method.tokenizer={tokenizer}",
        "method.width=128",
        "method.eval_images=16",
        "model.img_size=16",
        "data.train=demo:train",
        "data.max_images=16",
        "data.num_workers=0",
        "data.crop_pct=1.0",
        "optim.batch_size=16",
        "optim.lr=3e-3",
        "optim.warmup_epochs=0",
        "optim.weight_decay=0",
        "run.progress=false",
        "run.log_every=1",
        "run.checkpoint_minutes=.inf",
        "eval.knn=false",
        "eval.val=demo:val",
        *extra,
    ]


@pytest.mark.slow
def test_cli_trains_writes_official_weights_and_reports_accuracy(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    tok = tiny_tokenizer(tmp_path)
    out = tmp_path / "ta"
    args = [
        a for a in overrides(tok, "optim.epochs=16", "optim.lr=5e-3") if a != "model.img_size=16"
    ]  # follows the tokenizer
    assert main(["tokenadapt", "train", "--out", str(out), *args]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["loss"] for r in rows[:3]) / 3
    last = sum(r["loss"] for r in rows[-3:]) / 3
    assert last < 0.8 * first, (first, last)
    assert sum(r["acc"] for r in rows[-3:]) / 3 > rows[0]["acc"] + 0.05  # from chance (1/CODES) up

    ta = load_tokenadapt(out / "tokenadapt.ckpt")  # 128 wide: two 64-wide heads, as the official layout
    assert (ta.vocab_size, ta.token_dim, ta.in_grid, ta.out_grid, ta.num_heads) == (CODES, 8, 4, 4, 2)
    summary = json.loads((out / "summary.json").read_text())["tokenadapt"]
    assert summary["held_out"] and summary["images"] == 16 and summary["images_from"] == "demo:val"
    for key in ("token_acc", "warp_baseline_acc", "identity_baseline_acc"):
        assert 0 <= summary[key] <= 100
    printed = capsys.readouterr().out
    assert "token accuracy" in printed and "tokenadapt.ckpt" in printed


@pytest.mark.parametrize("flip", [False, True])
def test_pairs_are_the_tokens_of_the_image_and_of_its_augmentation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, flip: bool
) -> None:
    """With the draw forced to the identity (or to a flip of every image), the target is the tokenizer's
    ids of the image (or of its mirror image), and the baselines follow."""
    tok = tiny_tokenizer(tmp_path)
    method = build_method(build_config(None, overrides(tok)))
    views = method.batch_transform()
    assert isinstance(views, PairedViews)

    def forced(batch: int, height: int, width: int, *args: object, **kwargs: object) -> GeoParams:
        assert (height, width) == (8, 8)  # f-space: 2 x the 4 x 4 token grid
        zeros = torch.zeros(batch)
        full = CropBoxes(*(torch.full((batch,), v) for v in (0, 0, height, width)))
        return GeoParams(
            torch.full((batch,), flip),
            AffineParams(zeros, torch.zeros(batch, 2), torch.zeros(batch, 2)),
            full,
        )

    monkeypatch.setattr("mimkit.methods.tokenadapt.feature_augment_params", forced)
    images = torch.rand(6, 3, 16, 16)
    with torch.no_grad():
        pairs = views({"image": images, "seed": torch.arange(6)})
        encode = method.loaded.model.encode
        assert torch.equal(pairs["ids"], encode(images))
        assert torch.equal(pairs["target"], encode(images.flip(-1) if flip else images))
        assert torch.equal(pairs["warped"], pairs["ids"].flip(-1) if flip else pairs["ids"])
        step = method(pairs)
    assert torch.isfinite(step.loss) and set(step.metrics) == {"acc", "warp_acc", "identity_acc"}
    assert float(step.metrics["warp_acc"]) == float((pairs["warped"] == pairs["target"]).float().mean())


def test_g_trains_at_its_out_grid_against_the_target_taken_there_as_a_crop_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """method.out_grid below the tokenizer's grid (a 4-cell tokenizer, a 3-cell model, as 32 -> 28): the
    f-space crop is resized to twice it, and the target is the tokenizer's ids of the augmented image taken
    to that grid as the crop path takes a grid (codebook vectors, bicubic, re-quantised)."""
    tok = tiny_tokenizer(tmp_path)
    method = build_method(build_config(None, overrides(tok, "method.out_grid=3")))
    assert method.tokenadapt.out_grid == 3
    boxes = []

    def identity(batch: int, height: int, width: int, *args: object, **kwargs: object) -> GeoParams:
        full = CropBoxes(*(torch.full((batch,), v) for v in (0, 0, height, width)))
        boxes.append((height, width))
        affine = AffineParams(torch.zeros(batch), torch.zeros(batch, 2), torch.zeros(batch, 2))
        return GeoParams(torch.zeros(batch, dtype=torch.bool), affine, full)

    monkeypatch.setattr("mimkit.methods.tokenadapt.feature_augment_params", identity)
    images = torch.rand(4, 3, 16, 16)
    with torch.no_grad():
        pairs = method.batch_transform()({"image": images, "seed": torch.arange(4)})
        codebook = method.loaded.model.codebook()
        emb = embed(method.loaded.model.encode(images), codebook)
        expected = requantize(F.interpolate(emb, size=(3, 3), mode="bicubic", align_corners=False), codebook)
        assert torch.equal(pairs["target"], expected) and torch.equal(pairs["ids"], expected)
        assert pairs["warped"].shape == (4, 3, 3)
        logits = method.tokenadapt.invert_logits(torch.zeros(4, 8, 6, 6))
        step = method(pairs)
    assert boxes == [(8, 8)] and logits.shape == (4, CODES, 3, 3) and torch.isfinite(step.loss)


def test_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = [a for a in overrides(tmp_path) if not a.startswith("method.tokenizer")]
    assert main(["tokenadapt", "train", "--out", str(tmp_path / "x"), *args]) == 2
    # the recipe names the run folder its tokenizer command writes; absent here, the key is named
    expected = "mimkit: error: method.tokenizer: no tokenizer at 'runs/tokenizer_cifar10'"
    assert expected in capsys.readouterr().err
    odd = tiny_tokenizer(tmp_path / "odd", patch=1)
    assert main(["tokenadapt", "train", "--out", str(tmp_path / "y"), *overrides(odd)]) == 2
    assert "patch size must be even" in capsys.readouterr().err
    with pytest.raises(Exception, match=r"'method.width' must be a multiple of 64"):
        build_config(None, overrides(tmp_path, "method.width=96"))
