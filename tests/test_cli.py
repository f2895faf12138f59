import json
import os
import stat
import subprocess
import sys

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mimkit.cli import main
from mimkit.configs import RECIPE_DIR, to_dict
from mimkit.interop.load import load_encoder
from mimkit.methods import build_method
from tests.conftest import TINY, subprocess_env, tiny_config


@pytest.mark.slow
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
    old_umask = os.umask(0o077)  # a restrictive umask, as on shared machines: the export stays readable
    try:
        assert main(["export", str(out), "--out", str(export)]) == 0
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(export.stat().st_mode) == 0o600  # 0644 less the umask, never wider
    assert main(["export", str(out), "--out", str(tmp_path / "open.safetensors")]) == 0
    assert stat.S_IMODE((tmp_path / "open.safetensors").stat().st_mode) == 0o644 & ~old_umask
    printed = capsys.readouterr().out
    assert (
        "global_pool='avg'" in printed and "fc_norm=False" in printed and "pretrained_cfg_overlay=" in printed
    )
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    kwargs = json.loads(meta["timm_kwargs"])
    model = timm.create_model(meta["timm_model"], **kwargs)
    model.load_state_dict(load_file(export), strict=True)
    ckpt = torch.load(out / "last.pt", weights_only=True)
    assert torch.equal(
        model.state_dict()["blocks.1.mlp.fc2.weight"], ckpt["model"]["encoder.blocks.1.mlp.fc2.weight"]
    )
    # timm's data config is mimkit's evaluation view, and its pooled feature is the run's k-NN feature
    data = timm.data.resolve_data_config({}, model=model)
    assert tuple(data["input_size"]) == (3, 16, 16)
    assert data["crop_pct"] == 1.0 and data["interpolation"] == "bicubic"
    assert list(data["mean"]) == pytest.approx([0.485, 0.456, 0.406])
    assert list(data["std"]) == pytest.approx([0.229, 0.224, 0.225])
    assert load_encoder(str(export))[1]["probe_pool"] == "mean"  # mimkit knn on the export: the same feature
    encoder, _ = load_encoder(str(out))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), encoder.eval().features(x, pool="mean"))
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


