import json
import subprocess
import sys

import timm
import torch
from safetensors.torch import load_file

from mimkit.cli import main
from tests.conftest import TINY


def test_pretrain_knn_and_export_from_the_command_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = [a for a in TINY if not a.startswith("eval.knn")]
    code = main(
        [
            "pretrain",
            "--out",
            str(out),
            *args,
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "eval.val=synthetic:32",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "k-NN (k=20, mean) on synthetic:32: top-1" in printed  # the demo recipe pools by mean
    summary = json.loads((out / "summary.json").read_text())
    assert summary["knn"]["val_images"] == 32 and 0 <= summary["knn"]["top1"] <= 100
    assert (out / "config.yaml").is_file() and (out / "metrics.jsonl").read_text().count("\n") >= 2

    assert main(["knn", str(out), "--k", "5", "--num-workers", "0"]) == 0
    knn = json.loads((out / "knn.json").read_text())
    assert knn["k"] == 5 and knn["pool"] == "mean"  # unset options follow the run's eval settings

    export = tmp_path / "enc.safetensors"
    assert main(["export", str(out), "--out", str(export)]) == 0
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=16, patch_size=4, embed_dim=64, depth=2, num_heads=2
    )
    model.load_state_dict(load_file(export), strict=True)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert torch.equal(
        model.state_dict()["blocks.1.mlp.fc2.weight"], ckpt["model"]["encoder.blocks.1.mlp.fc2.weight"]
    )
    # the export is itself an input of mimkit knn
    assert (
        main(
            [
                "knn",
                str(export),
                "--train",
                "synthetic:32",
                "--val",
                "synthetic:16",
                "--num-workers",
                "0",
                "--out",
                str(tmp_path / "k.json"),
            ]
        )
        == 0
    )


def test_errors_are_one_clear_line(tmp_path, capsys):
    assert main(["pretrain", "--out", str(tmp_path), "optim.lrr=1"]) == 2
    assert (
        "mimkit: error: overrides: unknown config key 'optim.lrr'; did you mean 'optim.lr'?"
        in capsys.readouterr().err
    )
    assert main(["pretrain", "--out", str(tmp_path), "data.train=/no/such/folder"]) == 2
    assert "data path '/no/such/folder' does not exist" in capsys.readouterr().err
    assert main(["export", str(tmp_path / "missing")]) == 2


def test_python_dash_m_and_print_config():
    result = subprocess.run(
        [sys.executable, "-m", "mimkit", "pretrain", "--print-config", "optim.epochs=7"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "epochs: 7" in result.stdout
