"""A run folder's lifecycle, shared by every run that trains: where it is, what it resumes, and what is
written there before training starts."""

from __future__ import annotations

import sys
from pathlib import Path

from mimkit.checkpoint import remove_stale_temporaries, resolve_checkpoint
from mimkit.configs import Config, to_yaml
from mimkit.train.engine import Trainer


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out or f"runs/{cfg.recipe or cfg.method.name}")


def find_resume(cfg: Config, out: Path) -> Path | None:
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        last = out / "last.pt"
        return last if last.is_file() else None
    return resolve_checkpoint(cfg.run.resume)


def start_run(
    cfg: Config, trainer: Trainer, out: Path, description: str, *, show_config: bool = True
) -> None:
    """The resume (``run.resume``) when there is something to resume, then the run folder's config.yaml,
    the resolved config and a one-line description on stderr. The caller holds the folder's
    :class:`RunLock`, so temporary files found there are left over from a killed writer. ``show_config``
    false (a sub-run of ``mimkit eval``): the config is only written, not printed."""
    env = trainer.env
    resume_from = find_resume(cfg, out)
    if resume_from is not None:
        trainer.resume(resume_from)  # a refused resume leaves the folder as it was
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(out):
            print(f"note: removed {path}, left by a process killed while writing it", file=sys.stderr)
        (out / "config.yaml").write_text(to_yaml(cfg))
        if show_config:
            print(to_yaml(cfg), file=sys.stderr)
        else:
            print(f"config: {out / 'config.yaml'}", file=sys.stderr)
        print(description, file=sys.stderr)
        if resume_from is not None:
            print(
                f"mimkit: resumed {resume_from} at epoch {trainer.epoch}, step {trainer.step}",
                file=sys.stderr,
            )
