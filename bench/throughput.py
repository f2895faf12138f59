"""Training throughput of a method: synthetic device-resident batches through the real training step
(autocast, backward, optimizer step, EMA) of mimkit's engine. Prints one JSON line per variant measured.

    python bench/throughput.py --method mae --arch vit_base --batch 256 --precision bf16
    python bench/throughput.py --method mae --arch vit_tiny --img 32 --patch 4 --batch 64 --steps 5  # CPU
    python bench/throughput.py --config mae_vit_base_imagenet --precision bf16 \
        --variants baseline,sync_free,compiled

Each optimisation is a flag (--fused, --host-sync, --compile, --compile-mode, --float8, --tf32), or a named
variant of --variants (measured one after another in this process, one JSON line each):
    baseline    eager, the plain AdamW loop, the health check read every step (the step as written)
    fused       + fused AdamW
    sync_free   + no host sync in the step (run.host_sync=log: the marks are read every 20 steps)
    compiled    + torch.compile of the method's step, loss included
    cudagraphs  + compile mode reduce-overhead (CUDA graphs)
    float8      compiled, with the linear layers in float8 (torchao; numerics change)

Token methods (``--method mtm``) read id grids of ``--token-grid`` cells (SeiT's stored 32 x 32 by default)
with ``--vocab`` codes of a random codebook; the token views (crop, colour, TokenAdapt with
``--tokenadapt``: random weights of the official shape) run on the device inside the timed step:

    python bench/throughput.py --method mtm --arch vit_base --img 28 --patch 2 --batch 256 --precision bf16 \
        --tokenadapt model.stem=token_ids model.token_dropout=0.1
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import resource
import tempfile
import time

import torch

from mimkit.configs import build_config
from mimkit.distributed import init_distributed
from mimkit.methods import build_method
from mimkit.models.tokenadapt import TokenAdapt, save_tokenadapt
from mimkit.train.engine import Trainer

# dense bf16 tensor-core peaks (FLOP/s) for model FLOPs utilisation
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def fake_batch(method, batch: int, img: int, device: torch.device, token_grid: int, vocab: int) -> dict:
    """A batch of the shape the method's training views produce, already on the device: images, or for
    a token model id grids (with per-sample seeds for the device-side views)."""
    from mimkit.configs import DataConfig

    views = method.train_transform(DataConfig())
    if method.input_spec().kind == "token_ids":
        sample = views(torch.randint(0, vocab, (token_grid, token_grid), dtype=torch.int16))
        out = {k: torch.rand(batch, *v.shape, device=device) for k, v in sample.items() if k != "image"}
        out["image"] = torch.randint(0, vocab, (batch, token_grid, token_grid), device=device)
        out["seed"] = torch.arange(batch)  # seeds stay on the host, as the engine keeps them
        return out
    sample = views(torch.randint(0, 256, (3, img, img), dtype=torch.uint8))
    return {k: torch.randn(batch, *v.shape, device=device) for k, v in sample.items()}


class FakeTokens:
    """What a token method takes from its training source: the codebook of a token dataset."""

    def __init__(self, vocab: int, dim: int) -> None:
        self.name = "random codebook"
        self.vocab_size = vocab
        self.dataset = type("Dataset", (), {"codebook": torch.randn(vocab, dim)})()


def count_flops(trainer: Trainer, batch: dict) -> float:
    """The model's FLOPs per step (the device-side views are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    if trainer.batch_transform is not None:
        with torch.no_grad():
            batch = trainer.batch_transform(batch)
    with FlopCounterMode(display=False) as counter:
        with trainer.autocast():
            out = trainer.module(batch)
        out.loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


# the optimisations, each added to the one before (float8 changes numerics: opt-in, as in training)
VARIANTS = {
    "baseline": dict(fused="off", host_sync="step"),
    "fused": dict(fused="on", host_sync="step"),
    "sync_free": dict(fused="on", host_sync="log"),
    "compiled": dict(fused="on", host_sync="log", compile=True),
    "cudagraphs": dict(fused="on", host_sync="log", compile=True, compile_mode="reduce-overhead"),
    "float8": dict(fused="on", host_sync="log", compile=True, float8=True),
}
LOG_EVERY = 20  # the engine's default run.log_every: where host_sync=log reads the marks

