"""`mimkit linprobe` and `mimkit finetune`: train a classifier on a checkpoint's encoder with the engine,
then report its accuracy; the run folder is like pre-training's (last.pt, metrics.jsonl, tb/,
summary.json, exact resume)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mimkit.checkpoint import seed_all
from mimkit.configs import Config, ConfigError, build_config
from mimkit.data.loader import ViewDataset
from mimkit.data.source_spec import build_source, source_for, tokenized_for
from mimkit.data.sources import check_same_classes
from mimkit.data.token_sources import check_input, needs_vocab, vocab_from_data
from mimkit.distributed import DistEnv, barrier, init_distributed
from mimkit.eval.features import chance_warning, classify
from mimkit.interop.load import load_encoder
from mimkit.methods import TASKS, encoder_from_config
from mimkit.methods.linprobe import cached_features
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import absolute_tokenizer
from mimkit.models.vit import ViTEncoder
from mimkit.runs.folder import run_dir, start_run
from mimkit.runs.lock import RunLock
from mimkit.train.engine import Trainer, autocast_dtype
from mimkit.train.log import write_json


def task_config(
    kind: str, checkpoint: str, info: dict, recipe: str | None, overrides: list[str], out: str | None
) -> Config:
    """A linear-probe or fine-tune config for ``checkpoint`` (``info``: what load_encoder said of it): the
    recipe (default: the small generic one), then what the checkpoint says where the overrides say nothing
    (its evaluation crop, its own labelled data), then the overrides. The crop is the encoder's input
    spec's, not the recipe's, unless ``data.crop_pct`` is given; the normalisation is always the spec's
    (:func:`train_classifier` sets it)."""
    given = {o.split("=", 1)[0] for o in overrides}
    spec: InputSpec = info["input_spec"]
    if recipe is None and kind == "finetune" and spec.kind != "pixels":
        recipe = "finetune_tokens"  # SeiT++'s recipe: token views, avg_norm, the sqrt rule
    run = out or f"{Path(checkpoint).with_suffix('')}-{kind}"
    defaults = [f"method.checkpoint={checkpoint}", f"run.out={run}"]
    if "data.crop_pct" not in given:
        defaults.append(f"data.crop_pct={spec.crop_pct}")
    ignored = sorted(given & {"data.mean", "data.std"})
    if ignored:
        print(
            f"note: {' and '.join(ignored)} not used: an encoder is fed the normalisation it was trained on "
            f"(mean {list(spec.mean)}, std {list(spec.std)})",
            file=sys.stderr,
        )
    source_cfg = info.get("config")
    if source_cfg is not None:  # the run's own data beat the recipe's; the command line beats both
        if "data.train" not in given:
            defaults.append(f"data.train={source_cfg.eval.train or source_cfg.data.train}")
        if not given & {"eval.val", "data.val_fraction"} and source_cfg.eval.val:
            defaults.append(f"eval.val={source_cfg.eval.val}")
        if "data.tokenizer" not in given:  # null too: a run on token data reads the tokenizer they record
            defaults.append(f"data.tokenizer={source_cfg.data.tokenizer or 'null'}")
    return build_config(recipe or kind, [*defaults, *overrides])


SCRATCH = "scratch"  # method.checkpoint of a supervised run from a new encoder


def scratch_encoder(cfg: Config) -> tuple[ViTEncoder, dict[str, Any]]:
    """A new encoder of ``cfg.model`` (a token-id one takes its vocabulary from data.train), for a
    supervised run from scratch such as SeiT's; described as load_encoder describes a checkpoint's."""
    if cfg.method.name != "finetune":
        raise ConfigError(f"method.checkpoint={SCRATCH} trains a new encoder: it needs method=finetune")
    if needs_vocab(cfg.model):
        vocab_from_data(cfg.model, build_source(cfg.data.train, max_images=1, tokenizer=cfg.data.tokenizer))
    torch.manual_seed(cfg.run.seed)
    encoder = encoder_from_config(cfg.model, cfg.data)
    info = {
        "method": SCRATCH,
        "input_spec": encoder.input_spec,
        "weights": "student",
        "probe_pool": "mean",
        "config": None,
    }
    return encoder, info


def check_task(cfg: Config) -> None:
    """What :func:`train_classifier` checks before it reads any data, beyond the config's own checks."""
    task = cfg.method
    if task.name not in TASKS:
        raise ConfigError(f"'method' must be linprobe or finetune here; got {task.name!r}")
    if not task.checkpoint:
        raise ConfigError(
            f"{task.name} needs 'method.checkpoint': the run, checkpoint or export to evaluate (or "
            f"'{SCRATCH}' for a new encoder)"
        )
    if not cfg.eval.val:
        raise ConfigError(f"{task.name} needs 'eval.val': labelled images to measure the accuracy on")


