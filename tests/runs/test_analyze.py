"""`mimkit analyze`: one self-contained HTML report, its numbers and figures, for pixel and token
checkpoints side by side."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.data.source_spec import build_source
from mimkit.interop.load import load_method
from mimkit.interop.official import to_official
from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, save_tokenizer
from mimkit.runs.pretrain import pretrain
from mimkit.tokens.dataset import write_tokens
from tests.conftest import TINY

QUICK = ["--images", "2", "--stats-images", "4", "--ks", "2"]  # a report in a second
RUN = [*TINY, "optim.epochs=1", "optim.batch_size=16", "eval.knn=false", "run.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny MAE and LUT run, and an MTM run on tokens whose data records its tokenizer."""
    root = tmp_path_factory.mktemp("analyze")
    out = {}
    for name in ("mae", "lut"):
        out[name] = root / name
        torch.manual_seed(0)
        pretrain(build_config(None, [*RUN, f"method={name}", f"run.out={out[name]}"]))
    torch.manual_seed(0)
    shape = TokenizerShape(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=32)
    tokenizer = VQTokenizer(shape, kmeans_init=False).eval()
    save_tokenizer(tokenizer, root / "tok" / "tokenizer.pt", mean=(0.5,) * 3, std=(0.25,) * 3)
    source = build_source("demo:train", max_images=64)
    images = torch.stack([source.load(i)[0] for i in range(len(source))]).float() / 255
    ids = tokenizer.encode((images - 0.5) / 0.25).numpy().astype(np.uint8)
    labels = [source.load(i)[1] for i in range(len(source))]
    meta = {"tokenizer": str(root / "tok")}
    write_tokens(root / "tokens", ids, labels, codebook=tokenizer.codebook(), meta=meta)
    out["mtm"] = root / "mtm"
    mtm = [
        "method=mtm",
        "model.stem=token_ids",
        "model.img_size=8",
        "model.patch_size=2",
        "model.token_dim=16",
        f"data.train=tokens:{root / 'tokens'}",
    ]
    pretrain(build_config(None, [*RUN, *mtm, f"run.out={out['mtm']}"]))
    out["tokens"] = root / "tokens"
    out["tokenizer"] = root / "tok"
    return out


