import math

import pytest
import torch

from mimkit import checkpoint
from mimkit.configs import build_config
from mimkit.data import build_source
from mimkit.interop import load_official, to_official
from mimkit.masking import disjoint_pair
from mimkit.methods import build_method, cosine_momentum
from mimkit.methods.ema import EMATeacher
from mimkit.runs.pretrain import pretrain
from tests import reference
from tests.conftest import TINY

LUT_TINY = [*TINY, "method=lut", "method.head_hidden_dim=32", "method.mask_ratio=0.75"]


def tiny_lut(*overrides):
    torch.manual_seed(0)
    return build_method(build_config(None, [*LUT_TINY, *overrides]))


def views(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"view1": torch.randn(n, 3, 16, 16, generator=g), "view2": torch.randn(n, 3, 16, 16, generator=g)}


def test_two_views_see_disjoint_positions_and_are_reproducible():
    noise = torch.rand(5, 64, generator=torch.Generator().manual_seed(0))
    first, ids2 = disjoint_pair(5, 64, 0.75, noise=noise)
    assert first.ids_keep.shape == ids2.shape == (5, 16)
    for a, b in zip(first.ids_keep, ids2, strict=True):
        assert not set(a.tolist()) & set(b.tolist())
    again, ids2_again = disjoint_pair(5, 64, 0.75, noise=noise.clone())
    assert torch.equal(first.ids_keep, again.ids_keep) and torch.equal(ids2, ids2_again)
    g = [torch.Generator().manual_seed(3) for _ in range(2)]
    assert torch.equal(
        disjoint_pair(2, 64, 0.75, generator=g[0])[1], disjoint_pair(2, 64, 0.75, generator=g[1])[1]
    )
    with pytest.raises(ValueError, match=r"mask_ratio >= 0\.5"):
        disjoint_pair(2, 64, 0.4)


def test_momentum_schedule_matches_the_formula():
    for progress in (0.0, 0.25, 0.5, 1.0):
        assert cosine_momentum(0.996, progress) == pytest.approx(
            1 - 0.004 * (1 + math.cos(math.pi * progress)) / 2
        )
    assert cosine_momentum(0.996, 0.0) == pytest.approx(0.996) and cosine_momentum(
        0.996, 1.0
    ) == pytest.approx(1.0)


@pytest.mark.parametrize("valid", [None, 1.0, 0.0])
@pytest.mark.parametrize("cosine", [True, False])
def test_ema_update_follows_the_formula_for_parameters_and_buffers(valid, cosine):
    """valid = 0.0 (a step the engine found not finite, not yet read by the host) leaves every entry as it
    was; None and 1.0 are the formula; without the cosine the momentum stays at its base."""
    student = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    ema = EMATeacher(student, 0.9, cosine=cosine)
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    student(torch.randn(8, 3))  # moves the running statistics and num_batches_tracked
    if valid == 0.0:  # a bad step's forward can leave NaN statistics: they must not reach the teacher
        student[1].running_mean.fill_(float("nan"))
    m = ema.update(student, progress=0.3, valid=None if valid is None else torch.tensor(valid))
    assert m == pytest.approx(cosine_momentum(0.9, 0.3) if cosine else 0.9)
    assert ema.momentum.item() == pytest.approx(m)
    after, now = ema.module.state_dict(), student.state_dict()
    for key, old in before.items():
        if valid == 0.0:
            assert torch.equal(after[key], old), key
        elif old.is_floating_point():
            torch.testing.assert_close(after[key], m * old + (1 - m) * now[key])
        else:
            assert torch.equal(after[key], now[key])


def test_teacher_gets_no_gradient_and_stays_in_eval_mode():
    model = tiny_lut()
    model.train()
    assert not model.teacher.module.training and model.head.training
    out = model(views())
    out.loss.backward()
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.parameters())
    assert model.encoder.blocks[0].attn.qkv.weight.grad is not None
    assert model.head[0].weight.grad is not None and model.predictor[0].weight.grad is not None
    assert set(out.metrics) == {"loss_mim", "loss_bc", "ema_momentum"}


def _perturb_teacher(model):
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for t in model.teacher.module.state_dict().values():
            if t.is_floating_point():
                t.add_(0.05 * torch.randn(t.shape, generator=g))
        bn = model.teacher.module.head[1]
        bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
        bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_an_independent_computation_of_the_spec(norm_pix):
    model = tiny_lut(f"method.norm_pix_loss={str(norm_pix).lower()}", "method.w_bc=0.7")
    _perturb_teacher(model)
    official = to_official(model)
    teacher = {k[len("ema.") :]: v for k, v in official["model_ema"].items()}
    batch = views()
    noise = torch.rand(6, 16, generator=torch.Generator().manual_seed(5))
    ours = model(batch, noise=noise).loss
    expected = reference.lut_forward_loss(
        official["model"],
        teacher,
        batch["view1"],
        batch["view2"],
        noise,
        mask_ratio=0.75,
        norm_pix=norm_pix,
        heads=2,
        w_mae=1.0,
        w_bc=0.7,
        decoder_heads=2,
    )
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-6)