# what a profile's time is spent on, by operator or kernel name (first match wins)
CATEGORIES = [
    ("attention", re.compile(r"attention|flash|fmha|sdpa|scaled_dot", re.I)),
    (
        "matmul",
        re.compile(r"gemm|matmul|\bmm\b|::mm|addmm|bmm|linear|cublas|cutlass|xmma|nvjet|sm\d\d_", re.I),
    ),
    ("finite_checks", re.compile(r"LpNorm|foreach_norm", re.I)),  # the engine's non-finite marks
    ("norm", re.compile(r"norm", re.I)),
    ("optimizer", re.compile(r"adam|foreach|lars", re.I)),
]
# where the host waits for the GPU (.item(), bool() or a shape read from the device end in one of these)
HOST_SYNCS = re.compile(r"cudaStreamSynchronize|cudaDeviceSynchronize|cudaEventSynchronize")


def profile_steps(step, steps: int, device: torch.device) -> dict:
    """torch.profiler over ``steps`` training steps: milliseconds per step by kind of work (on a GPU, the
    kernels' device time; on a CPU, the operators' own time), and on a GPU the host syncs per step and the
    idle time (wall time the device spent without a kernel)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        for number in range(steps):
            step(number)
        if cuda:
            torch.cuda.synchronize()
    wall = (time.perf_counter() - start) * 1000 / steps
    spent = {name: 0.0 for name, _ in CATEGORIES} | {"elementwise_and_other": 0.0}
    syncs = 0
    for event in prof.key_averages():
        if HOST_SYNCS.search(event.key):
            syncs += event.count
        us = event.self_device_time_total if cuda else event.self_cpu_time_total
        if us <= 0 or (cuda and event.device_type.name != "CUDA"):
            continue
        kind = next(
            (name for name, pattern in CATEGORIES if pattern.search(event.key)), "elementwise_and_other"
        )
        spent[kind] += us / 1000 / steps
    busy = sum(spent.values())
    out = {"ms_per_step": {k: round(v, 3) for k, v in spent.items()}, "wall_ms_per_step": round(wall, 3)}
    if cuda:
        out["host_syncs_per_step"] = syncs / steps
        out["device_idle_ms_per_step"] = round(max(wall - busy, 0.0), 3)
    return out


def measure(args: argparse.Namespace, overrides: list[str], tokens: bool, out: str) -> dict:
    """Build the method and its Trainer from ``overrides`` and time ``args.steps`` training steps."""
    cfg = build_config(args.config, overrides)
    env = init_distributed(cfg.run.device)
    torch.manual_seed(0)
    method = build_method(cfg)
    if tokens:
        method.use_data(FakeTokens(args.vocab, cfg.model.token_dim))
    trainer = Trainer(method, cfg, env, out)
    batch = fake_batch(method, args.batch, cfg.model.img_size, env.device, args.token_grid, args.vocab)
    flops = count_flops(trainer, batch) / args.batch

    def step(number: int) -> None:
        trainer.start_step(progress=0.5)
        trainer.micro_step(batch, boundary=True)
        trainer.optimizer_step(progress=0.5)
        if trainer.host_sync == "log" and number % LOG_EVERY == 0:
            trainer.check_health()

    for number in range(args.warmup):
        step(number)
    if env.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for number in range(args.steps):
        step(number)
    trainer.check_health()  # the time includes the device finishing its work
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    profiled = profile_steps(step, args.profile, env.device) if args.profile else None

    images_per_s = args.batch * args.steps / seconds
    peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(env.device)
    if env.device.type == "cuda":
        memory = torch.cuda.max_memory_allocated() / 2**30
        device_name = torch.cuda.get_device_name(env.device)
    else:
        memory = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # process peak RSS
        device_name = "cpu"
    return {
        "method": cfg.method.name,
        "arch": cfg.model.arch,
        "img_size": cfg.model.img_size,
        "patch_size": method.encoder.patch_size,
        "token_views": trainer.batch_transform.extra_repr() if trainer.batch_transform is not None else None,
        "batch": args.batch,
        "precision": trainer.precision,
        "compile": cfg.run.compile,
        "compile_mode": cfg.run.compile_mode if cfg.run.compile else None,
        "fused_adamw": bool(trainer.optimizer.defaults.get("fused")),
        "host_sync": trainer.host_sync,
        "float8": cfg.run.float8,
        "tf32": cfg.run.tf32,
        "device": device_name,
        "torch": torch.__version__,
        "images_per_s": round(images_per_s, 1),
        "step_ms": round(1000 * seconds / args.steps, 2),
        "peak_memory_gib": round(memory, 3),
        "gflops_per_image": round(flops / 1e9, 2),
        "peak_tflops": round(peak / 1e12, 1) if peak else None,
        "mfu": round(flops * images_per_s / peak, 4) if peak else None,
        **({"profile": profiled} if profiled else {}),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="a recipe to start from (its model and method sections)")
    parser.add_argument("--method", help="the method (default: the recipe's, else mae)")
    parser.add_argument("--arch", help="the encoder size (default: the recipe's, else vit_base)")
    parser.add_argument("--img", type=int, help="the encoder's input side (default: the recipe's, else 224)")
    parser.add_argument("--patch", type=int, default=None)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp16", "fp32"))
    parser.add_argument("--compile", action="store_true", help="run.compile: torch.compile the step")
    parser.add_argument(
        "--compile-mode",
        default="default",
        choices=("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
        help="run.compile_mode (reduce-overhead: CUDA graphs)",
    )
    parser.add_argument(
        "--fused",
        choices=("auto", "on", "off"),
        default="auto",
        help="AdamW's fused kernel (optim.fused; auto: on GPUs); off is the plain-loop baseline",
    )
    parser.add_argument(
        "--host-sync",
        choices=("auto", "step", "log"),
        default="auto",
        help=f"run.host_sync: read the health marks every step, or every {LOG_EVERY} (needs fused AdamW)",
    )
    parser.add_argument("--float8", action="store_true", help="run.float8: linear layers in float8 (torchao)")
    parser.add_argument("--tf32", action="store_true", help="run.tf32: fp32 matmuls in TF32 (GPUs)")
    parser.add_argument(
        "--variants",
        help=f"comma-separated named variants to measure in turn, one JSON line each: {', '.join(VARIANTS)} "
        "(replaces the flags above)",
    )
    parser.add_argument(
        "--peak-tflops",
        type=float,
        help="the peak to state MFU against, e.g. a measured bf16 matmul peak (default: the device's "
        "datasheet dense bf16 figure, when known)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="also profile N steps (torch.profiler): time by kind of work, host syncs, device idle time",
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--token-grid", type=int, default=32, help="token methods: stored id grid side")
    parser.add_argument("--vocab", type=int, default=391, help="token methods: codes per cell")
    parser.add_argument(
        "--tokenadapt", action="store_true", help="token methods: the TokenAdapt path, random weights"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="any config override (method.*, model.*)"
    )
    args = parser.parse_args()
    flags = dict(
        fused=args.fused,
        host_sync=args.host_sync,
        compile=args.compile,
        compile_mode=args.compile_mode,
        float8=args.float8,
    )
    variants = {"flags": flags}
    if args.variants:
        unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
        if unknown:
            parser.error(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
        variants = {v: VARIANTS[v] for v in args.variants.split(",")}

    if args.config is None:  # no recipe: MAE's ViT-B at 224 px unless told otherwise
        args.method, args.arch, args.img = args.method or "mae", args.arch or "vit_base", args.img or 224
    given = {"method": args.method, "model.arch": args.arch, "model.img_size": args.img}
    overrides = [
        *(f"{key}={value}" for key, value in given.items() if value is not None),
        f"optim.batch_size={args.batch}",
        f"run.precision={args.precision}",
        f"run.device={args.device}",
        f"run.tf32={str(args.tf32).lower()}",
        "optim.epochs=1",
        "optim.warmup_epochs=0",
        "optim.accum_iter=1",
        "optim.lr=1e-4",
        *([f"model.patch_size={args.patch}"] if args.patch else []),
        *args.overrides,
    ]
    probe = build_config(args.config, overrides)  # what the recipe and overrides make of the model
    tokens = probe.model.stem == "token_ids"
    if tokens and probe.model.vocab_size is None:
        overrides.append(f"model.vocab_size={args.vocab}")
    with tempfile.TemporaryDirectory() as out:
        if args.tokenadapt or (tokens and getattr(probe.method, "tokenadapt", None)):
            # the recipe's TokenAdapt path, with random weights of the official shape
            ta = TokenAdapt(args.vocab, in_grid=args.token_grid, out_grid=probe.model.img_size)
            save_tokenadapt(ta, f"{out}/tokenadapt.ckpt")
            overrides.append(f"method.tokenadapt={out}/tokenadapt.ckpt")
        for name, variant in variants.items():
            chosen = {**flags, **variant}
            fused = {"auto": "null", "on": "true", "off": "false"}[chosen["fused"]]
            settings = [
                f"optim.fused={fused}",
                f"run.host_sync={chosen['host_sync']}",
                f"run.compile={str(chosen.get('compile', False)).lower()}",
                f"run.compile_mode={chosen.get('compile_mode', 'default')}",
                f"run.float8={str(chosen.get('float8', False)).lower()}",
            ]
            try:
                row = measure(args, [*overrides, *settings], tokens, out)
            except Exception as err:  # one variant's failure (say, float8 on an older GPU) is a row
                row = {"error": f"{type(err).__name__}: {err}"}
            print(json.dumps({"variant": name, **row}), flush=True)
            gc.collect()
            torch._dynamo.reset()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