@pytest.mark.slow
def test_print_config_prints_the_overridden_config(capsys):
    assert main(["pretrain", "--print-config", "optim.epochs=7"]) == 0
    assert "  epochs: 7\n" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_runs_the_cli_and_a_closed_output_pipe_ends_quietly():
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head`) is gone before anything is written
    result = subprocess.run(
        [sys.executable, "-m", "mimkit", "pretrain", "--print-config", "optim.epochs=7"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--k", "0", "--k must be at least 1; got 0"),
        ("--k", "-5", "--k must be at least 1; got -5"),
        ("--temperature", "0", "--temperature must be > 0; got 0.0"),
        ("--temperature", "-0.07", "--temperature must be > 0; got -0.07"),
    ],
)
def test_knn_options_of_zero_are_errors_not_the_defaults(tmp_path, capsys, option, value, message):
    # checked before the checkpoint is read
    assert main(["knn", str(tmp_path / "missing"), option, value]) == 2
    assert f"mimkit: error: {message}\n" in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            [*TINY, "method=latent_mim", "method.num_vis=16"],
            "'method.num_vis' must lie in [1, 15] for 16 patches; got 16",
        ),
        ([*TINY, "model.img_size=18"], "'model.img_size' (18) must be divisible by 'model.patch_size' (4)"),
        (
            [*TINY, "method.decoder_num_heads=3"],
            "'method.decoder_embed_dim' (32) must be divisible by 'method.decoder_num_heads' (3)",
        ),
        (["model.arch=vit_bsae"], "'model.arch' must be one of"),
        (["method=linprobe"], "'linprobe' is an evaluation, not a pre-training method"),
    ],
)
def test_pretrain_print_config_runs_the_checks_training_runs(capsys, overrides, message):
    assert main(["pretrain", "--print-config", *overrides]) == 2
    captured = capsys.readouterr()
    assert f"mimkit: error: {message}" in captured.err and captured.out == ""


def untrained_run(folder) -> str:
    """A run folder whose last.pt holds a freshly built tiny MAE: enough for linprobe / finetune to load."""
    cfg = tiny_config(folder)
    folder.mkdir(parents=True)
    torch.save({"config": to_dict(cfg), "model": build_method(cfg).state_dict()}, folder / "last.pt")
    return str(folder)


@pytest.mark.parametrize(
    "command, overrides, message",
    [
        ("linprobe", [], "linprobe needs 'eval.val': labelled images to measure the accuracy on"),
        (
            "finetune",
            ["eval.val=synthetic:8", "optim.batch_size=7"],
            "Mixup/CutMix pair images within a batch: 'optim.batch_size' must be even; got 7",
        ),
        ("finetune", ["eval.val=synthetic:8", "method.img_size=0"], "'method.img_size' must be at least 1"),
    ],
)
def test_task_print_config_runs_the_checks_training_runs(tmp_path, capsys, command, overrides, message):
    run = untrained_run(tmp_path / "run")  # its config names no eval.val
    assert main([command, run, "--print-config", *overrides]) == 2
    captured = capsys.readouterr()
    assert f"mimkit: error: {message}" in captured.err and captured.out == ""
    assert main([command, run, "--print-config", "eval.val=synthetic:8"]) == 0


def test_version_and_recipe_descriptions_in_whole_sentences(capsys):
    from mimkit.cli_commands import recipe_summary

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("mimkit ")
    text = "# One idea (with a\n# parenthesis) that runs over: two lines.\n# More.\nmodel:\n"
    assert recipe_summary(text) == "One idea (with a parenthesis) that runs over"
    assert recipe_summary("# A (b: c) d. E.\n") == "A (b: c) d."  # a colon inside brackets is not an end
    assert main(["recipes"]) == 0
    listed = capsys.readouterr().out
    assert "mtm_demo" in listed and "finetune_tokens" in listed
    for path in RECIPE_DIR.glob("*.yaml"):  # no description is cut inside a parenthesis
        summary = recipe_summary(path.read_text())
        assert summary and summary.count("(") == summary.count(")"), (path.name, summary)


def test_progress_without_a_terminal_is_plain_timed_lines(capsys):
    from mimkit.progress import PlainProgress

    bar = PlainProgress(100, "features of demo:val", "img", interval=0.0)
    bar.update(40)
    bar.update(60)
    bar.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("features of demo:val: 40/100 img (") and "eta" in lines[0]
    assert lines[1].startswith("features of demo:val: 100/100 img (")
    quiet = PlainProgress(100, "x", interval=3600.0)
    quiet.update(100)
    quiet.close()  # within the interval: nothing to say
    assert capsys.readouterr().err == ""


def test_a_run_without_a_terminal_says_it_is_alive_between_logged_steps(tmp_path, capsys, monkeypatch):
    from mimkit.train import log

    monkeypatch.setattr(log, "PLAIN_INTERVAL", 0.0)
    logger = log.RunLogger(tmp_path, enabled=True, total=10, initial=0, progress=True, tensorboard=False)
    logger.advance(3)
    logger.scalars(3, {"loss": 1.5}, epoch=0.3)
    logger.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("3/10 it, eta ") and lines[1].startswith("step 3 epoch 0.30 loss 1.5 eta ")


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (
            ["tokenize", "demo", "demo:val", "OUT"],
            "; the same command again resumes at the first shard not written",
        ),
        (["pretrain", "--out", "OUT"], "; --resume auto continues from the last checkpoint saved, if any"),
        (["knn", "OUT"], ""),
    ],
)
def test_a_second_ctrl_c_says_what_continues_in_the_commands_own_words(
    tmp_path, capsys, monkeypatch, argv, said
):
    import mimkit.cli_commands as cli_commands

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    for name in ("tokenize", "pretrain", "knn"):
        monkeypatch.setattr(cli_commands, name, interrupted)
    assert main([a.replace("OUT", str(tmp_path / "x")) for a in argv]) == 130
    assert capsys.readouterr().err == f"mimkit: interrupted at once{said}\n"
