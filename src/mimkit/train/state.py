"""What a training checkpoint holds and how a run resumes from one: the weights, every optimizer, the
loss scaler, the data position (as samples of the epoch, so that another batch size or number of
processes resumes at the same place), every rank's random state, the config and the run's totals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mimkit import checkpoint
from mimkit.configs import diff, to_dict
from mimkit.distributed import gather_objects
from mimkit.train.guard import all_finite, optimizer_tensors

if TYPE_CHECKING:
    from mimkit.train.engine import Trainer

# settings that may change when a run is resumed (they do not change what is being trained)
RESUMABLE_CHANGES = ("run.", "eval.", "data.num_workers", "data.normalize", "recipe")


def training_state(trainer: Trainer) -> dict[str, Any]:
    """The checkpoint of ``trainer`` now (every rank calls it: the random states are gathered)."""
    state = {
        "model": trainer.module.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "optimizers": {k: o.state_dict() for k, o in trainer.optimizers.items() if k != "main"},
        "scaler": trainer.scaler.state_dict(),
        "epoch": trainer.epoch,
        "iter": trainer.iter,
        # the data position: samples of the current epoch that all ranks took together, which a run on
        # another number of processes or per-device batch resumes from
        "epoch_samples": trainer.epoch_samples(),
        "step": trainer.step,
        "config": to_dict(trainer.cfg),
        "rng": gather_objects(checkpoint.rng_state(), trainer.env),
        "skipped": sorted(set().union(*gather_objects(trainer.skipped, trainer.env))),
        "totals": trainer.run_totals(),
    }
    if trainer.guard.before_step_done is not None:
        state["before_step_done"] = trainer.guard.before_step_done
    # what the trained model takes (a method's ``input_spec()``, a probe's ``encoder``, a fine-tune's
    # ``model``), so that whoever reads the checkpoint feeds it the input it was trained on, not a
    # config's guess
    stated = getattr(trainer.module, "input_spec", None)
    spec = stated() if callable(stated) else None
    for name in ("encoder", "model"):
        spec = spec or getattr(getattr(trainer.module, name, None), "input_spec", None)
    if spec is not None:
        state["input_spec"] = spec.to_dict()
    encoder = getattr(trainer.module, "encoder", None) or getattr(trainer.module, "model", None)
    if hasattr(encoder, "spec") and hasattr(encoder.spec, "to_dict"):
        state["encoder_spec"] = encoder.spec.to_dict()  # what rebuilds the encoder, as exports keep it
    return state


def resume_training(trainer: Trainer, path: str | Path) -> None:
    """Load ``path`` into ``trainer``: refused when the model or method changed, or the weights are not
    finite; other changed settings are noted."""
    cfg, env = trainer.cfg, trainer.env
    state = checkpoint.load(path)
    changed = diff(state["config"], to_dict(cfg))
    fatal = {k: v for k, v in changed.items() if k.startswith(("model.", "method."))}
    if fatal:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in fatal.items())
        raise ValueError(
            f"cannot resume {path}: it was trained with a different model or method ({listed}). "
            "Use --out for a new run, or --resume none to start over here."
        )
    noted = {k: v for k, v in changed.items() if not k.startswith(RESUMABLE_CHANGES)}
    if noted and env.is_main:
        listed = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in noted.items())
        print(f"note: resuming {path} with changed settings: {listed}", file=sys.stderr)
    floats = [t for t in state["model"].values() if t.is_floating_point()]
    saved_states = [state["optimizer"], *state.get("optimizers", {}).values()]
    moments = optimizer_tensors(entry for saved in saved_states for entry in saved["state"].values())
    if not bool(all_finite(floats + moments)):
        raise checkpoint.CheckpointError(
            f"{path}: holds non-finite weights or optimizer state; resume from an earlier checkpoint or "
            "start over with --resume none"
        )
    position = resumed_micro_batch(trainer, state, path)
    trainer.module.load_state_dict(state["model"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    for name, saved in state.get("optimizers", {}).items():
        trainer.optimizers[name].load_state_dict(saved)
    trainer.scaler.load_state_dict(state["scaler"])
    trainer.epoch, trainer.iter, trainer.step = state["epoch"], position, state["step"]
    trainer.skipped = set(state.get("skipped", ()))
    trainer.totals = {**trainer.totals, **state.get("totals", {})}
    trainer.last_saved = (Path(path), trainer.step)
    trainer.guard.before_step_done = state.get("before_step_done")
    rngs = state["rng"]
    if len(rngs) == env.world_size:
        checkpoint.set_rng_state(rngs[env.rank])
    else:
        # another world size: the data order, views and masks still resume exactly (functions of the
        # seed, epoch and sample index); what draws from the global generators during a step, which
        # pre-training's defaults do not (fine-tuning's drop path and Mixup do), is reseeded
        checkpoint.seed_all(cfg.run.seed + env.rank + 7919 * trainer.step)


def resumed_micro_batch(trainer: Trainer, state: dict[str, Any], path: str | Path) -> int:
    """The micro-batch position in the checkpoint's epoch under this session's batch size, accumulation
    and world size, from the samples of the epoch already taken (checkpoints without that count: from
    their micro-batch position, batch size and world size, one RNG state per rank)."""
    saved = state["config"]["optim"]
    saved_world = len(state["rng"])
    done = state.get("epoch_samples", state["iter"] * saved["batch_size"] * saved_world)
    bs, accum, world = trainer.cfg.optim.batch_size, trainer.cfg.optim.accum_iter, trainer.env.world_size
    if done % (bs * accum * world):
        raise ValueError(
            f"cannot resume {path} where it stopped: {done} samples of epoch {state['epoch']} are done, "
            f"not a whole number of optimizer steps of optim.batch_size={bs} x optim.accum_iter={accum} "
            f"x {world} processes = {bs * accum * world} samples. It was saved with "
            f"optim.batch_size={saved['batch_size']} x optim.accum_iter={saved.get('accum_iter', 1)} x "
            f"{saved_world} processes; resume with settings whose product divides {done} (the same "
            "effective batch does)."
        )
    return done // (bs * world)