def train_classifier(
    cfg: Config,
    env: DistEnv | None = None,
    loaded: tuple[ViTEncoder, dict] | None = None,
    *,
    show_config: bool = True,
) -> dict[str, Any]:
    """Train a linear probe or fine-tune (``cfg.method``) with the engine, then report top-1/top-5 on
    eval.val. Writes the run folder like ``pretrain`` (last.pt, metrics.jsonl, tb/, summary.json).
    ``loaded``: the (encoder, info) of ``load_encoder`` when the caller has read the checkpoint already;
    it is used if it holds the weights the config asks for. data.train and eval.val must name the same
    classes (checked before training: a label is a class index, so otherwise the accuracy is wrong).
    The views follow the encoder's input spec: its size (unless fine-tuning sets one) and normalisation,
    and the evaluation crop ``data.crop_pct`` (the spec's when the config comes from :func:`task_config`
    without one given)."""

    check_task(cfg)
    task = cfg.method
    env = env or init_distributed(cfg.run.device)
    if task.checkpoint == SCRATCH:
        encoder, info = scratch_encoder(cfg)
    elif loaded is not None and loaded[1]["weights"] == task.weights:
        encoder, info = loaded
    else:
        encoder, info = load_encoder(task.checkpoint, task.weights)
    spec = encoder.input_spec
    if spec.kind == "token_embeddings" and task.name != "finetune":
        raise ConfigError(
            f"{task.checkpoint}: its encoder takes codebook vectors, which only fine-tuning feeds it (the "
            "token dataset's ids through the codebook)"
        )
    if spec.kind == "pixels":  # recorded in the run's config: the normalisation the views use (the encoder's)
        cfg.data.mean, cfg.data.std = spec.mean, spec.std
    for key in ("normalize", "decode"):
        if getattr(cfg.data, key) == "device":
            raise ConfigError(
                f"data.{key}=device is for pre-training; {task.name} makes its views in the loader (leave "
                f"data.{key} at its default)"
            )
    size = getattr(task, "img_size", None) or spec.img_size
    source = source_for(
        "data.train",
        cfg.data.train,
        image_size=size,
        max_images=cfg.data.max_images,
        decode_size=cfg.data.decode_size,
    )
    if not source.has_labels:
        raise ConfigError(f"data.train '{source.name}' has no labels; {task.name} needs them")
    val = source_for("eval.val", cfg.eval.val, image_size=size)
    if not val.has_labels:
        raise ConfigError(f"eval.val '{val.name}' has no labels; {task.name} needs them to measure accuracy")
    check_same_classes(source, val)
    trained_on = info["config"].data.train if info.get("config") else None
    if cfg.data.tokenizer:
        cfg.data.tokenizer = absolute_tokenizer(cfg.data.tokenizer)
    source, val = tokenized_for(spec, [source, val], trained_on, cfg.data.tokenizer)
    for data in (source, val):  # token ids of the encoder's vocabulary for a token model, else images
        check_input(spec, data)
    num_classes = task.num_classes or len(source.classes)
    torch.manual_seed(cfg.run.seed)  # the same head on every rank
    # what the classifier takes: the encoder's input, evaluated at this run's crop
    task_spec = replace(spec, crop_pct=cfg.data.crop_pct)
    module = TASKS[task.name].build(encoder, {**info, "input_spec": task_spec}, task, num_classes)
    module.use_data(source)
    seed_all(cfg.run.seed + env.rank)  # drop path and Mixup differ across ranks, and repeat across runs
    out = run_dir(cfg)
    with RunLock(out, env):  # one run per folder, for the whole run
        trainer = Trainer(module, cfg, env, out)
        dtype = autocast_dtype(trainer.precision, env.device)
        eval_kwargs = dict(batch_size=cfg.eval.batch_size, num_workers=cfg.data.num_workers, dtype=dtype)
        if getattr(task, "cached", False):
            dataset = cached_features(module, source, cfg, env, dtype)
        else:
            dataset = ViewDataset(source, module.train_transform(cfg.data), seed=cfg.run.seed)
        start_run(
            cfg,
            trainer,
            out,
            f"mimkit: {task.name} of {task.checkpoint} ({info['method']}, {task.weights}) on {source.name} "
            f"({len(dataset)} samples, {num_classes} classes), effective batch {trainer.eff_batch}, lr "
            f"{trainer.base_lr:.3g}; writing to {out}",
            show_config=show_config,
        )
        summary: dict[str, Any] = {"protocol": task.name, "checkpoint": task.checkpoint}
        summary["weights"] = task.weights
        view = module.eval_transform(cfg.data)
        history = read_epoch_evals(out, trainer.epoch) if cfg.eval.every_epochs > 0 else []
        periodic = None
        final: list[dict[str, Any]] = []  # the last epoch's evaluation: the final weights'
        if cfg.eval.every_epochs > 0:

            def periodic(epoch: int) -> dict[str, float]:
                """The held-out accuracy every ``eval.every_epochs`` epochs (and at the last), kept in the
                run folder so that a resumed run still knows its best epoch."""
                if epoch % cfg.eval.every_epochs and epoch != cfg.optim.epochs:
                    return {}
                result = classify(module, module.logits, val, view, env, **eval_kwargs)
                final[:] = [result] if epoch == cfg.optim.epochs else []
                history.append({"epoch": epoch, **{k: result[k] for k in ("top1", "top5") if k in result}})
                if env.is_main:
                    write_json(out / EPOCH_EVALS_FILE, history)
                return {f"val_{k}": v for k, v in history[-1].items() if k != "epoch"}

        summary.update(trainer.fit(dataset, periodic))
        if not summary["stopped_early"]:
            summary.update({"method": info["method"], "val": val.name, "epochs": cfg.optim.epochs})
            summary.update(
                final[0] if final else classify(module, module.logits, val, view, env, **eval_kwargs)
            )
            if history:
                summary.update(epoch_report(history, summary, env.is_main))
            if getattr(module, "ema", None) is not None:
                ema = classify(module, lambda x: module.logits(x, ema=True), val, view, env, **eval_kwargs)
                summary.update({f"ema_{k}": v for k, v in ema.items()})
            summary["warnings"] = [line for line in [chance_warning(summary, task.name)] if line]
            if env.is_main:
                for line in summary["warnings"]:
                    print(f"warning: {line}", file=sys.stderr)
        if env.is_main:
            write_json(out / "summary.json", summary)
    barrier(env)
    return summary


