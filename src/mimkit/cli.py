"""The ``mimkit`` command: pretrain, knn, linprobe, finetune, eval, analyze, export, recipes; tokenizer,
tokenize, tokens and tokenadapt for token datasets."""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import shutil
import sys
import textwrap
from pathlib import Path

from mimkit.configs import POOLS, RECIPE_DIR, Config, ConfigError, build_config, to_yaml
from mimkit.distributed import cleanup
from mimkit.interop.load import export_encoder, load_encoder
from mimkit.runs.analyze import analyze
from mimkit.runs.classify import SCRATCH, check_task, task_config, train_classifier
from mimkit.runs.evaluate import evaluation_table, knn
from mimkit.runs.lock import RunFolderError
from mimkit.runs.pretrain import check_buildable, pretrain
from mimkit.runs.tokenadapt import train_tokenadapt
from mimkit.runs.tokenize import tokenize
from mimkit.runs.tokenizer_lifecycle import decode_grid, encode_ids, import_vitvqgan, train_tokenizer
from mimkit.tokens.dataset import convert, info, verify
from mimkit.train.engine import NonFiniteLoss, RunInterrupted


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


def _pretrain(args: argparse.Namespace) -> int:
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


def _knn(args: argparse.Namespace) -> int:
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


def _analyze(args: argparse.Namespace) -> int:
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


def _train_task(args: argparse.Namespace) -> int:
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


def _eval(args: argparse.Namespace) -> int:
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


def _export(args: argparse.Namespace) -> int:
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


def _tokenizer_train(args: argparse.Namespace) -> int:
    cfg = _run_config(args)
    if cfg is None:
        return 0
    summary = train_tokenizer(cfg)
    print(f"run folder: {summary['run']}")
    return 0


def _tokenadapt_train(args: argparse.Namespace) -> int:
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


def _tokenizer_encode(args: argparse.Namespace) -> int:
    result = encode_ids(args.tokenizer, args.data, args.out, max_images=args.max_images, device=args.device)
    print(f"wrote {result['images']} id grids {result['grid']} to {result['path']}")
    return 0


def _tokenizer_decode(args: argparse.Namespace) -> int:
    result = decode_grid(
        args.tokenizer, args.tokens, args.out, images=args.images, count=args.count, device=args.device
    )
    quality = (
        f" (PSNR {result['psnr']:.2f} dB over {result['psnr_images']} images)" if "psnr" in result else ""
    )
    print(f"wrote {result['png']}{quality}")
    return 0


def _tokenizer_import(args: argparse.Namespace) -> int:
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


def _tokenize(args: argparse.Namespace) -> int:
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


def _tokens(args: argparse.Namespace) -> int:
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


def _recipes(args: argparse.Namespace) -> int:
    width = max(60, shutil.get_terminal_size((100, 24)).columns)
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        wrapped = textwrap.wrap(recipe_summary(path.read_text()), width - 34) or [""]
        print(f"{path.stem:33s} {wrapped[0]}")
        for line in wrapped[1:]:
            print(f"{'':33s} {line}")
    return 0


