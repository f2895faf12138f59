"""What each ``mimkit`` command does once its arguments are parsed: build the config or read the paths it
names, call :mod:`mimkit.runs`, print the result. The parser and the entry point are :mod:`mimkit.cli`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import textwrap
from pathlib import Path

from mimkit.configs import RECIPE_DIR, Config, ConfigError, build_config, to_yaml
from mimkit.interop.load import export_encoder, load_encoder
from mimkit.runs.classify import SCRATCH, check_task, task_config, train_classifier
from mimkit.runs.evaluate import evaluation_table, knn
from mimkit.runs.pretrain import check_buildable, pretrain
from mimkit.runs.tokenadapt import train_tokenadapt
from mimkit.runs.tokenize import tokenize
from mimkit.runs.tokenizer_lifecycle import decode_grid, encode_ids, import_vitvqgan, train_tokenizer
from mimkit.tokens.dataset import convert, info, verify


def _run_config(args: argparse.Namespace) -> Config | None:
    """The config of a training command; None when it was only to be printed (--print-config)."""
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out={args.out}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    cfg = build_config(args.config, overrides)
    if args.print_config:
        check_buildable(cfg)
        print(to_yaml(cfg))
        return None
    return cfg


def pretrain_command(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if cfg is None:
        return 0
    summary = pretrain(cfg)
    knn = summary.get("knn")
    if knn is not None:
        line = f"k-NN (k={knn['k']}, {knn['pool']}) on {knn['val']}: top-1 {knn['top1']:.2f}%"
        line += f", top-5 {knn['top5']:.2f}%" if "top5" in knn else ""
        if "knn_at_init" in summary:
            line += f" (the encoder at initialisation: top-1 {summary['knn_at_init']['top1']:.2f}%)"
        print(line)
    last = summary.get("last_logged") or {}
    if "masked_token_acc" in last:
        majority = last.get("masked_token_majority")
        print(
            f"masked-token accuracy (last logged step) {100 * last['masked_token_acc']:.2f}%"
            + (f" (always the most common id: {100 * majority:.2f}%)" if majority is not None else "")
        )
    nn1 = summary.get("lmim_nn")
    if nn1 is not None:
        line = f"leave-one-out 1-NN ({nn1['pool']}) on {nn1['val']}: top-1 {nn1['top1']:.2f}%"
        if "lmim_nn_at_init" in summary:
            line += f" (at initialisation: {summary['lmim_nn_at_init']['top1']:.2f}%)"
        print(line)
    print(f"run folder: {summary['run']}")
    return 0


def knn_command(args: argparse.Namespace) -> int:
    result = knn(
        args.checkpoint,
        protocol=args.protocol,
        train=args.train,
        val=args.val,
        weights=args.weights,
        pool=args.pool,
        k=args.k,
        temperature=args.temperature,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        out=args.out,
        tokenizer=args.tokenizer,
    )
    if args.protocol == "lmim_nn":
        print(f"leave-one-out 1-NN ({result['pool']}) on {result['val']}: top-1 {result['top1']:.2f}%")
    else:
        top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
        print(
            f"k-NN (k={result['k']}, T={result['temperature']}, {result['pool']}) on {result['val']}: "
            f"top-1 {result['top1']:.2f}%{top5}"
        )
    for line in result.get("warnings", ()):
        print(f"warning: {line}", file=sys.stderr)
    if "written_to" in result:
        print(f"written to {result['written_to']}")
    return 0


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ConfigError(f"{flag} takes comma-separated integers; got {text!r}") from None


def analyze_command(args: argparse.Namespace) -> int:
    # the analyses bring scikit-learn, SciPy and matplotlib (a second or more to import): only this command
    # pays for them
    from mimkit.runs.analyze import analyze

    result = analyze(
        args.checkpoints,
        data=args.data,
        out=args.out,
        images=args.images,
        stats_images=args.stats_images,
        layer=args.layer,
        queries=_int_list(args.queries, "--queries") if args.queries else None,
        ks=_int_list(args.ks, "--ks"),
        upsample=args.upsample,
        weights=args.weights,
        norm_pix=None if args.norm_pix == "auto" else args.norm_pix == "on",
        overrides=args.overrides,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        tokenizer=args.tokenizer,
    )
    for row in result["checkpoints"]:
        distance, rank = row["attention_distance_mean"], row["effective_rank_mean"]
        if distance is None or rank is None:
            print(row["label"])
            continue
        unit, scale = row["distance_unit"], row["pixels_per_unit"]
        shown = f"{distance:.2f} {unit}"
        if unit == "cells" and scale:
            shown = f"{distance * scale:.2f} px ({distance:.2f} cells of {scale:g} px each)"
        line = f"{row['label']}: mean attention distance {shown} (all blocks and heads)"
        print(f"{line}, effective rank {rank:.1f}")
    print(f"report: {result['report']}\nnumbers: {result['json']}\nfigures: {result['figures']}")
    return 0


def train_task_command(args: argparse.Namespace) -> int:
    overrides = [
        *([f"method.weights={args.weights}"] if args.weights else []),
        *([f"data.tokenizer={args.tokenizer}"] if args.tokenizer else []),
        *args.overrides,
    ]
    if args.checkpoint == SCRATCH:  # a new encoder of the recipe's model section
        loaded = None
        out = args.out or f"runs/{Path(args.config or args.command).stem}"
        cfg = build_config(
            args.config or args.command, [f"method.checkpoint={SCRATCH}", f"run.out={out}", *overrides]
        )
    else:
        loaded = load_encoder(args.checkpoint, args.weights or "student")
        cfg = task_config(args.command, args.checkpoint, loaded[1], args.config, overrides, args.out)
    if args.resume:
        cfg.run.resume = args.resume
    if args.print_config:
        check_task(cfg)
        print(to_yaml(cfg))
        return 0
    summary = train_classifier(cfg, loaded=loaded)
    if "top1" in summary:
        line = f"{args.command} ({cfg.optim.epochs} epochs) on {summary['val']}: top-1 {summary['top1']:.2f}%"
        line += f", top-5 {summary['top5']:.2f}%" if "top5" in summary else ""
        if "ema_top1" in summary:
            line += f" (model EMA: top-1 {summary['ema_top1']:.2f}%)"
        print(line)
    print(f"run folder: {cfg.run.out}")
    return 0


def eval_command(args: argparse.Namespace) -> int:
    markdown, _ = evaluation_table(
        args.checkpoints,
        protocols=tuple(p.strip() for p in args.protocols.split(",") if p.strip()),
        train=args.train,
        val=args.val,
        weights=args.weights,
        pool=args.pool,
        linprobe_epochs=args.linprobe_epochs,
        finetune_epochs=args.finetune_epochs,
        num_workers=args.num_workers,
        device=args.device,
        out=args.out,
        overrides=args.overrides,
        tokenizer=args.tokenizer,
    )
    if markdown:
        print(markdown, end="")
        print(f"written to {Path(args.out) / 'table.md'} and {Path(args.out) / 'table.json'}")
    return 0


def export_command(args: argparse.Namespace) -> int:
    out = args.out or str(Path(args.checkpoint).with_suffix("")) + f"-{args.weights}.safetensors"
    spec = export_encoder(args.checkpoint, out, args.weights)
    kwargs = ",\n      ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    print(
        f"wrote {spec['path']}\nload it with:\n"
        f"  import timm, safetensors.torch\n"
        f"  model = timm.create_model(\n      {spec['model_name']!r},\n      {kwargs},\n  )\n"
        f"  model.load_state_dict(safetensors.torch.load_file({spec['path']!r}))\n"
        f"  config = timm.data.resolve_data_config({{}}, model=model)  # mimkit's evaluation view\n"
        f"(model(x) is the run's k-NN feature, '{spec['pool']}'"
        + (
            "; timm has no pooling before the final norm: it pools after it"
            if spec["pool"] == "mean_prenorm"
            else ""
        )
        + ")"
    )
    return 0


def tokenizer_train_command(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if cfg is None:
        return 0
    summary = train_tokenizer(cfg)
    print(f"run folder: {summary['run']}")
    return 0


def tokenadapt_train_command(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if cfg is None:
        return 0
    summary = train_tokenadapt(cfg)
    report = summary.get("tokenadapt")
    if report is not None:
        where = "held-out" if report["held_out"] else "training"
        print(
            f"token accuracy {report['token_acc']:.2f}% on {report['images']} {where} images (same geometry "
            f"on the emb map, re-quantised: {report['warp_baseline_acc']:.2f}%; ids left as they were: "
            f"{report['identity_baseline_acc']:.2f}%)"
        )
        print(f"TokenAdapt weights: {report['weights']}")
    print(f"run folder: {summary['run']}")
    return 0


def tokenizer_encode_command(args: argparse.Namespace) -> int:
    result = encode_ids(args.tokenizer, args.data, args.out, max_images=args.max_images, device=args.device)
    print(f"wrote {result['images']} id grids {result['grid']} to {result['path']}")
    return 0


def tokenizer_decode_command(args: argparse.Namespace) -> int:
    result = decode_grid(
        args.tokenizer, args.tokens, args.out, images=args.images, count=args.count, device=args.device
    )
    quality = (
        f" (PSNR {result['psnr']:.2f} dB over {result['psnr_images']} images)" if "psnr" in result else ""
    )
    print(f"wrote {result['png']}{quality}")
    return 0


def tokenizer_import_command(args: argparse.Namespace) -> int:
    result = import_vitvqgan(
        args.weights,
        args.data,
        args.out,
        img_size=args.img_size,
        num_heads=args.num_heads,
        device=args.device,
        max_images=args.max_images,
        codebook=args.codebook,
    )
    print(f"wrote {Path(args.out) / 'tokenizer.pt'} ({result['tokenizer']['codes_used']} codes kept)")
    return 0


def tokenize_command(args: argparse.Namespace) -> int:
    report = tokenize(
        args.tokenizer,
        args.data,
        args.out,
        to=args.to,
        shard_size=args.shard_size,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        device=args.device,
        max_images=args.max_images,
    )
    print(json.dumps(report, indent=2) if args.json else f"token dataset: {report['dataset']}")
    return 0


def tokens_command(args: argparse.Namespace) -> int:
    if args.action == "convert":
        dataset = convert(args.src, args.dst, to=args.to)
        print(f"wrote {len(dataset)} records to {dataset.path} ({args.to} format)")
        return 0
    result = info(args.src) if args.action == "info" else verify(args.src)
    if args.json:
        print(json.dumps(result, indent=2, default=str))
    elif args.action == "info":
        for key, value in result.items():
            print(f"{key:18s} {value}")
    elif result["records"] is None:
        print(f"unreadable: {result['bad_records'][0]['error']}")
    else:
        for bad in result["bad_records"]:
            print(f"damaged: record {bad['record']}: {bad['error']}")
        print(f"{result['path']}: {result['records']} records, {result['ok']} good, {result['bad']} damaged")
    return 1 if args.action == "verify" and not result["sound"] else 0


def recipe_summary(text: str) -> str:
    """The first sentence of a recipe's leading comment, which may run over several lines."""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        lines.append(line.lstrip("# ").strip())
    comment = " ".join(part for part in lines if part)
    depth = 0
    for i, char in enumerate(comment):
        depth += (char == "(") - (char == ")")
        if depth == 0 and char in ".:" and (i + 1 == len(comment) or comment[i + 1].isspace()):
            return comment[: i + (char == ".")]
    return comment


def recipes_command(args: argparse.Namespace) -> int:
    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        wrapped = textwrap.wrap(recipe_summary(path.read_text()), width - 34) or [""]
        print(f"{path.stem:33s} {wrapped[0]}")
        for line in wrapped[1:]:
            print(f"{'':33s} {line}")
    return 0