class Resources(HTMLParser):
    """Every URL-bearing attribute of a page, and the tags that load something."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.tags: list[str] = []
        self.images = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.images += tag == "img"
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "poster", "action", "background"):
                self.urls.append(value or "")


def strict_json(path: Path) -> dict:
    def refuse(constant: str) -> None:
        raise ValueError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow
def test_report_of_mae_and_lut_is_one_self_contained_page(runs: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "report"
    args = ["analyze", str(runs["mae"]), str(runs["lut"]), "--data", "demo:val", "--out", str(out)]
    code = main([*args, "--images", "3", "--stats-images", "24", "--ks", "2,3", "--upsample", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {out / 'report.html'}" in printed and "mae: mean attention distance" in printed

    page = (out / "report.html").read_text(encoding="utf-8")
    parser = Resources()
    parser.feed(page)
    # nothing is fetched: every image is a data URI, no stylesheet, script or frame is loaded
    assert parser.urls and all(u.startswith("data:image/png;base64,") for u in parser.urls), parser.urls
    assert not {"link", "script", "iframe", "object", "embed"} & set(parser.tags)
    assert not re.search(r"url\(|@import|https?://", page)
    # one distance plot and one spectrum plot for both; maps, heads, reconstructions, segmentation per run
    assert parser.images == 2 + 4 * 2
    figures = sorted((out / "figures").glob("*.png"))
    assert len(figures) == parser.images
    embedded = {base64.b64decode(u.split(",", 1)[1]) for u in parser.urls}
    assert {f.read_bytes() for f in figures} == embedded
    assert all(f.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") for f in figures)

    report = strict_json(out / "report.json")
    assert report["data"] == "demo:val"
    assert [c["label"] for c in report["checkpoints"]] == ["mae", "lut"]
    for c in report["checkpoints"]:
        renorm = np.array(c["attention_distance"]["renorm"])
        raw = np.array(c["attention_distance"]["raw"])
        assert renorm.shape == (2, 2) and (raw <= renorm + 1e-6).all() and (renorm > 0).all()
        assert c["attention_distance"]["images"] == 24
        assert (
            len(c["spectrum"]["mean"]["values"]) == 64 and 1 <= c["spectrum"]["mean"]["effective_rank"] <= 64
        )
        seg = c["segmentation"]
        assert seg["grid"] == [8, 8]  # 16 px, patch 4, fed twice as large
        for k in (2, 3):
            labels = np.array(seg["labels"][str(k)])
            assert labels.shape == (3, 8, 8)
            assert all(len(np.unique(one)) == k for one in labels)
        assert np.array(seg["tsne"]).shape == (3, 64, 2)
        assert c["reconstruction"]["mask_ratio"] == 0.75
    # the same masks for both: one seed, one grid
    masks = [c["reconstruction"]["mask"] for c in report["checkpoints"]]
    assert masks[0] == masks[1]


@pytest.mark.slow
def test_pixel_and_token_checkpoints_share_one_report(runs: dict[str, Path], tmp_path: Path):
    """The MTM model reads demo:val tokenized on the fly by the tokenizer its data records; its
    reconstruction is decoded by that tokenizer."""
    out = tmp_path / "mixed"
    args = ["analyze", str(runs["mae"]), str(runs["mtm"]), "--data", "demo:val", "--out", str(out)]
    assert main([*args, "--images", "2", "--stats-images", "8", "--ks", "3"]) == 0
    report = strict_json(out / "report.json")
    mae, mtm = report["checkpoints"]
    assert mtm["input"] == {"kind": "token_ids", "grid": [4, 4], "patch_size": 2}
    assert mtm["distance_unit"] == "cells" and mae["distance_unit"] == "px"
    # one unit on the page: a cell is the tokenizer's 4 px, and the maps are drawn over the real images
    assert (mtm["pixels_per_unit"], mae["pixels_per_unit"]) == (4, 1)
    assert mtm["images_are"] == "the images"
    assert np.array(mtm["attention_distance"]["renorm"]).shape == (2, 2)
    assert 0 <= mtm["reconstruction"]["masked_token_accuracy"] <= 1
    assert mtm["reconstruction"]["accuracy_images"] == 8  # the statistics' images, not the 2 shown
    assert "reconstruction_note" not in mtm and not any("tokenizer" in n for n in mtm["notes"])
    assert (out / "figures" / "reconstruction_1_mtm.png").exists()
    page = (out / "report.html").read_text()
    cells = float(np.array(mtm["attention_distance"]["renorm"]).mean())
    assert f"{4 * cells:.2f} px ({cells:.2f} cells)" in page
    side_by_side = "grid-template-columns: repeat(2, minmax(0, 1fr))"
    assert page.count(side_by_side) == 4  # maps, heads, reconstructions, segments: one column each
    assert "% at ratio" in page  # MTM's masked-token accuracy in the summary table


@pytest.mark.slow
def test_a_token_model_whose_tokenizer_is_gone_is_analysed_with_a_note(runs: dict[str, Path], tmp_path: Path):
    moved = runs["tokenizer"].with_name("tok-moved")
    runs["tokenizer"].rename(moved)
    try:
        out = tmp_path / "notok"
        args = ["analyze", str(runs["mtm"]), "--data", f"tokens:{runs['tokens']}", "--out", str(out)]
        assert main([*args, "--images", "2", "--stats-images", "4", "--ks", "2"]) == 0
    finally:
        moved.rename(runs["tokenizer"])
    (mtm,) = strict_json(out / "report.json")["checkpoints"]
    assert "which is gone" in mtm["reconstruction_note"]
    assert mtm["pixels_per_unit"] is None  # no tokenizer: its distances stay in cells, on a row of their own
    assert mtm["images_are"] == "the tokenizer's decodes of the tokens"
    assert "segmentation" in mtm and mtm["reconstruction"]["mask"] is None  # predicted, not shown
    assert 0 <= mtm["reconstruction"]["masked_token_accuracy"] <= 1
    assert "which is gone" in (out / "report.html").read_text()


@pytest.mark.slow
def test_an_export_has_no_decoder_and_one_run_writes_into_its_folder(runs: dict[str, Path], tmp_path: Path):
    export = tmp_path / "enc.safetensors"
    assert main(["export", str(runs["mae"]), "--out", str(export)]) == 0
    out = tmp_path / "exp"
    assert (
        main(
            [
                "analyze",
                str(export),
                "--data",
                "demo:val",
                "--out",
                str(out),
                "--images",
                "2",
                "--stats-images",
                "4",
                "--ks",
                "2",
            ]
        )
        == 0
    )
    (enc,) = strict_json(out / "report.json")["checkpoints"]
    assert enc["label"] == "enc" and "reconstruction" not in enc
    assert "no decoder" in enc["reconstruction_note"]
    # one run folder and no --out: RUN/analysis, on the run's own evaluation data
    assert main(["analyze", str(runs["lut"]), "--images", "2", "--stats-images", "4", "--ks", "2"]) == 0
    assert (runs["lut"] / "analysis" / "report.html").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ks", "3,x"], "--ks takes comma-separated integers; got '3,x'"),
        (["--ks", "0"], "--ks must be positive cluster counts; got [0]"),
        (["--layer", "5"], "--layer 5 is outside the 2 blocks of"),
        (["--queries", "99"], "query patch 99 is outside the 4x4 grid (0..15) of"),
        (["--ks", "17"], "--ks 17 is more clusters than the 16 patches of"),
        (["--batch-size", "0"], "--batch-size must be at least 1; got 0"),
        (["--images", "0"], "--images must be at least 1; got 0"),
    ],
)
def test_bad_settings_are_named(
    runs: dict[str, Path], tmp_path: Path, capsys, extra: list[str], message: str
):
    args = ["analyze", str(runs["mae"]), "--data", "demo:val", "--out", str(tmp_path / "x"), "--images", "1"]
    assert main([*args, "--stats-images", "2", *extra]) == 2
    assert message in capsys.readouterr().err


def test_a_missing_checkpoint_is_named_before_any_work(runs: dict[str, Path], tmp_path: Path, capsys):
    missing = tmp_path / "nope"
    assert main(["analyze", str(runs["mae"]), str(missing), "--out", str(tmp_path / "y")]) == 2
    assert f"checkpoint '{missing}' does not exist" in capsys.readouterr().err
    assert not (tmp_path / "y").exists()


@pytest.mark.slow
def test_an_official_encoder_only_file_gets_no_reconstruction(runs: dict[str, Path], tmp_path: Path):
    """MAE's released encoders hold no decoder: a reconstruction would come from random weights. A file
    without the training arguments cannot say whether its targets were normalised: --norm-pix says."""
    method, _, _ = load_method(runs["mae"])
    official = to_official(method)
    full = tmp_path / "full.pth"
    torch.save(official, full)
    encoder_only = tmp_path / "encoder.pth"
    torch.save(
        {
            "model": {
                k: v for k, v in official["model"].items() if not k.startswith(("decoder", "mask_token"))
            }
        },
        encoder_only,
    )
    args = ["--data", "demo:val", "--images", "2", "--stats-images", "4", "--ks", "2"]
    assert main(["analyze", str(encoder_only), str(full), "--out", str(tmp_path / "a"), *args]) == 0
    bare, whole = strict_json(tmp_path / "a" / "report.json")["checkpoints"]
    assert bare["reconstruction_note"] == "the file holds no decoder weights: no reconstructions"
    assert (
        "reconstruction" not in bare
        and not (tmp_path / "a" / "figures" / "reconstruction_0_encoder.png").exists()
    )
    assert whole["reconstruction"]["norm_pix"] is True
    assert any("does not say whether it was trained with norm_pix_loss" in n for n in whole["notes"])
    assert main(["analyze", str(full), "--out", str(tmp_path / "b"), "--norm-pix", "off", *args]) == 0
    (whole,) = strict_json(tmp_path / "b" / "report.json")["checkpoints"]
    assert whole["reconstruction"]["norm_pix"] is False and not any("norm_pix" in n for n in whole["notes"])


def test_an_unwritable_report_folder_is_named_before_any_work(runs: dict[str, Path], tmp_path: Path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["analyze", str(runs["mae"]), "--out", str(blocker / "sub"), "--images", "1"]) == 2
    err = capsys.readouterr().err
    assert str(blocker) in err and "analyzing" not in err


@pytest.mark.slow
def test_settings_complete_an_official_file_and_leave_a_run_as_saved(runs: dict[str, Path], tmp_path: Path):
    """Heads (and the evaluation crop) cannot be read from weights: an official file of a non-standard
    width takes them as settings, and then attends exactly as the run it was written from; the run itself
    keeps its saved config."""
    method, _, _ = load_method(runs["mae"])
    official = tmp_path / "official.pth"
    torch.save(to_official(method), official)
    args = ["--data", "demo:val", "--images", "2", "--stats-images", "8", "--ks", "2", "--norm-pix", "on"]
    heads = ["model.num_heads=2", "method.decoder_num_heads=2", "data.crop_pct=1.0"]  # as the run's
    assert (
        main(["analyze", str(official), str(runs["mae"]), "--out", str(tmp_path / "r"), *args, *heads]) == 0
    )
    from_file, from_run = strict_json(tmp_path / "r" / "report.json")["checkpoints"]
    assert from_file["attention_distance"]["renorm"] == from_run["attention_distance"]["renorm"]
    assert np.array(from_file["attention_distance"]["renorm"]).shape == (2, 2)
    assert from_file["notes"] == [] or not any("complete official files" in n for n in from_file["notes"])
    assert any(
        "complete official files; this checkpoint states its own config" in n for n in from_run["notes"]
    )
    assert main(["analyze", str(official), "--out", str(tmp_path / "s"), *args, "model.num_headz=2"]) == 2


def test_a_moved_tokenizer_is_given_with_tokenizer(runs: dict[str, Path], tmp_path: Path, capsys):
    """The token data name a tokenizer that is gone: images cannot be read for the token model until
    --tokenizer says where it is now."""
    moved = runs["tokenizer"].with_name("tok-elsewhere")
    runs["tokenizer"].rename(moved)
    try:
        args = ["knn", str(runs["mtm"]), "--val", "demo:val", "--num-workers", "0"]
        assert main([*args, "--out", str(tmp_path / "a.json")]) == 2
        assert "which is gone: give its tokenizer with --tokenizer PATH" in capsys.readouterr().err
        assert main([*args, "--tokenizer", str(moved), "--out", str(tmp_path / "b.json")]) == 0
    finally:
        moved.rename(runs["tokenizer"])
    result = strict_json(tmp_path / "b.json")
    assert result["val"] == f"demo:val (tokenized by {moved})" and result["val_images"] == 500


@pytest.mark.slow
def test_a_full_disk_names_the_report_file_and_leaves_no_part_of_it(
    runs: dict[str, Path], tmp_path: Path, capsys, monkeypatch
):
    import errno
    import os

    real = os.fsync

    def full(fd):  # the page's bytes are written, then flushing them finds the disk full
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).startswith(".report.html.tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd)

    monkeypatch.setattr(os, "fsync", full)
    out = tmp_path / "full"
    args = ["analyze", str(runs["mae"]), "--out", str(out), *QUICK]
    assert main(args) == 2
    assert capsys.readouterr().err == f"mimkit: error: '{out / 'report.html'}': No space left on device\n"
    assert not (out / "report.html").exists() and not (out / ".report.html.tmp").exists()
    assert not list(out.glob(".report.html.tmp*"))  # the writer's temporary, whatever its suffix
