"""`mimkit knn` and `mimkit eval`: evaluations of a checkpoint's encoder. The defaults every evaluation
shares live here: the data (the run's own), the feature (the run's eval.pool, else the method's), the
evaluation view (the encoder's input spec: size, normalisation, crop) and the autocast dtype (the engine's
rule)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from mimkit.checkpoint import check_output, is_json, resolve_checkpoint
from mimkit.configs import ConfigError, EvalConfig, build_config
from mimkit.data.source_spec import build_source, source_for, source_paths, tokenized_for
from mimkit.data.transforms import Views, eval_view
from mimkit.distributed import DistEnv, init_distributed
from mimkit.eval.features import chance_warning
from mimkit.eval.knn import knn_evaluate, loo_nn_evaluate
from mimkit.interop.load import load_encoder
from mimkit.models.input_spec import InputSpec
from mimkit.runs.classify import task_config, train_classifier
from mimkit.train.engine import autocast_dtype
from mimkit.train.log import write_json

PROTOCOLS = ("knn", "linprobe", "finetune")


def evaluation_view(spec: InputSpec) -> tuple[int, Views]:
    """The image size and the evaluation view of an encoder: what its input spec says (size,
    normalisation, crop), so an evaluation sees what the encoder was trained on."""
    return spec.eval_size, eval_view(spec.eval_size, spec)


def labelled_data(info: dict[str, Any], train: str | None, val: str | None) -> tuple[str | None, str | None]:
    """The memory bank / training images and the evaluation images: as given, else the run's own."""
    cfg = info.get("config")
    train = train or (cfg and (cfg.eval.train or cfg.data.train)) or None
    val = val or (cfg and cfg.eval.val) or None
    return train, val


def default_feature(info: dict[str, Any]) -> str:
    """The run's own k-NN feature (eval.pool), else the one its method's probe reads."""
    cfg = info.get("config")
    return cfg.eval.pool if cfg is not None else info["probe_pool"]


def knn(
    checkpoint: str,
    *,
    protocol: str = "knn",
    train: str | None = None,
    val: str | None = None,
    weights: str = "student",
    pool: str | None = None,
    k: int | None = None,
    temperature: float | None = None,
    batch_size: int = 256,
    num_workers: int | None = None,
    device: str = "auto",
    out: str | None = None,
    tokenizer: str | None = None,
    env: DistEnv | None = None,
) -> dict[str, Any]:
    """k-NN (``protocol="knn"``) or Latent MIM's leave-one-out 1-NN (``"lmim_nn"``) of a checkpoint's
    encoder; unset settings (None) follow the run's. Writes the result as JSON (``out``, or
    RUN/<protocol>.json for a run folder) and returns it."""
    if k is not None and k < 1:
        raise ConfigError(f"--k must be at least 1; got {k}")
    if temperature is not None and not temperature > 0:
        raise ConfigError(f"--temperature must be > 0; got {temperature}")
    env = env or init_distributed(device)
    target = (
        Path(out) if out else (Path(checkpoint) / f"{protocol}.json" if Path(checkpoint).is_dir() else None)
    )
    encoder, info = load_encoder(checkpoint, weights)
    encoder.to(env.device)
    loo = protocol == "lmim_nn"
    train, val = labelled_data(info, train, val)
    if target is not None:  # before any work: never over the checkpoint, the data, a device or a pipe
        inputs = [resolve_checkpoint(checkpoint), *source_paths(train or ""), *source_paths(val or "")]
        check_output(target, inputs, "--out", kind=("a JSON result", is_json))
    if not val or (not loo and not train):
        needs = "--val (the evaluation set)" if loo else "--train (memory bank) and --val (queries)"
        raise ConfigError(
            f"mimkit knn --protocol {protocol} needs {needs}; this checkpoint's config names no default"
        )
    settings = info["config"].eval if info.get("config") else EvalConfig()
    size, view = evaluation_view(encoder.input_spec)
    common = dict(
        batch_size=batch_size, num_workers=num_workers, autocast_dtype=autocast_dtype("auto", env.device)
    )
    trained_on = info["config"].data.train if info.get("config") else None
    tokenizer = tokenizer or (info["config"].data.tokenizer if info.get("config") else None)
    if loo:
        (queries,) = tokenized_for(
            encoder.input_spec, [source_for("--val", val, image_size=size)], trained_on, tokenizer
        )
        result = loo_nn_evaluate(encoder, queries, view, env, pool=pool or "mean_prenorm", **common)
    else:
        bank, queries = tokenized_for(
            encoder.input_spec,
            [source_for("--train", train, image_size=size), source_for("--val", val, image_size=size)],
            trained_on,
            tokenizer,
        )
        result = knn_evaluate(
            encoder,
            bank,
            queries,
            view,
            env,
            k=settings.k if k is None else k,
            temperature=settings.temperature if temperature is None else temperature,
            pool=pool or default_feature(info),
            **common,
        )
    result = {"checkpoint": str(checkpoint), "weights": weights, **result}
    what = "leave-one-out 1-NN" if loo else "k-NN"
    result["warnings"] = [line for line in [chance_warning(result, what)] if line]
    if target is not None and env.is_main:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_json(target, result)
        result["written_to"] = str(target)
    return result