def _run_arguments(p: argparse.ArgumentParser, recipe: str, example: str) -> None:
    """The arguments of a command that trains from a recipe in a run folder."""
    p.add_argument(
        "--config", "-c", default=recipe, help="recipe: a YAML file or a shipped name (mimkit recipes)"
    )
    p.add_argument("--out", help="run folder (run.out)")
    p.add_argument(
        "--resume", help="auto (default: continue OUT/last.pt if present) | none | checkpoint path"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help=example)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling for Vision Transformers."
    )
    parser.add_argument("--version", action="version", version=f"mimkit {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder (default: MAE on the embedded demo data)")
    _run_arguments(p, "demo", "e.g. optim.epochs=10 method=mae")
    p.set_defaults(func=_pretrain)

    p = sub.add_parser("knn", help="k-NN (or Latent MIM's 1-NN) accuracy of a checkpoint's encoder")
    p.add_argument("checkpoint", help="run folder, .pt checkpoint, .safetensors export or official file")
    p.add_argument(
        "--protocol",
        choices=("knn", "lmim_nn"),
        default="knn",
        help="knn: train-bank k-NN vote (default); lmim_nn: leave-one-out 1-NN within --val (Latent MIM)",
    )
    p.add_argument("--train", help="memory bank source (default: the run's training data)")
    p.add_argument("--val", help="query source (default: the run's eval.val)")
    p.add_argument("--weights", default="student", help="student | teacher (methods with an EMA teacher)")
    p.add_argument(
        "--pool",
        choices=POOLS,
        help="default: the run's eval.pool, else its method's (lmim_nn: mean_prenorm)",
    )
    p.add_argument("--k", type=int, help="default: the run's eval.k, else 20")
    p.add_argument("--temperature", type=float, help="default: the run's eval.temperature, else 0.07")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument(
        "--num-workers", type=int, help="loader processes (default: the cores this process may use)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="JSON file for the result (default: RUN/<protocol>.json for a run folder)")
    p.add_argument(
        "--tokenizer",
        help="token models: the tokenizer that reads images (default: the run's data.tokenizer, else the "
        "one its token data record; 'demo': the shipped one)",
    )
    p.set_defaults(func=_knn)

    for kind, what in (
        ("linprobe", "linear probe (frozen encoder, BN + Linear, LARS)"),
        ("finetune", "fine-tune"),
    ):
        p = sub.add_parser(kind, help=f"{what} of a checkpoint's encoder, then its accuracy on eval.val")
        p.add_argument(
            "checkpoint",
            help="run folder, .pt checkpoint, .safetensors export or official file"
            + ("; 'scratch': a new encoder of the recipe's model section" if kind == "finetune" else ""),
        )
        p.add_argument("--config", "-c", help=f"recipe (default: {kind}; mimkit recipes lists them)")
        p.add_argument("--out", help="run folder (default: CHECKPOINT-" + kind + ")")
        p.add_argument("--weights", help="student (default) | teacher (methods with an EMA teacher)")
        p.add_argument("--resume", help="auto (default) | none | checkpoint path")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        p.add_argument(
            "--tokenizer",
            help="token models: the tokenizer that reads images (default: the run's data.tokenizer, else the "
            "one its token data record; 'demo': the shipped one)",
        )
        p.add_argument(
            "overrides", nargs="*", metavar="key=value", help="e.g. optim.epochs=10 method.pool=mean"
        )
        p.set_defaults(func=_train_task)

    p = sub.add_parser("eval", help="k-NN, linear probe and fine-tune of checkpoints, in one table")
    p.add_argument("checkpoints", nargs="+", help="run folders, checkpoints, exports or official files")
    p.add_argument("--protocols", default="knn,linprobe,finetune", help="comma-separated subset")
    p.add_argument("--train", help="labelled training images (default: each run's)")
    p.add_argument("--val", help="labelled evaluation images (default: each run's eval.val)")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.add_argument(
        "--pool", choices=POOLS, help="k-NN feature (default: the run's eval.pool, else its method's)"
    )
    p.add_argument("--linprobe-epochs", type=int, default=90, help="linear probe budget (cached features)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning budget")
    p.add_argument(
        "--num-workers", type=int, help="loader processes (default: the cores this process may use)"
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/eval", help="folder for table.md, table.json and the runs")
    p.add_argument(
        "--tokenizer",
        help="token models: the tokenizer that reads images (default: the run's data.tokenizer, else the "
        "one its token data record; 'demo': the shipped one)",
    )
    p.add_argument(
        "overrides", nargs="*", metavar="key=value", help="for the linear probe and fine-tune runs"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser(
        "analyze", help="attention, spectrum, reconstructions, segmentation of checkpoints: one HTML report"
    )
    p.add_argument("checkpoints", nargs="+", help="run folders, checkpoints, exports or official files")
    p.add_argument(
        "--data",
        help="images (or token data) to analyse (default: the first run's eval.val, else data.train)",
    )
    p.add_argument("--out", help="report folder (default: RUN/analysis for one run folder, else ./analysis)")
    p.add_argument("--images", type=int, default=6, help="images shown in the grids")
    p.add_argument(
        "--stats-images", type=int, default=1024, help="images averaged for attention distance and spectra"
    )
    p.add_argument("--layer", type=int, default=-1, help="attention maps' block (negative: from the end)")
    p.add_argument("--queries", help="query patches, row-major (default: 3 on the diagonal)")
    p.add_argument("--ks", default="3,4,5", help="cluster counts of the segmentation")
    p.add_argument("--upsample", type=int, default=1, help="pixel images N times larger: a finer grid")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.add_argument(
        "--norm-pix",
        choices=("auto", "on", "off"),
        default="auto",
        help="MAE / LUT predictions per-patch normalised (auto: as the checkpoint says)",
    )
    p.add_argument("--seed", type=int, default=0, help="the masks of the reconstructions and t-SNE's seed")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument(
        "--tokenizer",
        help="token models: the tokenizer that reads images (default: the run's data.tokenizer, else the "
        "one its token data record; 'demo': the shipped one)",
    )
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="for official files: what their weights cannot tell (model.num_heads=...)",
    )
    p.set_defaults(func=_analyze)

    p = sub.add_parser("export", help="write the encoder as a timm-loadable safetensors file")
    p.add_argument("checkpoint", help="run folder or .pt checkpoint")
    p.add_argument("--out", help="output .safetensors path")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.set_defaults(func=_export)

    p = sub.add_parser("tokenizer", help="train a VQ image tokenizer; encode and decode with it")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a tokenizer (a run folder, resumable), then prune its codebook")
    _run_arguments(t, "tokenizer_cifar10", "e.g. data.train=images/ optim.epochs=20")
    t.set_defaults(func=_tokenizer_train)
    t = tok.add_parser("encode", help="id grids of images, as a .npz (ids, y)")
    t.add_argument("tokenizer", help="tokenizer run folder or its tokenizer.pt")
    t.add_argument("data", help="images: a folder, .npz file(s), demo:train, ...")
    t.add_argument("--out", required=True, help="output .npz")
    t.add_argument("--max-images", type=int, default=1000, help="default: the first 1000")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_tokenizer_encode)
    t = tok.add_parser(
        "import", help="ViT-VQGAN weights (enhancing-transformers' state dict) as a pruned mimkit tokenizer"
    )
    t.add_argument("weights", help="a state dict file (torch.save(model.state_dict()), or Lightning's)")
    t.add_argument("data", help="images whose codes are kept (the dataset to tokenize, or a sample)")
    t.add_argument("--out", required=True, help="folder for tokenizer.pt and reconstructions.png")
    t.add_argument("--img-size", type=int, help="when the file holds no position tables")
    t.add_argument("--num-heads", type=int, help="default: width / 64, as the official configs")
    t.add_argument(
        "--codebook", help="a released codebook.ckpt: keep exactly its rows, so ids match that release"
    )
    t.add_argument("--max-images", type=int)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_tokenizer_import)
    t = tok.add_parser("decode", help="a PNG of token records decoded back to images")
    t.add_argument("tokenizer", help="tokenizer run folder or its tokenizer.pt")
    t.add_argument("tokens", help="a token dataset")
    t.add_argument("--out", required=True, help="output .png")
    t.add_argument("--images", help="the images the tokens were made from: originals beside reconstructions")
    t.add_argument("--count", type=int, default=32)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=_tokenizer_decode)

    p = sub.add_parser("tokenize", help="images -> a token dataset (resumable by shard), with a report")
    p.add_argument("tokenizer", help="tokenizer run folder or its tokenizer.pt")
    p.add_argument("data", help="images: a folder, .npz file(s), demo:train, ... (labels kept)")
    p.add_argument("out", help="a folder (mimkit format) or NAME-token.data.bin.gz (--to seit)")
    p.add_argument("--to", choices=("mimkit", "seit"), default="mimkit", help="format (default: mimkit)")
    p.add_argument("--shard-size", type=int, default=10_000, help="records per shard")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, help="image loader processes (default: the cores available)")
    p.add_argument("--max-images", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_tokenize)

    p = sub.add_parser("tokenadapt", help="TokenAdapt (SeiT++): pixel-style augmentation of token grids")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser(
        "train", help="learn TokenAdapt for a tokenizer's tokens (a run folder, resumable): tokenadapt.ckpt"
    )
    _run_arguments(t, "tokenadapt_cifar10", "e.g. method.tokenizer=runs/tokenizer_cifar10 optim.epochs=10")
    t.set_defaults(func=_tokenadapt_train)

    p = sub.add_parser("tokens", help="token datasets: convert between formats, info, verify")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser("convert", help="SeiT <-> mimkit format")
    t.add_argument("src", help="a token dataset (SeiT: its NAME-token.data.bin.gz)")
    t.add_argument("dst", help="a folder (mimkit) or NAME-token.data.bin.gz (seit)")
    t.add_argument("--to", choices=("mimkit", "seit"), required=True)
    t.set_defaults(func=_tokens)
    t = tok.add_parser("info", help="header, records, bytes per image, codebook use")
    t.add_argument("src")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_tokens)
    t = tok.add_parser(
        "verify", help="read every record as training does (exit 1 on any damage a reader refuses)"
    )
    t.add_argument("src")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=_tokens)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options (`mimkit pretrain --out x method=lut optim.epochs=3`)
    if extra:
        if hasattr(args, "overrides") and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = [*args.overrides, *extra]
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        code = args.func(args)
        sys.stdout.flush()  # inside the try: a closed pipe (`mimkit recipes | head`) is handled below
        return code
    except NonFiniteLoss as err:
        if _is_main_rank():  # every rank stops at the same step; one says so
            print(f"mimkit: stopped: {err}", file=sys.stderr)
        return 3
    except RunInterrupted as err:
        if _is_main_rank():
            print(f"mimkit: {err}", file=sys.stderr)
        return 128 + err.signal
    except (ConfigError, ValueError, RunFolderError) as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # the reader of our output went away: say nothing more, and keep Python's exit-time flush quiet
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a missing or unwritable path, a full disk: the message names the path
        print(f"mimkit: error: {_os_error(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mimkit: interrupted at once{_how_to_continue(args)}", file=sys.stderr)
        return 130
    finally:
        cleanup()


def _how_to_continue(args: argparse.Namespace) -> str:
    """What a second Ctrl-C leaves, in the words of the command that was stopped."""
    command = (args.command, getattr(args, "action", None))
    if command[0] in ("pretrain", "linprobe", "finetune") or command in (
        ("tokenizer", "train"),
        ("tokenadapt", "train"),
    ):
        return "; --resume auto continues from the last checkpoint saved, if any"
    if command[0] == "tokenize":
        return "; the same command again resumes at the first shard not written"
    return ""


def _version() -> str:
    try:
        return importlib.metadata.version("mimkit")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown (not installed)"


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _os_error(err: OSError) -> str:
    if err.filename is not None and err.strerror:
        return f"'{err.filename}': {err.strerror}"
    return str(err)
