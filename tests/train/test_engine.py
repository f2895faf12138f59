import math

import pytest
import torch

from mimkit import checkpoint
from mimkit.data.loader import collate, per_sample_uniform
from mimkit.distributed import init_distributed
from mimkit.methods import build_method
from mimkit.methods.base import BatchTransform, Trainable
from mimkit.runs.pretrain import pretrain
from mimkit.train.engine import NonFiniteLoss, Trainer
from mimkit.train.optim import build_optimizers, lr_at, resolve_lr


def test_lr_schedule_warmup_then_cosine():
    kw = dict(lr=1.0, min_lr=0.1, warmup_epochs=4, epochs=20)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(2, **kw) == pytest.approx(0.5)
    assert lr_at(4, **kw) == pytest.approx(1.0)
    assert lr_at(12, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(20, **kw) == pytest.approx(0.1)
    assert lr_at(1, **kw, warmup_from=0.1) == pytest.approx(0.1 + 0.9 / 4)


def test_lr_rules(tiny):
    cfg = tiny("optim.lr=null", "optim.blr=1.5e-4")
    assert resolve_lr(cfg.optim, 4096) == pytest.approx(2.4e-3)
    assert resolve_lr(cfg.optim, 256) == pytest.approx(1.5e-4)
    cfg = tiny("optim.lr=null", "optim.blr=1.5e-4", "optim.lr_rule=sqrt")
    assert resolve_lr(cfg.optim, 4096) == pytest.approx(2.4e-3)  # equal to linear at the reference batch
    assert resolve_lr(cfg.optim, 1024) == pytest.approx(1.5e-4 * 1024**0.5 / 4)
    cfg = tiny("optim.lr=null", "optim.blr=1e-3", "optim.lr_rule=sqrt", "optim.lr_ref_batch=1024")
    assert resolve_lr(cfg.optim, 256) == pytest.approx(1e-3 * 256**0.5 / 8)


def _group_names(module, groups):
    names = {id(p): n for n, p in module.named_parameters()}
    return [{names[id(p)] for p in g["params"]} for g in groups]


def test_fused_adamw_is_chosen_by_config_and_steps_as_the_plain_loop(tiny):
    """optim.fused: null fuses on GPUs only (the CPU here: not fused), true / false force it; the fused
    kernel's update is the plain loop's to float rounding."""
    updated = {}
    for fused in (None, False, True):
        cfg = tiny(f"optim.fused={'null' if fused is None else str(fused).lower()}")
        torch.manual_seed(0)
        method = build_method(cfg)
        opt = build_optimizers(method, cfg.optim, 1e-3, torch.device("cpu"))["main"]
        assert bool(opt.defaults["fused"]) is bool(fused)
        for step in range(3):
            gen = torch.Generator().manual_seed(step)
            for p in method.parameters():
                p.grad = torch.randn(p.shape, generator=gen) if p.requires_grad else None
            opt.step()
        updated[fused] = torch.cat([p.detach().flatten() for p in method.parameters()])
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in build_method(tiny()).parameters()])
    assert not torch.allclose(updated[False], initial)  # the steps moved the weights
    assert torch.equal(updated[None], updated[False])
    torch.testing.assert_close(updated[True], updated[False], rtol=1e-5, atol=1e-6)


def test_weight_decay_groups(tiny):
    method = build_method(tiny())
    opt = build_optimizers(method, tiny().optim, 1e-3, torch.device("cpu"))["main"]
    decay = {
        n
        for g, names in zip(opt.param_groups, _group_names(method, opt.param_groups), strict=True)
        if g["weight_decay"] > 0
        for n in names
    }
    no_decay = {
        n
        for g, names in zip(opt.param_groups, _group_names(method, opt.param_groups), strict=True)
        if g["weight_decay"] == 0
        for n in names
    }
    assert "encoder.blocks.0.attn.qkv.weight" in decay and "decoder.pred.weight" in decay
    for name in (
        "encoder.blocks.0.norm1.weight",
        "encoder.blocks.0.attn.qkv.bias",
        "encoder.cls_token",
        "decoder.mask_token",
        "encoder.norm.bias",
    ):
        assert name in no_decay
    everything = decay | no_decay
    assert "encoder.pos_embed" not in everything and "decoder.pos_embed" not in everything  # frozen
    # the paper recipes decay the 3-D tokens, as the reference code does
    groups = method.param_groups(0.05, decay_tokens=True)
    decayed = {
        n
        for g, names in zip(groups, _group_names(method, groups), strict=True)
        if g["weight_decay"]
        for n in names
    }
    assert {"encoder.cls_token", "decoder.mask_token"} <= decayed


