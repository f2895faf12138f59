import math

import pytest
import timm
import torch

from mimkit import checkpoint
from mimkit.cli import main
from mimkit.configs import ConfigError, build_config
from mimkit.data import build_source
from mimkit.eval.knn import loo_nearest
from mimkit.interop import load_official, to_official
from mimkit.interop.latent_mim import lmim_to_mimkit, mimkit_to_lmim
from mimkit.masking import visible_target_split
from mimkit.methods import build_method, cosine_momentum
from mimkit.methods.latent_mim import cosine_decay, infonce_patches
from mimkit.models.patches import gap_patchify, patchify
from mimkit.runs.pretrain import pretrain
from tests import reference
from tests.conftest import TINY

# 16 px images, 4 px patches: a 4 x 4 grid; gap 1 (patch // 4), so training crops are 20 px
LMIM_TINY = [
    *TINY,
    "method=latent_mim",
    "method.proj_hidden_dim=48",
    "method.num_vis=5",
    "method.decoder_depth=2",
]


def tiny_lmim(*overrides):
    torch.manual_seed(0)
    return build_method(build_config(None, [*LMIM_TINY, *overrides]))


def batch_of(n=4, seed=0, size=20, gap=1):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.randn(n, 3, size, size, generator=g)
    return {"patches": gap_patchify(imgs, 4, gap, generator=g)}


