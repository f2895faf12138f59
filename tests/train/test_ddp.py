"""Two CPU processes under torchrun (gloo) train in lock-step.

Starting two processes costs seconds (each imports torch and timm), so every two-process run of this file
is one job of a single launch (:func:`ddp_jobs`), run one after the other in the same two processes; each
test prepares nothing itself and reads what its jobs left."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook

from mimkit import checkpoint
from mimkit.configs import build_config
from mimkit.methods.base import Method
from mimkit.runs.pretrain import pretrain
from tests.conftest import TINY, subprocess_env
from tests.train.test_engine import assert_trained_alike

REPO = Path(__file__).resolve().parents[2]

# Each job: {"name", "entry" (pretrain, or a recipe of train_classifier), "overrides", "record" (a path to
# record its batches to, or null), "nan" (rank 1's second loss made NaN)}. A job's outcome per rank goes
# to {work}/{name}.outcome{r}.json: its summary, or the exception it raised. The group is closed and the
# processes leave without the interpreter's teardown, so no job's leftovers can fail the launch at exit.
JOBS_SCRIPT = textwrap.dedent("""
    import json, os, sys
    from contextlib import nullcontext
    from pathlib import Path
    import torch.distributed as dist
    from mimkit.configs import build_config
    from mimkit.distributed import cleanup
    from mimkit.runs.classify import train_classifier
    from mimkit.runs.pretrain import pretrain
    from tests.train.test_ddp import nan_on_rank_1, recorded_batches
    work = Path(sys.argv[1])
    for job in json.loads((work / "jobs.json").read_text()):
        record = recorded_batches(job["record"]) if job["record"] else nullcontext()
        nan = nan_on_rank_1() if job["nan"] else nullcontext()
        try:
            with record, nan:
                if job["entry"] == "pretrain":
                    outcome = {"summary": pretrain(build_config(None, job["overrides"]))}
                else:
                    outcome = {"summary": train_classifier(build_config(job["entry"], job["overrides"]))}
        except Exception as err:
            outcome = {"error": f"{type(err).__name__}: {err}"}
        (work / f"{job['name']}.outcome{dist.get_rank()}.json").write_text(json.dumps(outcome, default=str))
    cleanup()
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(0)
""")


@dataclass
class Launch:
    work: Path
    result: subprocess.CompletedProcess

    def outcome(self, name: str, rank: int) -> dict:
        path = self.work / f"{name}.outcome{rank}.json"
        assert path.is_file(), f"job {name} left nothing on rank {rank}:\n{self.result.stderr[-3000:]}"
        return json.loads(path.read_text())

    def summaries(self, name: str) -> list[dict]:
        """Each rank's summary of job ``name``, which must have succeeded on both."""
        outcomes = [self.outcome(name, rank) for rank in range(2)]
        for outcome in outcomes:
            assert "error" not in outcome, f"{name}: {outcome['error']}\n{self.result.stderr[-3000:]}"
        return [o["summary"] for o in outcomes]


def torchrun_two_cpus(work: Path, jobs: list[dict]) -> Launch:
    """Run ``jobs`` (see :data:`JOBS_SCRIPT`) in 2 gloo processes."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "jobs.json").write_text(json.dumps(jobs))
    script = work / "jobs.py"
    script.write_text(JOBS_SCRIPT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = subprocess_env()
    env["PYTHONPATH"] += os.pathsep + str(REPO)
    result = subprocess.run(
        [*cmd, str(script), str(work)], capture_output=True, text=True, env=env, timeout=300
    )
    return Launch(work, result)


def job(
    name: str, overrides: list[str], entry: str = "pretrain", record: Path | None = None, nan: bool = False
):
    return {
        "name": name,
        "entry": entry,
        "overrides": overrides,
        "record": str(record) if record else None,
        "nan": nan,
    }


EXTRA = {"mae": [], "lut": ["method.head_hidden_dim=32"], "latent_mim": ["method.proj_hidden_dim=32"]}
ONE_EPOCH = ["optim.epochs=1", "optim.warmup_epochs=0", "run.checkpoint_minutes=0"]
NAN_RUN = [*TINY, "optim.epochs=1", "optim.warmup_epochs=0", "optim.fused=true", "run.host_sync=log"]
NAN_RUN += ["run.log_every=100", "run.checkpoint_minutes=.inf"]
FINETUNE = [
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
]


@pytest.fixture(scope="session")
def ddp_jobs(tmp_path_factory: pytest.TempPathFactory) -> Launch:
    """One launch for every two-process run of this file. What comes before or after them on one process
    (a pre-trained encoder to fine-tune; the first and last segments of a run resumed across world sizes)
    runs here, in the test process."""
    work = tmp_path_factory.mktemp("ddp")
    pretrained = work / "pretrained"
    pretrain(build_config(None, [*TINY, f"run.out={pretrained}", *ONE_EPOCH[:2]]))
    with recorded_batches(work / "straight"):
        pretrain(build_config(None, [*TINY, f"run.out={work / 'straight'}"]))
    with recorded_batches(work / "first"):
        pretrain(build_config(None, [*TINY, f"run.out={work / 'split'}", "run.stop_at_step=3"]))
    jobs = [
        *(job(m, [*TINY, f"method={m}", *EXTRA[m], f"run.out={work / m}", *ONE_EPOCH]) for m in EXTRA),
        job("finetune", [f"method.checkpoint={pretrained}", *FINETUNE, f"run.out={work / 'ft'}"], "finetune"),
        job(
            "second",
            [*TINY, f"run.out={work / 'split'}", "optim.batch_size=4", "run.stop_at_step=11"],
            record=work / "second",
        ),
        job("clean", [*NAN_RUN, f"run.out={work / 'clean'}", "run.stop_at_step=1"]),
        job("nan", [*NAN_RUN, f"run.out={work / 'nan'}"], nan=True),  # last: it ends in an error
    ]
    launch = torchrun_two_cpus(work, jobs)
    assert launch.result.returncode == 0, launch.result.stderr[-3000:]
    shutil.copy(work / "split" / "last.pt", work / "second.pt")  # what the 2-process segment saved
    with recorded_batches(work / "third"):
        pretrain(build_config(None, [*TINY, f"run.out={work / 'split'}"]))
    return launch


@pytest.mark.slow
@pytest.mark.parametrize("method", list(EXTRA))
def test_two_processes_stay_in_sync(ddp_jobs, method):
    ckpt = checkpoint.load(ddp_jobs.work / method / "last.pt")
    # 64 images over 2 ranks x batch 8: 4 steps, RNG states from both ranks saved for exact resume
    assert ckpt["step"] == 4 and len(ckpt["rng"]) == 2
    for summary in ddp_jobs.summaries(method):
        assert summary["steps"] == 4 and summary["ranks_in_sync"] is True


@pytest.mark.slow
def test_fine_tune_with_model_ema_in_two_processes(ddp_jobs):
    """The EMA copy lives inside the DDP-wrapped module: it must stay out of DDP's gradient reduction
    (else the second step fails on parameters that got no gradient), yet be saved and stay in sync."""
    summaries = ddp_jobs.summaries("finetune")
    # the EMA weights are part of the checkpoint, so a resumed run continues the same average
    state = checkpoint.load(ddp_jobs.work / "ft" / "last.pt")["model"]
    assert any(key.startswith("ema.") for key in state)
    for summary in summaries:
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


@contextmanager
def nan_on_rank_1() -> Iterator[None]:
    """Rank 1's second training loss becomes NaN, its gradients stay finite: only rank 1 can see it."""
    import torch.distributed as dist

    calls: list[int] = []

    def explode(module: torch.nn.Module, args: tuple, out):
        if isinstance(module, Method) and module.training:
            calls.append(1)
            if dist.get_rank() == 1 and len(calls) == 2:
                return type(out)(out.loss + float("nan"), out.metrics)
        return None

    handle = register_module_forward_hook(explode)
    try:
        yield
    finally:
        handle.remove()


