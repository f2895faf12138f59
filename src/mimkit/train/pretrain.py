"""`mimkit pretrain`: build the method and data from a config, train, and end with a k-NN accuracy."""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mimkit.checkpoint import remove_stale_temporaries, resolve_checkpoint, seed_all
from mimkit.configs import Config, to_yaml
from mimkit.data.loader import ViewDataset
from mimkit.data.sources import ImageSource, build_source
from mimkit.data.transforms import eval_view
from mimkit.eval.knn import check_knn_sources, knn_evaluate, loo_nn_evaluate
from mimkit.methods import build_method
from mimkit.train.distributed import DistEnv, barrier, init_distributed
from mimkit.train.engine import Trainer
from mimkit.train.log import write_json
from mimkit.train.runlock import RunLock


def run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out or f"runs/{cfg.recipe or cfg.method.name}")


def find_resume(cfg: Config, out: Path) -> Path | None:
    if cfg.run.resume == "none":
        return None
    if cfg.run.resume == "auto":
        last = out / "last.pt"
        return last if last.is_file() else None
    return resolve_checkpoint(cfg.run.resume)


def autocast_dtype(trainer: Trainer) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(trainer.precision)


def pretrain(cfg: Config, env: DistEnv | None = None) -> dict[str, Any]:
    """Pre-train ``cfg.method`` on ``cfg.data.train`` in the run folder, which it locks for the run."""
    env = env or init_distributed(cfg.run.device)
    out = run_dir(cfg)
    with RunLock(out, env):
        return _pretrain(cfg, env, out)


def _pretrain(cfg: Config, env: DistEnv, out: Path) -> dict[str, Any]:
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    method = build_method(cfg)
    seed_all(cfg.run.seed + env.rank)  # masks differ across ranks
    source = build_source(cfg.data.train, image_size=cfg.model.img_size, max_images=cfg.data.max_images)
    dataset = ViewDataset(source, method.train_transform(cfg.data), seed=cfg.run.seed)
    trainer = Trainer(method, cfg, env, out)
    params = sum(p.numel() for p in method.parameters() if p.requires_grad)
    start_run(
        cfg,
        trainer,
        out,
        f"mimkit: {cfg.method.name} on {source.name} ({len(source)} images), {params / 1e6:.2f}M trainable "
        f"parameters, {env.world_size} x {env.device}, {trainer.precision}, effective batch "
        f"{trainer.eff_batch}, lr {trainer.base_lr:.3g}; writing to {out}",
    )

    summary: dict[str, Any] = {"method": cfg.method.name, "run": str(out)}
    probes: dict[str, Callable[[torch.nn.Module], dict[str, Any]]] = {}
    if cfg.eval.val and (cfg.eval.knn or cfg.eval.lmim_nn):
        queries = build_source(cfg.eval.val, image_size=cfg.model.img_size)
        dtype = autocast_dtype(trainer)
        if cfg.eval.knn:
            bank = None if cfg.eval.train else source
            probes["knn"] = knn_probe(cfg, env, dtype, bank=bank, queries=queries)
        if cfg.eval.lmim_nn:
            probes["lmim_nn"] = nn_probe(cfg, env, dtype, queries)
    if cfg.eval.baseline and trainer.step == 0:
        for name, probe in probes.items():
            summary[f"{name}_at_init"] = probe(method.encoder)
    periodic = None
    if probes and cfg.eval.every_epochs > 0:

        def periodic(epoch: int) -> dict[str, float]:
            if epoch % cfg.eval.every_epochs or epoch == cfg.optim.epochs:
                return {}
            return {f"{name}_top1": probe(method.encoder)["top1"] for name, probe in probes.items()}

    summary.update(trainer.fit(dataset, periodic))
    if summary["skipped_images"] and env.is_main:
        print(
            f"warning: {summary['skipped_images']} unreadable images were skipped (listed above)",
            file=sys.stderr,
        )
    if not summary["stopped_early"]:
        for name, probe in probes.items():
            summary[name] = probe(method.encoder)
    if env.is_main:
        write_json(out / "summary.json", summary)
    barrier(env)
    return summary


def start_run(cfg: Config, trainer: Trainer, out: Path, description: str) -> None:
    """The resume (``run.resume``) when there is something to resume, then the run folder's config.yaml,
    the resolved config and a one-line description on stderr. The caller holds the folder's
    :class:`RunLock`, so temporary files found there are left over from a killed writer."""
    env = trainer.env
    resume_from = find_resume(cfg, out)
    if resume_from is not None:
        trainer.resume(resume_from)  # a refused resume leaves the folder as it was
    if env.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for path in remove_stale_temporaries(out):
            print(f"note: removed {path}, left by a process killed while writing it", file=sys.stderr)
        (out / "config.yaml").write_text(to_yaml(cfg))
        print(to_yaml(cfg), file=sys.stderr)
        print(description, file=sys.stderr)
        if resume_from is not None:
            print(
                f"mimkit: resumed {resume_from} at epoch {trainer.epoch}, step {trainer.step}",
                file=sys.stderr,
            )


def knn_probe(
    cfg: Config,
    env: DistEnv,
    dtype: torch.dtype | None = None,
    bank: ImageSource | None = None,
    queries: ImageSource | None = None,
) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """k-NN accuracy of an encoder with the config's eval settings; the sources are read once. The memory
    bank is eval.train, else the training images (pass the sources already read to avoid reading them
    twice)."""
    size = cfg.model.img_size
    if bank is None:
        bank = build_source(cfg.eval.train or cfg.data.train, image_size=size, max_images=cfg.data.max_images)
    if queries is None:
        queries = build_source(cfg.eval.val, image_size=size)
    # checked now rather than when the first evaluation runs, possibly after the whole training
    check_knn_sources(bank, queries, hint="eval.train, else data.train, and eval.val; or set eval.knn=false")
    return partial(
        knn_evaluate,
        train=bank,
        val=queries,
        transform=eval_view(size, cfg.data),
        env=env,
        k=cfg.eval.k,
        temperature=cfg.eval.temperature,
        pool=cfg.eval.pool,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        autocast_dtype=dtype,
    )


def nn_probe(
    cfg: Config, env: DistEnv, dtype: torch.dtype | None, queries: ImageSource
) -> Callable[[torch.nn.Module], dict[str, Any]]:
    """Latent MIM's leave-one-out 1-NN accuracy on eval.val (its own pooling: before the final norm)."""
    return partial(
        loo_nn_evaluate,
        val=queries,
        transform=eval_view(cfg.model.img_size, cfg.data),
        env=env,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        autocast_dtype=dtype,
    )