def _weights(run_dir):
    return checkpoint.load(run_dir / "last.pt")["model"]


def assert_trained_alike(state: dict, expected: dict, atol: float = 1e-6) -> None:
    """Weights of two runs that differ by rounding only agree to ``atol``, except the attention's key
    biases: softmax ignores a shift, so their true gradient is 0 and what moves them is rounding, which
    AdamW's division by the root of the second moment lifts to a good part of the lr at every step (they
    do not change what the model computes)."""
    assert state.keys() == expected.keys()
    for key, value in state.items():
        want = expected[key]
        if key.endswith("attn.qkv.bias"):  # [q, k, v]: the query and value biases only
            value, want = (torch.cat([t.chunk(3)[0], t.chunk(3)[2]]) for t in (value, want))
        torch.testing.assert_close(value, want, rtol=0, atol=atol, msg=lambda m, key=key: f"{key}: {m}")


@pytest.mark.slow
def test_resume_after_an_epoch_gives_the_same_weights(tiny, tmp_path):
    pretrain(tiny(out="straight"))
    steps_per_epoch = 64 // 8
    first = pretrain(tiny(f"run.stop_at_step={steps_per_epoch}", out="resumed"))
    assert first["stopped_early"] and first["steps"] == steps_per_epoch
    second = pretrain(tiny(out="resumed"))  # run.resume=auto picks up last.pt
    assert second["steps"] == 2 * steps_per_epoch
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_in_the_middle_of_an_epoch_with_workers(tiny, tmp_path):
    pretrain(tiny("optim.epochs=1", "optim.warmup_epochs=0", "optim.accum_iter=2", out="straight"))
    pretrain(
        tiny(
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "optim.accum_iter=2",
            "run.stop_at_step=3",
            "data.num_workers=2",
            out="resumed",
        )
    )
    pretrain(tiny("optim.epochs=1", "optim.warmup_epochs=0", "optim.accum_iter=2", out="resumed"))
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.slow
def test_resume_counts_samples_so_another_batch_or_an_older_checkpoint_resumes(tiny, tmp_path):
    """The checkpoint holds how many samples of the epoch are done; one from before that count has it
    derived from its own micro-batch count and batch size. Resumed with batch 4 x 2 accumulation (the same
    effective batch), both end where the straight run does, up to rounding, and equal to each other."""
    once = ("optim.epochs=1", "optim.warmup_epochs=0")
    pretrain(tiny(*once, out="straight"))
    for out in ("new", "old"):
        pretrain(tiny(*once, "run.stop_at_step=3", out=out))
        saved = checkpoint.load(tmp_path / out / "last.pt")
        assert (saved["iter"], saved["epoch_samples"]) == (3, 24)
    old = tmp_path / "old" / "last.pt"
    torch.save({k: v for k, v in checkpoint.load(old).items() if k != "epoch_samples"}, old)
    for out in ("new", "old"):
        pretrain(tiny(*once, "optim.batch_size=4", "optim.accum_iter=2", out=out))
    new, old = (checkpoint.load(tmp_path / out / "last.pt") for out in ("new", "old"))
    assert (new["step"], new["iter"], new["epoch"]) == (8, 0, 1)
    for key, value in new["model"].items():
        assert torch.equal(value, old["model"][key]), key
    assert_trained_alike(new["model"], _weights(tmp_path / "straight"))  # a mean of 2 means of 4: of 8