def global_batches(path: Path, world_size: int) -> list[list]:
    """The recorded batches of all ranks, step by step: each step's samples of every rank, sorted."""
    ranks = [json.loads(Path(f"{path}.rank{r}.json").read_text()) for r in range(world_size)]
    assert len({len(batches) for batches in ranks}) == 1
    return [sorted(sample for batch in step for sample in batch) for step in zip(*ranks, strict=True)]


@pytest.mark.slow
def test_a_run_resumes_exactly_on_another_number_of_processes(ddp_jobs):
    """Steps 1-3 on 1 process (batch 8), steps 4-11 on 2 processes (batch 4 each: the same effective
    batch), across the epoch boundary and stopped in the middle of the second epoch, steps 12-16 on 1
    process again: every step sees the samples, views and masks of the straight 1-process run, nothing
    repeated or skipped, and the weights end where the straight run's do, up to rounding."""
    work = ddp_jobs.work
    ddp_jobs.summaries("second")
    saved = checkpoint.load(work / "second.pt")
    assert (saved["step"], saved["epoch"], saved["iter"], saved["epoch_samples"]) == (11, 1, 3, 24)
    assert len(saved["rng"]) == 2
    expected = global_batches(work / "straight", 1)
    assert len(expected) == 16
    for epoch in range(2):
        indices = [sample[0] for batch in expected[8 * epoch : 8 * epoch + 8] for sample in batch]
        assert sorted(indices) == list(range(64))
    first, second, third = (
        global_batches(work / n, w) for n, w in (("first", 1), ("second", 2), ("third", 1))
    )
    assert (len(first), len(second), len(third)) == (3, 8, 5)
    for step, (got, want) in enumerate(zip(first + second + third, expected, strict=True), start=1):
        assert got == want, f"step {step}"
    a, b = (checkpoint.load(work / d / "last.pt") for d in ("straight", "split"))
    assert b["step"] == 16 and len(b["rng"]) == 1
    assert_trained_alike(b["model"], a["model"])  # the mean over 2 ranks of means over 4 is the mean over 8


@pytest.mark.slow
def test_a_nan_on_one_rank_stops_every_rank_with_the_state_before_it_without_host_syncs(ddp_jobs):
    """host_sync=log: the loss of step 2 is NaN on rank 1 only, its gradients finite. The mark is reduced
    over the ranks on the device, so rank 0 skips that update too; both stop when the marks are read (the
    epoch end) and the checkpoint is the state after step 1, as a clean run stopped there saves it."""
    for rank in range(2):
        error = ddp_jobs.outcome("nan", rank).get("error", "")
        assert error.startswith("NonFiniteLoss: loss or gradients not finite"), (rank, error)
        assert "at step 2 (epoch 0, micro-batch 1)" in error, (rank, error)
    ddp_jobs.summaries("clean")
    saved, expected = (checkpoint.load(ddp_jobs.work / d / "last.pt") for d in ("nan", "clean"))
    assert saved["step"] == 1 and saved["iter"] == 1
    for key, value in expected["model"].items():
        assert torch.equal(saved["model"][key], value), key
