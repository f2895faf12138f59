"""The fine-tune method (mimkit.methods.finetune): layer-wise lr decay and the model it builds; Token-EDA's
synonyms from a given file (SeiT's released ``synonyms.json``) or built from the codebook, and the errors a
bad file gets."""

import json
from pathlib import Path

import pytest
import torch

from mimkit.configs import build_config
from mimkit.methods import FineTune, FinetuneConfig, build_method
from mimkit.models.pos_embed import resample_pos_embed
from mimkit.tokens.codebook import build_synonyms, save_codebook, synonym_table
from tests.conftest import TINY
from tests.methods.test_mtm import DIM, GRID, TINY_MTM, VOCAB


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


TINY_TOKENS = [*TINY_MTM, f"model.vocab_size={VOCAB}"]  # an MTM encoder of ids, as fine-tuning takes it


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return build_method(build_config(None, TINY_TOKENS)).encoder


@pytest.fixture
def codebook_file(tmp_path: Path) -> Path:
    return save_codebook(
        torch.randn(VOCAB, DIM, generator=torch.Generator().manual_seed(1)), tmp_path / "cb.ckpt"
    )


def finetune(encoder, codebook_file: Path, **kw) -> FineTune:
    cfg = FinetuneConfig(
        codebook=str(codebook_file), noise_prob=0, coloradapt_prob=0, mixup=0, cutmix=0, **kw
    )
    task = FineTune(encoder, cfg, num_classes=10)
    task.use_data(None)
    return task


def test_token_eda_replaces_ids_by_the_given_synonyms(encoder, codebook_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "synonyms.json"
    path.write_text(json.dumps({str(i): [(i + 1) % VOCAB] for i in range(VOCAB)}))
    eda = finetune(encoder, codebook_file, eda_rc_prob=1.0, synonyms=str(path)).batch_transform().eda
    ids = torch.randint(0, VOCAB, (4, GRID, GRID), generator=torch.Generator().manual_seed(2))
    out = eda(ids, generator=torch.Generator().manual_seed(3))
    changed = out != ids
    assert changed.any()  # about a quarter of the ids (replace_prob 0.25)
    assert torch.equal(out[changed], (ids[changed] + 1) % VOCAB)  # the file's synonym, not a built one


def test_token_eda_builds_synonyms_from_the_codebook_without_a_file(encoder, codebook_file: Path) -> None:
    eda = finetune(encoder, codebook_file, eda_rc_prob=1.0).batch_transform().eda
    built = build_synonyms(torch.load(codebook_file), k=5)
    assert torch.equal(eda.table, synonym_table(built, 5))


def test_a_missing_synonym_file_is_an_error_naming_the_key_and_the_file(encoder, codebook_file: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        finetune(encoder, codebook_file, synonyms="nowhere/synonyms.json")
    assert str(err.value) == (
        "method.synonyms: 'nowhere/synonyms.json' is not a file (a synonym JSON such as SeiT's "
        "synonyms.json; null builds them from the codebook)"
    )


def test_a_synonym_file_of_another_vocabulary_is_an_error(
    encoder, codebook_file: Path, tmp_path: Path
) -> None:
    path = tmp_path / "synonyms.json"
    path.write_text(json.dumps({str(i): [0] for i in range(VOCAB - 1)}))  # one id short
    with pytest.raises(ValueError) as err:
        finetune(encoder, codebook_file, synonyms=str(path))  # checked even with EDA off
    assert str(err.value) == f"method.synonyms: {path}: no entry for token ids [23] (expected keys '0'..'23')"
    path.write_text("{not json")
    with pytest.raises(ValueError, match=rf"^method\.synonyms: {path}: not a valid JSON synonym file"):
        finetune(encoder, codebook_file, synonyms=str(path))