def evaluation_table(
    checkpoints: list[str],
    *,
    protocols: tuple[str, ...] = PROTOCOLS,
    train: str | None = None,
    val: str | None = None,
    weights: str = "student",
    pool: str | None = None,
    linprobe_epochs: int = 90,
    finetune_epochs: int = 5,
    num_workers: int | None = None,
    device: str = "auto",
    out: str = "runs/eval",
    overrides: list[str] | None = None,
    tokenizer: str | None = None,
) -> tuple[str, list[dict[str, Any]]]:
    """k-NN, linear probe and fine-tune for each checkpoint (read once each), one table: table.md and
    table.json in ``out``, each training run's folder beside them. Returns (Markdown, rows)."""
    unknown = sorted(set(protocols) - set(PROTOCOLS))
    if unknown:
        raise ConfigError(f"--protocols takes {', '.join(PROTOCOLS)}; got {', '.join(unknown)}")
    folder = Path(out)
    env = init_distributed(device)
    rows = []
    for index, checkpoint in enumerate(checkpoints):
        encoder, info = load_encoder(checkpoint, weights)
        data_train, data_val = labelled_data(info, train, val)
        if not data_train or not data_val:
            raise ConfigError(f"{checkpoint}: names no labelled data; give --train and --val")
        row = {"checkpoint": str(checkpoint), "method": info["method"], "weights": weights}
        if "knn" in protocols:
            size, view = evaluation_view(encoder.input_spec)
            feature = pool or default_feature(info)
            bank, queries = tokenized_for(
                encoder.input_spec,
                [build_source(data_train, image_size=size), build_source(data_val, image_size=size)],
                info["config"].data.train if info.get("config") else None,
                tokenizer or (info["config"].data.tokenizer if info.get("config") else None),
            )
            result = knn_evaluate(
                encoder.to(env.device),
                bank,
                queries,
                view,
                env,
                pool=feature,
                num_workers=num_workers,
                autocast_dtype=autocast_dtype("auto", env.device),
            )
            rows.append({**row, "protocol": "knn", "budget": f"k={result['k']}, {feature}", **_tops(result)})
            if env.is_main and (line := chance_warning(result, f"{checkpoint}: k-NN")):
                print(f"warning: {line}", file=sys.stderr)
        for kind, epochs in (("linprobe", linprobe_epochs), ("finetune", finetune_epochs)):
            if kind not in protocols:
                continue
            # the recipe's schedule compressed to the budget (warmup keeps its share of the epochs)
            recipe = build_config(kind).optim
            warmup = recipe.warmup_epochs * epochs / recipe.epochs
            settings = [
                f"data.train={data_train}",
                f"eval.val={data_val}",
                f"method.weights={weights}",
                f"optim.epochs={epochs}",
                f"optim.warmup_epochs={warmup:.6g}",
                f"data.num_workers={'null' if num_workers is None else num_workers}",
                f"run.device={device}",
                "run.resume=none",
                *([f"data.tokenizer={tokenizer}"] if tokenizer else []),
                *(overrides or []),
            ]
            cfg = task_config(kind, checkpoint, info, None, settings, str(folder / f"{index}-{kind}"))
            result = train_classifier(cfg, env, loaded=(encoder, info), show_config=False)
            rows.append({**row, "protocol": kind, "budget": f"{epochs} epochs", **_tops(result)})
    markdown = write_table(rows, folder) if env.is_main else ""
    return markdown, rows


def _tops(result: dict) -> dict:
    return {"top1": result["top1"], "top5": result.get("top5")}


def write_table(rows: list[dict[str, Any]], out: Path) -> str:
    """One Markdown table (and the same rows as JSON) of evaluation results; returns the Markdown."""
    header = ["checkpoint", "method", "weights", "protocol", "budget", "top-1", "top-5"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        top5 = f"{r['top5']:.2f}" if r.get("top5") is not None else "-"
        cells = [
            r["checkpoint"],
            r["method"],
            r["weights"],
            r["protocol"],
            r["budget"],
            f"{r['top1']:.2f}",
            top5,
        ]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    markdown = "\n".join(lines) + "\n"
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(markdown)
    write_json(out / "table.json", rows)
    return markdown