EPOCH_EVALS_FILE = "epoch_evals.json"  # the held-out accuracy of every evaluated epoch, kept across sessions


def read_epoch_evals(out: Path, completed: int) -> list[dict[str, Any]]:
    """The per-epoch evaluations an earlier session of this run wrote, up to the ``completed`` epochs it
    resumes from (none for a new run, or when the file is missing or unreadable)."""
    try:
        saved = json.loads((out / EPOCH_EVALS_FILE).read_text())
    except (OSError, ValueError):
        return []
    return [e for e in saved if isinstance(e, dict) and e.get("epoch", completed + 1) <= completed]


def epoch_report(history: list[dict[str, Any]], summary: dict[str, Any], show: bool) -> dict[str, Any]:
    """``per_epoch`` (the held-out accuracy of each evaluated epoch) and ``best_epoch`` (the one of highest
    top-1, the earliest on a tie), beside the final weights' accuracy, which stays the headline ``top1``.
    The SeiT++ and SeiT scripts evaluate every epoch and report the best; mimkit reports the final weights,
    which were not chosen on the held-out data."""
    best = max(history, key=lambda e: (e["top1"], -e["epoch"]))
    if show:
        shown = ", ".join(f"{e['epoch']}: {e['top1']:.2f}" for e in history)
        print(
            f"held-out top-1 per epoch: {shown}; best epoch {best['epoch']}: {best['top1']:.2f}% (the "
            f"reference scripts' figure, chosen on these images); final weights: {summary['top1']:.2f}% "
            "(mimkit's headline)",
            file=sys.stderr,
        )
    return {"per_epoch": history, "best_epoch": best}
