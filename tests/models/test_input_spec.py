import json

import pytest
import torch

from mimkit.configs import DataConfig, ModelConfig
from mimkit.models.input_spec import InputSpec


def pixel_spec(**kw):
    args = dict(
        kind="pixels", channels=3, mean=(0.5, 0.4, 0.3), std=(0.2, 0.2, 0.25), img_size=32, patch_size=8
    )
    return InputSpec(**{**args, **kw})


def token_spec(**kw):
    return InputSpec(
        **{"kind": "token_ids", "channels": 1, "img_size": 28, "patch_size": 2, "vocab_size": 391, **kw}
    )


def test_derived_fields():
    spec = pixel_spec()
    assert spec.grid == (4, 4) and spec.num_patches == 16
    assert spec.eval_size == 32 and spec.crop_pct == 0.875 and spec.resize_size == 36
    assert token_spec().grid == (14, 14)


@pytest.mark.parametrize("make", [pixel_spec, token_spec])
def test_round_trip_through_a_weights_only_checkpoint_and_json(tmp_path, make):
    spec = make(eval_size=16 if make is pixel_spec else 24, crop_pct=0.75)
    torch.save({"input_spec": spec.to_dict()}, tmp_path / "ckpt.pt")
    loaded = torch.load(tmp_path / "ckpt.pt", weights_only=True)["input_spec"]
    assert InputSpec.from_dict(loaded) == spec
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    assert all(isinstance(v, (str, int, float, list, type(None))) for v in spec.to_dict().values())


def test_from_config_reads_the_model_and_data_sections():
    spec = InputSpec.from_config(ModelConfig(), DataConfig())
    assert (spec.kind, spec.channels, spec.img_size, spec.eval_size, spec.patch_size, spec.grid) == (
        "pixels",
        3,
        224,
        224,
        16,
        (14, 14),
    )
    assert spec.mean == (0.485, 0.456, 0.406) and spec.std == (0.229, 0.224, 0.225) and spec.crop_pct == 0.875
    huge = InputSpec.from_config(ModelConfig(arch="vit_huge"), DataConfig(crop_pct=1.0))
    assert huge.patch_size == 14 and huge.grid == (16, 16) and huge.crop_pct == 1.0
    small = InputSpec.from_config(
        ModelConfig(arch="vit_tiny", img_size=32, patch_size=4), DataConfig(mean=(0.1,) * 3, std=(0.3,) * 3)
    )
    assert small.grid == (8, 8) and small.mean == (0.1,) * 3


def test_from_dict_names_missing_and_unknown_keys():
    data = pixel_spec().to_dict()
    with pytest.raises(ValueError, match=r"missing 'patch_size'"):
        InputSpec.from_dict({k: v for k, v in data.items() if k != "patch_size"})
    with pytest.raises(ValueError, match=r"unknown InputSpec key 'crop_pc'; did you mean 'crop_pct'\?"):
        InputSpec.from_dict({**data, "crop_pc": 0.9})


@pytest.mark.parametrize(
    ("make", "kw", "match"),
    [
        (pixel_spec, {"kind": "pixel"}, "did you mean 'pixels'"),
        (pixel_spec, {"mean": (0.5, 0.5)}, "mean and std of 3 values"),
        (pixel_spec, {"std": (0.2, 0.0, 0.2)}, "std must be positive"),
        (pixel_spec, {"img_size": 30}, r"img_size \(30\) is not divisible by patch_size \(8\)"),
        (pixel_spec, {"eval_size": 20}, r"eval_size \(20\) is not divisible"),
        (pixel_spec, {"grid": (2, 4)}, "grid must be img_size / patch_size"),
        (pixel_spec, {"crop_pct": 0.0}, "crop_pct must lie in"),
        (pixel_spec, {"crop_pct": 1.5}, "crop_pct must lie in"),
        (pixel_spec, {"patch_size": 0}, "patch_size must be an integer >= 1"),
        (pixel_spec, {"img_size": 32.0}, "img_size must be an integer"),
        (pixel_spec, {"vocab_size": 10}, "vocab_size applies to token ids only"),
        (token_spec, {"vocab_size": None}, "vocab_size must be an integer"),
        (token_spec, {"mean": (0.5,), "std": (0.5,)}, "a token_ids InputSpec has none"),
        (token_spec, {"channels": 32}, "channels 1"),
    ],
)
def test_impossible_values_are_clear_errors(make, kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_token_embeddings_spec():
    spec = InputSpec(kind="token_embeddings", channels=32, img_size=28, patch_size=2)
    assert spec.mean == () and spec.vocab_size is None and spec.grid == (14, 14)


def test_frozen():
    with pytest.raises(AttributeError):
        pixel_spec().img_size = 64


def test_the_tokenizer_fingerprint_is_optional_and_for_token_inputs_only():
    spec = InputSpec(
        kind="token_ids",
        channels=1,
        img_size=8,
        patch_size=1,
        vocab_size=384,
        codebook_signature=(0.5, -0.25),
    )
    assert InputSpec.from_dict(spec.to_dict()) == spec
    old = {k: v for k, v in spec.to_dict().items() if k != "codebook_signature"}  # a checkpoint from before
    assert InputSpec.from_dict(old).codebook_signature is None
    assert "codebook_signature" not in InputSpec.from_dict(old).to_dict()  # older readers refuse unknown keys
    with pytest.raises(
        ValueError, match="codebook_signature identifies a tokenizer; a pixel InputSpec has none"
    ):
        InputSpec(
            kind="pixels",
            channels=3,
            mean=(0.5,) * 3,
            std=(0.5,) * 3,
            img_size=8,
            patch_size=4,
            codebook_signature=(0.5, -0.25),
        )
