"""The one training loop. Pre-training, and the evaluations that train (linear probe, fine-tuning), run
here: a module's forward(batch) returns a StepOutput, the Trainer does the rest."""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mimkit import checkpoint
from mimkit.configs import Config
from mimkit.data.device import DeviceStages
from mimkit.data.loader import EpochSampler, ViewDataset, close_loader, make_loader
from mimkit.distributed import DistEnv, all_gather_rows, broadcast_flag, gather_objects, max_over_ranks
from mimkit.methods.base import StepOutput, Trainable
from mimkit.methods.ema import EMATeacher
from mimkit.train.guard import NonFiniteGuard, NonFiniteLoss, all_finite, optimizer_tensors
from mimkit.train.log import RunLogger
from mimkit.train.optim import build_optimizers, effective_batch, lr_at, resolve_lr
from mimkit.train.signals import RunInterrupted, StopSignals, interrupted
from mimkit.train.state import resume_training, training_state

__all__ = ["NonFiniteLoss", "RunInterrupted", "Trainer", "all_finite", "autocast_dtype"]


def fused_adamw(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer`` is AdamW with the fused kernel in every group: the one kind that can skip an
    update on the device (its ``found_inf``) without the host looking."""
    return isinstance(optimizer, torch.optim.AdamW) and all(g.get("fused") for g in optimizer.param_groups)


def resolve_host_sync(setting: str, optimizers: dict[str, torch.optim.Optimizer], precision: str) -> str:
    """``run.host_sync``: "log" needs every optimizer to be fused AdamW, and no fp16 (its loss scaler skips
    steps on a schedule of its own); auto takes "log" where it can."""
    why = None
    if not all(fused_adamw(o) for o in optimizers.values()):
        why = "it needs fused AdamW (optim.name=adamw with optim.fused=true, or null on a GPU)"
    elif precision == "fp16":
        why = "run.precision=fp16 scales the loss and skips steps of its own"
    if setting == "auto":
        return "step" if why else "log"
    if setting == "log" and why:
        raise ValueError(f"run.host_sync=log is not possible here: {why}; use run.host_sync=step or auto")
    return setting


def float8_layers(module: nn.Module) -> None:
    """Swap the linear layers that train (not an EMA teacher's, nor any frozen one: a linear probe's
    encoder) for torchao's float8 ones: dynamic per-tensor scales, e4m3 forward, e5m2 gradients. Layers
    whose sizes are not multiples of 16 (what float8 matmuls take) stay as they are."""
    try:  # imported here: torchao is optional, and only this opt-in needs it
        from torchao.float8 import convert_to_float8_training
    except ImportError as err:
        raise ValueError("run.float8=true needs torchao: pip install 'mimkit[float8]'") from err
    frozen = {name for name, m in module.named_modules() if isinstance(m, EMATeacher)}

    def trains(layer: nn.Module, name: str) -> bool:
        return (
            isinstance(layer, nn.Linear)
            and layer.weight.requires_grad
            and layer.in_features % 16 == 0
            and layer.out_features % 16 == 0
            and not any(name == f or name.startswith(f + ".") for f in frozen)
        )

    convert_to_float8_training(module, module_filter_fn=trains)


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision=fp16 needs a GPU; use bf16 or fp32 on the CPU")
    return precision


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``run.precision`` on ``device`` (None: fp32); every run and evaluation uses
    this one rule."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_precision(precision, device))


def batch_size(batch: dict[str, Any]) -> int:
    """Samples in a batch: its labels', else its first tensor's length."""
    first = batch.get("label", next((v for v in batch.values() if torch.is_tensor(v)), None))
    return 0 if first is None else len(first)


class Trainer:
    def __init__(self, module: Trainable, cfg: Config, env: DistEnv, out_dir: str | Path) -> None:
        self.cfg, self.env, self.out_dir = cfg, env, Path(out_dir)
        if env.enabled and env.device.type == "cuda":
            # BatchNorm heads see the global batch, as in the references (SyncBN has no CPU kernels: on
            # CPU ranks keep per-rank statistics)
            module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
        if cfg.run.float8:
            float8_layers(module)
        if cfg.run.tf32 and env.device.type == "cuda":
            torch.set_float32_matmul_precision("high")  # process-wide, as torch keeps it
        self.module = module.to(env.device)
        self.precision = resolve_precision(cfg.run.precision, env.device)
        self.eff_batch = effective_batch(cfg.optim, env.world_size)
        self.base_lr = resolve_lr(cfg.optim, self.eff_batch)
        # "main", and any other optimizer the module's parameter groups name (a discriminator's)
        self.optimizers = build_optimizers(self.module, cfg.optim, self.base_lr, env.device)
        self.optimizer = self.optimizers["main"]
        # the method's device-side stage; with the dataset's own (set by fit) the one device stage
        self.batch_transform = module.batch_transform()
        self.stages = DeviceStages(env.device, None, self.batch_transform, check=self._report_skipped)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=self.precision == "fp16")
        if env.enabled:
            ids = [env.device.index] if env.device.type == "cuda" else None
            self.model: nn.Module = DistributedDataParallel(self.module, device_ids=ids)
        else:
            self.model = self.module
        self.forward = torch.compile(self.model, mode=cfg.run.compile_mode) if cfg.run.compile else self.model
        self.host_sync = resolve_host_sync(cfg.run.host_sync, self.optimizers, self.precision)
        self.guard = NonFiniteGuard(self.module, env, self.host_sync)
        self.signals = StopSignals(announce=env.is_main)
        self.epoch = 0  # epochs completed
        self.iter = 0  # micro-batches done in the current epoch
        self.step = 0  # optimizer steps done
        self.skipped: set[str] = set()  # unreadable images met by this rank, one message per file
        # what earlier sessions of this run did, so that summaries count the whole run
        self.totals = {"images_seen": 0, "seconds": 0.0, "sessions": 0}
        self.last_saved: tuple[Path, int] | None = None  # the last good checkpoint and its step
        self._session: _Session | None = None  # the fit() in progress
        self._metric_sums: dict[str, torch.Tensor] = {}
        self._metric_count = 0

    # ---- one step -----------------------------------------------------------------------------------
    def train_step(self, micro_batches: list[dict[str, Any]], progress: float) -> int:
        """One optimizer step over ``optim.accum_iter`` micro-batches, in the order it happens.
        ``progress``: the fraction of training's data iterations done, which schedules read. Returns the
        samples it trained on, over every rank."""
        number, images = self.step + 1, 0
        # 1. where a rewind would start; the method's schedules, and a teacher that moves first
        self.guard.start_step(number, self.epoch, self.iter)
        with self.guard.before_step_hooks(number):
            self.module.before_step(progress)
        # 2. views on the device, forward, backward; gradients averaged over the micro-batches
        for k, batch in enumerate(micro_batches):
            batch = self.stages(batch)
            with self.gradient_sync(last=k == len(micro_batches) - 1):
                with self.autocast():
                    out = self.forward(batch)
                self.scaler.scale(out.loss / self.cfg.optim.accum_iter).backward()
            self.guard.mark_loss(out.loss)
            self.add_metrics(out)
            self.iter += 1
            images += batch_size(batch) * self.env.world_size
        # 3. a loss or gradient that is not finite marks the step bad: read now (host_sync=step) or at
        # the next log step, and never applied
        self.guard.mark_gradients(
            number, (p.grad for p in self.module.parameters()), self.scaler.is_enabled()
        )
        if self.host_sync == "step":
            self.check_health()
        elif not self.env.enabled:
            self.signals.agreed = self.signals.requested  # host-side: no sync to agree with itself
        # 4. clip, update (a marked step's update is skipped on the device), then the teacher
        if self.cfg.optim.clip_grad:
            for optimizer in self.optimizers.values():
                self.scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.clip_grad)
        for optimizer in self.optimizers.values():
            self.guard.skip_if_bad(optimizer)
            self.scaler.step(optimizer)
        self.scaler.update()
        self.zero_grad()
        self.guard.mark_update(number, self._trained_state())
        self.step += 1
        self.module.after_step(progress)
        return images

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """DDP averages gradients over the ranks at the last micro-batch of a step only."""
        return contextlib.nullcontext() if last or not self.env.enabled else self.model.no_sync()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision in ("bf16", "fp16"):
            dtype = torch.bfloat16 if self.precision == "bf16" else torch.float16
            return torch.autocast(self.env.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def add_metrics(self, out: StepOutput) -> None:
        """Summed on the device; averaged and read at the next log step (no host sync per step)."""
        metrics = {"loss": out.loss.detach().float(), **{k: v.float() for k, v in out.metrics.items()}}
        for key, value in metrics.items():
            self._metric_sums[key] = self._metric_sums.get(key, 0) + value
        self._metric_count += 1

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)

    def zero_grad(self) -> None:
        for optimizer in self.optimizers.values():
            optimizer.zero_grad(set_to_none=True)

    def check_health(self) -> None:
        """Read the guard's marks (one host sync; every rank gets the same answer). An update that left
        non-finite state stops the run unsaved, naming the last good checkpoint. A step whose loss or
        gradients were not finite was never applied, nor any after it: the run goes back to its start,
        saves the weights from before it and stops. A stop signal on any rank is agreed on here."""
        flags = self.guard.marks()
        if self.env.enabled:
            # a signal may reach only some ranks: the largest signal number wins on all of them
            flags = torch.cat([flags, flags.new_full((1,), self.signals.requested)])
            bad_loss, bad_state, self.signals.agreed = max_over_ranks(flags, self.env)
        else:
            (bad_loss, bad_state), self.signals.agreed = flags.tolist(), self.signals.requested
        if bad_state >= 0:
            raise self._spoiled_weights_error(bad_state)
        if bad_loss >= 0:
            later = self.step - bad_loss
            self.epoch, self.iter = self.guard.rewind(bad_loss)
            self.step = bad_loss - 1
            self.zero_grad()
            path = self.save()
            skipped = f" (the {later} steps after it were not applied either)" if later > 0 else ""
            raise NonFiniteLoss(
                f"loss or gradients not finite at step {bad_loss} (epoch {self.epoch}, micro-batch "
                f"{self.iter}){skipped}; the weights before it are saved in {path}. Resume with --resume "
                f"{path} after lowering the learning rate, raising warmup or switching run.precision."
            )
        self.guard.forget_before(self.step)

    def _trained_state(self) -> list[torch.Tensor]:
        states = [state for optimizer in self.optimizers.values() for state in optimizer.state.values()]
        return [p.detach() for p in self.module.parameters()] + optimizer_tensors(states)

    def _spoiled_weights_error(self, step: int) -> NonFiniteLoss:
        if self.last_saved is not None:
            path, saved_step = self.last_saved
            kept = f"the last good checkpoint, {path} (step {saved_step}), is kept. Resume from it"
        else:
            kept = "no checkpoint had been written yet. Start again"
        return NonFiniteLoss(
            f"optimizer step {step} made the weights or the optimizer state non-finite although its loss was "
            "finite (the update "
            f"overflowed); they were not saved: {kept} after lowering the learning rate, raising warmup or "
            "setting optim.clip_grad."
        )

    # ---- checkpoints (train/state.py) ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return training_state(self)

    def save(self, name: str = "last.pt") -> Path:
        """Every rank must call this together (RNG states are gathered); rank 0 writes. Weights that are
        not finite are never written: the run stops and the last good checkpoint stays."""
        self.check_health()
        state = self.state_dict()
        path = self.out_dir / name
        if self.env.is_main:
            checkpoint.save_atomic(state, path)
        self.last_saved = (path, self.step)
        return path

    def resume(self, path: str | Path) -> None:
        resume_training(self, path)

    def epoch_samples(self) -> int:
        """Samples of the current epoch that all ranks have taken together."""
        return self.iter * self.cfg.optim.batch_size * self.env.world_size

    # ---- the loop -----------------------------------------------------------------------------------
    def fit(
        self, dataset: ViewDataset, on_epoch_end: Callable[[int], dict[str, float]] | None = None
    ) -> dict[str, Any]:
        """Train to ``optim.epochs`` (or ``run.stop_at_step``); ``on_epoch_end(epoch)`` may return scalars
        to log (a periodic evaluation). SIGINT and SIGTERM stop the run at the next step boundary, after
        saving (:class:`RunInterrupted`)."""
        cfg = self.cfg
        loader, iters = self._loader(dataset)
        stage = getattr(dataset, "device_stage", None)
        self.stages = DeviceStages(self.env.device, stage, self.batch_transform, check=self._report_skipped)
        log = RunLogger(
            self.out_dir,
            enabled=self.env.is_main,
            total=cfg.optim.epochs * iters,
            initial=self.epoch * iters + self.iter,
            progress=cfg.run.progress,
            resume_step=self.step,
        )
        session = self._session = _Session(log)
        stopped_early = False
        try:
            with self.signals.deferred():
                while self.epoch < cfg.optim.epochs and not stopped_early:
                    stopped_early = self._epoch(loader, iters, session)
                    self.check_health()  # before an evaluation reads the weights
                    if stopped_early:
                        self.save()
                        break
                    self.epoch, self.iter = self.epoch + 1, 0
                    scalars = on_epoch_end(self.epoch) if on_epoch_end is not None else None
                    if scalars:
                        log.scalars(self.step, scalars, epoch=self.epoch)
                    self.save()
                    session.last_save = time.monotonic()
                self._stop_if_signalled_late()
        finally:
            close_loader(loader)
            log.close()
            session.take_window()
            self.totals, self._session = self.run_totals(), None
        return self._summary(session, stopped_early)

    def run_totals(self) -> dict[str, Any]:
        """Images, seconds and sessions of the whole run: earlier sessions' plus this one's so far."""
        if self._session is None:
            return dict(self.totals)
        session = self._session
        return {
            "images_seen": self.totals["images_seen"] + session.images_seen + session.window_images,
            "seconds": self.totals["seconds"] + time.perf_counter() - session.started,
            "sessions": self.totals["sessions"] + 1,
        }

    def _epoch(self, loader: Any, iters: int, session: _Session) -> bool:
        """The rest of the current epoch; True when ``run.stop_at_step`` was reached."""
        cfg, env = self.cfg, self.env
        stop_at, total = cfg.run.stop_at_step, cfg.optim.epochs * iters
        loader.sampler.set_epoch(self.epoch, start=self.epoch_samples())
        self.zero_grad()
        for micro_batches in self._steps(loader, iters, session):
            it = self.epoch * iters + self.iter
            self.set_lr(lr_at(it / iters, **self.schedule))
            session.window_images += self.train_step(micro_batches, progress=it / total)
            session.log.advance(len(micro_batches))
            if self.step % cfg.run.log_every == 0 or self.step == stop_at:
                if self.host_sync == "log":
                    self.check_health()
                session.last_loss = self._log(session, iters)
                due = time.monotonic() - session.last_save > cfg.run.checkpoint_minutes * 60
                if not self.signals.agreed and broadcast_flag(due, env):  # a stop saves below
                    self.save()
                    session.last_save = time.monotonic()
            if self.signals.agreed:
                self._stop_for_signal(session, iters)
            if stop_at is not None and self.step >= stop_at:
                return True
        return False

    def _steps(self, loader: Any, iters: int, session: _Session) -> Iterator[list[dict[str, Any]]]:
        """The loader's micro-batches in groups of ``optim.accum_iter``. Micro-batches left over at an epoch
        end (iters % accum) are dropped, as in the references (which compute them, then clear their
        gradients at the next epoch)."""
        accum, group = self.cfg.optim.accum_iter, []
        for batch in loader:
            if not group and self.iter + accum > iters:
                session.log.advance(iters - self.iter)
                return
            group.append(batch)
            if len(group) == accum:
                yield group
                group = []

    def _loader(self, dataset: ViewDataset) -> tuple[Any, int]:
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
        return loader, iters

    @property
    def schedule(self) -> dict[str, float]:
        optim = self.cfg.optim
        min_lr = max(optim.min_lr, optim.min_lr_frac * self.base_lr)
        return dict(
            lr=self.base_lr,
            min_lr=min_lr,
            warmup_epochs=optim.warmup_epochs,
            epochs=optim.epochs,
            warmup_from=min_lr if optim.warmup_from_min_lr else 0.0,
        )

    # ---- stop signals (train/signals.py) -----------------------------------------------------------
    def _stop_for_signal(self, session: _Session, iters: int) -> None:
        self.check_health()  # a bad step stops the run with its own message, before a NaN is logged
        if session.window_images:
            session.last_loss = self._log(session, iters)
        raise interrupted(self.signals.agreed, self.step, self.epoch, self.save())

    def _stop_if_signalled_late(self) -> None:
        """A signal after the last step's sync (during the final save or evaluation) still stops the run
        here, before what follows training; every rank agrees first."""
        signum = self.signals.requested
        if self.env.enabled:
            signum = max_over_ranks(torch.tensor([signum], device=self.env.device), self.env)[0]
        if signum:
            saved = self.last_saved[0] if self.last_saved else self.save()
            raise interrupted(signum, self.step, self.epoch, saved)

    def _summary(self, session: _Session, stopped_early: bool) -> dict[str, Any]:
        env = self.env
        skipped = set().union(*gather_objects(self.skipped, env))
        seconds, images = self.totals["seconds"], self.totals["images_seen"]
        summary = {
            "epochs_done": self.epoch,
            "steps": self.step,
            "stopped_early": stopped_early,
            # the whole run, over every session that resumed it
            "images_seen": images,
            "seconds": round(seconds, 2),
            "images_per_s": round(images / seconds, 1) if seconds > 0 else None,
            "sessions": self.totals["sessions"],
            "last_logged_loss": session.last_loss if math.isfinite(session.last_loss) else None,
            "last_logged": session.last_scalars,  # every scalar of the last logged step (quality checks)
            "skipped_images": len(skipped),
        }
        if env.enabled:
            summary["ranks_in_sync"] = self.ranks_in_sync()
        return summary

    def _report_skipped(self, batch: dict[str, Any]) -> None:
        """Unreadable images are named (once per file) and counted; a batch with none left is an error
        (the ranks of a DDP run must step together, and a folder of broken files should not train
        silently)."""
        skipped = batch.pop("skipped", [])  # the loader's collate always puts the list there
        for message in skipped:
            if message not in self.skipped:
                self.skipped.add(message)
                print(f"warning: skipped unreadable image {message}", file=sys.stderr, flush=True)
        if "label" not in batch and skipped:
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

    def _log(self, session: _Session, iters: int) -> float:
        """Log the mean of the metrics since the last log step (one host sync); returns the loss."""
        images, seconds = session.take_window()
        if not self._metric_count:
            return math.nan
        keys = list(self._metric_sums)
        values = (torch.stack([self._metric_sums[k] for k in keys]) / self._metric_count).tolist()
        self._metric_sums, self._metric_count = {}, 0
        scalars = dict(zip(keys, values, strict=True))
        # the unscaled lr (groups may carry a layer-decay lr_scale below 1)
        scalars["lr"] = max(group["lr"] for group in self.optimizer.param_groups)
        scalars["img/s"] = images / seconds if seconds > 0 else 0.0
        session.log.scalars(self.step, scalars, epoch=self.epoch + self.iter / iters)
        session.last_scalars = scalars
        return scalars["loss"]


class _Session:
    """What one call of :meth:`Trainer.fit` measures: throughput windows, images seen, time since the
    last save; added to the run's totals (in every checkpoint, and when it ends)."""

    def __init__(self, log: RunLogger) -> None:
        self.log = log
        self.started = self.window_start = time.perf_counter()
        self.last_save = time.monotonic()
        self.window_images = self.images_seen = 0
        self.last_loss = math.nan
        self.last_scalars: dict[str, float] = {}

    def take_window(self) -> tuple[int, float]:
        """Images and seconds since the last call."""
        now = time.perf_counter()
        images, seconds = self.window_images, now - self.window_start
        self.images_seen += images
        self.window_start, self.window_images = now, 0
        return images, seconds
