import pytest

from mimkit.configs import RECIPE_DIR, ConfigError, build_config


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
