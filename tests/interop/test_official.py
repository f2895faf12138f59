import pytest
import torch

from mimkit.configs import build_config
from mimkit.interop import load_official, to_official
from mimkit.interop.load import load_encoder
from mimkit.interop.mae_lut import infer_overrides
from mimkit.methods import build_method
from tests.conftest import TINY

TINY_HEADS = ["model.num_heads=2", "method.decoder_num_heads=2"]


def tiny_mae():
    torch.manual_seed(0)
    return build_method(build_config(None, TINY))


def test_official_mae_layout_round_trip_gives_the_same_loss(tmp_path):
    model = tiny_mae()
    state = to_official(model)
    assert "decoder_pred.weight" in state["model"] and "mask_token" in state["model"]
    assert "blocks.0.attn.qkv.weight" in state["model"] and "model_ema" not in state
    torch.save(state, tmp_path / "mae_full.pth")
    loaded = load_official(tmp_path / "mae_full.pth", overrides=TINY_HEADS)
    assert loaded.name == "mae"
    imgs, noise = torch.randn(4, 3, 16, 16), torch.rand(4, 16)
    assert torch.equal(loaded({"image": imgs}, noise=noise).loss, model({"image": imgs}, noise=noise).loss)


@pytest.mark.slow
def test_encoder_only_release_loads_with_a_fresh_decoder(tmp_path, capsys):
    model = tiny_mae()
    encoder_only = {
        k: v for k, v in to_official(model)["model"].items() if not k.startswith(("decoder", "mask"))
    }
    torch.save({"model": encoder_only}, tmp_path / "mae_pretrain.pth")
    loaded = load_official(tmp_path / "mae_pretrain.pth", overrides=TINY_HEADS)
    assert "has no decoder weights" in capsys.readouterr().err
    for key, value in model.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[key], value)
    # an official file is also an input of the evaluations
    encoder, info = load_encoder(tmp_path / "mae_pretrain.pth")
    assert encoder.input_spec.img_size == 16 and info["input_spec"] is encoder.input_spec


def test_official_sizes_are_inferred_from_the_weights():
    def shaped(dim, depth, patch, grid, decoder=(512, 8)):
        state = {
            "cls_token": torch.empty(1, 1, dim),
            "pos_embed": torch.empty(1, grid * grid + 1, dim),
            "patch_embed.proj.weight": torch.empty(dim, 3, patch, patch),
            "blocks.0.mlp.fc1.weight": torch.empty(4 * dim, dim),
            "decoder_embed.weight": torch.empty(decoder[0], dim),
        }
        state |= {f"blocks.{i}.norm1.weight": torch.empty(dim) for i in range(depth)}
        state |= {f"decoder_blocks.{i}.norm1.weight": torch.empty(decoder[0]) for i in range(decoder[1])}
        return state

    base = infer_overrides(shaped(768, 12, 16, 14), "mae")
    assert {
        "model.arch=vit_base",
        "model.num_heads=12",
        "model.img_size=224",
        "model.patch_size=16",
        "model.depth=12",
        "method.decoder_embed_dim=512",
        "method.decoder_depth=8",
    } <= set(base)
    huge = infer_overrides(shaped(1280, 32, 14, 16), "mae")
    assert {"model.arch=vit_huge", "model.num_heads=16", "model.img_size=224", "model.patch_size=14"} <= set(
        huge
    )
