"""Evaluation runs (mimkit.runs.evaluate): one table for several checkpoints, k-NN on folders with empty or
unreadable parts, and accuracies at chance level said to be."""

import json

import pytest
import torch

from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.distributed import init_distributed
from mimkit.runs.classify import train_classifier
from mimkit.runs.pretrain import pretrain
from tests.conftest import TINY
from tests.methods.test_finetune import tiny_encoder
from tests.runs.test_classify import BLUE, GREEN, RED, TASK


@pytest.mark.slow
def test_eval_writes_one_table_for_two_checkpoints(tiny_checkpoint, tmp_path, capfd):
    second = tmp_path / "lut"
    pretrain(
        build_config(
            None,
            [
                *TINY,
                "method=lut",
                "method.head_hidden_dim=32",
                f"run.out={second}",
                "optim.epochs=1",
                "optim.warmup_epochs=0",
            ],
        )
    )
    args = [
        "eval",
        tiny_checkpoint,
        str(second),
        "--train",
        "synthetic:32",
        "--val",
        "synthetic:16",
        "--linprobe-epochs",
        "3",
        "--finetune-epochs",
        "1",
        "--num-workers",
        "0",
        "--out",
        str(tmp_path / "table"),
        "optim.batch_size=8",
        "run.progress=false",
    ]
    capfd.readouterr()
    assert main(args) == 0
    printed = capfd.readouterr()
    err = printed.err
    # each sub-run names its config file instead of printing it (the config's sections stay unprinted)
    assert err.count("config: ") == 4 and "\noptim:\n" not in err and "\nmodel:\n" not in err
    rows = json.loads((tmp_path / "table" / "table.json").read_text())
    assert [(r["method"], r["protocol"]) for r in rows] == [
        ("mae", "knn"),
        ("mae", "linprobe"),
        ("mae", "finetune"),
        ("lut", "knn"),
        ("lut", "linprobe"),
        ("lut", "finetune"),
    ]
    assert rows[1]["budget"] == "3 epochs" and all(0 <= r["top1"] <= 100 for r in rows)
    markdown = (tmp_path / "table" / "table.md").read_text()
    assert markdown.startswith("| checkpoint | method | weights | protocol | budget | top-1 | top-5 |")
    assert len(markdown.strip().splitlines()) == 8 and markdown in printed.out


def test_evaluations_take_exports_and_teachers(tiny_checkpoint, tmp_path, capsys):
    export = tmp_path / "encoder.safetensors"
    assert main(["export", tiny_checkpoint, "--out", str(export)]) == 0
    cfg = build_config("linprobe", [*TASK, f"method.checkpoint={export}", f"run.out={tmp_path / 'x'}"])
    assert train_classifier(cfg)["method"] == "mae"
    # a method without a teacher says so, naming what it has
    args = ["finetune", tiny_checkpoint, "--weights", "teacher", "--out", str(tmp_path / "t"), *TASK]
    assert main(args) == 2
    assert "has no 'teacher' weights; it has: student" in capsys.readouterr().err


def _colour_folders(root, classes: dict[str, list[tuple[int, int, int]]]):
    """An ImageFolder of 16 px solid-colour PNGs: {class name: colours}; an empty list makes an empty
    class folder."""
    import numpy as np
    from PIL import Image

    for name, colours in classes.items():
        (root / name).mkdir(parents=True)
        for i, colour in enumerate(colours):
            Image.fromarray(np.full((16, 16, 3), colour, np.uint8)).save(root / name / f"img{i}.png")
    return root


def _knn_inputs():
    from mimkit.configs import DataConfig
    from mimkit.data.transforms import eval_view

    return tiny_encoder(), eval_view(16, DataConfig(crop_pct=1.0)), init_distributed("cpu")


