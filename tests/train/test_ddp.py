"""Two CPU processes under torchrun (gloo) train in lock-step."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from torch.nn.modules.module import register_module_forward_pre_hook

from mimkit import checkpoint
from mimkit.configs import build_config
from mimkit.methods.base import Method
from mimkit.runs.pretrain import pretrain
from tests.conftest import TINY, subprocess_env
from tests.train.test_engine import assert_trained_alike

REPO = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mimkit.configs import build_config
    from mimkit.runs.classify import train_classifier
    from mimkit.runs.pretrain import pretrain
    entry, out, *overrides = sys.argv[1:]
    if entry == "pretrain":
        summary = pretrain(build_config(None, overrides))
    else:
        summary = train_classifier(build_config(entry, overrides))
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(summary, f)
""")


def torchrun_two_cpus(
    tmp_path, entry: str, out, overrides: list[str], script: str = SCRIPT
) -> subprocess.CompletedProcess:
    """``script`` (by default: ``entry``, pretrain or the recipe of a linear probe / fine-tune) in 2 gloo
    processes; ``script`` may import from the tests."""
    path = tmp_path / "run.py"
    path.write_text(script)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(path),
        entry,
        str(out),
        *overrides,
    ]
    env = subprocess_env()
    env["PYTHONPATH"] += os.pathsep + str(REPO)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


