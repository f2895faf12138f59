"""Pre-training runs (mimkit.runs.pretrain): a run folder as a hostile user treats it (two runs at once,
signals, a refused resume, broken images, an output that cannot be written, a reader that goes away),
and the token default end to end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.configs import build_config
from mimkit.runs.pretrain import pretrain, quality_warnings
from mimkit.runs.tokenize import tokenize
from tests.conftest import TINY, subprocess_env


def test_a_second_run_on_a_locked_folder_names_the_holder_and_touches_nothing(tmp_path, capsys):
    from mimkit.runs.lock import RunLock

    out = tmp_path / "run"
    with RunLock(out):
        assert main(["pretrain", "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err
        assert (
            f"run folder '{out}' is in use by another run (pid {os.getpid()} on {socket.gethostname()}" in err
        )
        assert sorted(p.name for p in out.iterdir()) == [".lock"]  # no config.yaml, logs or checkpoint
    # the lock ends with its holder
    assert main(["pretrain", "--out", str(out), *TINY, "run.stop_at_step=1"]) == 0


def test_a_refused_resume_leaves_config_yaml_alone(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["pretrain", "--out", str(out), *TINY, "run.stop_at_step=1"]) == 0
    before = (out / "config.yaml").read_text()
    assert main(["pretrain", "--out", str(out), *TINY, "model.depth=3"]) == 2
    assert "model.depth: 2 -> 3" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == before


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["pretrain", "--out", str(blocker / "run"), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mimkit: error: cannot use run folder '{blocker / 'run'}': Not a directory"


def test_an_unreadable_image_is_reported_and_counted_once(tmp_path, capsys):
    data = tmp_path / "images"
    for label in ("a", "b"):
        (data / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(data / label / f"{i}.png")
    (data / "a" / "broken.png").write_bytes(b"not a png")
    # one batch of all 7 images per epoch: the broken one is met in each of 3 epochs
    args = ["pretrain", "--out", str(tmp_path / "run"), *TINY, f"data.train={data}", "optim.batch_size=7"]
    assert main([*args, "optim.epochs=3"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: skipped unreadable image") == 1 and str(data / "a" / "broken.png") in err
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["skipped_images"] == 1


def _wait_for_rows(path, rows, process, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and path.read_text().count("\n") >= rows:
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before it was signalled: {process.stderr.read()[-2000:]}")
        time.sleep(0.02)
    pytest.fail("the run logged nothing in time")


TEN_EPOCHS = [*TINY, "optim.epochs=10", "run.log_every=1"]


@pytest.fixture(scope="module")
def ten_epochs(tmp_path_factory):
    """The run that the stopped and resumed ones must end as."""
    out = tmp_path_factory.mktemp("straight") / "run"
    pretrain(build_config(None, [*TEN_EPOCHS, f"run.out={out}"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_the_next_step_and_the_run_resumes_exactly(tmp_path, signum, ten_epochs):
    """SIGTERM (to the main process, as a scheduler sends it) or SIGINT (to the whole process group, as
    Ctrl-C; loader workers included) stops the run after the current step with a checkpoint; resuming
    it ends on the weights of a run never stopped."""
    overrides = TEN_EPOCHS
    out = tmp_path / "stopped"
    # the threads of this process: a run resumed on another number of CPU threads is equal only up to rounding
    env = subprocess_env(threads=torch.get_num_threads())
    cmd = [sys.executable, "-m", "mimkit", "pretrain", "--out", str(out), *overrides, "data.num_workers=2"]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    _wait_for_rows(out / "metrics.jsonl", 3, process)
    if signum == signal.SIGINT:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err[-3000:]
    name = signal.Signals(signum).name
    saved = checkpoint.load(out / "last.pt")
    assert f"stopped by {name} at step {saved['step']} " in err and "Run the same command again" in err
    assert 3 <= saved["step"] < 10 * 8 and "Traceback" not in err

    # the same batches without workers (each image's view depends on (seed, epoch, index) only)
    assert main(["pretrain", "--out", str(out), *overrides]) == 0
    a, b = (checkpoint.load(d / "last.pt")["model"] for d in (ten_epochs, out))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_run_killed_hard_does_not_leave_its_folder_locked(tmp_path):
    """kill -9 leaves no chance to clean up, and loader workers outlive their parent for a few seconds:
    the lock must go with the parent (the workers drop their inherited copy of it)."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "mimkit", "pretrain", "--out", str(out), *TINY, "optim.epochs=30"]
    cmd += ["run.log_every=1", "data.num_workers=2"]
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=subprocess_env(threads=2)
    )
    _wait_for_rows(out / "metrics.jsonl", 2, process)
    process.kill()
    process.wait(timeout=30)
    assert main(["pretrain", "--out", str(out), *TINY, "optim.epochs=30", "run.stop_at_step=1"]) == 0


