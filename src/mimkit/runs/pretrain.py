"""`mimkit pretrain`: build the method and data from a config, train, and end with a k-NN accuracy."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from mimkit.checkpoint import seed_all
from mimkit.configs import Config, ConfigError
from mimkit.data.loader import EncodedDataset, ViewDataset
from mimkit.data.source_spec import build_source, source_for, tokenized_for
from mimkit.data.sources import ImageSource, full_size
from mimkit.data.token_sources import (
    check_input,
    codebook_fingerprint,
    needs_vocab,
    tokenizer_of,
    vocab_from_data,
)
from mimkit.data.transforms import DeviceNormalize, training_data
from mimkit.distributed import DistEnv, barrier, init_distributed
from mimkit.eval.features import chance_warning
from mimkit.eval.knn import check_knn_sources, knn_evaluate, loo_nn_evaluate
from mimkit.methods import build_method
from mimkit.models.input_spec import InputSpec
from mimkit.models.tokenizer import absolute_tokenizer, load_tokenizer, tokenizer_file
from mimkit.models.vit import ViTEncoder
from mimkit.runs.evaluate import evaluation_view
from mimkit.runs.folder import run_dir, start_run
from mimkit.runs.lock import RunLock
from mimkit.train.engine import Trainer, autocast_dtype
from mimkit.train.log import write_json


def check_buildable(cfg: Config) -> None:
    """What building the method checks beyond the config, without memory, initialisation or data: the
    method is built on the meta device (a token model's vocabulary is read from its data's header)."""
    if needs_vocab(cfg.model):
        try:
            one = build_source(cfg.data.train, max_images=1, tokenizer=token_reader(cfg))
            vocab_from_data(cfg.model, one)
        except (OSError, ValueError) as err:
            note = f"note: the model is not checked: its vocabulary comes from data.train ({err})"
            print(note, file=sys.stderr)
            return
    with torch.device("meta"):
        build_method(cfg)


def token_reader(cfg: Config) -> str | None:
    """The tokenizer that reads a token model's training images (data.tokenizer); a pixel model reads
    images as they are."""
    tokenizer = cfg.data.tokenizer
    if not tokenizer or cfg.method.name == "vq_tokenizer":
        return None
    if cfg.model.stem == "pixels":
        raise ConfigError(
            f"data.tokenizer={tokenizer} turns images into token ids for a token model "
            "(model.stem=token_ids), but this model takes pixels: leave data.tokenizer unset"
        )
    if not tokenizer_file(tokenizer).is_file():
        raise ConfigError(
            f"data.tokenizer: no tokenizer at '{tokenizer}'; train one (`mimkit tokenizer train --config "
            "tokenizer_cifar10` writes runs/tokenizer_cifar10), or give data.tokenizer=demo for the one "
            "shipped with mimkit (32 px images)"
        )
    cfg.data.tokenizer = absolute_tokenizer(tokenizer)
    return cfg.data.tokenizer


def pretrain(cfg: Config, env: DistEnv | None = None) -> dict[str, Any]:
    """Pre-train ``cfg.method`` on ``cfg.data.train`` in the run folder, which it locks for the run."""
    env = env or init_distributed(cfg.run.device)
    out = run_dir(cfg)
    with RunLock(out, env):
        return _pretrain(cfg, env, out)


def _pretrain(cfg: Config, env: DistEnv, out: Path) -> dict[str, Any]:
    source = source_for(
        "data.train",
        cfg.data.train,
        image_size=cfg.model.img_size,
        max_images=cfg.data.max_images,
        decode_size=cfg.data.decode_size,
        tokenizer=token_reader(cfg),
    )
    vocab_from_data(cfg.model, source)
    inherited = tokenizer_warnings_of(source)
    if env.is_main:
        for line in inherited:
            print(f"warning: {line}", file=sys.stderr)
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    method = build_method(cfg)
    seed_all(cfg.run.seed + env.rank)  # drop path differs across ranks (masks come from per-sample seeds)
    check_input(method.input_spec(), source)
    fingerprint = codebook_fingerprint(source) if method.input_spec().kind != "pixels" else None
    if fingerprint is not None:  # saved with the encoder: its later inputs must come from this tokenizer
        method.encoder.input_spec = replace(method.input_spec(), codebook_signature=fingerprint)
    method.use_data(source)
    data = training_data(cfg.data, env.device, method.input_spec().kind)
    views = method.train_transform(data)
    layouts = getattr(views, "layouts", {})
    finish = DeviceNormalize(data.mean, data.std, layouts) if data.normalize == "device" else None
    if data.decode == "device":
        dataset: ViewDataset = EncodedDataset(source, views, seed=cfg.run.seed, finish=finish)
    else:
        dataset = ViewDataset(source, views, seed=cfg.run.seed, device_stage=finish)
    trainer = Trainer(method, cfg, env, out)
    # every evaluation source is read and checked before the run folder is written
    probes: dict[str, Callable[[ViTEncoder], dict[str, Any]]] = {}
    if cfg.eval.val and (cfg.eval.knn or cfg.eval.lmim_nn):
        queries = source_for("eval.val", cfg.eval.val, image_size=cfg.model.img_size)
        dtype = autocast_dtype(trainer.precision, env.device)
        if cfg.eval.knn:
            bank = None if cfg.eval.train else source
            if bank is not None:
                bank = full_size(bank)  # evaluations see whole decodes, as any other evaluation does
            probes["knn"] = knn_probe(cfg, env, dtype, bank=bank, queries=queries, spec=method.input_spec())
        if cfg.eval.lmim_nn:
            (read,) = tokenized_for(method.input_spec(), [queries], cfg.data.train, cfg.data.tokenizer)
            check_input(method.input_spec(), read)
            probes["lmim_nn"] = nn_probe(cfg, env, dtype, read)
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
    if cfg.eval.baseline:
        summary.update(at_init(out, trainer.step, probes, method.encoder, env.is_main))
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
    summary["warnings"] = inherited + quality_warnings(summary)
    if env.is_main:
        for line in summary["warnings"]:
            print(f"warning: {line}", file=sys.stderr)
        write_json(out / "summary.json", summary)
    barrier(env)
    return summary


AT_INIT_FILE = "at_init.json"  # the evaluations of the encoder at initialisation, kept for a resumed run


def at_init(
    out: Path,
    step: int,
    probes: dict[str, Callable[[ViTEncoder], dict[str, Any]]],
    encoder: ViTEncoder,
    is_main: bool,
) -> dict[str, Any]:
    """The probes of the encoder at initialisation, as ``{name}_at_init``: measured at step 0 and kept in
    the run folder, so that a resumed run still compares its final figure with them."""
    saved = out / AT_INIT_FILE
    if step > 0:
        try:
            return json.loads(saved.read_text())
        except (OSError, ValueError):  # measured by no session, or cut short by a kill: say it is lost
            if is_main and probes:
                print(
                    f"note: {saved} is missing or unreadable: this resumed run cannot compare its final "
                    "figures with the encoder at initialisation",
                    file=sys.stderr,
                )
            return {}
    measured = {f"{name}_at_init": probe(encoder) for name, probe in probes.items()}
    if is_main and measured:
        write_json(saved, measured)
    return measured


def tokenizer_warnings_of(source: ImageSource) -> list[str]:
    """The warnings of the report of the tokenizer a token model's data come from (a tokenizer that learnt
    nothing makes every later figure meaningless), said again where those data are used."""
    try:
        path = tokenizer_of(source)
        report = load_tokenizer(path).info.get("report", {}) if path else {}
    except (OSError, ValueError):  # no tokenizer to ask: nothing to repeat
        return []
    return [f"the tokens come from {path}, whose report says: {line}" for line in report.get("warnings", [])]


def quality_warnings(summary: dict[str, Any]) -> list[str]:
    """What makes a finished run's figures meaningless, in one line each: an evaluation at or below the
    same encoder at initialisation (the pre-training did not help, or hurt), and a masked-token accuracy
    no better than always answering the most common id (the ids carry nothing the model could learn:
    often a tokenizer that learnt nothing)."""
    found = []
    for name, what in (("knn", "k-NN"), ("lmim_nn", "leave-one-out 1-NN")):
        final, start = summary.get(name), summary.get(f"{name}_at_init")
        if final and (line := chance_warning(final, f"the final {what}")):
            found.append(line)
        if final and start and final["top1"] <= start["top1"]:
            found.append(
                f"the final {what} top-1 {final['top1']:.2f}% is not above the encoder at initialisation "
                f"({start['top1']:.2f}%): this pre-training did not help (too short, or a learning rate or "
                "warmup that does not suit it)"
            )
    last = summary.get("last_logged") or {}
    accuracy, majority = last.get("masked_token_acc"), last.get("masked_token_majority")
    if accuracy is not None and majority is not None and accuracy <= 1.5 * majority:
        found.append(
            f"masked-token accuracy {100 * accuracy:.2f}% is no better than always answering the most "
            f"common id ({100 * majority:.2f}%): the model learnt (almost) nothing about the tokens; check "
            "the tokenizer's reconstruction PSNR in its run's summary"
        )
    return found


def pretrain_then(
    cfg: Config, env: DistEnv | None, finish: Callable[[Path, Config, torch.device], dict[str, Any]]
) -> dict[str, Any]:
    """Pre-train, then (on the main rank, holding the run folder) ``finish(out, cfg, device)``: what a run
    writes from its last checkpoint once training is done (a tokenizer's pruned codes, TokenAdapt's
    official weights), merged into the summary."""
    env = env or init_distributed(cfg.run.device)
    summary = pretrain(cfg, env)
    if summary.get("stopped_early"):
        return summary
    out = run_dir(cfg)
    if env.is_main:
        with RunLock(out):
            summary.update(finish(out, cfg, env.device))
            write_json(out / "summary.json", summary)
    barrier(env)
    return summary


def knn_probe(
    cfg: Config,
    env: DistEnv,
    dtype: torch.dtype | None = None,
    bank: ImageSource | None = None,
    queries: ImageSource | None = None,
    spec: InputSpec | None = None,
) -> Callable[[ViTEncoder], dict[str, Any]]:
    """k-NN accuracy of an encoder with the config's eval settings, in the view of the encoder's input
    spec; the sources are read once. The memory bank is eval.train, else the training images (pass the
    sources already read to avoid reading them twice). ``spec``: the encoder's input, when images are to
    be tokenized for a token encoder (by the tokenizer of its token data)."""
    size = cfg.model.img_size
    if bank is None:
        key = "eval.train" if cfg.eval.train else "data.train"
        where = cfg.eval.train or cfg.data.train
        bank = source_for(key, where, image_size=size, max_images=cfg.data.max_images)
    if queries is None:
        queries = source_for("eval.val", cfg.eval.val, image_size=size)
    if spec is not None:
        bank, queries = tokenized_for(spec, [bank, queries], cfg.data.train, cfg.data.tokenizer)
    # checked now rather than when the first evaluation runs, possibly after the whole training
    check_knn_sources(bank, queries, hint="eval.train, else data.train, and eval.val; or set eval.knn=false")
    if spec is not None:  # the vocabulary and grid too, before the first step rather than after the last
        for source in (bank, queries):
            check_input(spec, source)
    evaluate = partial(
        knn_evaluate,
        train=bank,
        val=queries,
        env=env,
        k=cfg.eval.k,
        temperature=cfg.eval.temperature,
        pool=cfg.eval.pool,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        autocast_dtype=dtype,
    )
    return lambda encoder: evaluate(encoder, transform=evaluation_view(encoder.input_spec)[1])


def nn_probe(
    cfg: Config, env: DistEnv, dtype: torch.dtype | None, queries: ImageSource
) -> Callable[[ViTEncoder], dict[str, Any]]:
    """Latent MIM's leave-one-out 1-NN accuracy on eval.val (its own pooling: before the final norm), in
    the view of the encoder's input spec."""
    evaluate = partial(
        loo_nn_evaluate,
        val=queries,
        env=env,
        batch_size=cfg.eval.batch_size,
        num_workers=cfg.data.num_workers,
        autocast_dtype=dtype,
    )
    return lambda encoder: evaluate(encoder, transform=evaluation_view(encoder.input_spec)[1])