EXTRA = {"mae": [], "lut": ["method.head_hidden_dim=32"], "latent_mim": ["method.proj_hidden_dim=32"]}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "lut", "latent_mim"])
def test_two_processes_stay_in_sync(tmp_path, method):
    out = tmp_path / "ddp"
    overrides = [
        *TINY,
        f"method={method}",
        *EXTRA[method],
        f"run.out={out}",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "run.checkpoint_minutes=0",
    ]
    result = torchrun_two_cpus(tmp_path, "pretrain", out, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoint.load(out / "last.pt")
    # 64 images over 2 ranks x batch 8: 4 steps, RNG states from both ranks saved for exact resume
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    for rank in range(2):
        summary = json.loads((out / f"rank{rank}.json").read_text())
        assert summary["steps"] == 4 and summary["ranks_in_sync"] is True


@pytest.mark.slow
def test_fine_tune_with_model_ema_in_two_processes(tmp_path):
    """The EMA copy lives inside the DDP-wrapped module: it must stay out of DDP's gradient reduction
    (else the second step fails on parameters that got no gradient), yet be saved and stay in sync."""
    pretrained = tmp_path / "pretrained"
    pretrain(build_config(None, [*TINY, f"run.out={pretrained}", "optim.epochs=1", "optim.warmup_epochs=0"]))
    out = tmp_path / "ft"
    overrides = [
        f"method.checkpoint={pretrained}",
        "method.model_ema=true",
        "data.train=synthetic:64",
        "eval.val=synthetic:16",
        "data.num_workers=0",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "optim.batch_size=8",
        "run.progress=false",
        "run.log_every=2",
        "run.checkpoint_minutes=0",
        f"run.out={out}",
    ]
    result = torchrun_two_cpus(tmp_path, "finetune", out, overrides)
    errors = [line for line in result.stderr.splitlines() if "Error" in line]
    assert result.returncode == 0, "\n".join(errors[:5]) + "\n" + result.stderr[-3000:]
    # the EMA weights are part of the checkpoint, so a resumed run continues the same average
    state = checkpoint.load(out / "last.pt")["model"]
    assert any(key.startswith("ema.") for key in state)
    for rank in range(2):
        summary = json.loads((out / f"rank{rank}.json").read_text())
        assert summary["steps"] == 4 and summary["ranks_in_sync"] is True
        assert "ema_top1" in summary


def sample_digests(batch: dict) -> list[list]:
    """[index, digest of the sample's views, digest of its mask noise] for each sample of a batch."""
    views = sorted(
        k for k, v in batch.items() if k != "noise" and torch.is_tensor(v) and v.is_floating_point()
    )

    def digest(*tensors: torch.Tensor) -> str:
        return hashlib.sha1(b"".join(t.detach().cpu().numpy().tobytes() for t in tensors)).hexdigest()[:16]

    return [
        [index, digest(*(batch[k][i] for k in views)), digest(batch["noise"][i])]
        for i, index in enumerate(batch["index"].tolist())
    ]


@contextmanager
def recorded_batches(path: Path | str) -> Iterator[None]:
    """Record the samples of every batch that a method is given (its forward's input, after the loader) and
    write them to ``{path}.rank{rank}.json``: a list, one entry per forward, of :func:`sample_digests`."""
    seen: list[list] = []

    def record(module: torch.nn.Module, args: tuple) -> None:
        if isinstance(module, Method) and args:
            seen.append(sample_digests(args[0]))

    handle = register_module_forward_pre_hook(record)
    try:
        yield
    finally:
        handle.remove()
        Path(f"{path}.rank{os.environ.get('RANK', '0')}.json").write_text(json.dumps(seen))


RECORDED_PRETRAIN = textwrap.dedent("""
    import sys
    from mimkit.configs import build_config
    from mimkit.runs.pretrain import pretrain
    from tests.train.test_ddp import recorded_batches
    record, out, *overrides = sys.argv[1:]
    with recorded_batches(record):
        pretrain(build_config(None, [f"run.out={out}", *overrides]))
""")


def global_batches(path: Path, world_size: int) -> list[list]:
    """The recorded batches of all ranks, step by step: each step's samples of every rank, sorted."""
    ranks = [json.loads(Path(f"{path}.rank{r}.json").read_text()) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    return [sorted(sample for batch in step for sample in batch) for step in zip(*ranks, strict=True)]


@pytest.mark.slow
def test_a_run_resumes_exactly_on_another_number_of_processes(tmp_path):
    """Steps 1-3 on 1 process (batch 8), steps 4-11 on 2 processes (batch 4 each: the same effective
    batch), across the epoch boundary and stopped in the middle of the second epoch, steps 12-16 on 1
    process again: every step sees the samples, views and masks of the straight 1-process run, nothing
    repeated or skipped, and the weights end where the straight run's do, up to rounding."""
    straight, split = tmp_path / "straight", tmp_path / "split"
    with recorded_batches(tmp_path / "straight"):
        pretrain(build_config(None, [*TINY, f"run.out={straight}"]))
    with recorded_batches(tmp_path / "first"):
        pretrain(build_config(None, [*TINY, f"run.out={split}", "run.stop_at_step=3"]))
    overrides = [*TINY, "optim.batch_size=4", "run.stop_at_step=11"]
    result = torchrun_two_cpus(tmp_path, tmp_path / "second", split, overrides, script=RECORDED_PRETRAIN)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = checkpoint.load(split / "last.pt")
    assert (saved["step"], saved["epoch"], saved["iter"], saved["epoch_samples"]) == (11, 1, 3, 24)
    assert len(saved["rng"]) == 2
    with recorded_batches(tmp_path / "third"):
        pretrain(build_config(None, [*TINY, f"run.out={split}"]))

    expected = global_batches(tmp_path / "straight", 1)
    assert len(expected) == 16
    for epoch in range(2):
        indices = [sample[0] for batch in expected[8 * epoch : 8 * epoch + 8] for sample in batch]
        assert sorted(indices) == list(range(64))
    first, second, third = (
        global_batches(tmp_path / n, w) for n, w in (("first", 1), ("second", 2), ("third", 1))
    )
    assert (len(first), len(second), len(third)) == (3, 8, 5)
    for step, (got, want) in enumerate(zip(first + second + third, expected, strict=True), start=1):
        assert got == want, f"step {step}"
    a, b = (checkpoint.load(d / "last.pt") for d in (straight, split))
    assert b["step"] == 16 and len(b["rng"]) == 1
    assert_trained_alike(b["model"], a["model"])  # the mean over 2 ranks of means over 4 is the mean over 8


NAN_ON_RANK_1 = textwrap.dedent("""
    import sys
    import torch.distributed as dist
    from torch.nn.modules.module import register_module_forward_hook
    from mimkit.configs import build_config
    from mimkit.methods.base import Method
    from mimkit.runs.pretrain import pretrain
    entry, out, *overrides = sys.argv[1:]
    calls = []

    def explode(module, args, out):
        if isinstance(module, Method) and module.training:
            calls.append(1)
            if dist.get_rank() == 1 and len(calls) == 2:
                # a NaN that leaves the gradients finite: only rank 1 can see it
                return type(out)(out.loss + float("nan"), out.metrics)

    register_module_forward_hook(explode)
    pretrain(build_config(None, overrides))
""")


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_state_before_it_without_host_syncs(tmp_path):
    """host_sync=log: the loss of step 2 is NaN on rank 1 only, its gradients finite. The mark is reduced
    over the ranks on the device, so rank 0 skips that update too; both stop when the marks are read (the
    epoch end) and the checkpoint is the state after step 1, as a clean run stopped there saves it."""
    overrides = [*TINY, "optim.epochs=1", "optim.warmup_epochs=0", "optim.fused=true", "run.host_sync=log"]
    overrides += ["run.log_every=100", "run.checkpoint_minutes=.inf"]
    out, clean = tmp_path / "nan", tmp_path / "clean"
    result = torchrun_two_cpus(
        tmp_path, "pretrain", out, [*overrides, f"run.out={out}"], script=NAN_ON_RANK_1
    )
    assert result.returncode != 0
    stops = [
        line for line in result.stderr.splitlines() if "NonFiniteLoss: loss or gradients not finite" in line
    ]
    assert len(stops) == 2 and all("at step 2 (epoch 0, micro-batch 1)" in line for line in stops), stops
    result = torchrun_two_cpus(
        tmp_path, "pretrain", clean, [*overrides, f"run.out={clean}", "run.stop_at_step=1"]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    saved, expected = (checkpoint.load(d / "last.pt") for d in (out, clean))
    assert saved["step"] == 1 and saved["iter"] == 1
    for key, value in expected["model"].items():
        assert torch.equal(saved["model"][key], value), key