@pytest.mark.parametrize(
    "method", [["method=mae"], ["method=lut", "method.head_hidden_dim=32"], ["method=latent_mim"]]
)
def test_a_pretraining_step_draws_nothing_from_the_global_generator(tiny, method):
    """With the loader's mask noise (and no drop path, the default), a step is a function of the batch and
    the weights alone, so a run resumed on another number of processes needs no generator state."""
    from mimkit.data import ViewDataset, build_source, collate

    cfg = tiny(*method)
    model = build_method(cfg).train()
    data = ViewDataset(build_source("synthetic:4", image_size=16), model.train_transform(cfg.data))
    batch = collate([data[i] for i in range(4)])
    state = torch.get_rng_state()
    model.before_step(0.5)
    model(batch).loss.backward()
    model.after_step(0.5)
    assert torch.equal(torch.get_rng_state(), state)


def test_resume_refuses_a_position_that_is_not_a_whole_number_of_steps(tiny, tmp_path):
    pretrain(tiny("run.stop_at_step=3"))
    before = (tmp_path / "run" / "last.pt").read_bytes()
    message = (
        r"24 samples of epoch 0 are done, not a whole number of optimizer steps of optim.batch_size=16 x "
        r"optim.accum_iter=1 x 1 processes = 16 samples. It was saved with optim.batch_size=8 x "
        r"optim.accum_iter=1 x 1 processes"
    )
    with pytest.raises(ValueError, match=message):
        pretrain(tiny("optim.batch_size=16"))
    assert (tmp_path / "run" / "last.pt").read_bytes() == before


def test_resume_refuses_a_different_model(tiny):
    pretrain(tiny("run.stop_at_step=1"))
    with pytest.raises(ValueError, match=r"model.depth: 2 -> 3"):
        pretrain(tiny("model.depth=3"))


class Exploding(Trainable):
    """Wraps a method; its loss goes NaN at one call (None: never)."""

    def __init__(self, method, at_step):
        super().__init__()
        self.method, self.calls, self.at = method, 0, at_step
        self.encoder = method.encoder

    def forward(self, batch):
        out = self.method(batch)
        self.calls += 1
        if self.calls == self.at:
            return type(out)(out.loss * float("nan"), out.metrics)
        return out

    def before_step(self, progress):
        self.method.before_step(progress)

    def after_step(self, progress):
        self.method.after_step(progress)


SYNC = {"step": ["run.host_sync=step"], "log": ["run.host_sync=log", "optim.fused=true"]}


