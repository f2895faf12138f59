"""The ``mimkit`` command: pretrain, knn, export, recipes."""

from __future__ import annotations

import argparse
import json
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
    from types import SimpleNamespace

    import torch

    from mimkit.checkpoint import load_encoder
    from mimkit.configs import EvalConfig
    from mimkit.data.sources import build_source
    from mimkit.data.transforms import eval_view
    from mimkit.eval.knn import knn_evaluate, loo_nn_evaluate
    from mimkit.train.distributed import init_distributed

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
    size = info["img_size"]
    data = SimpleNamespace(mean=info["mean"], std=info["std"], crop_pct=info["crop_pct"])
    dtype = torch.bfloat16 if env.device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    common = dict(batch_size=args.batch_size, num_workers=args.num_workers, autocast_dtype=dtype)
    if loo:
        result = loo_nn_evaluate(
            encoder,
            build_source(val, image_size=size),
            eval_view(size, data),
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
            eval_view(size, data),
            env,
            k=args.k or settings.k,
            temperature=args.temperature or settings.temperature,
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

    p = sub.add_parser("export", help="write the encoder as a timm-loadable safetensors file")
    p.add_argument("checkpoint", help="run folder or .pt checkpoint")
    p.add_argument("--out", help="output .safetensors path")
    p.add_argument("--weights", default="student", help="student | teacher")
    p.set_defaults(func=_export)

    p = sub.add_parser("recipes", help="list the shipped recipes")
    p.set_defaults(func=_recipes)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from mimkit.train.distributed import cleanup
    from mimkit.train.engine import NonFiniteLoss

    try:
        return args.func(args)
    except NonFiniteLoss as err:
        print(f"mimkit: stopped: {err}", file=sys.stderr)
        return 3
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"mimkit: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mimkit: interrupted; resume with --resume auto", file=sys.stderr)
        return 130
    finally:
        cleanup()