def test_a_run_that_fails_to_start_leaves_no_folder_and_names_the_key(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    assert main(["pretrain", "--config", "mae_cifar10", "--out", str(out), "data.train=/no/cifar"]) == 2
    assert "mimkit: error: data.train: data path '/no/cifar' does not exist" in capsys.readouterr().err
    assert not out.exists()
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["pretrain", "--out", str(out), "eval.val=/no/val", *TINY[:-1]]) == 2
    assert "mimkit: error: eval.val: data path '/no/val' does not exist" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]  # the user's folder stays, unlocked


def test_runs_whose_figures_mean_nothing_say_so():
    summary = {
        "knn": {"top1": 20.4},
        "knn_at_init": {"top1": 25.8},
        "last_logged": {"masked_token_acc": 0.0044, "masked_token_majority": 0.0151},
    }
    knn, tokens = quality_warnings(summary)
    assert knn.startswith("the final k-NN top-1 20.40% is not above the encoder at initialisation (25.80%)")
    assert tokens.startswith(
        "masked-token accuracy 0.44% is no better than always answering the most common id (1.51%)"
    )
    fine = {
        "knn": {"top1": 30.0},
        "knn_at_init": {"top1": 25.8},
        "last_logged": {"masked_token_acc": 0.06, "masked_token_majority": 0.015},
    }
    assert quality_warnings(fine) == []


def test_the_token_default_recipe_reads_the_demo_through_the_shipped_tokenizer():
    cfg = build_config("mtm_demo")
    assert (cfg.data.train, cfg.data.tokenizer, cfg.eval.val) == ("demo:train", "demo", "demo:val")
    assert cfg.model.stem == "token_ids" and cfg.eval.baseline


@pytest.mark.slow
def test_the_token_default_runs_end_to_end_and_keeps_its_baseline_through_a_resume(tmp_path):
    """mtm_demo at a tiny size: images tokenized by the shipped tokenizer, k-NN beside the encoder at
    initialisation, the masked-token accuracy beside its majority baseline; a resumed run still has the
    at-initialisation figure of its first session."""
    from mimkit.runs.pretrain import pretrain

    sizes = ("model.embed_dim", "model.depth", "model.num_heads", "method.decoder")
    small = [
        *(o for o in TINY if o.startswith(sizes)),  # the tests' depth-2, width-64 model
        "data.max_images=64",
        "data.num_workers=0",
        "optim.epochs=2",
        "optim.batch_size=16",
        "eval.every_epochs=0",
        "eval.lmim_nn=true",  # the leave-one-out 1-NN reads demo:val through the tokenizer too
        "run.progress=false",
        f"run.out={tmp_path / 'run'}",
    ]
    first = pretrain(build_config("mtm_demo", [*small, "run.stop_at_step=3"]))
    assert first["stopped_early"] and "knn" not in first
    resumed = pretrain(build_config("mtm_demo", small))
    assert resumed["knn_at_init"] == first["knn_at_init"]
    assert resumed["knn"]["val"] == "demo:val (tokenized by demo)" and resumed["knn"]["val_images"] == 500
    assert resumed["lmim_nn"]["val"] == "demo:val (tokenized by demo)"
    last = resumed["last_logged"]
    assert 0 < last["masked_token_majority"] < 1 and "masked_token_acc" in last
    assert isinstance(resumed["warnings"], list)


def test_evaluation_data_a_model_cannot_read_stop_the_run_before_its_first_step(tmp_path):
    """Tokens of another vocabulary as eval.val: refused when the run starts, not after it trained."""
    from mimkit.models.tokenizer import TokenizerShape, VQTokenizer, save_tokenizer
    from mimkit.runs.pretrain import pretrain

    torch.manual_seed(0)
    shape = TokenizerShape(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=32)
    save_tokenizer(
        VQTokenizer(shape, kmeans_init=False).eval(),
        tmp_path / "other" / "tokenizer.pt",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
    )
    tokenize(
        str(tmp_path / "other"), "demo:val", str(tmp_path / "other-tokens"), max_images=16, progress=False
    )
    sizes = ("model.embed_dim", "model.depth", "model.num_heads", "method.decoder")
    small = [*(o for o in TINY if o.startswith(sizes)), "data.max_images=32", "data.num_workers=0"]
    out = tmp_path / "run"
    cfg = build_config("mtm_demo", [*small, f"eval.val={tmp_path / 'other-tokens'}", f"run.out={out}"])
    with pytest.raises(
        ValueError, match=r"has 32 codes but the encoder embeds 384: its ids would mean other"
    ):
        pretrain(cfg)
    assert not out.exists()  # no step, no checkpoint, no folder


def test_a_separate_memory_bank_is_read_for_the_end_of_run_knn(tmp_path):
    from mimkit.runs.pretrain import pretrain

    knn = [o for o in TINY if o != "eval.knn=false"]
    cfg = build_config(
        None,
        [*knn, "optim.epochs=1", "eval.train=synthetic:32", "eval.val=synthetic:16", f"run.out={tmp_path}"],
    )
    summary = pretrain(cfg)
    assert summary["knn"]["train_images"] == 32 and summary["knn"]["val_images"] == 16
