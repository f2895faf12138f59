"""The ``mimkit`` command: pretrain, knn, linprobe, finetune, eval, export, recipes."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mimkit.configs import RECIPE_DIR, ConfigError


def _pretrain(args: argparse.Namespace) -> int:
    from mimkit.configs import build_config, to_yaml
    from mimkit.train.pretrain import pretrain

    overrides = list(args.overrides)
    if args.out:
        overrides.append(f"run.out={args.out}")
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    cfg = build_config(args.config, overrides)
    if args.print_config:
        import torch

        from mimkit.methods import build_method

        # what building the method checks, on the meta device: no memory, no initialisation, no data
        with torch.device("meta"):
            build_method(cfg)
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


def _view_and_dtype(info: dict, env) -> tuple:
    """What every evaluation of a loaded encoder needs: its image size, its evaluation view (the
    checkpoint's normalisation and crop) and the autocast dtype of the device."""
    from types import SimpleNamespace

    import torch

    from mimkit.data.transforms import eval_view

    size = info["img_size"]
    data = SimpleNamespace(mean=info["mean"], std=info["std"], crop_pct=info["crop_pct"])
    dtype = torch.bfloat16 if env.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return size, eval_view(size, data), dtype


def _knn(args: argparse.Namespace) -> int:
    from mimkit.checkpoint import load_encoder
    from mimkit.configs import EvalConfig
    from mimkit.data.sources import build_source
    from mimkit.eval.knn import knn_evaluate, loo_nn_evaluate
    from mimkit.train.distributed import init_distributed

    # unset options (None) follow the run's settings; 0 is not "unset"
    if args.k is not None and args.k < 1:
        raise ConfigError(f"--k must be at least 1; got {args.k}")
    if args.temperature is not None and not args.temperature > 0:
        raise ConfigError(f"--temperature must be > 0; got {args.temperature}")
    env = init_distributed(args.device)
    encoder, info = load_encoder(args.checkpoint, args.weights)
    encoder.to(env.device)
    cfg = info.get("config")
    loo = args.protocol == "lmim_nn"
    train = args.train or (cfg and (cfg.eval.train or cfg.data.train))
    val = args.val or (cfg and cfg.eval.val)
    if not val or (not loo and not train):
        needs = "--val (the evaluation set)" if loo else "--train (memory bank) and --val (queries)"
        raise ConfigError(
            f"mimkit knn --protocol {args.protocol} needs {needs}; this checkpoint's config names no default"
        )
    settings = cfg.eval if cfg else EvalConfig()
    size, view, dtype = _view_and_dtype(info, env)
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, autocast_dtype=dtype)
    if loo:
        result = loo_nn_evaluate(
            encoder,
            build_source(val, image_size=size),
            view,
            env,
            pool=args.pool or "mean_prenorm",
            **common,
        )
        line = f"leave-one-out 1-NN ({result['pool']}) on {result['val']}: top-1 {result['top1']:.2f}%"
    else:
        result = knn_evaluate(
            encoder,
            build_source(train, image_size=size),
            build_source(val, image_size=size),
            view,
            env,
            k=settings.k if args.k is None else args.k,
            temperature=settings.temperature if args.temperature is None else args.temperature,
            pool=args.pool or settings.pool,
            **common,
        )
        line = (
            f"k-NN (k={result['k']}, T={result['temperature']}, {result['pool']}) on {result['val']}: "
            f"top-1 {result['top1']:.2f}%" + (f", top-5 {result['top5']:.2f}%" if "top5" in result else "")
        )
    result = {"checkpoint": str(args.checkpoint), "weights": args.weights, **result}
    if env.is_main:
        print(line)
        out = Path(args.out) if args.out else None
        if out is None and Path(args.checkpoint).is_dir():
            out = Path(args.checkpoint) / f"{args.protocol}.json"
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=2))
            print(f"written to {out}")
    return 0


def _task_config(
    kind: str, checkpoint: str, info: dict, recipe: str | None, overrides: list[str], out: str | None
):
    """A linear-probe or fine-tune config for ``checkpoint`` (``info``: what load_encoder said of it): the
    recipe (default: the small generic one), then the checkpoint's own labelled data where the overrides
    name none, then the overrides."""
    from mimkit.configs import build_config

    given = {o.split("=", 1)[0] for o in overrides}
    base = build_config(recipe or kind)
    run = out or f"{Path(checkpoint).with_suffix('')}-{kind}"
    defaults = [f"method.checkpoint={checkpoint}", f"run.out={run}"]
    source_cfg = info.get("config")
    if source_cfg is not None:
        if "data.train" not in given and base.data.train == "demo:train":
            defaults.append(f"data.train={source_cfg.eval.train or source_cfg.data.train}")
        if "eval.val" not in given and not base.eval.val and source_cfg.eval.val:
            defaults.append(f"eval.val={source_cfg.eval.val}")
    return build_config(recipe or kind, [*defaults, *overrides])


