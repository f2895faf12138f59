"""The ``mimkit`` command: pretrain, knn, linprobe, finetune, eval, export, recipes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from mimkit.configs import POOLS, RECIPE_DIR, ConfigError, build_config, to_yaml
from mimkit.distributed import cleanup
from mimkit.interop.load import export_encoder, load_encoder
from mimkit.runs.classify import check_task, task_config, train_classifier
from mimkit.runs.evaluate import evaluation_table, knn
from mimkit.runs.lock import RunFolderError
from mimkit.runs.pretrain import check_buildable, pretrain
from mimkit.train.engine import NonFiniteLoss, RunInterrupted


def _pretrain(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out={args.out}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    cfg = build_config(args.config, overrides)
    if args.print_config:
        check_buildable(cfg)
        print(to_yaml(cfg))
        return 0
    summary = pretrain(cfg)
    knn = summary.get("knn")
    if knn is not None:
        line = f"k-NN (k={knn['k']}, {knn['pool']}) on {knn['val']}: top-1 {knn['top1']:.2f}%"
        line += f", top-5 {knn['top5']:.2f}%" if "top5" in knn else ""
        if "knn_at_init" in summary:
            line += f" (the encoder at initialisation: top-1 {summary['knn_at_init']['top1']:.2f}%)"
        print(line)
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
    )
    if args.protocol == "lmim_nn":
        print(f"leave-one-out 1-NN ({result['pool']}) on {result['val']}: top-1 {result['top1']:.2f}%")
    else:
        top5 = f", top-5 {result['top5']:.2f}%" if "top5" in result else ""
        print(
            f"k-NN (k={result['k']}, T={result['temperature']}, {result['pool']}) on {result['val']}: "
            f"top-1 {result['top1']:.2f}%{top5}"
        )
    if "written_to" in result:
        print(f"written to {result['written_to']}")
    return 0


def _train_task(args: argparse.Namespace) -> int:
    loaded = load_encoder(args.checkpoint, args.weights or "student")
    overrides = [*([f"method.weights={args.weights}"] if args.weights else []), *args.overrides]
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
    )
    if markdown:
        print(markdown, end="")
        print(f"written to {Path(args.out) / 'table.md'} and {Path(args.out) / 'table.json'}")
    return 0


def _export(args: argparse.Namespace) -> int:
    out = args.out or str(Path(args.checkpoint).with_suffix("")) + f"-{args.weights}.safetensors"
    spec = export_encoder(args.checkpoint, out, args.weights)
    kwargs = ", ".join(f"{k}={v!r}" for k, v in spec["kwargs"].items())
    print(
        f"wrote {spec['path']}\nload it with:\n"
        f"  import timm, safetensors.torch\n"
        f"  model = timm.create_model({spec['model_name']!r}, {kwargs})\n"
        f"  model.load_state_dict(safetensors.torch.load_file({spec['path']!r}))"
    )
    return 0


def _recipes(args: argparse.Namespace) -> int:
    for path in sorted(RECIPE_DIR.glob("*.yaml")):
        first = path.read_text().splitlines()[0].lstrip("# ").strip() if path.read_text() else ""
        print(f"{path.stem:32s} {first}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mimkit", description="Masked image modeling for Vision Transformers."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("pretrain", help="pre-train an encoder (default: MAE on the embedded demo data)")
    p.add_argument(
        "--config", "-c", default="demo", help="recipe: a YAML file or a shipped name (mimkit recipes)"
    )
    p.add_argument("--out", help="run folder (run.out)")
    p.add_argument(
        "--resume", help="auto (default: continue OUT/last.pt if present) | none | checkpoint path"
    )
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="e.g. optim.epochs=10 method=mae")
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
    p.set_defaults(func=_knn)

    for kind, what in (
        ("linprobe", "linear probe (frozen encoder, BN + Linear, LARS)"),
        ("finetune", "fine-tune"),
    ):
        p = sub.add_parser(kind, help=f"{what} of a checkpoint's encoder, then its accuracy on eval.val")
        p.add_argument("checkpoint", help="run folder, .pt checkpoint, .safetensors export or official file")
        p.add_argument("--config", "-c", help=f"recipe (default: {kind}; mimkit recipes lists them)")
        p.add_argument("--out", help="run folder (default: CHECKPOINT-" + kind + ")")
        p.add_argument("--weights", help="student (default) | teacher (methods with an EMA teacher)")
        p.add_argument("--resume", help="auto (default) | none | checkpoint path")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
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
        "overrides", nargs="*", metavar="key=value", help="for the linear probe and fine-tune runs"
    )
    p.set_defaults(func=_eval)

    p = sub.add_parser("export", help="write the encoder as a timm-loadable safetensors file")
    p.add_argument("checkpoint", help="run folder or .pt checkpoint")
    p.add_argument("--out", help="output .safetensors path")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.set_defaults(func=_export)

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
        print("mimkit: interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    finally:
        cleanup()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _os_error(err: OSError) -> str:
    if err.filename is not None and err.strerror:
        return f"'{err.filename}': {err.strerror}"
    return str(err)
