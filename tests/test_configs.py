import re

import pytest

from mimkit.configs import RECIPE_DIR, ConfigError, build_config
from mimkit.methods import build_method


def test_unknown_override_names_the_nearest_key():
    with pytest.raises(
        ConfigError, match=r"overrides: unknown config key 'optim.blrr'; did you mean 'optim.blr'\?"
    ):
        build_config(None, ["optim.blrr=1e-3"])
    with pytest.raises(ConfigError, match=r"did you mean 'method.mask_ratio'"):
        build_config(None, ["method.mask_ration=0.5"])


def test_unknown_recipe_key_names_the_file(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("optim:\n  epoch: 3\n")
    with pytest.raises(
        ConfigError, match=r"r\.yaml: unknown config key 'optim.epoch'; did you mean 'optim.epochs'"
    ):
        build_config(recipe)


def test_values_of_the_wrong_type_or_choice_are_errors():
    with pytest.raises(ConfigError, match=r"bad value for 'optim.epochs'"):
        build_config(None, ["optim.epochs=many"])
    with pytest.raises(
        ConfigError, match=r"'run.precision' must be one of auto, bf16, fp16, fp32; got 'fp8'"
    ):
        build_config(None, ["run.precision=fp8"])
    with pytest.raises(ConfigError, match=r"overrides must look like key=value"):
        build_config(None, ["optim.epochs"])


def test_unknown_method_and_recipe():
    with pytest.raises(ConfigError, match=r"unknown method 'maee'.*did you mean 'mae'"):
        build_config(None, ["method=maee"])
    with pytest.raises(ConfigError, match=r"recipe 'dem' .*did you mean 'demo'"):
        build_config("dem")


def test_overrides_win_and_types_are_kept():
    cfg = build_config("demo", ["optim.epochs=3", "optim.warmup_epochs=1", "model.depth=2", "method=mae"])
    assert cfg.optim.epochs == 3 and cfg.model.depth == 2 and cfg.method.name == "mae"
    assert isinstance(cfg.optim.betas, tuple) and cfg.recipe == "demo"


@pytest.mark.parametrize("recipe", sorted(p.stem for p in RECIPE_DIR.glob("*.yaml")))
def test_every_shipped_recipe_resolves(recipe):
    cfg = build_config(recipe)
    assert cfg.method.name


def test_imagenet_recipe_has_the_papers_values():
    cfg = build_config("mae_vit_base_imagenet")
    assert (cfg.model.arch, cfg.model.img_size, cfg.optim.blr, cfg.optim.weight_decay) == (
        "vit_base",
        224,
        1.5e-4,
        0.05,
    )
    assert (
        cfg.optim.batch_size * cfg.optim.accum_iter * 8 == 4096
        or cfg.optim.batch_size * cfg.optim.accum_iter == 4096
    )
    assert (cfg.optim.warmup_epochs, cfg.method.mask_ratio, cfg.method.norm_pix_loss) == (40, 0.75, True)
    assert cfg.optim.epochs in (800, 1600) and cfg.optim.betas == (0.9, 0.95)


def test_sections_and_shapes_are_checked():
    with pytest.raises(ConfigError, match=r"'model' is a section; set its keys, e.g. model.arch=\.\.\."):
        build_config(None, ["model=3"])
    with pytest.raises(ConfigError, match=r"bad value for 'optim.betas' \(\[0.9\]\): .*length 1"):
        build_config(None, ["optim.betas=[0.9]"])
    with pytest.raises(ConfigError, match=r"'model.arch' is a value, not a section"):
        build_config(None, ["model.arch.x=1"])


def test_lut_imagenet_recipe_is_the_documented_command():
    from mimkit.train.optim import effective_batch, resolve_lr

    cfg = build_config("lut_vit_base_imagenet")
    m = cfg.method
    assert (m.name, m.w_bc, m.ema_momentum, m.head_depth, m.pred_depth, m.head_hidden_dim) == (
        "lut",
        0.25,
        0.996,
        2,
        2,
        4096,
    )
    assert (m.head_norm, m.head_act, m.norm_pix_loss, cfg.optim.epochs) == ("bn", "relu", True, 1600)
    assert effective_batch(cfg.optim, world_size=8) == 4096
    assert resolve_lr(cfg.optim, 4096) == pytest.approx(2.4e-3)  # sqrt and linear rules agree here
    lut, mae = build_config("lut_cifar10"), build_config("mae_cifar10")
    assert (lut.model, lut.optim, lut.data, lut.eval) == (mae.model, mae.optim, mae.data, mae.eval)


def test_lut_refuses_settings_it_would_ignore():
    with pytest.raises(ConfigError, match=r"min_crop_scale.*simple random crop"):
        build_config(None, ["method=lut", "method.min_crop_scale=0.5"])
    with pytest.raises(ConfigError, match=r"mask_ratio.*>= 0.5"):
        build_config(None, ["method=lut", "method.mask_ratio=0.4"])


def test_clip_grad_must_be_positive_or_null_and_is_applied_at_its_value(tiny, monkeypatch):
    import torch

    from mimkit.distributed import init_distributed
    from mimkit.train.engine import Trainer

    # a negative norm would flip the gradients (gradient ascent); 0 would silently not clip
    for value in ("-1.0", "0.0"):
        with pytest.raises(
            ConfigError, match=rf"'optim.clip_grad' must be > 0 \(or null for no clipping\); got {value}"
        ):
            tiny(f"optim.clip_grad={value}")
    seen = []
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(
        torch.nn.utils,
        "clip_grad_norm_",
        lambda params, max_norm: seen.append(max_norm) or clip(params, max_norm),
    )
    cfg = tiny("optim.clip_grad=0.5")
    trainer = Trainer(build_method(cfg), cfg, init_distributed("cpu"), cfg.run.out)
    trainer.train_step([{"image": torch.randn(8, 3, 16, 16)}], progress=0.0)
    assert seen == [0.5]


@pytest.mark.parametrize(
    "key, valid, built",
    [
        ("depth", 1, lambda enc: len(enc.blocks)),
        ("patch_size", 8, lambda enc: enc.patch_size),
        ("embed_dim", 32, lambda enc: enc.embed_dim),
        ("num_heads", 1, lambda enc: enc.blocks[0].attn.num_heads),
    ],
)
def test_model_sizes_below_one_are_errors_not_the_archs_defaults(tiny, key, valid, built):
    for bad in (0, -2):
        with pytest.raises(
            ConfigError, match=rf"'model.{key}' must be at least 1 \(or null for the arch's\); got {bad}"
        ):
            tiny(f"model.{key}={bad}")
    assert built(build_method(tiny(f"model.{key}={valid}")).encoder) == valid


def test_model_shapes_are_checked_with_the_config(tiny):
    with pytest.raises(
        ConfigError, match=r"'model.img_size' \(16\) must be divisible by 'model.patch_size' \(5\)"
    ):
        tiny("model.patch_size=5")
    with pytest.raises(
        ConfigError, match=r"'model.embed_dim' \(64\) must be divisible by 'model.num_heads' \(3\)"
    ):
        tiny("model.num_heads=3")
    with pytest.raises(ConfigError, match=r"'model.embed_dim' must be divisible by 4 .*; got 6"):
        tiny("model.embed_dim=6", "model.num_heads=1")
    with pytest.raises(
        ConfigError, match=r"'model.arch' must be one of .*; got 'vit_bsae'; did you mean 'vit_base'"
    ):
        tiny("model.arch=vit_bsae")


@pytest.mark.parametrize("method", ["mae", "lut", "latent_mim"])
def test_decoder_depth_must_not_be_negative(tiny, method):
    with pytest.raises(ConfigError, match=r"'method.decoder_depth' must be >= 0; got -1"):
        tiny(f"method={method}", "method.decoder_depth=-1")
    with pytest.raises(
        ConfigError,
        match=r"'method.decoder_embed_dim' \(32\) must be divisible by 'method.decoder_num_heads' \(3\)",
    ):
        tiny(f"method={method}", "method.decoder_num_heads=3")
    assert len(build_method(tiny(f"method={method}", "method.decoder_depth=0")).decoder.blocks) == 0


def test_checkpoint_minutes_may_be_zero_or_infinite_but_not_negative(tiny):
    with pytest.raises(
        ConfigError, match=r"'run.checkpoint_minutes' must be >= 0 \(0: at every logged step\); got -1.0"
    ):
        tiny("run.checkpoint_minutes=-1")
    assert tiny("run.checkpoint_minutes=0").run.checkpoint_minutes == 0  # what tests/test_ddp.py runs with
    assert tiny("run.checkpoint_minutes=.inf").run.checkpoint_minutes == float("inf")  # epoch ends only


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.weight_decay=-0.05", r"'optim.weight_decay' must be >= 0; got -0.05"),
        ("optim.lr=-1e-3", r"'optim.lr' must be > 0 \(or null to scale optim.blr\); got -0.001"),
        ("optim.blr=0", r"'optim.blr' must be > 0; got 0.0"),
        ("optim.min_lr=-1", r"'optim.min_lr' must be >= 0; got -1.0"),
        ("optim.min_lr_frac=1.5", r"'optim.min_lr_frac' must lie in \[0, 1\]; got 1.5"),
        ("optim.betas=[1.0,0.95]", r"'optim.betas' must both lie in \[0, 1\); got \[1.0, 0.95\]"),
        ("optim.momentum=1", r"'optim.momentum' must lie in \[0, 1\); got 1.0"),
        ("optim.lr_ref_batch=0", r"'optim.lr_ref_batch' must be at least 1; got 0"),
        ("eval.temperature=0", r"'eval.temperature' must be > 0; got 0.0"),
        ("eval.every_epochs=-1", r"'eval.every_epochs' must be >= 0 \(0: only at the end\); got -1"),
        ("data.std=[0.2,0.0,0.2]", r"'data.std' must be > 0 in every channel; got \[0.2, 0.0, 0.2\]"),
        ("data.max_images=0", r"'data.max_images' must be at least 1 \(or null\); got 0"),
        ("run.stop_at_step=0", r"'run.stop_at_step' must be at least 1 \(or null\); got 0"),
        ("model.drop_path=1", r"'model.drop_path' must lie in \[0, 1\); got 1.0"),
        ("model.mlp_ratio=0", r"'model.mlp_ratio' must be > 0; got 0.0"),
        ("method.min_crop_scale=0", r"'method.min_crop_scale' must lie in \(0, 1\]; got 0.0"),
    ],
)
def test_out_of_range_values_name_the_key(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.warmup_epochs=nan", r"'optim.warmup_epochs' must be a finite number; got nan"),
        ("optim.lr=inf", r"'optim.lr' must be a finite number; got inf"),
        ("optim.blr=nan", r"'optim.blr' must be a finite number; got nan"),
        ("optim.min_lr=nan", r"'optim.min_lr' must be a finite number; got nan"),
        ("optim.clip_grad=inf", r"'optim.clip_grad' must be a finite number; got inf"),
        ("optim.betas=[nan,0.95]", r"'optim.betas' must be finite numbers; got \(nan, 0.95\)"),
        ("run.checkpoint_minutes=nan", r"'run.checkpoint_minutes' must be a finite number; got nan"),
        ("eval.temperature=nan", r"'eval.temperature' must be a finite number; got nan"),
        ("method.mask_ratio=nan", r"'method.mask_ratio' must be a finite number; got nan"),
    ],
)
def test_non_finite_floats_are_errors(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny(override)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["method.num_vis=16"], r"'method.num_vis' must lie in \[1, 15\] for 16 patches; got 16"),
        (["method.num_vis=0"], r"'method.num_vis' must lie in \[1, 15\] for 16 patches; got 0"),
        (["method.ema_momentum=1.5"], r"'method.ema_momentum' must lie in \[0, 1\]; got 1.5"),
    ],
)
def test_latent_mim_settings_are_checked_against_the_model_with_the_config(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny("method=latent_mim", *overrides)


@pytest.mark.parametrize(
    "override, message",
    [
        ("method.head_depth=-1", r"'method.head_depth' must be >= 0; got -1"),
        ("method.w_bc=-0.25", r"'method.w_bc' must be >= 0; got -0.25"),
        ("method.head_hidden_dim=0", r"'method.head_hidden_dim' must be at least 1; got 0"),
        ("method.ema_momentum=-0.1", r"'method.ema_momentum' must lie in \[0, 1\]; got -0.1"),
    ],
)
def test_lut_head_settings_are_checked_with_the_config(tiny, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny("method=lut", override)


def test_fine_tune_settings_that_training_would_refuse():
    base = ["method.checkpoint=x", "eval.val=synthetic:8"]
    with pytest.raises(ConfigError, match=r"'optim.batch_size' must be even; got 7"):
        build_config("finetune", [*base, "optim.batch_size=7"])
    assert build_config("finetune", [*base, "optim.batch_size=7", "method.mixup=0", "method.cutmix=0"])
    with pytest.raises(ConfigError, match=r"'method.img_size' must be at least 1 .*; got 0"):
        build_config("finetune", [*base, "method.img_size=0"])


def test_a_run_shorter_than_its_warmup_keeps_the_recipes_share_with_a_note(capsys):
    cfg = build_config("demo", ["optim.epochs=2"])  # the demo warms up 4 of 40 epochs
    assert cfg.optim.warmup_epochs == pytest.approx(0.2)
    assert (
        "note: optim.warmup_epochs 4 is longer than the run's 2 epochs; warming up for 0.2 epochs, the "
        "recipe's share (set optim.warmup_epochs to choose)" in capsys.readouterr().err
    )
    with pytest.raises(ConfigError, match=r"'optim.warmup_epochs' must lie in \[0, optim.epochs=2\]; got 3"):
        build_config("demo", ["optim.epochs=2", "optim.warmup_epochs=3"])  # the user's own: checked


def _declared(section: type, prefix: str) -> list[tuple[str, object, object]]:
    """(key, a value the declared check refuses, the declaration) for every checked field of a section."""
    import dataclasses

    found = []
    for f in dataclasses.fields(section):
        rule = f.metadata.get("check")
        if rule is None:
            continue
        if rule.choices:
            bad: object = "nonsense"
        elif rule.low is not None:
            bad = rule.low if rule.low_open else rule.low - 1
        else:
            bad = rule.high if rule.high_open else rule.high + 1
        found.append((f"{prefix}{f.name}", bad, rule))
    return found


def _every_declared_check() -> list[tuple[str, str, object, object]]:
    from mimkit import configs
    from mimkit.methods import build_method  # noqa: F401 (registers every method's config)

    cases = []
    for section in ("model", "data", "optim", "run", "eval"):
        kind = type(getattr(configs.Config(), section))
        cases += [("mae", *case) for case in _declared(kind, f"{section}.")]
    for name, kind in configs.METHOD_CONFIGS.items():
        cases += [(name, *case) for case in _declared(kind, "method.")]
    return cases


@pytest.mark.parametrize(("method", "key", "bad", "rule"), _every_declared_check(), ids=lambda v: str(v)[:40])
def test_every_declared_range_is_checked_once_with_one_message(method, key, bad, rule):
    """Ranges and choices live on the config fields; validate refuses a value just beyond each with the
    message that names the key, what it must hold and what it got."""
    from mimkit.configs import ConfigError, build_config

    value = f"'{bad}'" if isinstance(bad, str) else bad
    shown = repr(bad) if isinstance(bad, str) else bad
    with pytest.raises(ConfigError, match=re.escape(f"'{key}' must {rule.must()}; got {shown}")):
        build_config(None, [f"method={method}", f"{key}={value}"])
