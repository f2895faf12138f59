import json
import math

import pytest
import torch

from mimkit.cli import main
from mimkit.configs import ConfigError, build_config
from mimkit.data.loader import FeatureDataset
from mimkit.distributed import init_distributed
from mimkit.methods import FineTune, LinearProbe, build_method
from mimkit.methods.base import Trainable
from mimkit.models.pos_embed import resample_pos_embed
from mimkit.runs.classify import train_classifier
from mimkit.runs.pretrain import pretrain
from mimkit.train.engine import Trainer
from mimkit.train.optim import build_optimizers
from tests.conftest import TINY, straight_and_resumed

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


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrained") / "run"
    pretrain(build_config(None, [*TINY, f"run.out={out}", "optim.epochs=1", "optim.warmup_epochs=0"]))
    return str(out)


def tiny_encoder():
    torch.manual_seed(0)
    return build_method(build_config(None, TINY)).encoder


def test_layer_decay_groups_follow_the_layer_ids():
    """Spec 4.1: id 0 = cls, positions, patch embedding; block i -> i + 1; the rest (fc_norm, head) ->
    depth + 1; scale = ld^(depth + 1 - id); no decay for 1-D tensors, positions and cls."""
    cfg = build_config(None, ["method=finetune", "method.layer_decay=0.5"]).method
    model = FineTune(tiny_encoder(), cfg, num_classes=10)
    scale, decay = {}, {}
    names = {id(p): n for n, p in model.model.named_parameters()}
    for group in model.param_groups(0.05):
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == {n for n, p in model.model.named_parameters() if p.requires_grad}
    for name, value in scale.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer = 3
        assert value == pytest.approx(0.5 ** (3 - layer)), name
    assert (
        decay["pos_embed"] == decay["cls_token"] == decay["blocks.0.norm1.weight"] == decay["head.bias"] == 0
    )
    assert decay["blocks.1.attn.qkv.weight"] == decay["head.weight"] == 0.05


def test_fine_tune_model_keeps_the_pretrained_weights_and_makes_positions_learnable():
    encoder = tiny_encoder()
    cfg = build_config(None, ["method=finetune"]).method
    model = FineTune(encoder, cfg, num_classes=10)
    assert model.model.pos_embed.requires_grad and torch.equal(model.model.pos_embed, encoder.pos_embed)
    assert torch.equal(model.model.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)
    assert isinstance(model.model.norm, torch.nn.Identity) and model.model.global_pool == "avg"
    assert model.model.head.weight.std().item() < 1e-4 and model.model.blocks[1].drop_path1.drop_prob > 0
    # same grid: the table is kept exactly; another size: resampled to the new grid
    assert resample_pos_embed(encoder.pos_embed, (4, 4)) is encoder.pos_embed
    bigger = FineTune(encoder, build_config(None, ["method=finetune", "method.img_size=32"]).method, 10)
    assert bigger.model.pos_embed.shape == (1, 1 + 64, 64)
    assert bigger.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_lars_follows_maes_rule():
    """One step: 2-D tensors move by lr * trust * |w| / |g| * g (no weight decay here), 1-D ones by lr * g."""
    layer = torch.nn.Linear(4, 3)
    layer.weight.grad, layer.bias.grad = torch.randn(3, 4), torch.randn(3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    optim = build_config(None, ["optim.name=lars", "optim.weight_decay=0"]).optim
    module = Trainable()
    module.layer = layer
    opt = build_optimizers(module, optim, lr=2.0, device=torch.device("cpu"))["main"]
    opt.step()
    trust = 0.001 * w.norm() / layer.weight.grad.norm()
    torch.testing.assert_close(
        layer.weight.detach(), w - 2.0 * trust * layer.weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(layer.bias.detach(), b - 2.0 * layer.bias.grad)


def test_linear_probe_separates_separable_features(tmp_path):
    """A probe trained by the engine on cached features of 4 Gaussian clusters classifies held-out samples."""
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 64, generator=g)

    def sample(n):
        labels = torch.arange(n) % 4
        return centres[labels] + torch.randn(n, 64, generator=g), labels

    cfg = build_config(
        None,
        [
            *TASK,
            "method=linprobe",
            "optim.name=lars",
            "optim.lr=6.4",
            "optim.weight_decay=0",
            "optim.epochs=10",
            f"run.out={tmp_path}",
        ],
    )
    probe = LinearProbe(tiny_encoder(), cfg.method, num_classes=4, pool="mean")
    train_x, train_y = sample(256)
    Trainer(probe, cfg, init_distributed("cpu"), tmp_path).fit(FeatureDataset(train_x, train_y, seed=0))
    probe.eval()
    test_x, test_y = sample(200)
    accuracy = (probe.head(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.9  # chance: 0.25


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


def test_evaluations_take_exports_and_teachers(tiny_checkpoint, tmp_path, capsys):
    export = tmp_path / "encoder.safetensors"
    assert main(["export", tiny_checkpoint, "--out", str(export)]) == 0
    cfg = build_config("linprobe", [*TASK, f"method.checkpoint={export}", f"run.out={tmp_path / 'x'}"])
    assert train_classifier(cfg)["method"] == "mae"
    # a method without a teacher says so, naming what it has
    args = ["finetune", tiny_checkpoint, "--weights", "teacher", "--out", str(tmp_path / "t"), *TASK]
    assert main(args) == 2
    assert "has no 'teacher' weights; it has: student" in capsys.readouterr().err


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


RED, GREEN, BLUE = (220, 20, 20), (20, 220, 20), (20, 20, 220)


def _knn_inputs():
    from mimkit.configs import DataConfig
    from mimkit.data.transforms import eval_view

    return tiny_encoder(), eval_view(16, DataConfig(crop_pct=1.0)), init_distributed("cpu")


def test_knn_labels_classes_by_name_when_a_val_class_folder_is_empty(tmp_path, capfd):
    """A query of class c is the exact copy of a bank image of class c, so 1-NN is right on every query,
    provided c has the same label in both folders although the val folder of b is empty."""
    import re

    from mimkit.data.sources import build_source
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
    from mimkit.data.sources import build_source
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