def _fit_recording_reads(module, cfg, out, monkeypatch, reads=None):
    """Train ``module``; returns the trainer and, with ``monkeypatch``, the step count at each host read of
    the health marks (also appended to ``reads`` as they happen)."""
    from mimkit.data import ViewDataset, build_source

    reads = [] if reads is None else reads
    check = Trainer.check_health

    def recorded(self):
        reads.append(self.step)
        return check(self)

    if monkeypatch is not None:
        monkeypatch.setattr(Trainer, "check_health", recorded)
    trainer = Trainer(module, cfg, init_distributed("cpu"), out)
    data = ViewDataset(build_source("synthetic:64", image_size=16), module.method.train_transform(cfg.data))
    try:
        trainer.fit(data)
    finally:
        if monkeypatch is not None:
            monkeypatch.setattr(Trainer, "check_health", check)
    return trainer, reads


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "lut"])
@pytest.mark.parametrize("sync", ["step", "log"])
def test_nan_loss_stops_with_the_weights_from_before_that_step(tiny, tmp_path, monkeypatch, sync, method):
    """NaN at step 3. host_sync=step stops before updating; host_sync=log reads the marks only at the
    epoch end (step 8), having skipped steps 3 to 8 on the device: either way the checkpoint is exactly
    the state after step 2 (weights, EMA teacher, AdamW's moments and step counts), which a clean run
    stopped at step 2 saves too."""
    overrides = [f"method={method}", "run.log_every=100", "run.checkpoint_minutes=.inf", *SYNC[sync]]
    cfg = tiny(*overrides)
    torch.manual_seed(0)
    clean = tiny(*overrides, "run.stop_at_step=2")
    _fit_recording_reads(Exploding(build_method(clean), None), clean, tmp_path / "clean", monkeypatch)
    torch.manual_seed(0)
    module = Exploding(build_method(cfg), at_step=3)
    assert Trainer(module, cfg, init_distributed("cpu"), tmp_path / "x").host_sync == sync
    with pytest.raises(NonFiniteLoss, match=r"not finite at step 3 \(epoch 0, micro-batch 2\).*nan/last\.pt"):
        _fit_recording_reads(module, cfg, tmp_path / "nan", monkeypatch, reads := [])
    # log: one read at the epoch end, then the save of the rewound state; step: one before each update
    assert reads == ([8, 2] if sync == "log" else [0, 1, 2, 2])
    saved, expected = (checkpoint.load(tmp_path / d / "last.pt") for d in ("nan", "clean"))
    assert saved["step"] == 2 and saved["iter"] == 2 and saved["epoch"] == 0
    assert saved["model"].keys() == expected["model"].keys()
    for key, value in expected["model"].items():
        assert torch.equal(saved["model"][key], value), key
    for entry, clean_entry in zip(
        saved["optimizer"]["state"].values(), expected["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(entry[k], clean_entry[k]) for k in clean_entry)
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


@pytest.mark.parametrize("sync", ["step", "log"])
def test_an_inf_gradient_from_a_finite_loss_is_never_applied(tiny, tmp_path, sync):
    """Step 5's loss is finite but its gradients overflow to inf (AdamW would write NaN weights): the step
    counts as bad, and the weights from before it are saved."""
    from mimkit.data import ViewDataset, build_source

    cfg = tiny("run.checkpoint_minutes=.inf", "run.log_every=100", *SYNC[sync])
    method = build_method(cfg)
    trainer = Trainer(OverflowAt(method, at_step=5, scale=1e39), cfg, init_distributed("cpu"), tmp_path)
    data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
    with pytest.raises(NonFiniteLoss, match=r"loss or gradients not finite at step 5 "):
        trainer.fit(data)
    saved = checkpoint.load(tmp_path / "last.pt")
    assert saved["step"] == 4 and saved["iter"] == 4
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())


def _resumed_to_the_end(cfg, path, out):
    from mimkit.data import ViewDataset, build_source

    module = Exploding(build_method(cfg), None)
    trainer = Trainer(module, cfg, init_distributed("cpu"), out)
    trainer.resume(path)
    trainer.fit(
        ViewDataset(build_source("synthetic:64", image_size=16), module.method.train_transform(cfg.data))
    )
    return checkpoint.load(out / "last.pt")["model"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["mae", "latent_mim"])
def test_a_run_resumed_after_a_nan_stop_ends_as_one_resumed_from_the_step_before(tiny, tmp_path, method):
    """host_sync=log, NaN at step 3, read at step 8. Resuming the rewound checkpoint gives what resuming a
    clean checkpoint of step 2 gives: the RNG states are those of step 3's start (drop path draws from
    them), and Latent MIM's target encoder, which moved before step 3's forward, does not move twice."""
    overrides = [
        f"method={method}",
        "model.drop_path=0.2",
        "run.log_every=100",
        "run.checkpoint_minutes=.inf",
    ]
    overrides += SYNC["log"]
    cfg = tiny(*overrides)
    clean = tiny(*overrides, "run.stop_at_step=2")
    torch.manual_seed(0)
    _fit_recording_reads(Exploding(build_method(clean), None), clean, tmp_path / "clean", monkeypatch=None)
    torch.manual_seed(0)
    with pytest.raises(
        NonFiniteLoss, match=r"not finite at step 3 .*\(the 5 steps after it were not applied"
    ):
        _fit_recording_reads(Exploding(build_method(cfg), 3), cfg, tmp_path / "nan", monkeypatch=None)
    a = _resumed_to_the_end(cfg, tmp_path / "clean" / "last.pt", tmp_path / "a")
    b = _resumed_to_the_end(cfg, tmp_path / "nan" / "last.pt", tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]


@pytest.mark.parametrize("method", ["mae", "lut", "latent_mim"])
def test_host_sync_log_steps_never_wait_for_the_device(tiny, tmp_path, method):
    """No operation that reads a tensor on the host (.item(), bool(), data-dependent shapes) runs inside a
    step: on a GPU each would wait for the device."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from mimkit.data import ViewDataset, build_source

    waits = []

    class Recorder(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = str(func)
            if any(op in name for op in ("_local_scalar_dense", "is_nonzero", "nonzero", "masked_select")):
                waits.append(name)
            return func(*args, **(kwargs or {}))

    cfg = tiny(f"method={method}", "optim.clip_grad=1.0", *SYNC["log"])
    method_ = build_method(cfg)
    trainer = Trainer(method_, cfg, init_distributed("cpu"), tmp_path)
    data = ViewDataset(build_source("synthetic:64", image_size=16), method_.train_transform(cfg.data))
    batch = collate([data[(0, i)] for i in range(8)])
    batch.pop("skipped")
    for step in range(3):
        with Recorder():
            trainer.train_step([batch], progress=step / 10)
    assert trainer.step == 3 and waits == []


@pytest.mark.parametrize("sync", ["step", "log"])
def test_micro_batches_left_over_at_an_epoch_end_are_not_computed(tiny, tmp_path, sync):
    """8 micro-batches an epoch, 3 a step: 2 steps, and the last 2 micro-batches are dropped unread (were
    they computed, a NaN there would mark the next epoch's first, good step; and their BatchNorm statistics
    would be kept)."""
    cfg = tiny("optim.accum_iter=3", "run.log_every=1", *SYNC[sync])
    module = Exploding(build_method(cfg), at_step=None)
    trainer, _ = _fit_recording_reads(module, cfg, tmp_path, monkeypatch=None)
    assert trainer.step == 4 and module.calls == 12


@pytest.mark.slow
def test_host_sync_log_reads_the_device_only_at_log_steps_and_saves(tiny, tmp_path, monkeypatch):
    cfg = tiny("run.log_every=3", "run.checkpoint_minutes=.inf", *SYNC["log"])
    _, reads = _fit_recording_reads(Exploding(build_method(cfg), None), cfg, tmp_path / "r", monkeypatch)
    # 16 steps: log steps 3, 6 | the epoch end 8 and its save | 9, 12, 15 | the epoch end 16 and its save
    assert reads == [3, 6, 8, 8, 9, 12, 15, 16, 16]
    cfg = tiny("run.log_every=3", "run.checkpoint_minutes=.inf", *SYNC["step"])
    _, reads = _fit_recording_reads(Exploding(build_method(cfg), None), cfg, tmp_path / "s", monkeypatch)
    assert reads[:4] == [0, 1, 2, 3]  # before every update


def test_host_sync_log_is_refused_where_updates_cannot_be_skipped_on_the_device(tiny, tmp_path):
    method = build_method(tiny())
    for overrides, why in [
        (["optim.fused=false"], "it needs fused AdamW"),
        (["optim.fused=true", "optim.name=lars"], "it needs fused AdamW"),
    ]:
        with pytest.raises(ValueError, match=f"run.host_sync=log is not possible here: {why}"):
            Trainer(method, tiny("run.host_sync=log", *overrides), init_distributed("cpu"), tmp_path)
    assert Trainer(method, tiny("optim.fused=false"), init_distributed("cpu"), tmp_path).host_sync == "step"
    assert Trainer(method, tiny("optim.fused=true"), init_distributed("cpu"), tmp_path).host_sync == "log"


class ScaledGradient(torch.autograd.Function):
    """Identity forward; the backward multiplies the gradient by ``scale``: a finite loss whose update
    overflows."""

    @staticmethod
    def forward(ctx, loss, scale):
        ctx.scale = scale
        return loss.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


class OverflowAt(Exploding):
    def __init__(self, method, at_step, scale):
        super().__init__(method, at_step)
        self.scale = scale

    def forward(self, batch):
        out = self.method(batch)
        self.calls += 1
        if self.calls == self.at:
            return type(out)(ScaledGradient.apply(out.loss, self.scale), out.metrics)
        return out


@pytest.mark.parametrize("sync", ["step", "log"])
def test_a_step_that_spoils_the_state_keeps_the_last_good_checkpoint(tiny, tmp_path, sync):
    """The loss and gradients of step 5 are finite but their squares overflow AdamW's second moment: the
    weights stay finite but freeze. The run stops at the next read and never writes that state; last.pt
    stays the one saved at step 4, finite throughout."""
    from mimkit.data import ViewDataset, build_source

    cfg = tiny("run.checkpoint_minutes=0", "run.log_every=2", *SYNC[sync])  # saves at steps 2 and 4
    method = build_method(cfg)
    module = OverflowAt(method, at_step=5, scale=1e25)
    trainer = Trainer(module, cfg, init_distributed("cpu"), tmp_path / "spoiled")
    data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
    stop = r"optimizer step 5 made the weights or the optimizer state non-finite.*last\.pt \(step 4\)"
    with pytest.raises(NonFiniteLoss, match=stop):
        trainer.fit(data)
    moments = [t for s in trainer.optimizer.state.values() for t in s.values() if t.dim()]
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert not all(torch.isfinite(t).all() for t in moments)  # the update did spoil the state
    saved = checkpoint.load(tmp_path / "spoiled" / "last.pt")
    assert saved["step"] == 4
    tensors = [
        *saved["model"].values(),
        *(t for s in saved["optimizer"]["state"].values() for t in s.values()),
    ]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())


def test_a_signal_after_the_last_step_still_stops_the_run(tiny, tmp_path):
    """SIGTERM during the last epoch-end evaluation: training is saved, and what follows fit() (the final
    evaluation of a run) does not start."""
    import os
    import signal

    from mimkit.data import ViewDataset, build_source
    from mimkit.train.engine import RunInterrupted

    cfg = tiny("optim.epochs=1")
    method = build_method(cfg)
    trainer = Trainer(method, cfg, init_distributed("cpu"), tmp_path / "late")
    data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
    with pytest.raises(RunInterrupted, match=r"stopped by SIGTERM at step 8 .*last\.pt") as stopped:
        trainer.fit(data, on_epoch_end=lambda epoch: os.kill(os.getpid(), signal.SIGTERM))
    assert stopped.value.signal == signal.SIGTERM
    assert checkpoint.load(tmp_path / "late" / "last.pt")["step"] == 8
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back


def test_resume_refuses_a_checkpoint_with_non_finite_weights(tiny, tmp_path):
    pretrain(tiny("run.stop_at_step=1"))
    path = tmp_path / "run" / "last.pt"
    state = checkpoint.load(path)
    state["model"]["encoder.blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    torch.save(state, path)
    with pytest.raises(
        checkpoint.CheckpointError, match=r"last\.pt: holds non-finite weights or optimizer state"
    ):
        pretrain(tiny())


@pytest.mark.slow
def test_resumed_runs_log_each_step_once_and_count_every_session(tiny, tmp_path):
    """A session killed after logging step 6 but before saving (last.pt at step 4) leaves rows that the
    resumed run would log again: they are dropped. The summary counts both sessions and is strict JSON."""
    import json

    straight = pretrain(tiny("run.log_every=1", out="straight"))
    pretrain(tiny("run.log_every=1", "run.stop_at_step=4"))
    metrics = tmp_path / "run" / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    # what a killed session leaves: rows past the checkpoint, and half a line
    metrics.write_text(
        "\n".join([*rows, rows[-1].replace('"step": 4', '"step": 5'), '{"step": 6, "lo']) + "\n"
    )
    second = pretrain(tiny("run.log_every=1"))
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 17))
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())  # strict JSON: no NaN
    assert summary == json.loads(json.dumps(summary), parse_constant=lambda c: pytest.fail(c))
    assert second["sessions"] == 2 and straight["sessions"] == 1
    assert second["images_seen"] == straight["images_seen"] == 16 * 8


class ColourStage(BatchTransform):
    """A device-side stage: a per-sample brightness shift drawn from each sample's seed, then a frozen
    channel mix (the kind of frozen module TokenAdapt is)."""

    def __init__(self):
        super().__init__()
        self.mix = torch.nn.Linear(3, 3, bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.eye(3) + 0.1)

    def forward(self, batch):
        assert batch["seed"].device.type == "cpu"  # the seeds stay on the host
        views = {k: v for k, v in batch.items() if k in ("image", "view1", "view2")}
        device = next(iter(views.values())).device
        shift = per_sample_uniform(batch["seed"], 1)[:, :, None, None].to(device) - 0.5
        return {**batch, **{k: self.mix((v + shift).movedim(1, -1)).movedim(-1, 1) for k, v in views.items()}}


def with_stage(cls):
    class WithStage(cls):
        def batch_transform(self):
            return ColourStage()

    return WithStage


def test_the_batch_stage_draws_from_each_samples_seed():
    stage = ColourStage()
    images, seeds = torch.randn(8, 3, 4, 4), torch.arange(100, 108) * 7919
    full = stage({"image": images, "seed": seeds})["image"]
    assert torch.equal(stage({"image": images, "seed": seeds})["image"], full)  # reproducible
    pair = stage({"image": images[2:4], "seed": seeds[2:4]})["image"]
    assert torch.equal(pair, full[2:4])  # a sample's draw does not depend on its batch
    other = stage({"image": images, "seed": seeds + 1})["image"]
    assert not torch.allclose(other, full)
    draws = per_sample_uniform(torch.arange(4096), 8)
    assert draws.min() >= 0 and draws.max() < 1 and abs(draws.mean().item() - 0.5) < 0.01


@pytest.mark.parametrize("name", ["mae", "lut"])
def test_the_batch_stage_stays_out_of_optimizer_teacher_and_checkpoint(tiny, tmp_path, name):
    from mimkit.data import ViewDataset, build_source
    from mimkit.methods import METHODS

    extra = ["method.head_hidden_dim=32"] if name == "lut" else []
    cfg = tiny(f"method={name}", "optim.epochs=1", *extra)
    method = with_stage(METHODS[name]).build(cfg.model, cfg.method)
    trainer = Trainer(method, cfg, init_distributed("cpu"), tmp_path / "stage")
    stage = trainer.batch_transform
    before = stage.mix.weight.detach().clone()
    optimized = {id(p) for o in trainer.optimizers.values() for g in o.param_groups for p in g["params"]}
    assert id(stage.mix.weight) not in optimized and not stage.mix.weight.requires_grad
    data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
    seen = []
    stage.register_forward_hook(lambda module, args, out: seen.append(len(out["seed"])))
    trainer.fit(data)
    assert sum(seen) == 64  # every training batch went through it
    assert torch.equal(stage.mix.weight, before)  # frozen
    saved = checkpoint.load(tmp_path / "stage" / "last.pt")["model"]
    assert not any("mix" in key for key in saved)  # not in the checkpoint, nor (LUT) in the teacher
    assert len(saved) == len(method.state_dict())


class TwoOptimizers(Exploding):
    """The decoder gets an optimizer of its own (as a VQ tokenizer's discriminator would)."""

    def param_groups(self, weight_decay, decay_tokens):
        groups = super().param_groups(weight_decay, decay_tokens)
        decoder = {id(p) for p in self.method.decoder.parameters()}
        split = []
        for group in groups:
            for own in (False, True):
                params = [p for p in group["params"] if (id(p) in decoder) == own]
                if params:
                    split.append({**group, "params": params, **({"optimizer": "second"} if own else {})})
        return split


def test_a_module_may_declare_a_second_optimizer_which_is_stepped_saved_and_resumed(tiny, tmp_path):
    from mimkit.data import ViewDataset, build_source

    cfg = tiny("optim.epochs=1", "run.stop_at_step=2")
    method = build_method(cfg)
    trainer = Trainer(TwoOptimizers(method, at_step=0), cfg, init_distributed("cpu"), tmp_path / "two")
    assert set(trainer.optimizers) == {"main", "second"}
    main_ids = {id(p) for g in trainer.optimizers["main"].param_groups for p in g["params"]}
    assert not main_ids & {id(p) for p in method.decoder.parameters()}
    data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
    trainer.fit(data)
    saved = checkpoint.load(tmp_path / "two" / "last.pt")
    second = saved["optimizers"]["second"]["state"]
    assert second and all(int(s["step"]) == 2 for s in second.values())  # stepped with the main one
    resumed = Trainer(
        TwoOptimizers(build_method(cfg), at_step=0), cfg, init_distributed("cpu"), tmp_path / "r"
    )
    resumed.resume(tmp_path / "two" / "last.pt")
    for key, value in trainer.optimizers["second"].state_dict()["state"].items():
        assert torch.equal(
            resumed.optimizers["second"].state_dict()["state"][key]["exp_avg"], value["exp_avg"]
        )


@pytest.mark.slow
def test_float8_trains_the_linear_layers_in_float8_and_saves_the_usual_checkpoint(tiny, tmp_path):
    """run.float8 swaps the student's linear layers (not the EMA teacher's) for torchao's; the parameters
    keep their names, so checkpoints, exports and resume are those of any run."""
    from torchao.float8.float8_linear import Float8Linear

    # one step of a small batch: torch._scaled_mm is emulated on the CPU (tens of ms per product)
    cfg = tiny(
        "method=lut", "run.float8=true", "run.stop_at_step=1", "optim.warmup_epochs=0", "optim.batch_size=2"
    )
    torch.manual_seed(0)
    method = build_method(cfg)
    initial = {k: v.clone() for k, v in method.state_dict().items()}
    trainer = Trainer(method, cfg, init_distributed("cpu"), tmp_path)
    swapped = {n for n, m in method.named_modules() if isinstance(m, Float8Linear)}
    assert "encoder.blocks.0.attn.qkv" in swapped and "decoder.blocks.0.mlp.fc2" in swapped
    assert not any(n.startswith("teacher.") for n in swapped)
    assert all(type(m) is torch.nn.Linear for m in method.teacher.modules() if isinstance(m, torch.nn.Linear))
    from mimkit.data import ViewDataset, build_source

    trainer.fit(ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data)))
    saved = checkpoint.load(tmp_path / "last.pt")
    assert saved["step"] == 1 and saved["model"].keys() == initial.keys()
    weight = "encoder.blocks.0.attn.qkv.weight"
    assert torch.isfinite(saved["model"][weight]).all() and not torch.equal(
        saved["model"][weight], initial[weight]
    )