def _perturb(model):
    """Teacher != student and a non-zero mask token, so that a mix-up of either cannot go unnoticed."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.teacher.module.named_parameters():
            if "pos_embed" not in name:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.decoder.mask_token.normal_(generator=g)


def test_gap_patches_are_windows_inside_their_cells_that_never_overlap():
    p, gap, grid = 4, 3, 5
    size = grid * (p + gap)
    # every pixel holds its own coordinates, so each patch says where it was cut
    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    img = torch.stack([ys, xs, torch.zeros_like(ys)]).float()[None].repeat(6, 1, 1, 1)
    patches = gap_patchify(img, p, gap, generator=torch.Generator().manual_seed(0))
    assert patches.shape == (6, grid * grid, p * p * 3)
    cells = patches.reshape(6, grid * grid, p, p, 3)
    seen_offsets = set()
    for n in range(6):
        pixels = set()
        for token in range(grid * grid):
            rows, cols = cells[n, token, ..., 0].long(), cells[n, token, ..., 1].long()
            top, left = int(rows[0, 0]), int(cols[0, 0])
            # a contiguous p x p window, row-major (row, col, channel) values
            assert torch.equal(rows, top + torch.arange(p)[:, None].expand(p, p))
            assert torch.equal(cols, left + torch.arange(p)[None, :].expand(p, p))
            oy, ox = top - (token // grid) * (p + gap), left - (token % grid) * (p + gap)
            assert 0 <= oy < gap and 0 <= ox < gap
            seen_offsets.add((oy, ox))
            pixels |= {(int(r), int(c)) for r, c in zip(rows.flatten(), cols.flatten(), strict=True)}
        assert len(pixels) == grid * grid * p * p  # no two patches share a pixel
    assert len(seen_offsets) == gap * gap  # every offset occurs


def test_gap_patches_follow_the_spec_and_are_reproducible():
    imgs = torch.randn(3, 3, 20, 20)
    ours = gap_patchify(imgs, 4, 1, generator=torch.Generator().manual_seed(3))
    again = gap_patchify(imgs, 4, 1, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, again)
    # the same generator draws row offsets, then column offsets
    g = torch.Generator().manual_seed(3)
    rows, cols = torch.randint(0, 1, (3, 4, 4), generator=g), torch.randint(0, 1, (3, 4, 4), generator=g)
    assert torch.equal(ours, reference.lmim_gap_patches(imgs, 4, 1, rows, cols))
    offsets = torch.randint(0, 4, (3, 2, 2, 2))
    wide = torch.randn(3, 3, 40, 40)
    expected = reference.lmim_gap_patches(wide, 16, 4, offsets[..., 0], offsets[..., 1])
    assert torch.equal(gap_patchify(wide, 16, 4, offsets=offsets), expected)
    # gap 0 is the ordinary patchify
    assert torch.equal(gap_patchify(imgs, 4, 0), patchify(imgs, 4))
    with pytest.raises(ValueError, match=r"not divisible by the cell size 7 \(patch 4 \+ gap 3\)"):
        gap_patchify(imgs, 4, 3)


def test_visible_and_target_ids_partition_the_grid():
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(0))
    split = visible_target_split(4, 16, 5, noise=noise)
    assert split.visible.shape == (4, 5) and split.masked.shape == (4, 11)
    assert torch.equal(split.target, split.masked)
    for vis, masked in zip(split.visible, split.masked, strict=True):
        assert sorted(vis.tolist() + masked.tolist()) == list(range(16))
    assert torch.equal(torch.cat([split.visible, split.masked], 1), torch.argsort(noise, 1))
    full = visible_target_split(4, 16, 5, noise=noise, mask_target=False)
    assert torch.equal(full.target[:, 5:], split.masked) and full.target.shape == (4, 16)
    with pytest.raises(ValueError, match=r"num_visible must lie in \[1, 15\]"):
        visible_target_split(4, 16, 16)


def test_position_tables_use_the_scaled_layout():
    model = tiny_lmim()
    table = reference.lmim_pos_table(64, 4)
    torch.testing.assert_close(model.encoder.pos_embed[0], table, atol=1e-6, rtol=0)
    torch.testing.assert_close(model.decoder.pos_embed[0], reference.lmim_pos_table(32, 4), atol=1e-6, rtol=0)
    # an MAE encoder keeps integer positions
    mae = build_method(build_config(None, TINY))
    assert not torch.allclose(mae.encoder.pos_embed[0], table, atol=1e-3)


@pytest.mark.parametrize("mask_target", [True, False])
@pytest.mark.parametrize("perturbed", [False, True])
def test_loss_equals_an_independent_computation_of_the_spec(mask_target, perturbed):
    model = tiny_lmim(f"method.mask_target={str(mask_target).lower()}", "method.avg_sim_coeff=0.5")
    if perturbed:
        _perturb(model)
    model.before_step(0.4)
    sim_target = 0.25 + 0.5 * 0.5 * (1 + math.cos(math.pi * 0.4))
    assert model.sim_target.item() == pytest.approx(sim_target)
    batch = batch_of()
    noise = torch.rand(4, 16, generator=torch.Generator().manual_seed(5))
    official = to_official(model)["state_dict"]
    expected = reference.lmim_forward_loss(
        official,
        batch["patches"],
        noise,
        num_vis=5,
        heads=2,
        decoder_heads=2,
        tau=0.2,
        coeff=0.5,
        sim_target=sim_target,
        mask_target=mask_target,
    )
    torch.testing.assert_close(model(batch, noise=noise).loss, expected, rtol=1e-5, atol=1e-6)


def test_loss_at_initialisation_is_about_two_tau_log_of_the_targets():
    """Spec 6.1's sanity value: untrained predictions cannot tell targets apart, so the InfoNCE term is
    close to 2 tau ln(M) (M = 11 masked patches here)."""
    model = tiny_lmim()
    out = model(batch_of(8))
    assert out.metrics["loss_latent"].item() == pytest.approx(0.4 * math.log(11), rel=0.05)
    pred, target = torch.randn(2, 11, 8), torch.randn(2, 11, 8)
    assert infonce_patches(pred, target, 0.2).item() == pytest.approx(
        reference.lmim_infonce(pred, target, 0.2).item(), rel=1e-6
    )


def test_no_gradient_reaches_the_target_encoder():
    model = tiny_lmim()
    out = model(batch_of())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    for module in (model.encoder.patch_embed, model.projector, model.decoder.embed, model.decoder.blocks[1]):
        assert all(p.grad is not None for p in module.parameters() if p.requires_grad)
    assert set(out.metrics) == {
        "loss_latent",
        "avg_sim_pred",
        "avg_sim_vis",
        "avg_sim_trg",
        "sim_target",
        "ema_momentum",
    }


def test_target_encoder_follows_by_ema_before_each_step():
    model = tiny_lmim()
    with torch.no_grad():
        for p in model.online().parameters():
            p.add_(0.1)
    before = {k: v.clone() for k, v in model.teacher.module.state_dict().items()}
    model.before_step(0.3)
    m = cosine_momentum(0.99, 0.3)
    assert model.teacher.momentum.item() == pytest.approx(m)
    now = model.online().state_dict()
    for key, old in model.teacher.module.state_dict().items():
        torch.testing.assert_close(old, m * before[key] + (1 - m) * now[key])
    assert cosine_decay(0.75, 0.25, 0.0) == 0.75 and cosine_decay(0.75, 0.25, 1.0) == pytest.approx(0.25)


@pytest.mark.slow
def test_latent_mim_trains_on_a_small_fixed_batch():
    cfg = build_config(None, [*LMIM_TINY, "model.img_size=32", "model.patch_size=4", "method.num_vis=7"])
    torch.manual_seed(0)
    model = build_method(cfg)
    source, views = build_source("demo:train"), model.train_transform(cfg.data)
    torch.manual_seed(1)
    batch = {"patches": torch.stack([views(source.load(i)[0])["patches"] for i in range(16)])}
    assert batch["patches"].shape == (16, 64, 48)
    noise = torch.rand(16, 64, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    history = []
    for step in range(30):
        model.before_step(step / 30)
        out = model(batch, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in out.metrics.items()})
    # from about 2 tau ln(57) = 1.62; the targets move too (EMA), so the fall is gradual
    assert history[-1]["loss_latent"] < 0.85 * history[0]["loss_latent"]
    for key in ("avg_sim_pred", "avg_sim_vis", "avg_sim_trg"):
        assert all(h[key] < 0.99 for h in history), key
    # the regulariser pulls the predictions' similarity down with its decaying target
    assert history[-1]["avg_sim_pred"] < history[0]["avg_sim_pred"] - 0.2


def test_weight_decay_follows_the_reference_rule():
    model = tiny_lmim()
    groups = model.param_groups(0.05, decay_tokens=True)
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    decayed_names = {names[i] for i in decayed}
    assert (
        "encoder.patch_embed.proj.weight" not in decayed_names and "decoder.embed.weight" not in decayed_names
    )
    assert {"encoder.cls_token", "decoder.mask_token", "decoder.cls_token"} <= decayed_names
    assert "projector.3.weight" in decayed_names and not any(n.startswith("teacher.") for n in decayed_names)


def test_bad_settings_name_the_key():
    with pytest.raises(ConfigError, match=r"'method.loss' must be one of infonce_patches, norm_l2; got 'l2'"):
        build_config(None, [*LMIM_TINY, "method.loss=l2"])
    with pytest.raises(ValueError, match=r"'method.num_vis' must lie in \[1, 15\] for 16 patches; got 16"):
        tiny_lmim("method.num_vis=16")
    default = tiny_lmim("method.num_vis=null")
    assert default.num_vis == 2 and default.patch_gap == 1  # round(16 * 20 / 196), 4 // 4
    assert tiny_lmim("method.loss=norm_l2")(batch_of()).loss.isfinite()


def test_official_layout_checkpoint_gives_the_same_loss(tmp_path):
    model = tiny_lmim("method.avg_sim_coeff=0.3")
    _perturb(model)
    official = to_official(model, ddp_prefix=True)
    state = official["state_dict"]
    assert state["module.encoder.embed.proj.weight"].shape == (64, 48)
    assert state["module.encoder.pos_embed.pos_embeds"].shape == (17, 64)
    assert state["module.encoder.head.linear2.weight"].shape == (64, 48)
    assert state["module.target_encoder.head.norm2.weight"].shape == (64,)
    assert state["module.decoder.blocks.1.cross_attn.kv_proj.weight"].shape == (64, 32)
    assert "module.decoder.blocks.0.norm2kv.weight" in state
    path = tmp_path / "checkpoint_latest.pth"
    torch.save({**official, "optimizer": {}, "loss_scaler": {}, "epoch": 3}, path)
    # heads are not in the weights (the official sizes are, in a table); tiny ones are given
    loaded = load_official(
        path, overrides=["model.num_heads=2", "method.decoder_num_heads=2", "method.num_vis=5"]
    )
    assert (
        loaded.name == "latent_mim" and loaded.cfg.avg_sim_coeff == 0.1
    )  # what a file cannot tell: defaults
    loaded.cfg.avg_sim_coeff = 0.3
    batch, noise = batch_of(), torch.rand(4, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        loaded(batch, noise=noise).loss, model(batch, noise=noise).loss, rtol=0, atol=0
    )
    # the conversion is exact both ways
    bare = {k[len("module.") :]: v for k, v in state.items()}
    assert all(torch.equal(v, mimkit_to_lmim(lmim_to_mimkit(bare))[k]) for k, v in bare.items())


@pytest.mark.slow
def test_pretrain_on_the_embedded_data_exports_to_timm(tmp_path, capsys):
    common = [
        *LMIM_TINY,
        "data.train=demo:train",
        "data.max_images=64",
        "model.img_size=32",
        "model.patch_size=8",
        "method.num_vis=4",
        "optim.epochs=2",
        "optim.warmup_epochs=1",
        "optim.min_lr_frac=0.25",
        "optim.warmup_from_min_lr=true",
    ]
    straight = pretrain(build_config(None, [*common, f"run.out={tmp_path / 'a'}"]))
    assert straight["steps"] == 16

    out = tmp_path / "encoder.safetensors"
    assert main(["export", str(tmp_path / "a"), "--out", str(out)]) == 0
    from safetensors.torch import load_file

    vit = timm.create_model(
        "vit_tiny_patch16_224", num_classes=0, img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2
    )
    vit.load_state_dict(load_file(out), strict=True)
    encoder = build_method(build_config(None, [*common])).encoder
    trained = checkpoint.load(tmp_path / "a" / "last.pt")["model"]
    encoder.load_state_dict({k[len("encoder.") :]: v for k, v in trained.items() if k.startswith("encoder.")})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit.forward_features(x), encoder.forward_features(x))


def test_leave_one_out_nearest_neighbour(tmp_path, capsys):
    feats = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.05, 1.0]])
    # each row's nearest other row; never itself
    assert loo_nearest(feats, chunk=2).tolist() == [1, 0, 4, 4, 2]
    with pytest.raises(ValueError, match="at least 2 images"):
        loo_nearest(feats[:1])

    pretrain(
        build_config(
            None, [*LMIM_TINY, f"run.out={tmp_path / 'run'}", "optim.epochs=1", "optim.warmup_epochs=0"]
        )
    )
    args = [
        "knn",
        str(tmp_path / "run"),
        "--protocol",
        "lmim_nn",
        "--val",
        "synthetic:16",
        "--num-workers",
        "0",
    ]
    assert main(args) == 0
    assert "leave-one-out 1-NN (mean_prenorm) on synthetic:16: top-1" in capsys.readouterr().out
    assert (tmp_path / "run" / "lmim_nn.json").is_file()
    # the pooling reads the tokens before the final norm
    encoder = build_method(build_config(None, LMIM_TINY)).encoder
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        encoder.norm.weight.mul_(3.0)
        tokens = encoder.forward_visible(x, norm=False)
    torch.testing.assert_close(encoder.features(x, "mean_prenorm"), tokens[:, 1:].mean(1))
    torch.testing.assert_close(encoder.features(x, "mean"), encoder.norm(tokens)[:, 1:].mean(1))


@pytest.mark.slow
def test_recipes_are_the_released_command_and_the_small_mae_budget():
    from mimkit.train.optim import effective_batch, resolve_lr

    cfg = build_config("latent_mim_vit_base_imagenet")
    m, o = cfg.method, cfg.optim
    assert (m.patch_gap, m.decoder_depth, m.avg_sim_coeff, m.num_vis, m.loss, m.tau) == (
        4,
        3,
        0.1,
        20,
        "infonce_patches",
        0.2,
    )
    assert (o.epochs, o.warmup_epochs, o.blr, o.min_lr_frac, o.warmup_from_min_lr) == (
        800,
        40,
        1.5e-4,
        0.25,
        True,
    )
    assert effective_batch(o, world_size=8) == 4096 and resolve_lr(o, 4096) == pytest.approx(2.4e-3)
    assert o.clip_grad is None and o.decay_tokens and o.betas == (0.9, 0.95)
    # the training crop is grid x (patch + gap) = 14 x 20 = 280 px
    views = build_method(cfg).train_transform(cfg.data).pipelines["patches"].transforms
    assert views[0].size == (280, 280)
    small, mae = build_config("latent_mim_cifar10"), build_config("mae_cifar10")
    assert (small.model, small.data) == (mae.model, mae.data)
    assert (small.optim.epochs, small.optim.batch_size, small.optim.blr) == (
        mae.optim.epochs,
        mae.optim.batch_size,
        mae.optim.blr,
    )
    assert small.eval.lmim_nn and (small.eval.val, small.eval.pool) == (mae.eval.val, mae.eval.pool)


def test_the_loaders_noise_sets_the_split_unless_noise_is_given():
    cfg = build_config(None, LMIM_TINY)
    model = tiny_lmim()
    out = model.train_transform(cfg.data)(build_source("demo:train").load(0)[0])
    assert list(out) == ["patches", "noise"] and out["noise"].shape == (16,)
    g = torch.Generator().manual_seed(3)
    batch, a, b = batch_of(), torch.rand(4, 16, generator=g), torch.rand(4, 16, generator=g)
    with torch.no_grad():
        given = model(batch, noise=a).loss
        assert torch.equal(model({**batch, "noise": a}).loss, given)
        assert torch.equal(model({**batch, "noise": b}, noise=a).loss, given)
        assert not torch.equal(model({**batch, "noise": b}).loss, given)