def test_knn_labels_classes_by_name_when_a_val_class_folder_is_empty(tmp_path, capfd):
    """A query of class c is the exact copy of a bank image of class c, so 1-NN is right on every query,
    provided c has the same label in both folders although the val folder of b is empty."""
    import re

    from mimkit.data.source_spec import build_source
    from mimkit.eval.knn import knn_evaluate

    train = build_source(
        str(_colour_folders(tmp_path / "train", {"a": [RED] * 2, "b": [GREEN] * 2, "c": [BLUE] * 2}))
    )
    val = build_source(str(_colour_folders(tmp_path / "val", {"a": [RED], "b": [], "c": [BLUE]})))
    encoder, view, env = _knn_inputs()
    result = knn_evaluate(encoder, train, val, view, env, k=1, batch_size=4)
    assert result["top1"] == 100.0  # not 50: c would read as b's label
    assert (result["val_images"], result["skipped_images"]) == (2, 0)
    assert f"class folder '{tmp_path / 'val' / 'b'}' has no images" in capfd.readouterr().err
    # a val folder without the class at all: one line naming both sources and the difference
    (tmp_path / "val" / "b").rmdir()
    val = build_source(str(tmp_path / "val"))
    message = (
        f"classes differ between '{train.name}' (a, b, c) and '{val.name}' (a, c): only in '{train.name}': b"
    )
    with pytest.raises(ValueError, match=re.escape(message)):
        knn_evaluate(encoder, train, val, view, env, k=1)


def test_knn_names_and_counts_unreadable_images(tmp_path, capfd):
    from mimkit.data.source_spec import build_source
    from mimkit.eval.knn import knn_evaluate, loo_nn_evaluate

    train = build_source(str(_colour_folders(tmp_path / "train", {"a": [RED] * 3, "b": [GREEN] * 3})))
    val = build_source(str(_colour_folders(tmp_path / "val", {"a": [RED] * 2, "b": [GREEN] * 2})))
    broken = [tmp_path / "train" / "a" / "img1.png", tmp_path / "val" / "b" / "img0.png"]
    for path in broken:
        path.write_bytes(b"\x89PNG broken")
    encoder, view, env = _knn_inputs()
    capfd.readouterr()
    result = knn_evaluate(encoder, train, val, view, env, k=1, batch_size=2)
    assert (result["skipped_images"], result["train_images"], result["val_images"]) == (2, 5, 3)
    err = capfd.readouterr().err
    assert all(f"warning: skipped unreadable image {path}" in err for path in broken)
    loo = loo_nn_evaluate(encoder, val, view, env, batch_size=2)
    assert (loo["skipped_images"], loo["val_images"]) == (1, 3)
    assert f"warning: skipped unreadable image {broken[1]}" in capfd.readouterr().err


def test_a_bad_npz_given_to_knn_is_one_line(tiny_checkpoint, tmp_path, capfd):
    bad = tmp_path / "broken.npz"
    bad.write_bytes(b"PK\x03\x04 cut short")
    assert main(["knn", tiny_checkpoint, "--train", str(bad), "--val", "synthetic:16"]) == 2
    err = capfd.readouterr().err
    assert (
        err.startswith(f"mimkit: error: --train: {bad}: not a readable .npz file (BadZipFile: ")
        and err.count("\n") == 1
    )


def test_an_accuracy_at_chance_level_is_said_to_be():
    from mimkit.eval.features import chance_top1, chance_warning, topk_accuracy

    labels = torch.arange(10).repeat(100)  # 1,000 balanced labels: chance is 10%
    assert chance_top1(labels) == 10.0 and chance_top1(torch.tensor([0, 0, 0, 1])) == 75.0
    scores = torch.zeros(1000, 10)
    scores[:, 3] = 1  # always class 3
    result = {**topk_accuracy(scores, labels), "val_images": 1000}
    assert (result["top1"], result["chance_top1"]) == (10.0, 10.0)
    assert chance_warning(result, "k-NN") == (
        "k-NN top-1 10.00% is at chance level: always answering the most common class scores 10.00% on "
        "these 1000 images (3 standard errors: 2.85 points)"
    )
    assert chance_warning({**result, "top1": 12.8}, "k-NN") is not None  # within 3 standard errors
    assert chance_warning({**result, "top1": 13.0}, "k-NN") is None
