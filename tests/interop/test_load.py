"""The encoder's input spec is saved with every checkpoint and export, read back by ``load_encoder``, and
decides the views of every evaluation (k-NN, linear probe, fine-tune) instead of a recipe."""

import importlib
import json
from dataclasses import replace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torchvision.transforms import v2 as T

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.configs import IMAGENET_MEAN, build_config, to_dict
from mimkit.data.source_spec import build_source
from mimkit.data.transforms import eval_view
from mimkit.distributed import init_distributed
from mimkit.interop.load import export_encoder, load_encoder
from mimkit.methods import FineTune, LinearProbe, build_method
from mimkit.models.input_spec import InputSpec
from mimkit.train.engine import Trainer
from tests.conftest import TINY

# the modules (mimkit.runs exports functions of the same names), for patching what they call
classify_run, evaluate_run, pretrain_run = (
    importlib.import_module(f"mimkit.runs.{name}") for name in ("classify", "evaluate", "pretrain")
)

# a pre-training view no recipe has: crop 1.0 (TINY) and its own normalisation
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
OWN_DATA = [f"data.mean=[{','.join(map(str, MEAN))}]", f"data.std=[{','.join(map(str, STD))}]"]
TASK = [
    "data.train=synthetic:16",
    "eval.val=synthetic:8",
    "data.num_workers=0",
    "optim.epochs=1",
    "optim.warmup_epochs=0",
    "optim.batch_size=8",
    "optim.accum_iter=1",
    "run.progress=false",
    "run.device=cpu",
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec") / "run"
    cfg = build_config(None, [*TINY, *OWN_DATA, f"run.out={out}", "optim.epochs=1", "optim.warmup_epochs=0"])
    pretrain_run.pretrain(cfg)
    return out, InputSpec.from_config(cfg.model, cfg.data)


def _image() -> torch.Tensor:
    """A non-square image, so that the resize before the centre crop (crop_pct) changes the pixels."""
    return torch.randint(0, 256, (3, 20, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def _same_view(view, spec: InputSpec) -> bool:
    img = _image()
    return torch.equal(view(img)["image"], eval_view(spec.eval_size, spec)(img)["image"])


def test_spec_round_trips_through_a_checkpoint_an_export_and_load_encoder(run, tmp_path, capsys):
    out, spec = run
    assert spec.mean == MEAN and spec.crop_pct == 1.0
    assert checkpoint.load(out / "last.pt")["input_spec"] == spec.to_dict()
    encoder, info = load_encoder(out)
    assert encoder.input_spec == spec and info["input_spec"] == spec
    assert "predates" not in capsys.readouterr().err

    export = tmp_path / "enc.safetensors"
    export_encoder(out, export)
    with safe_open(str(export), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["input_spec"]) == spec.to_dict()
    encoder, info = load_encoder(export)
    assert encoder.input_spec == spec and info["input_spec"] == spec

    # an export written before specs were saved: separate entries, still read
    legacy = {k: v for k, v in meta.items() if k != "input_spec"}
    legacy |= {
        "img_size": "16",
        "mean": json.dumps([0.2] * 3),
        "std": json.dumps([0.3] * 3),
        "crop_pct": "0.5",
    }
    save_file(load_file(str(export)), str(tmp_path / "old.safetensors"), metadata=legacy)
    encoder, _ = load_encoder(tmp_path / "old.safetensors")
    assert encoder.input_spec == replace(spec, mean=(0.2,) * 3, std=(0.3,) * 3, crop_pct=0.5)


def test_an_old_checkpoint_loads_with_a_note_and_the_spec_of_its_config(run, tmp_path, capsys):
    out, spec = run
    state = checkpoint.load(out / "last.pt")
    del state["input_spec"]
    old = tmp_path / "old.pt"
    torch.save(state, old)
    encoder, info = load_encoder(old)
    err = capsys.readouterr().err
    assert f"note: {old} predates saved input specs; inferred from its config" in err
    assert len(err.strip().splitlines()) == 1
    assert encoder.input_spec == spec and info["input_spec"] == spec


def test_the_saved_spec_wins_over_the_config_for_every_encoder(tmp_path):
    """A teacher takes what its student takes; the saved spec, not the config's, is what both state."""
    cfg = build_config(None, [*TINY, "method=lut", "method.head_hidden_dim=32", "method.mask_ratio=0.75"])
    method = build_method(cfg)
    saved = replace(method.encoder.input_spec, mean=MEAN, std=STD, crop_pct=0.5)
    torch.save(
        {"config": to_dict(cfg), "model": method.state_dict(), "input_spec": saved.to_dict()},
        tmp_path / "c.pt",
    )
    for weights in ("student", "teacher"):
        assert load_encoder(tmp_path / "c.pt", weights)[0].input_spec == saved


def test_official_checkpoints_state_the_spec_of_their_rebuilt_config(tmp_path, capsys):
    from mimkit.interop import to_official

    method = build_method(build_config(None, TINY))
    torch.save(to_official(method), tmp_path / "mae.pth")
    encoder, _ = load_encoder(tmp_path / "mae.pth")
    spec = encoder.input_spec
    assert spec.mean == IMAGENET_MEAN and spec.crop_pct == 0.875 and spec.img_size == 16
    assert "predates" not in capsys.readouterr().err


def test_knn_views_follow_the_checkpoints_spec_not_its_config(run, tmp_path, monkeypatch):
    out, spec = run
    state = checkpoint.load(out / "last.pt")
    saved = replace(spec, mean=(0.3, 0.3, 0.3), crop_pct=0.5)  # the config still says MEAN and 1.0
    state["input_spec"] = saved.to_dict()
    torch.save(state, tmp_path / "edited.pt")
    seen = {}

    def fake_knn(encoder, train, val, transform, env, **kwargs):
        seen["view"] = transform
        return {"top1": 0.0}

    monkeypatch.setattr(evaluate_run, "knn_evaluate", fake_knn)
    evaluate_run.knn(str(tmp_path / "edited.pt"), train="synthetic:8", val="synthetic:8", device="cpu")
    assert _same_view(seen["view"], saved) and not _same_view(seen["view"], spec)


def test_knn_during_pretraining_reads_the_encoders_spec(monkeypatch):
    cfg = build_config(None, [*TINY, "eval.val=synthetic:8"])
    seen = {}

    def fake_knn(encoder, train, val, transform, env, **kwargs):
        seen["view"] = transform
        return {"top1": 0.0}

    monkeypatch.setattr(pretrain_run, "knn_evaluate", fake_knn)
    source = build_source("synthetic:8", image_size=16)
    probe = pretrain_run.knn_probe(cfg, init_distributed("cpu"), bank=source, queries=source)
    encoder = build_method(cfg).encoder
    assert encoder.input_spec == InputSpec.from_config(cfg.model, cfg.data)
    encoder.input_spec = replace(encoder.input_spec, mean=MEAN, crop_pct=0.5)
    probe(encoder)
    assert _same_view(seen["view"], encoder.input_spec)


def _captured_probe(monkeypatch, args):
    """Run `mimkit linprobe` with the final evaluation captured: its view and the trained module."""
    seen = {}

    def fake_classify(module, logits, val, view, env, **kwargs):
        seen.update(module=module, view=view)
        return {"top1": 0.0, "top5": 0.0}

    monkeypatch.setattr(classify_run, "classify", fake_classify)
    assert main(args) == 0
    return seen


def _normalize(views) -> T.Normalize:
    return next(t for t in views.pipelines["image"].transforms if isinstance(t, T.Normalize))


def test_the_linear_probe_sees_the_checkpoints_view_whatever_the_recipe(run, tmp_path, monkeypatch):
    out, spec = run
    # the ImageNet probe recipe says crop 0.875 (and the data config ImageNet's mean)
    recipe = "linprobe_vit_base_imagenet"
    assert build_config(recipe).data.crop_pct == 0.875
    args = ["linprobe", str(out), "--config", recipe, "--out", str(tmp_path / "lp"), *TASK]
    seen = _captured_probe(monkeypatch, args)
    assert _same_view(seen["view"], spec)
    assert _normalize(seen["module"].train_transform(None)).mean == list(MEAN)
    resolved = OmegaConf.load(tmp_path / "lp" / "config.yaml")
    assert resolved.data.crop_pct == 1.0 and tuple(resolved.data.mean) == MEAN
    assert checkpoint.load(tmp_path / "lp" / "last.pt")["input_spec"] == spec.to_dict()

    # a crop given on the command line wins; the normalisation stays the encoder's
    args = ["linprobe", str(out), "--config", recipe, "--out", str(tmp_path / "lp2"), *TASK]
    seen = _captured_probe(monkeypatch, [*args, "data.crop_pct=0.5", "data.mean=[0.9,0.9,0.9]"])
    assert _same_view(seen["view"], replace(spec, crop_pct=0.5))


def test_fine_tuning_states_its_own_size_and_the_checkpoints_input(run, tmp_path):
    out, spec = run
    encoder, info = load_encoder(out)
    cfg = build_config("finetune", [*TASK, f"method.checkpoint={out}", "method.img_size=32"])
    module = FineTune.build(encoder, {**info, "input_spec": replace(spec, crop_pct=0.5)}, cfg.method, 4)
    resized = replace(spec, img_size=32, eval_size=32, grid=None, crop_pct=0.5)
    assert module.model.input_spec == resized and encoder.input_spec == spec
    assert _same_view(module.eval_transform(cfg.data), replace(resized, crop_pct=cfg.data.crop_pct))
    env = init_distributed("cpu")
    assert Trainer(module, cfg, env, tmp_path / "ft").state_dict()["input_spec"] == resized.to_dict()
    probe = LinearProbe.build(encoder, info, build_config("linprobe", TASK).method, 4)
    assert Trainer(probe, cfg, env, tmp_path / "lp").state_dict()["input_spec"] == spec.to_dict()