def _train_task(args: argparse.Namespace) -> int:
    from mimkit.checkpoint import load_encoder
    from mimkit.configs import to_yaml
    from mimkit.eval.classify import train_classifier

    loaded = load_encoder(args.checkpoint, args.weights or "student")
    overrides = [*([f"method.weights={args.weights}"] if args.weights else []), *args.overrides]
    cfg = _task_config(args.command, args.checkpoint, loaded[1], args.config, overrides, args.out)
    if args.resume:
        cfg.run.resume = args.resume
    if args.print_config:
        # what train_classifier checks before it reads any data, beyond the config's own checks
        if not cfg.eval.val:
            raise ConfigError(
                f"{cfg.method.name} needs 'eval.val': labelled images to measure the accuracy on"
            )
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
    """k-NN, linear probe and fine-tune for each checkpoint, one table; each checkpoint is read once."""
    from mimkit.checkpoint import load_encoder
    from mimkit.configs import build_config
    from mimkit.data.sources import build_source
    from mimkit.eval.classify import train_classifier, write_table
    from mimkit.eval.knn import knn_evaluate
    from mimkit.train.distributed import init_distributed

    protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(protocols) - {"knn", "linprobe", "finetune"})
    if unknown:
        raise ConfigError(f"--protocols takes knn, linprobe and finetune; got {', '.join(unknown)}")
    out = Path(args.out)
    env = init_distributed(args.device)
    rows = []
    for index, checkpoint in enumerate(args.checkpoints):
        encoder, info = load_encoder(checkpoint, args.weights)
        cfg = info.get("config")
        train = args.train or (cfg and (cfg.eval.train or cfg.data.train))
        val = args.val or (cfg and cfg.eval.val)
        if not train or not val:
            raise ConfigError(f"{checkpoint}: names no labelled data; give --train and --val")
        row = {"checkpoint": str(checkpoint), "method": info["method"], "weights": args.weights}
        if "knn" in protocols:
            size, view, dtype = _view_and_dtype(info, env)
            result = knn_evaluate(
                encoder.to(env.device),
                build_source(train, image_size=size),
                build_source(val, image_size=size),
                view,
                env,
                pool=args.pool,
                num_workers=args.num_workers,
                autocast_dtype=dtype,
            )
            rows.append(
                {**row, "protocol": "knn", "budget": f"k={result['k']}, {args.pool}", **_tops(result)}
            )
        for kind, epochs in (("linprobe", args.linprobe_epochs), ("finetune", args.finetune_epochs)):
            if kind not in protocols:
                continue
            # the recipe's schedule compressed to the budget (warmup keeps its share of the epochs)
            recipe = build_config(kind).optim
            warmup = recipe.warmup_epochs * epochs / recipe.epochs
            overrides = [
                f"data.train={train}",
                f"eval.val={val}",
                f"method.weights={args.weights}",
                f"optim.epochs={epochs}",
                f"optim.warmup_epochs={warmup:.6g}",
                f"data.num_workers={args.num_workers}",
                f"run.device={args.device}",
                "run.resume=none",
                *args.overrides,
            ]
            cfg_task = _task_config(kind, checkpoint, info, None, overrides, str(out / f"{index}-{kind}"))
            result = train_classifier(cfg_task, env, loaded=(encoder, info))
            rows.append({**row, "protocol": kind, "budget": f"{epochs} epochs", **_tops(result)})
    if env.is_main:
        print(write_table(rows, out), end="")
        print(f"written to {out / 'table.md'} and {out / 'table.json'}")
    return 0


def _tops(result: dict) -> dict:
    return {"top1": result["top1"], "top5": result.get("top5")}


def _export(args: argparse.Namespace) -> int:
    from mimkit.interop.timm import export_encoder

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
        choices=("cls", "mean", "mean_prenorm"),
        help="default: the run's eval.pool, else cls (lmim_nn: mean_prenorm)",
    )
    p.add_argument("--k", type=int, help="default: the run's eval.k, else 20")
    p.add_argument("--temperature", type=float, help="default: the run's eval.temperature, else 0.07")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=4)
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
    p.add_argument("--pool", default="mean", choices=("cls", "mean", "mean_prenorm"), help="k-NN features")
    p.add_argument("--linprobe-epochs", type=int, default=90, help="linear probe budget (cached features)")
    p.add_argument("--finetune-epochs", type=int, default=5, help="fine-tuning budget")
    p.add_argument("--num-workers", type=int, default=2)
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
    from mimkit.train.distributed import cleanup
    from mimkit.train.engine import NonFiniteLoss, RunInterrupted
    from mimkit.train.runlock import RunFolderError

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
