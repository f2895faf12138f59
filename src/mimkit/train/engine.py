"""The one training loop. Pre-training, and the evaluations that train (linear probe, fine-tuning), run
here: a module's forward(batch) returns a StepOutput, the Trainer does the rest."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimkit import checkpoint
from mimkit.configs import Config, diff, to_dict
from mimkit.data.loader import EpochSampler, ViewDataset, make_loader
from mimkit.train.distributed import DistEnv, all_gather_rows, any_rank, broadcast_flag, gather_objects
from mimkit.train.log import RunLogger
from mimkit.train.optim import build_optimizer, effective_batch, lr_at, resolve_lr

# settings that may change when a run is resumed (they do not change what is being trained)
RESUMABLE_CHANGES = ("run.", "eval.", "data.num_workers", "recipe")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf; the message gives the step and the checkpoint to resume from."""


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, module: nn.Module, cfg: Config, env: DistEnv, out_dir: str | Path) -> None:
        self.cfg, self.env, self.out_dir = cfg, env, Path(out_dir)
        if env.enabled and env.device.type == "cuda":
            # BatchNorm heads see the global batch, as in the references (SyncBN has no CPU kernels: on
            # CPU ranks keep per-rank statistics)
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        self.module = module.to(env.device)
        self.precision = resolve_precision(cfg.run.precision, env.device)
        self.eff_batch = effective_batch(cfg.optim, env.world_size)
        self.base_lr = resolve_lr(cfg.optim, self.eff_batch)
        self.optimizer = build_optimizer(self.module, cfg.optim, self.base_lr, env.device)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        if env.enabled:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module
        self.forward = torch.compile(self.model) if cfg.run.compile else self.model
        self.epoch = 0  # epochs completed
        self.iter = 0  # micro-batches done in the current epoch
        self.step = 0  # optimizer steps done
        self.skipped = 0  # unreadable images met by this rank
        self._nonfinite = torch.zeros((), dtype=torch.bool, device=env.device)
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0

    # ---- one step -----------------------------------------------------------------------------------
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.env.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def start_step(self, progress: float) -> None:
        """Before the first micro-batch of an optimizer step: the method's own schedules (and teachers that
        move before the step) read ``progress``, the fraction of data iterations done."""
        before_step = getattr(self.module, "before_step", None)
        if before_step is not None:
            before_step(progress)

    def micro_step(self, batch: dict[str, Any], *, boundary: bool) -> None:
        """Forward and backward of one micro-batch; gradients are averaged over accum_iter micro-batches."""
        sync = contextlib.nullcontext() if boundary or not self.env.enabled else self.model.no_sync()
        with sync:
            with self.autocast():
                out = self.forward(batch)
            self.scaler.scale(out.loss / self.cfg.optim.accum_iter).backward()
        self._nonfinite |= ~torch.isfinite(out.loss.detach())
        metrics = {"loss": out.loss.detach().float(), **{k: v.float() for k, v in out.metrics.items()}}
        for key, value in metrics.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0) + value
        self._metric_count += 1

    def optimizer_step(self, progress: float) -> None:
        """Apply the accumulated gradients; stop the run (with a checkpoint) if any loss was not finite."""
        if any_rank(self._nonfinite, self.env):  # one host sync per step, before the weights are spoiled
            self.iter -= self.cfg.optim.accum_iter  # resume at the start of this accumulation cycle
            self.optimizer.zero_grad(set_to_none=True)
            path = self.save()
            raise NonFiniteLoss(
                f"loss is not finite at step {self.step + 1} (epoch {self.epoch}, micro-batch {self.iter}); "
                f"the weights before it are saved in {path}. Resume with --resume {path} after lowering "
                "the learning rate, raising warmup or switching run.precision."
            )
        if self.cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite.zero_()
        self.step += 1
        after_step = getattr(self.module, "after_step", None)
        if after_step is not None:
            after_step(progress)

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "iter": self.iter,
            "step": self.step,
            "config": to_dict(self.cfg),
            "rng": gather_objects(checkpoint.rng_state(), self.env),
        }

    def save(self, name: str = "last.pt") -> Path:
        """Every rank must call this together (RNG states are gathered); rank 0 writes."""
        state = self.state_dict()
        path = self.out_dir / name
        if self.env.is_main:
            checkpoint.save_atomic(state, path)
        return path

    def resume(self, path: str | Path) -> None:
        state = checkpoint.load(path)
        changed = diff(state["config"], to_dict(self.cfg))
        fatal = {k: v for k, v in changed.items() if k.startswith(("model.", "method."))}
        if fatal:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fatal.items())
            raise ValueError(
                f"cannot resume {path}: it was trained with a different model or method ({listed}). "
                "Use --out for a new run, or --resume none to start over here."
            )
        noted = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE_CHANGES)}
        if noted and self.env.is_main:
            listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in noted.items())
            print(f"note: resuming {path} with changed settings: {listed}", file=sys.stderr)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.iter, self.step = state["epoch"], state["iter"], state["step"]
        rngs = state["rng"]
        if len(rngs) == self.env.world_size:
            checkpoint.set_rng_state(rngs[self.env.rank])
        else:  # another world size: the data order still resumes exactly, the masks cannot
            checkpoint.seed_all(self.cfg.run.seed + self.env.rank + 7919 * self.step)

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(
        self, dataset: ViewDataset, on_epoch_end: Callable[[int], dict[str, float]] | None = None
    ) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or ``run.stop_at_step``); ``on_epoch_end(epoch)`` may return scalars
        to log (a periodic evaluation)."""
        cfg, env = self.cfg, self.env
        bs, accum = cfg.optim.batch_size, cfg.optim.accum_iter
        sampler = EpochSampler(len(dataset), seed=cfg.run.seed, rank=env.rank, world_size=env.world_size)
        iters = sampler.per_rank // bs
        if iters < accum:
            raise ValueError(
                f"data.train has {len(dataset)} images: {sampler.per_rank} per device, fewer than one "
                f"optimizer step of {accum} x {bs}; lower optim.batch_size or optim.accum_iter"
            )
        loader = make_loader(
            dataset,
            sampler,
            batch_size=bs,
            # tensors already in memory (cached features) gain nothing from worker processes
            num_workers=0 if getattr(dataset, "in_memory", False) else cfg.data.num_workers,
            drop_last=True,
            pin_memory=env.device.type == "cuda",
        )
        total = cfg.optim.epochs * iters
        log = RunLogger(
            self.out_dir,
            enabled=env.is_main,
            total=total,
            initial=self.epoch * iters + self.iter,
            progress=cfg.run.progress,
        )
        min_lr = max(cfg.optim.min_lr, cfg.optim.min_lr_frac * self.base_lr)
        schedule = dict(
            lr=self.base_lr,
            min_lr=min_lr,
            warmup_epochs=cfg.optim.warmup_epochs,
            epochs=cfg.optim.epochs,
            warmup_from=min_lr if cfg.optim.warmup_from_min_lr else 0.0,
        )
        start_time = window_start = time.perf_counter()
        last_save, window_images, images_seen, last_loss = time.monotonic(), 0, 0, math.nan
        stop_at = cfg.run.stop_at_step
        stopped_early = False
        try:
            while self.epoch < cfg.optim.epochs and not stopped_early:
                sampler.set_epoch(self.epoch, start=self.iter * bs)
                # micro-batches left over at the end of an epoch (iters % accum) are dropped, as in the
                # references: their gradients are cleared here
                self.optimizer.zero_grad(set_to_none=True)
                for batch in loader:
                    self._report_skipped(batch)
                    it = self.epoch * iters + self.iter
                    if self.iter % accum == 0:
                        self.set_lr(lr_at(it / iters, **schedule))
                        self.start_step(it / total)
                    boundary = (self.iter + 1) % accum == 0
                    self.micro_step(to_device(batch, env.device), boundary=boundary)
                    window_images += len(batch["label"]) * env.world_size
                    self.iter += 1
                    log.advance()
                    if not boundary:
                        continue
                    self.optimizer_step(progress=it / total)
                    if self.step % cfg.run.log_every == 0 or self.step == stop_at:
                        last_loss = self._log(log, window_images, time.perf_counter() - window_start, iters)
                        images_seen += window_images
                        window_start, window_images = time.perf_counter(), 0
                        due = time.monotonic() - last_save > cfg.run.checkpoint_minutes * 60
                        if broadcast_flag(due, env):
                            self.save()
                            last_save = time.monotonic()
                    if stop_at is not None and self.step >= stop_at:
                        stopped_early = True
                        break
                if stopped_early:
                    self.save()
                    break
                self.epoch, self.iter = self.epoch + 1, 0
                if on_epoch_end is not None:
                    scalars = on_epoch_end(self.epoch)
                    if scalars:
                        log.scalars(self.step, scalars, epoch=self.epoch)
                self.save()
                last_save = time.monotonic()
        finally:
            log.close()
        images_seen += window_images
        seconds = time.perf_counter() - start_time
        skipped_total = (
            int(all_gather_rows(torch.tensor([self.skipped]), env).sum()) if env.enabled else self.skipped
        )
        summary = {
            "epochs_done": self.epoch,
            "steps": self.step,
            "stopped_early": stopped_early,
            "images_seen": images_seen,
            "seconds": round(seconds, 2),
            "images_per_s": round(images_seen / seconds, 1) if seconds > 0 else None,
            "last_logged_loss": last_loss,
            "skipped_images": skipped_total,
        }
        if env.enabled:
            summary["ranks_in_sync"] = self.ranks_in_sync()
        return summary

    def _report_skipped(self, batch: dict[str, Any]) -> None:
        """Unreadable images are named and counted; a batch with none left is an error (the ranks of a
        DDP run must step together, and a folder of broken files should not train silently)."""
        skipped = batch.pop("skipped")
        self.skipped += len(skipped)
        for message in skipped:
            print(f"warning: skipped unreadable image {message}", file=sys.stderr, flush=True)
        if "label" not in batch:
            raise ValueError(f"every image of a batch was unreadable; the first: {skipped[0]}")

    @torch.no_grad()
    def ranks_in_sync(self) -> bool:
        """Whether every rank holds bit-identical weights (DDP keeps them so; a mismatch is a bug)."""
        sums = torch.stack(
            [p.double().sum() for p in self.module.parameters()]
            + [p.double().square().sum() for p in self.module.parameters()]
        )
        gathered = all_gather_rows(sums[None], self.env)
        return bool((gathered == gathered[0]).all())

    def _log(self, log: RunLogger, images: int, seconds: float, iters: int) -> float:
        if not self._metric_count:
            return math.nan
        keys = list(self._metric_sums)
        values = (torch.stack([self._metric_sums[k] for k in keys]) / self._metric_count).tolist()
        self._metric_sums, self._metric_count = {}, 0
        scalars = dict(zip(keys, values, strict=True))
        # the unscaled lr (groups may carry a layer-decay lr_scale below 1)
        scalars["lr"] = max(group["lr"] for group in self.optimizer.param_groups)
        scalars["img/s"] = images / seconds if seconds > 0 else 0.0
        log.scalars(self.step, scalars, epoch=self.epoch + self.iter / iters)
        return scalars["loss"]
