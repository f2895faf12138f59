"""SeiT++ masked token modeling: the loss against an independent computation from the spec, the tied
head's cut gradient, the masking, training on tokens of real images, exact resume, the token views."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mimkit.configs import ConfigError, build_config
from mimkit.data.sources import demo_source
from mimkit.masking import token_masking
from mimkit.methods import MTM, build_method
from mimkit.methods.token_views import TokenViews
from mimkit.models.patches import patchify
from mimkit.runs.pretrain import pretrain
from mimkit.tokens.dataset import write_tokens
from tests.conftest import straight_and_resumed

VOCAB, GRID, DIM = 24, 8, 16  # 32 px images, 4 px cells


def tokenize_by_colour(
    images: torch.Tensor, codes: int = VOCAB, seed: int = 0
) -> tuple[np.ndarray, torch.Tensor]:
    """Real images to real token grids without a trained tokenizer: each 4 x 4 pixel cell's mean colour
    snapped to the nearest of ``codes`` k-means colours; the codebook rows are those colours through a
    fixed random map to DIM dimensions. Returns (ids [N, 8, 8], codebook [codes, DIM])."""
    x = images.float() / 255  # [N, 3, 32, 32]
    cells = patchify(x, 4).reshape(x.shape[0], GRID * GRID, 16, 3).mean(2)  # [N, 64, 3]
    flat = cells.reshape(-1, 3)
    gen = torch.Generator().manual_seed(seed)
    centres = flat[torch.randperm(flat.shape[0], generator=gen)[:codes]].clone()
    for _ in range(10):
        assign = torch.cdist(flat, centres).argmin(1)
        for c in range(codes):
            if (assign == c).any():
                centres[c] = flat[assign == c].mean(0)
    ids = torch.cdist(flat, centres).argmin(1).reshape(-1, GRID, GRID)
    projection = torch.randn(3, DIM, generator=gen)
    return ids.numpy().astype(np.uint8), (centres - 0.5) @ projection


@pytest.fixture(scope="module")
def real_tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    source = demo_source("train")
    images = torch.stack([source.load(i)[0] for i in range(96)])
    labels = [source.load(i)[1] for i in range(96)]
    ids, codebook = tokenize_by_colour(images)
    path = tmp_path_factory.mktemp("tokens") / "demo-tokens"
    write_tokens(path, ids, labels, codebook=codebook)
    return path


TINY_MTM = [
    "method=mtm",
    "model.arch=vit_tiny",
    "model.stem=token_ids",
    f"model.img_size={GRID}",
    "model.patch_size=2",
    f"model.token_dim={DIM}",
    "model.token_dropout=0.1",
    "model.embed_dim=64",
    "model.depth=2",
    "model.num_heads=2",
    "method.decoder_embed_dim=32",
    "method.decoder_depth=1",
    "method.decoder_num_heads=2",
    "data.num_workers=0",
    "optim.epochs=2",
    "optim.warmup_epochs=1",
    "optim.batch_size=16",
    "optim.lr=1e-3",
    "run.progress=false",
    "run.log_every=2",
    "eval.knn=false",
]


def tiny_mtm(*overrides: str) -> MTM:
    cfg = build_config(None, [*TINY_MTM, f"model.vocab_size={VOCAB}", *overrides])
    torch.manual_seed(0)
    return build_method(cfg)


def spec_loss(method: MTM, ids: torch.Tensor, noise: torch.Tensor, ratio: float) -> torch.Tensor:
    """The spec's forward (section 4) written out on the full grid, independently of the method's code:
    embed every cell, the conv stem on the whole map, the mask token on masked patches, positions, drop,
    cls, encoder; decoder canvas; MlmLayer back to raster order; per-cell CE re-grouped per patch."""
    enc, dec, head = method.encoder, method.decoder, method.head
    stem = enc.stem
    n, side = ids.shape[0], ids.shape[1]
    p = enc.patch_size
    g = side // p
    length = g * g
    emb = stem.embedding_norm(stem.embedding(ids.reshape(n, -1)))  # [N, H*W, e] raster
    emb_map = emb.transpose(1, 2).reshape(n, -1, side, side)
    patches = F.conv2d(emb_map, stem.proj.weight, stem.proj.bias, stride=p).flatten(2).transpose(1, 2)
    n_drop, n_mask = math.ceil(length * 0.4), math.ceil(length * ratio)
    order = noise.argsort(1)
    drop = torch.zeros(n, length, dtype=torch.bool).scatter(1, order[:, :n_drop], True)
    mask = torch.zeros(n, length, dtype=torch.bool).scatter(1, order[:, :n_mask], True)
    x = torch.where(mask[..., None], enc.mask_token.expand(n, length, -1), patches) + enc.pos_embed[:, 1:]
    x = x[~drop].reshape(n, length - n_drop, -1)
    x = torch.cat([(enc.cls_token + enc.pos_embed[:, :1]).expand(n, -1, -1), x], 1)
    x = enc.norm(enc.blocks(x))
    y = dec.embed(x)
    canvas = y[:, :1].repeat(1, length + 1, 1)
    keep_slots = torch.cat([torch.ones(n, 1, dtype=torch.bool), ~drop], 1)
    canvas[keep_slots] = y.reshape(-1, y.shape[-1])
    canvas[:, 1:][mask] = y[:, :1].expand(n, length, -1)[mask]
    y = dec.norm(dec.blocks(canvas + dec.pos_embed))
    h = head.fc(y[:, 1:]).reshape(n, g, g, p, p, -1).permute(0, 1, 3, 2, 4, 5).reshape(n, side * side, -1)
    logits = head.norm(F.gelu(h)) @ stem.embedding.weight.T + head.bias
    per_cell = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="none")
    per_patch = per_cell.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, length, p * p).mean(-1)
    return (per_patch * mask).sum() / mask.sum()


def randomised(method: MTM) -> MTM:
    """Every parameter random (the mask token, decoder positions and head bias start at zero, where a
    forgotten term would go unseen)."""
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in method.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return method


def test_loss_equals_the_spec_computation_on_fixed_ids_and_masks():
    method = randomised(tiny_mtm()).eval()  # no dropout: both sides see the same network
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, VOCAB, (3, GRID, GRID), generator=gen)
    noise = torch.rand(3, (GRID // 2) ** 2, generator=gen)
    for ratio in (0.4, 0.55, 0.9):
        ours = method({"image": ids}, noise=noise, mask_ratio=ratio).loss
        torch.testing.assert_close(ours, spec_loss(method, ids, noise, ratio), rtol=1e-5, atol=1e-6)


def test_masked_token_accuracy_is_logged_beside_the_most_common_id():
    """The majority baseline is the share of the most common id among the cells of masked patches: what a
    model that learnt nothing about the tokens would score."""
    method = randomised(tiny_mtm()).eval()
    ids = torch.zeros(2, GRID, GRID, dtype=torch.long)
    ids[:, : GRID // 2, : GRID // 2] = 3  # id 3 fills the top-left quarter: half of the masked top rows
    noise = torch.arange((GRID // 2) ** 2, dtype=torch.float).repeat(2, 1)  # masks the first patches
    metrics = method({"image": ids}, noise=noise, mask_ratio=0.5).metrics
    g = GRID // 2
    masked = torch.zeros(g, g, dtype=torch.bool).flatten()
    masked[: math.ceil(g * g * 0.5)] = True
    cells = ids[0].reshape(g, 2, g, 2).permute(0, 2, 1, 3).reshape(g * g, 4)[masked].flatten()
    expected = torch.bincount(cells).max() / cells.numel()
    assert float(expected) == 0.5  # over every cell it would be 0.75
    assert float(metrics["masked_token_majority"]) == pytest.approx(float(expected))
    assert 0 <= float(metrics["masked_token_acc"]) <= 1


def test_tied_head_sends_no_gradient_into_the_embedding_table():
    method = tiny_mtm().eval()
    ids = torch.randint(0, VOCAB, (2, GRID, GRID), generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(2))
    table = method.encoder.stem.embedding.weight
    tied = torch.autograd.grad(method({"image": ids}, noise=noise, mask_ratio=0.6).loss, table)[0]
    # the same loss with the head given a constant copy of the table: any gradient through the tie
    # would make the two differ
    forward = method.head.forward
    method.head.forward = lambda x, t: forward(x, t.detach().clone())
    untied = torch.autograd.grad(method({"image": ids}, noise=noise, mask_ratio=0.6).loss, table)[0]
    torch.testing.assert_close(tied, untied, rtol=0, atol=0)
    assert tied.abs().sum() > 0  # the input side still learns


def test_batch_ratio_is_a_truncated_normal_in_range_with_exact_counts():
    method = tiny_mtm()
    ratios = torch.tensor([method.mask_ratio(u) for u in torch.linspace(0, 1, 201).tolist()])
    assert ratios.min() >= 0.4 and ratios.max() <= 1.0
    assert ratios[0] == pytest.approx(0.4) and ratios[-1] == pytest.approx(1.0)
    assert 0.55 < ratios.median() < 0.70  # a normal(0.45, 0.25) cut at 0.4 has its median near 0.63
    for ratio in ratios[::20].tolist():
        m = token_masking(4, 196, ratio, 0.4, generator=torch.Generator().manual_seed(0))
        assert (m.mask.sum(1) == math.ceil(196 * ratio)).all()
        assert m.ids_keep.shape[1] == 196 - math.ceil(196 * 0.4)
        dropped = torch.ones(4, 196).scatter(1, m.ids_keep, 0.0)
        assert (dropped <= m.mask).all()  # dropped is a subset of masked


def test_the_batch_ratio_comes_from_the_loader_uniform():
    method = tiny_mtm().eval()
    ids = torch.randint(0, VOCAB, (2, GRID, GRID))
    low = method({"image": ids, "ratio_noise": torch.zeros(2, 1)}).metrics["mask_ratio"]
    high = method({"image": ids, "ratio_noise": torch.ones(2, 1)}).metrics["mask_ratio"]
    assert float(low) == pytest.approx(math.ceil(16 * 0.4) / 16)
    assert float(high) == 1.0


def test_mtm_needs_a_token_id_encoder():
    with pytest.raises(ConfigError, match=r"model\.stem=token_ids"):
        build_config(None, ["method=mtm"])
    with pytest.raises(ValueError, match=r"model\.vocab_size"):
        build_method(build_config(None, [*TINY_MTM]))


def test_views_crop_and_requantise_reproducibly(real_tokens: Path):
    from mimkit.tokens.dataset import open_tokens

    data = open_tokens(real_tokens)
    ids = torch.from_numpy(data.read_many(np.arange(8))).long()
    views = TokenViews(data.codebook, 6, min_scale=0.2, noise_prob=0.5, coloradapt_prob=0.5)
    seeds = torch.arange(8)
    a = views({"image": ids, "seed": seeds})["image"]
    b = views({"image": ids, "seed": seeds})["image"]
    c = views({"image": ids, "seed": seeds + 1})["image"]
    assert a.shape == (8, 6, 6) and a.dtype == torch.long
    assert int(a.min()) >= 0 and int(a.max()) < VOCAB
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a full-box crop at the same size and no colour change gives back the ids
    same = TokenViews(data.codebook, GRID, min_scale=1.0)
    boxes_full = same({"image": ids, "seed": seeds})["image"]
    assert (boxes_full == ids).float().mean() > 0.99


@pytest.mark.slow
def test_mtm_learns_on_tokens_of_real_images(real_tokens: Path):
    from mimkit.tokens.dataset import open_tokens

    data = open_tokens(real_tokens)
    method = tiny_mtm()
    ids = torch.from_numpy(data.read_many(np.arange(32))).long()
    freq = torch.bincount(ids.flatten(), minlength=VOCAB).float() / ids.numel()
    unigram = float(-(freq * freq.clamp_min(1e-12).log()).sum())  # the best loss without context
    noise = torch.rand(32, 16, generator=torch.Generator().manual_seed(0))
    opt = torch.optim.AdamW(method.parameters(), lr=5e-3)
    losses = []
    for _ in range(60):
        loss = method({"image": ids}, noise=noise, mask_ratio=0.6).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > unigram  # starts near ln(24) = 3.18
    assert losses[-1] < unigram - 0.15  # ends below it: the visible cells are used


@pytest.mark.slow
def test_pretrain_on_a_token_dataset_records_the_vocabulary_it_took_from_the_data(
    real_tokens: Path, tmp_path: Path
):
    overrides = [*TINY_MTM, f"data.train=tokens:{real_tokens}", "method.noise_prob=0.5", "run.stop_at_step=2"]
    pretrain(build_config(None, [*overrides, f"run.out={tmp_path / 'a'}"]))
    saved = build_config(tmp_path / "a" / "config.yaml")
    assert saved.model.vocab_size == VOCAB  # taken from the data and recorded


def test_pretrain_ends_with_a_knn_on_tokens(real_tokens: Path, tmp_path: Path):
    cfg = build_config(
        None,
        [
            *TINY_MTM,
            f"data.train=tokens:{real_tokens}",
            f"eval.val=tokens:{real_tokens}",
            "eval.knn=true",
            "optim.epochs=1",
            f"run.out={tmp_path / 'run'}",
        ],
    )
    summary = pretrain(cfg)
    assert 0 <= summary["knn"]["top1"] <= 100


@pytest.mark.slow
def test_a_finetune_on_tokens_runs_through_mimkit_finetune(real_tokens: Path, tmp_path: Path):
    from mimkit import checkpoint
    from mimkit.cli import main

    run = tmp_path / "mtm"
    pretrain(
        build_config(
            None,
            [
                *TINY_MTM,
                f"data.train=tokens:{real_tokens}",
                f"eval.val=tokens:{real_tokens}",
                f"run.out={run}",
            ],
        )
    )
    code = main(
        [
            "finetune",
            str(run),
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "optim.batch_size=16",
            "data.num_workers=0",
            "run.progress=false",
            "method.pool=avg_norm",
            "method.layer_decay=0.65",
            "method.mixup=0",
            "method.cutmix=1.0",
            "--out",
            str(tmp_path / "ft"),
        ]
    )
    assert code == 0
    summary = checkpoint.load(tmp_path / "ft" / "last.pt")
    state = summary["model"]
    assert "model.patch_embed.embedding.weight" in state and "model.mask_token" not in state
    # avg_norm: the pre-trained final norm after the mean, at first exactly the encoder's
    pre = checkpoint.load(run / "last.pt")["model"]
    assert state["model.fc_norm.weight"].shape == pre["encoder.norm.weight"].shape
    assert (tmp_path / "ft" / "summary.json").is_file()


def test_token_finetune_puts_the_id_embedding_at_the_full_lr():
    from mimkit.methods import FineTune, FinetuneConfig

    encoder = randomised(tiny_mtm()).encoder
    task = FineTune(encoder, FinetuneConfig(layer_decay=0.65, pool="avg_norm"), num_classes=10)
    # avg_norm: the mean of the patch tokens through the pre-trained final norm
    assert isinstance(task.model.norm, torch.nn.Identity)
    torch.testing.assert_close(task.model.fc_norm.weight, encoder.norm.weight, rtol=0, atol=0)
    ids = torch.randint(0, VOCAB, (2, GRID, GRID))
    tokens = encoder.forward_visible(ids, norm=False)[:, 1:].mean(1)
    expected = task.model.head(encoder.norm(tokens))
    torch.testing.assert_close(task.eval().logits(ids), expected)
    groups = task.param_groups(0.05)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    stem = task.model.stem
    assert scale[id(stem.embedding.weight)] == 1.0
    assert scale[id(stem.embedding_norm.weight)] == 1.0
    assert scale[id(stem.proj.weight)] == pytest.approx(0.65 ** (2 + 1))  # depth 2: the stem is id 0
    assert scale[id(task.model.blocks[1].mlp.fc1.weight)] == pytest.approx(0.65)
    n_params = sum(p.numel() for g in groups for p in g["params"])
    assert n_params == sum(p.numel() for p in task.parameters() if p.requires_grad)


@pytest.mark.parametrize("stem", ["token_embeddings", "token_ids"])
def test_a_supervised_token_classifier_from_scratch(real_tokens: Path, tmp_path: Path, stem: str):
    """SeiT's recipe shape (continuous input through the stem adapter, EDA, colour, CutMix, model EMA)
    and its id-input counterpart, through `mimkit finetune scratch`."""
    from mimkit.cli import main

    code = main(
        [
            "finetune",
            "scratch",
            "--config",
            "seit_vit_base_imagenet",
            "--out",
            str(tmp_path / stem),
            f"model.stem={stem}",
            "model.img_size=6",
            f"model.token_dim={DIM}",
            "model.embed_dim=32",
            "model.depth=1",
            "model.num_heads=2",
            f"data.train=tokens:{real_tokens}",
            f"eval.val=tokens:{real_tokens}",
            "data.num_workers=0",
            "optim.epochs=1",
            "optim.warmup_epochs=0",
            "optim.batch_size=16",
            "run.progress=false",
            "run.precision=fp32",
        ]
    )
    assert code == 0
    import json

    summary = json.loads((tmp_path / stem / "summary.json").read_text())
    assert summary["steps"] == 6 and 0 <= summary["top1"] <= 100 and "ema_top1" in summary


def small_tokenadapt(out_grid: int = 6):
    from mimkit.models.tokenadapt import TokenAdapt

    torch.manual_seed(0)
    return TokenAdapt(VOCAB, token_dim=DIM, width=128, num_heads=2, in_grid=GRID, out_grid=out_grid).eval()


def test_views_split_the_batch_between_the_crop_and_tokenadapt_with_soft_targets(real_tokens: Path):
    from mimkit.data.token_augment import TokenMixup
    from mimkit.methods.token_views import TokenViews
    from mimkit.tokens.dataset import open_tokens

    data = open_tokens(real_tokens)
    ids = torch.from_numpy(data.read_many(np.arange(8))).long()
    labels = torch.arange(8) % 3
    batch = {"image": ids, "label": labels, "seed": torch.arange(8)}
    ta = small_tokenadapt()
    # only the TokenAdapt half mixed: the crop half gets its labels as smoothed one-hot targets
    views = TokenViews(data.codebook, 6, min_scale=0.5, tokenadapt=ta, mixers=(None, TokenMixup(3)))
    out = views(batch)
    assert out["image"].shape == (8, 6, 6) and out["soft_target"].shape == (8, 3)
    torch.testing.assert_close(out["soft_target"].sum(1), torch.ones(8))
    first = out["soft_target"][:4]
    assert torch.equal(first.argmax(1), labels[:4]) and first.max() == pytest.approx(0.9 + 0.1 / 3)
    # the second half is TokenAdapt's: g's ids of f's map, the first the crop's, re-quantised
    np.random.seed(0)  # timm's Mixup draws from numpy
    again = views(batch)
    np.random.seed(0)
    assert torch.equal(again["image"], views(batch)["image"])  # the same seeds, the same draws
    # a batch that lost a sample to a damaged record is cut to what still splits and pairs
    with pytest.warns(UserWarning, match="cut to 4"):
        odd = views({k: v[:7] for k, v in batch.items()})
    assert odd["image"].shape[0] == 4 and odd["label"].shape[0] == 4 and odd["soft_target"].shape[0] == 4
    # a TokenAdapt of another tokenizer is refused
    with pytest.raises(ValueError, match="trained for another tokenizer"):
        TokenViews(data.codebook[:10], 6, min_scale=0.5, tokenadapt=ta)


@pytest.mark.slow
def test_mtm_with_tokenadapt_runs_and_resumes_exactly(real_tokens: Path, tmp_path: Path):
    from mimkit.models.tokenadapt import save_tokenadapt

    save_tokenadapt(small_tokenadapt(out_grid=GRID), tmp_path / "ta.ckpt")
    overrides = [
        *TINY_MTM,
        f"data.train=tokens:{real_tokens}",
        f"method.tokenadapt={tmp_path / 'ta.ckpt'}",
        "optim.epochs=1",
    ]
    a, b, summary = straight_and_resumed(overrides, tmp_path, stop_at=3)
    assert summary["steps"] == 6
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_token_data_keeps_its_codebook_and_tokenizer_when_cut(real_tokens: Path):
    from mimkit.data.source_spec import build_source
    from mimkit.methods.token_views import views_codebook

    cut = build_source(f"tokens:{real_tokens}", max_images=10)
    assert len(cut) == 10
    assert views_codebook(None, cut, VOCAB).shape == (VOCAB, DIM)


def test_print_config_of_a_token_recipe_needs_no_data(tmp_path: Path, capsys: pytest.CaptureFixture):
    from mimkit.runs.pretrain import check_buildable

    cfg = build_config("mtm_cifar10", [f"data.train={tmp_path / 'absent'}"])
    check_buildable(cfg)  # the vocabulary would come from the data: said, not an error
    assert "vocabulary comes from data.train" in capsys.readouterr().err
    check_buildable(build_config("mtm_cifar10", ["model.vocab_size=10"]))  # given: built on the meta device
    assert "not checked" not in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["method=mtm", "method.noise_prob=0.7", "method.coloradapt_prob=0.5"],
            "'method.noise_prob' + 'method.coloradapt_prob' must not exceed 1",
        ),
        (
            ["method=mtm", "method.coloradapt_prob=-0.1"],
            "'method.coloradapt_prob' must lie in [0, 1]; got -0.1",
        ),
        (["method=finetune", "method.eda_rc_prob=1.5"], "'method.eda_rc_prob' must lie in [0, 1]; got 1.5"),
        (
            ["method=finetune", "method.eda_rc_prob=0.6", "method.eda_sc_prob=0.6"],
            "'method.eda_rc_prob' + 'method.eda_sc_prob' must not exceed 1",
        ),
        (
            ["method=finetune", "method.noise_prob=0.6", "method.coloradapt_prob=0.6"],
            "'method.noise_prob' + 'method.coloradapt_prob' must not exceed 1",
        ),
    ],
)
def test_the_views_choice_probabilities_are_checked_by_name(overrides: list[str], message: str):
    with pytest.raises(ConfigError) as err:
        build_config(None, overrides)
    assert message in str(err.value)
