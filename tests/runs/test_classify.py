"""Linear probe and fine-tune runs (mimkit.runs.classify) on images: they learn, resume exactly, check their
settings and data, and follow their pre-training run; with eval.every_epochs they log the held-out accuracy
of every N epochs and the best one beside the final weights' (the headline), kept across a resume."""

import json
import math
from pathlib import Path

import pytest
import torch

from mimkit.cli import main
from mimkit.configs import ConfigError, build_config
from mimkit.methods import build_method
from mimkit.runs.classify import EPOCH_EVALS_FILE, epoch_report, train_classifier
from tests.conftest import straight_and_resumed

TASK = [
    "data.train=synthetic:64",
    "eval.val=synthetic:32",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.batch_size=16",
    "run.progress=false",
    "run.log_every=2",
]


@pytest.mark.slow
def test_linear_probe_and_fine_tune_on_images(tiny_checkpoint, tmp_path, capsys):
    assert (
        main(
            [
                "linprobe",
                tiny_checkpoint,
                "--out",
                str(tmp_path / "lp"),
                *TASK,
                "optim.epochs=30",
                "optim.lr=6.4",
            ]
        )
        == 0
    )
    assert "linprobe (30 epochs) on synthetic:32: top-1" in capsys.readouterr().out
    summary = json.loads((tmp_path / "lp" / "summary.json").read_text())
    # synthetic classes differ by colour, so even a barely trained encoder's features separate them
    assert summary["top1"] > 50 and summary["protocol"] == "linprobe"
    # the full mode (fresh augmentations every epoch) runs through the same engine
    full_mode = build_config(
        "linprobe",
        [*TASK, f"method.checkpoint={tiny_checkpoint}", "method.cached=false", f"run.out={tmp_path / 'f'}"],
    )
    assert train_classifier(full_mode)["steps"] == 8
    fine = build_config(
        "finetune",
        [
            *TASK,
            f"method.checkpoint={tiny_checkpoint}",
            "method.model_ema=true",
            f"run.out={tmp_path / 'ft'}",
        ],
    )
    summary = train_classifier(fine)
    assert {"top1", "top5", "ema_top1"} <= set(summary) and summary["steps"] == 8


@pytest.mark.slow
def test_fine_tuning_learns_and_resumes_exactly(tiny_checkpoint, tmp_path):
    """What this checks instead of 'beats training from scratch' (which needs more pre-training than a test
    can afford on a CPU): fine-tuning starts from the checkpoint, its loss starts at ln(C) (a near-zero
    head) and falls on real images, and a run stopped mid-way and resumed ends with the same weights."""
    overrides = [
        *TASK,
        "method=finetune",
        f"method.checkpoint={tiny_checkpoint}",
        "data.train=demo:train",
        "data.max_images=64",
        "eval.val=demo:val",
        "method.mixup=0",
        "method.cutmix=0",
        "method.label_smoothing=0",
        "method.img_size=16",
        "optim.lr=2e-3",
    ]
    a, b, summary = straight_and_resumed(overrides, tmp_path, stop_at=5, run=train_classifier)
    assert summary["steps"] == 8
    for key in a:
        assert torch.equal(a[key], b[key]), key
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[0] == pytest.approx(math.log(10), rel=0.05) and losses[-1] < losses[0]


def test_bad_evaluation_settings_are_named(tiny_checkpoint, tmp_path):
    with pytest.raises(ConfigError, match=r"needs 'method\.checkpoint'"):
        train_classifier(build_config(None, [*TASK, "method=linprobe"]))
    with pytest.raises(ConfigError, match=r"needs 'eval\.val'"):
        train_classifier(
            build_config(
                None, [*TASK, "method=linprobe", f"method.checkpoint={tiny_checkpoint}", "eval.val=null"]
            )
        )
    with pytest.raises(ConfigError, match=r"'optim\.batch_size' must be even; got 15"):
        train_classifier(
            build_config(
                None,
                [*TASK, "method=finetune", f"method.checkpoint={tiny_checkpoint}", "optim.batch_size=15"],
            )
        )
    with pytest.raises(ValueError, match="'linprobe' is an evaluation, not a pre-training method"):
        build_method(build_config(None, ["method=linprobe"]))
    assert main(["eval", tiny_checkpoint, "--protocols", "knn,probe"]) == 2


@pytest.mark.slow
def test_fine_tuning_with_mixup_repeats_exactly(tiny_checkpoint, tmp_path):
    """Mixup draws from NumPy in the main process; the run's seed fixes it, so two runs agree."""
    import numpy as np

    states = []
    for name in ("a", "b"):
        np.random.seed(len(name) + len(states))  # whatever came before the run must not matter
        cfg = build_config(
            "finetune", [*TASK, f"method.checkpoint={tiny_checkpoint}", f"run.out={tmp_path / name}"]
        )
        train_classifier(cfg)
        states.append(torch.load(tmp_path / name / "last.pt", weights_only=True)["model"])
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