def test_official_layout_checkpoint_gives_the_same_loss(tmp_path):
    import argparse

    model = tiny_lut("method.w_bc=0.4")
    _perturb_teacher(model)
    args = argparse.Namespace(norm_pix_loss=True, mask_ratio=0.75, w_mae=1.0, w_bc=0.4, model_ema_decay=0.996)
    path = tmp_path / "checkpoint-last.pth"
    torch.save({**to_official(model), "epoch": 3, "args": args}, path)
    assert "ema.head.1.running_mean" in torch.load(path, weights_only=False)["model_ema"]
    # the number of heads is not in the weights (the official sizes are, in a table); tiny ones are given
    loaded = load_official(path, overrides=["model.num_heads=2", "method.decoder_num_heads=2"])
    assert loaded.name == "lut" and loaded.cfg.w_bc == 0.4 and loaded.cfg.head_norm == "bn"
    batch, noise = views(), torch.rand(6, 16, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(
        loaded(batch, noise=noise).loss, model(batch, noise=noise).loss, rtol=0, atol=0
    )
    torch.testing.assert_close(
        loaded.export_encoder("teacher").cls_token, model.teacher.module.encoder.cls_token
    )


def test_heads_follow_the_recipe_layout():
    model = tiny_lut()
    kinds = [type(m).__name__ for m in model.head]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert all(m.bias is None for m in model.head if isinstance(m, torch.nn.Linear))
    assert model.head[0].out_features == 32 and model.head[3].out_features == 64
    gelu_ln = tiny_lut("method.head_norm=ln", "method.head_act=gelu", "method.pred_depth=0")
    assert [type(m).__name__ for m in gelu_ln.head] == ["Linear", "LayerNorm", "GELU", "Linear"]
    assert isinstance(gelu_ln.predictor, torch.nn.Identity)


def test_views_of_the_small_recipe():
    cfg = build_config(None, [*LUT_TINY, "model.img_size=32", "model.patch_size=4"])
    model = build_method(cfg)
    img = build_source("demo:train").load(0)[0]
    out = model.train_transform(cfg.data)(img)
    assert out["view1"].shape == out["view2"].shape == (3, 32, 32)
    assert not torch.equal(out["view1"], out["view2"])


def test_lut_trains_on_a_small_fixed_batch():
    model = tiny_lut()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
    batch = views(8)
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(2))
    losses = []
    for step in range(40):
        out = model(batch, noise=noise)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        model.after_step(step / 40)
        losses.append(out.loss.item())
    assert losses[-1] < 0.7 * losses[0]


@pytest.mark.slow
def test_export_and_knn_take_the_teacher(tmp_path, capsys):
    from safetensors.torch import load_file

    from mimkit.cli import main

    pretrain(
        build_config(
            None, [*LUT_TINY, f"run.out={tmp_path / 'run'}", "optim.epochs=1", "optim.warmup_epochs=0"]
        )
    )
    saved = checkpoint.load(tmp_path / "run" / "last.pt")["model"]
    for weights in ("student", "teacher"):
        out = tmp_path / f"{weights}.safetensors"
        assert main(["export", str(tmp_path / "run"), "--weights", weights, "--out", str(out)]) == 0
        prefix = "encoder." if weights == "student" else "teacher.module.encoder."
        exported = load_file(out)
        assert all(torch.equal(v, saved[prefix + k]) for k, v in exported.items())
    assert (
        main(
            [
                "knn",
                str(tmp_path / "run"),
                "--weights",
                "teacher",
                "--train",
                "synthetic:32",
                "--val",
                "synthetic:16",
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    assert main(["export", str(tmp_path / "run"), "--weights", "ema"]) == 2
    assert "has no 'ema' weights; it has: student, teacher" in capsys.readouterr().err


def test_blur_range_scales_with_the_image_size_unless_given():
    def blur_of(*overrides):
        cfg = build_config(None, [*LUT_TINY, *overrides])
        strong = build_method(cfg).train_transform(cfg.data).pipelines["view2"].transforms[1]
        return strong.transforms[1].transforms[2].sigma

    assert blur_of("model.img_size=224", "model.patch_size=16") == [0.1, 2.0]
    assert blur_of("model.img_size=32", "model.patch_size=4") == pytest.approx([0.1, 2.0 * 32 / 224])
    assert blur_of("method.blur_sigma=[0.2,0.5]") == [0.2, 0.5]


def test_one_loader_noise_per_sample_sets_both_views_unless_noise_is_given():
    cfg = build_config(None, LUT_TINY)
    model = tiny_lut()
    out = model.train_transform(cfg.data)(build_source("demo:train").load(0)[0])
    assert list(out) == ["view1", "view2", "noise"] and out["noise"].shape == (16,)
    g = torch.Generator().manual_seed(3)
    batch, a, b = views(), torch.rand(6, 16, generator=g), torch.rand(6, 16, generator=g)
    with torch.no_grad():
        given = model(batch, noise=a).loss
        assert torch.equal(model({**batch, "noise": a}).loss, given)
        assert torch.equal(model({**batch, "noise": b}, noise=a).loss, given)
        assert not torch.equal(model({**batch, "noise": b}).loss, given)
