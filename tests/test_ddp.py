"""Two CPU processes under torchrun (gloo) train in lock-step."""

import json
import subprocess
import sys
import textwrap

import pytest

from mimkit import checkpoint
from mimkit.configs import build_config
from mimkit.runs.pretrain import pretrain
from tests.conftest import TINY, subprocess_env

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


def torchrun_two_cpus(tmp_path, entry: str, out, overrides: list[str]) -> subprocess.CompletedProcess:
    """``entry`` (pretrain, or the recipe of a linear probe / fine-tune) in 2 gloo processes."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        entry,
        str(out),
        *overrides,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), timeout=300)


EXTRA = {"mae": [], "lut": ["method.head_hidden_dim=32"], "latent_mim": ["method.proj_hidden_dim=32"]}


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