def test_probe_and_fine_tune_check_that_train_and_val_name_the_same_classes(tiny_checkpoint, tmp_path):
    for task in ("linprobe", "finetune"):
        cfg = build_config(
            task,
            [
                *TASK,
                f"method.checkpoint={tiny_checkpoint}",
                "eval.val=demo:val",
                f"run.out={tmp_path / task}",
            ],
        )
        with pytest.raises(
            ValueError,
            match=r"^classes differ between 'synthetic:64' \(class0, .*, class9\) and 'demo:val' "
            r"\(airplane, .*, truck\): only in 'synthetic:64': class0, ",
        ):
            train_classifier(cfg)
        assert not (tmp_path / task / "last.pt").exists()  # checked before any training


def test_follow_up_runs_use_the_runs_own_data_over_a_recipes(tiny_checkpoint, tmp_path):
    """A shipped recipe's data never beat the run's (finetune_cifar10 names the CIFAR-10 download); the
    command line beats both."""
    from mimkit.interop.load import load_encoder
    from mimkit.runs.classify import task_config

    _, info = load_encoder(tiny_checkpoint)
    run_cfg = info["config"]
    run_cfg.eval.val, run_cfg.data.tokenizer = "synthetic:16", "demo"
    cfg = task_config("finetune", tiny_checkpoint, info, "finetune_cifar10", [], str(tmp_path / "f"))
    assert (cfg.data.train, cfg.eval.val, cfg.data.tokenizer) == ("synthetic:64", "synthetic:16", "demo")
    given = ["data.train=synthetic:8", "eval.val=synthetic:4"]
    cfg = task_config("finetune", tiny_checkpoint, info, "finetune_cifar10", given, str(tmp_path / "g"))
    assert (cfg.data.train, cfg.eval.val) == ("synthetic:8", "synthetic:4")
    split = ["data.train=demo:val", "data.val_fraction=0.2"]  # the held-out part, not the run's eval.val
    cfg = task_config("linprobe", tiny_checkpoint, info, None, split, str(tmp_path / "h"))
    assert (cfg.data.train, cfg.eval.val) == ("demo:val#train=0.2", "demo:val#val=0.2")


SCRATCH = [
    "method.checkpoint=scratch",
    "model.arch=vit_tiny",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "data.train=synthetic:64",
    "eval.val=synthetic:32",
    "data.num_workers=0",
    "optim.epochs=3",
    "optim.warmup_epochs=1",
    "optim.batch_size=16",
    "optim.lr=1e-3",
    "run.progress=false",
    "run.log_every=2",
    "eval.every_epochs=2",
]


def test_the_best_epoch_is_the_highest_top1_and_the_earliest_on_a_tie(capsys) -> None:
    history = [
        {"epoch": 1, "top1": 50.0, "top5": 90.0},
        {"epoch": 2, "top1": 70.0, "top5": 95.0},
        {"epoch": 3, "top1": 70.0, "top5": 96.0},
        {"epoch": 4, "top1": 60.0, "top5": 97.0},
    ]
    report = epoch_report(history, {"top1": 60.0}, show=True)
    assert report == {"per_epoch": history, "best_epoch": history[1]}
    assert capsys.readouterr().err == (
        "held-out top-1 per epoch: 1: 50.00, 2: 70.00, 3: 70.00, 4: 60.00; best epoch 2: 70.00% (the "
        "reference scripts' figure, chosen on these images); final weights: 60.00% (mimkit's headline)\n"
    )


@pytest.mark.slow
def test_per_epoch_accuracy_and_best_epoch_are_logged_and_survive_a_resume(tmp_path: Path) -> None:
    straight = train_classifier(build_config("finetune", [*SCRATCH, f"run.out={tmp_path / 'a'}"]))
    per_epoch = straight["per_epoch"]
    assert [e["epoch"] for e in per_epoch] == [2, 3]  # every 2 epochs, and the last
    assert straight["top1"] == per_epoch[-1]["top1"]  # the headline: the final weights
    assert straight["best_epoch"] == max(per_epoch, key=lambda e: (e["top1"], -e["epoch"]))
    log = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    logged = [(r["epoch"], r["val_top1"]) for r in log if "val_top1" in r]
    assert logged == [(e["epoch"], e["top1"]) for e in per_epoch]
    assert json.loads((tmp_path / "a" / EPOCH_EVALS_FILE).read_text()) == per_epoch

    # stopped in the third epoch (4 steps an epoch), then resumed: epoch 2's evaluation is not lost
    resumed = [*SCRATCH, f"run.out={tmp_path / 'b'}"]
    assert train_classifier(build_config("finetune", [*resumed, "run.stop_at_step=10"]))["stopped_early"]
    assert train_classifier(build_config("finetune", resumed))["per_epoch"] == per_epoch
