"""Two CPU processes under torchrun (gloo) train in lock-step."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from mimkit import checkpoint
from tests.conftest import TINY

SCRIPT = textwrap.dedent("""
    import json, sys
    import torch.distributed as dist
    from mimkit.configs import build_config
    from mimkit.train.pretrain import pretrain
    out, *overrides = sys.argv[1:]
    summary = pretrain(build_config(None, overrides))
    with open(f"{out}/rank{dist.get_rank()}.json", "w") as f:
        json.dump(summary, f)
""")


EXTRA = {"mae": [], "lut": ["method.head_hidden_dim=32"], "latent_mim": ["method.proj_hidden_dim=32"]}


@pytest.mark.parametrize("method", ["mae", "lut", "latent_mim"])
def test_two_processes_stay_in_sync(tmp_path, method):
    out = tmp_path / "ddp"
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    overrides = [
        *TINY,
        f"method={method}",
        *EXTRA[method],
        f"run.out={out}",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "run.checkpoint_minutes=0",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(out),
        *overrides,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt = checkpoint.load(out / "last.pt")
    # 64 images over 2 ranks x batch 8: 4 steps, RNG states from both ranks saved for exact resume
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    for rank in range(2):
        summary = json.loads((out / f"rank{rank}.json").read_text())
        assert summary["steps"] == 4 and summary["ranks_in_sync"] is True
