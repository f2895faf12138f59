"""The ``mimkit`` command: pretrain, knn, linprobe, finetune, eval, analyze, export, recipes; tokenizer,
tokenize, tokens and tokenadapt for token datasets. Here are its parser and its entry point (:func:`main`,
which turns errors into exit codes); what each command does is :mod:`mimkit.cli_commands`."""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import sys

from mimkit.cli_commands import (
    analyze_command,
    eval_command,
    export_command,
    knn_command,
    pretrain_command,
    recipes_command,
    tokenadapt_train_command,
    tokenize_command,
    tokenizer_decode_command,
    tokenizer_encode_command,
    tokenizer_import_command,
    tokenizer_train_command,
    tokens_command,
    train_task_command,
)
from mimkit.configs import POOLS, ConfigError
from mimkit.distributed import cleanup
from mimkit.runs.lock import RunFolderError
from mimkit.train.engine import NonFiniteLoss, RunInterrupted


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
    p.set_defaults(func=pretrain_command)

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
    p.set_defaults(func=knn_command)

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
        p.set_defaults(func=train_task_command)

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
    p.set_defaults(func=eval_command)

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
    p.set_defaults(func=analyze_command)

    p = sub.add_parser("export", help="write the encoder as a timm-loadable safetensors file")
    p.add_argument("checkpoint", help="run folder or .pt checkpoint")
    p.add_argument("--out", help="output .safetensors path")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.set_defaults(func=export_command)

    p = sub.add_parser("tokenizer", help="train a VQ image tokenizer; encode and decode with it")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser("train", help="train a tokenizer (a run folder, resumable), then prune its codebook")
    _run_arguments(t, "tokenizer_cifar10", "e.g. data.train=images/ optim.epochs=20")
    t.set_defaults(func=tokenizer_train_command)
    t = tok.add_parser("encode", help="id grids of images, as a .npz (ids, y)")
    t.add_argument("tokenizer", help="tokenizer run folder or its tokenizer.pt")
    t.add_argument("data", help="images: a folder, .npz file(s), demo:train, ...")
    t.add_argument("--out", required=True, help="output .npz")
    t.add_argument("--max-images", type=int, default=1000, help="default: the first 1000")
    t.add_argument("--device", default="auto")
    t.set_defaults(func=tokenizer_encode_command)
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
    t.set_defaults(func=tokenizer_import_command)
    t = tok.add_parser("decode", help="a PNG of token records decoded back to images")
    t.add_argument("tokenizer", help="tokenizer run folder or its tokenizer.pt")
    t.add_argument("tokens", help="a token dataset")
    t.add_argument("--out", required=True, help="output .png")
    t.add_argument("--images", help="the images the tokens were made from: originals beside reconstructions")
    t.add_argument("--count", type=int, default=32)
    t.add_argument("--device", default="auto")
    t.set_defaults(func=tokenizer_decode_command)

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
    p.set_defaults(func=tokenize_command)

    p = sub.add_parser("tokenadapt", help="TokenAdapt (SeiT++): pixel-style augmentation of token grids")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser(
        "train", help="learn TokenAdapt for a tokenizer's tokens (a run folder, resumable): tokenadapt.ckpt"
    )
    _run_arguments(t, "tokenadapt_cifar10", "e.g. method.tokenizer=runs/tokenizer_cifar10 optim.epochs=10")
    t.set_defaults(func=tokenadapt_train_command)

    p = sub.add_parser("tokens", help="token datasets: convert between formats, info, verify")
    tok = p.add_subparsers(dest="action", required=True)
    t = tok.add_parser("convert", help="SeiT <-> mimkit format")
    t.add_argument("src", help="a token dataset (SeiT: its NAME-token.data.bin.gz)")
    t.add_argument("dst", help="a folder (mimkit) or NAME-token.data.bin.gz (seit)")
    t.add_argument("--to", choices=("mimkit", "seit"), required=True)
    t.set_defaults(func=tokens_command)
    t = tok.add_parser("info", help="header, records, bytes per image, codebook use")
    t.add_argument("src")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=tokens_command)
    t = tok.add_parser(
        "verify", help="read every record as training does (exit 1 on any damage a reader refuses)"
    )
    t.add_argument("src")
    t.add_argument("--json", action="store_true")
    t.set_defaults(func=tokens_command)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=recipes_command)
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