def test_float8_without_torchao_names_the_package(tiny, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # as if not installed
    with pytest.raises(ValueError, match=r"run.float8=true needs torchao: pip install 'mimkit\[float8\]'"):
        Trainer(build_method(tiny()), tiny("run.float8=true"), init_distributed("cpu"), tmp_path)


def test_compile_mode_and_tf32_reach_torch(tiny, tmp_path, monkeypatch):
    """run.compile_mode is torch.compile's mode; run.tf32 changes nothing on the CPU (it is for GPUs)."""
    seen = {}
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.update(kwargs) or model)
    cfg = tiny("run.compile=true", "run.compile_mode=reduce-overhead", "run.tf32=true")
    Trainer(build_method(cfg), cfg, init_distributed("cpu"), tmp_path)
    assert seen == {"mode": "reduce-overhead"}
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.slow
def test_a_run_that_fails_with_loader_workers_still_exits(tmp_path):
    """The workers ignore SIGTERM (the main process saves first on a stop signal): a failure that leaves
    the loader referenced by its traceback must not leave the interpreter waiting for them at exit."""
    import subprocess
    import sys
    import textwrap

    from tests.conftest import TINY, subprocess_env

    script = textwrap.dedent(f"""
        from mimkit.configs import build_config
        from mimkit.data import ViewDataset, build_source
        from mimkit.distributed import init_distributed
        from mimkit.methods import build_method
        from mimkit.train.engine import Trainer
        cfg = build_config(None, {[*TINY, "data.num_workers=1", "optim.epochs=1"]!r} + ["run.out={tmp_path}"])
        method = build_method(cfg)
        data = ViewDataset(build_source("synthetic:64", image_size=16), method.train_transform(cfg.data))
        trainer = Trainer(method, cfg, init_distributed("cpu"), {str(tmp_path)!r})
        trainer.fit(data, on_epoch_end=lambda e: 1 / 0)
    """)
    done = subprocess.run(
        [sys.executable, "-c", script], env=subprocess_env(), capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1 and "ZeroDivisionError" in done.stderr, done.stderr[-2000:]
