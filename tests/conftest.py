from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

import mimkit
from mimkit.configs import Config, build_config

# the cores this process may use, shared among the test processes (pytest-xdist: PYTEST_XDIST_WORKER_COUNT)
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
torch.set_num_threads(max(1, CORES // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))


def pytest_xdist_auto_num_workers(config: pytest.Config) -> int:
    """`-n auto`: one test process per core this process may use (not per core of the machine), at most
    4 (each imports torch and holds its own copies of the session fixtures)."""
    return max(1, min(CORES, 4))


TINY = [
    "model.arch=vit_tiny",
    "model.img_size=16",
    "model.patch_size=4",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "method.decoder_embed_dim=32",
    "method.decoder_depth=1",
    "method.decoder_num_heads=2",
    "data.train=synthetic:64",
    "data.num_workers=0",
    "data.crop_pct=1.0",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.batch_size=8",
    "optim.lr=1e-3",
    "run.progress=false",
    "run.log_every=2",
    "eval.knn=false",
]


@pytest.fixture(autouse=True)
def token_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Token datasets' decoded caches go to a temporary folder, not the user's ~/.cache."""
    monkeypatch.setenv("MIMKIT_CACHE", str(tmp_path_factory.getbasetemp() / "mimkit-cache"))


@pytest.fixture(scope="session")
def demo_tokenizer():
    """The tokenizer shipped in the package."""
    from mimkit.models.tokenizer import load_tokenizer

    return load_tokenizer("demo")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run folder of one epoch of the tiny MAE, for the runs that start from a pre-trained encoder."""
    from mimkit.runs.pretrain import pretrain

    out = tmp_path_factory.mktemp("pretrained") / "run"
    pretrain(build_config(None, [*TINY, f"run.out={out}", "optim.epochs=1", "optim.warmup_epochs=0"]))
    return str(out)


def subprocess_env(threads: int = 1) -> dict[str, str]:
    """The environment for a child process that must import the same mimkit as the tests (not whichever
    one is installed), with ``threads`` CPU threads."""
    paths = [str(Path(mimkit.__file__).resolve().parents[1]), os.getcwd()]
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(paths)}


def tiny_config(out: Path | str, *overrides: str) -> Config:
    """A depth-2, width-64 MAE on 16 px synthetic images: a few seconds per epoch on a CPU."""
    return build_config(None, [*TINY, f"run.out={out}", *overrides])


@pytest.fixture
def tiny(tmp_path: Path):
    def make(*overrides: str, out: str = "run") -> Config:
        return tiny_config(tmp_path / out, *overrides)

    return make


def straight_and_resumed(
    overrides: list[str], tmp_path: Path, stop_at: int, run: Any = None
) -> tuple[dict, dict, dict]:
    """Train (``run``: pretrain, or another entry point of the engine) once straight through and once
    stopped at step ``stop_at`` then resumed; returns both final model state dicts and the straight run's
    summary."""
    from mimkit import checkpoint
    from mimkit.runs.pretrain import pretrain

    run = run or pretrain
    summary = run(build_config(None, [*overrides, f"run.out={tmp_path / 'a'}"]))
    run(build_config(None, [*overrides, f"run.out={tmp_path / 'b'}", f"run.stop_at_step={stop_at}"]))
    run(build_config(None, [*overrides, f"run.out={tmp_path / 'b'}"]))
    a, b = (checkpoint.load(tmp_path / d / "last.pt")["model"] for d in "ab")
    return a, b, summary
