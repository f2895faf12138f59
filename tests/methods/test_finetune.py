"""The fine-tune method (mimkit.methods.finetune): layer-wise lr decay and the model it builds."""

import pytest
import torch

from mimkit.configs import build_config
from mimkit.methods import FineTune, build_method
from mimkit.models.pos_embed import resample_pos_embed
from tests.conftest import TINY


def tiny_encoder():
    torch.manual_seed(0)
    return build_method(build_config(None, TINY)).encoder


def test_layer_decay_groups_follow_the_layer_ids():
    """Spec 4.1: id 0 = cls, positions, patch embedding; block i -> i + 1; the rest (fc_norm, head) ->
    depth + 1; scale = ld^(depth + 1 - id); no decay for 1-D tensors, positions and cls."""
    cfg = build_config(None, ["method=finetune", "method.layer_decay=0.5"]).method
    model = FineTune(tiny_encoder(), cfg, num_classes=10)
    scale, decay = {}, {}
    names = {id(p): n for n, p in model.model.named_parameters()}
    for group in model.param_groups(0.05):
        for p in group["params"]:
            scale[names[id(p)]], decay[names[id(p)]] = group["lr_scale"], group["weight_decay"]
    assert set(scale) == {n for n, p in model.model.named_parameters() if p.requires_grad}
    for name, value in scale.items():
        if name.startswith(("cls_token", "pos_embed", "patch_embed")):
            layer = 0
        elif name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        else:
            assert name.startswith(("fc_norm", "head")), name
            layer = 3
        assert value == pytest.approx(0.5 ** (3 - layer)), name
    assert (
        decay["pos_embed"] == decay["cls_token"] == decay["blocks.0.norm1.weight"] == decay["head.bias"] == 0
    )
    assert decay["blocks.1.attn.qkv.weight"] == decay["head.weight"] == 0.05


def test_fine_tune_model_keeps_the_pretrained_weights_and_makes_positions_learnable():
    encoder = tiny_encoder()
    cfg = build_config(None, ["method=finetune"]).method
    model = FineTune(encoder, cfg, num_classes=10)
    assert model.model.pos_embed.requires_grad and torch.equal(model.model.pos_embed, encoder.pos_embed)
    assert torch.equal(model.model.blocks[1].mlp.fc2.weight, encoder.blocks[1].mlp.fc2.weight)
    assert isinstance(model.model.norm, torch.nn.Identity) and model.model.global_pool == "avg"
    assert model.model.head.weight.std().item() < 1e-4 and model.model.blocks[1].drop_path1.drop_prob > 0
    # same grid: the table is kept exactly; another size: resampled to the new grid
    assert resample_pos_embed(encoder.pos_embed, (4, 4)) is encoder.pos_embed
    bigger = FineTune(encoder, build_config(None, ["method=finetune", "method.img_size=32"]).method, 10)
    assert bigger.model.pos_embed.shape == (1, 1 + 64, 64)
    assert bigger.model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
