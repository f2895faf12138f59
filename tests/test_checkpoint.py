"""Checkpoint files as a hostile user leaves them: truncated, random, empty, half-written, on a full disk."""

import errno
import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.models.tokenizer import DEMO_TOKENIZER as DEMO_TOKENIZER_FILE
from mimkit.runs.pretrain import pretrain
from tests.conftest import TINY, tiny_config


def _broken_files(tmp_path, good):
    data = good.read_bytes()
    files = {
        "truncated": data[: len(data) // 2],
        # fixed bytes: the safe unpickler fails on random ones with several exception types
        "random": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "random_pickle": b"R\x95\xbb\xda" + bytes(range(256)) * 4,
        "empty": b"",
    }
    for name, content in files.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
    return [tmp_path / f"{name}.pt" for name in files]


@pytest.fixture
def good_run(tmp_path):
    out = tmp_path / "good"
    pretrain(tiny_config(out, "run.stop_at_step=1"))
    return out


def test_load_names_a_broken_file(tmp_path, good_run):
    for path in _broken_files(tmp_path, good_run / "last.pt"):
        with pytest.raises(checkpoint.CheckpointError, match=rf"{path.name}: truncated or not a checkpoint"):
            checkpoint.load(path)
    # whatever the bytes, one error type (the safe unpickler raises IndexError, KeyError, ... on some)
    rng = np.random.default_rng(1)
    for i in range(300):
        path = tmp_path / f"noise{i}.pt"
        path.write_bytes(bytes(rng.integers(0, 256, 512, dtype=np.uint8)))
        with pytest.raises(checkpoint.CheckpointError, match="truncated or not a checkpoint"):
            checkpoint.load(path)


@pytest.mark.parametrize("command", ["resume", "knn", "export", "finetune", "linprobe"])
def test_every_command_reports_a_broken_checkpoint_in_one_line(tmp_path, good_run, capsys, command):
    for path in _broken_files(tmp_path, good_run / "last.pt"):
        if command == "resume":
            argv = ["pretrain", "--out", str(tmp_path / "r"), "--resume", str(path), *TINY]
        else:
            argv = [command, str(path)]
        assert main(argv) == 2, (command, path.name)
        err = capsys.readouterr().err.strip()
        assert err.splitlines()[-1].startswith(f"mimkit: error: {path}: truncated or not a checkpoint"), err
        assert "Traceback" not in err and "untrusted" not in err and "trust=True" not in err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("command", ["knn", "export", "analyze"])
def test_a_hostile_pickle_is_refused_as_unsafe_and_nothing_suggests_loading_it(
    tmp_path, capsys, monkeypatch, command
):
    monkeypatch.chdir(tmp_path)  # `analyze FILE` reports into ./analysis
    path = tmp_path / "hostile.pt"
    torch.save({"model": _RunsCode()}, path)
    assert main([command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"mimkit: error: {path}: refused as unsafe: it holds a pickled 'posix.system', which could run code "
        "when loaded; mimkit never loads such a file\n"
    )
    assert "weights_only" not in err and "truncated" not in err


def test_auto_resume_names_a_broken_last_pt(tmp_path, good_run, capsys):
    (good_run / "last.pt").write_bytes((good_run / "last.pt").read_bytes()[:1000])
    assert main(["pretrain", "--out", str(good_run), *TINY]) == 2
    assert f"{good_run / 'last.pt'}: truncated or not a checkpoint" in capsys.readouterr().err


def test_a_checkpoint_of_no_known_layout_is_named(tmp_path, capsys):
    torch.save({}, tmp_path / "empty_dict.pt")
    assert (
        main(["knn", str(tmp_path / "empty_dict.pt"), "--train", "synthetic:8", "--val", "synthetic:8"]) == 2
    )
    assert "empty_dict.pt: not an official MAE / LUT / Latent MIM layout" in capsys.readouterr().err


def test_a_broken_safetensors_export_is_named(tmp_path, capsys):
    path = tmp_path / "enc.safetensors"
    path.write_bytes(os.urandom(256))
    assert main(["knn", str(path), "--train", "synthetic:8", "--val", "synthetic:8"]) == 2
    assert f"{path}: truncated or not a safetensors file" in capsys.readouterr().err


def test_a_failed_write_leaves_no_temporary_and_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    path = checkpoint.save_atomic({"step": 1}, tmp_path / "last.pt")

    def disk_full(state, f):
        Path(f).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"could not write checkpoint '.*last\.pt': .*No space"
    ):
        checkpoint.save_atomic({"step": 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]
    assert checkpoint.load(path)["step"] == 1


def test_a_run_removes_temporaries_that_a_killed_writer_left(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    for name in (".last.pt.tmp4242", ".summary.json.tmp", ".metrics.jsonl.tmp", ".notes.tmpl"):
        (out / name).write_bytes(b"half")
    assert main(["pretrain", "--out", str(out), *TINY, "run.stop_at_step=1"]) == 0
    assert [p.name for p in out.glob(".*.tmp*")] == [".notes.tmpl"]  # a user's file is not ours to delete
    assert "removed" in capsys.readouterr().err


def test_an_output_that_is_an_input_or_a_special_file_is_refused_before_any_work(tmp_path, good_run, capsys):
    last = good_run / "last.pt"
    before = last.read_bytes()
    assert main(["export", str(good_run), "--out", str(last)]) == 2
    assert capsys.readouterr().err == (
        f"mimkit: error: --out '{last}' is the input '{last}': writing it would destroy it; give another "
        "path\n"
    )
    assert last.read_bytes() == before
    pipe = tmp_path / "pipe"
    os.mkfifo(pipe)
    assert (
        main(["knn", str(good_run), "--train", "synthetic:8", "--val", "synthetic:8", "--out", str(pipe)])
        == 2
    )
    assert f"--out '{pipe}' is not a regular file (a device, pipe or socket)" in capsys.readouterr().err
    assert stat.S_ISFIFO(pipe.stat().st_mode)  # still the pipe it was
    images = tmp_path / "X.npz"
    np.savez(images, x=np.zeros((2, 32, 32, 3), np.uint8), y=np.array([0, 1]))
    assert main(["tokenizer", "encode", "demo", str(images), "--out", str(images)]) == 2
    assert f"--out '{images}' is the input '{images}'" in capsys.readouterr().err
    assert sorted(np.load(images).files) == ["x", "y"]


def test_an_output_never_replaces_a_file_of_another_kind(tmp_path, good_run, capsys):
    """A run's config, a tokenizer or any file that is not what the command writes is never replaced; an
    earlier output of the same kind is."""
    config = good_run / "config.yaml"
    before = config.read_bytes()
    assert main(["export", str(good_run), "--out", str(config)]) == 2
    assert capsys.readouterr().err == (
        f"mimkit: error: --out '{config}' exists and is not a safetensors export: writing would replace it; "
        "give another path, or remove it first\n"
    )
    assert config.read_bytes() == before
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(good_run), "--out", str(out)]) == 0
    assert main(["export", str(good_run), "--out", str(out)]) == 0  # an earlier export is replaced
    tokenizer = tmp_path / "tok" / "tokenizer.pt"
    tokenizer.parent.mkdir()
    shutil.copy(DEMO_TOKENIZER_FILE, tokenizer)
    assert (
        main(
            ["tokenizer", "encode", str(tokenizer), "demo:val", "--max-images", "4", "--out", str(tokenizer)]
        )
        == 2
    )
    assert f"--out '{tokenizer}' is the input '{tokenizer}'" in capsys.readouterr().err
    assert tokenizer.read_bytes() == DEMO_TOKENIZER_FILE.read_bytes()
    capsys.readouterr()
    assert main(["tokenizer", "encode", "demo", "demo:val", "--max-images", "4", "--out", str(config)]) == 2
    assert "exists and is not an .npz of id grids" in capsys.readouterr().err


def test_a_failed_export_or_encode_leaves_no_partial_file_and_names_the_path(
    tmp_path, good_run, capsys, monkeypatch
):
    import safetensors.torch

    from mimkit.interop import timm as timm_export
    from mimkit.runs import tokenizer_lifecycle

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    def safetensors_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half")  # what a full disk leaves: part of the file, then the error
        raise safetensors.SafetensorError("Error while serializing: IoError(No space left on device)")

    monkeypatch.setattr(timm_export, "save_file", safetensors_full)
    out = tmp_path / "enc.safetensors"
    assert main(["export", str(good_run), "--out", str(out)]) == 2
    assert capsys.readouterr().err == (
        f"mimkit: error: could not write '{out}': Error while serializing: IoError(No space left on device)\n"
    )
    monkeypatch.setattr(tokenizer_lifecycle.np, "savez", no_space)
    ids = tmp_path / "ids.npz"
    assert main(["tokenizer", "encode", "demo", "demo:val", "--max-images", "4", "--out", str(ids)]) == 2
    assert capsys.readouterr().err == f"mimkit: error: '{ids}': No space left on device\n"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "good") == []  # no partial, no temporary


def test_a_read_only_folder_is_named_by_the_output_not_its_temporary(tmp_path, monkeypatch):
    """On a read-only file system even removing the (absent) temporary fails: that second error must not
    hide the first, which names the file asked for."""

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(args[-1]) if args else None)

    monkeypatch.setattr(torch, "save", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)
    out = tmp_path / "last.pt"
    with pytest.raises(checkpoint.CheckpointError, match=rf"could not write checkpoint '{out}': .*Read-only"):
        checkpoint.save_atomic({"a": 1}, out)
