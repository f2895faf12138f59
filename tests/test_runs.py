"""A run folder as a hostile user treats it: two runs at once, signals, a refused resume, broken images,
an output that cannot be written, a reader that goes away."""

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
from mimkit.runs.pretrain import pretrain
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


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_saves_at_the_next_step_and_the_run_resumes_exactly(tmp_path, signum):
    """SIGTERM (to the main process, as a scheduler sends it) or SIGINT (to the whole process group, as
    Ctrl-C; loader workers included) stops the run after the current step with a checkpoint; resuming
    it ends on the weights of a run never stopped."""
    overrides = [*TINY, "optim.epochs=10", "run.log_every=1"]
    out = tmp_path / "stopped"
    env = subprocess_env(threads=2)
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
    pretrain(build_config(None, [*overrides, f"run.out={tmp_path / 'straight'}"]))
    a, b = (checkpoint.load(tmp_path / d / "last.pt")["model"] for d in ("straight", "stopped"))
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_a_closed_output_pipe_ends_quietly(tmp_path):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader (`| head`) is gone before anything is written
    result = subprocess.run(
        [sys.executable, "-m", "mimkit", "recipes"],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(),
    )
    os.close(write_end)
    assert result.returncode == 141 and result.stderr == ""


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
