import numpy as np
import torch

from mimkit.configs import DataConfig, build_config
from mimkit.data import build_source, eval_view
from mimkit.methods import build_method, mae_loss
from tests.conftest import TINY


def tiny_mae(*overrides):
    torch.manual_seed(0)
    return build_method(build_config(None, [*TINY, *overrides]))


def reference_loss(
    pred: np.ndarray, imgs: np.ndarray, noise: np.ndarray, p: int, ratio: float, norm_pix: bool
):
    """The spec's formulas (sections 2.2 and 2.4), written with numpy loops, independent of mimkit."""
    n, _, h, _ = imgs.shape
    g = h // p
    num = g * g
    keep = int(num * (1 - ratio))
    total, count = 0.0, 0.0
    for i in range(n):
        order = np.argsort(noise[i], kind="stable")
        removed = set(order[keep:].tolist())
        for t in range(num):
            if t not in removed:
                continue
            row, col = divmod(t, g)
            patch = imgs[i, :, row * p : (row + 1) * p, col * p : (col + 1) * p]  # c, py, px
            target = patch.transpose(1, 2, 0).reshape(-1)  # (py, px, c)
            if norm_pix:
                target = (target - target.mean()) / np.sqrt(target.var(ddof=1) + 1e-6)
            total += np.mean((pred[i, t] - target) ** 2)
            count += 1
    return total / count


def test_loss_on_a_fixed_mask_equals_the_spec_formula():
    for norm_pix in (True, False):
        model = tiny_mae(f"method.norm_pix_loss={str(norm_pix).lower()}", "method.mask_ratio=0.75")
        g = torch.Generator().manual_seed(1)
        imgs = torch.randn(3, 3, 16, 16, generator=g)
        noise = torch.rand(3, 16, generator=g)
        out = model({"image": imgs}, noise=noise)
        pred, _ = model.reconstruct(imgs, noise)
        expected = reference_loss(
            pred.detach().double().numpy(), imgs.double().numpy(), noise.numpy(), 4, 0.75, norm_pix
        )
        assert abs(out.loss.item() - expected) < 1e-5 * max(1.0, expected)


def test_loss_ignores_visible_patches():
    pred = torch.zeros(1, 4, 3)
    target = torch.ones(1, 4, 3)
    target[0, 0] = 100.0  # a visible patch with a huge error must not count
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0]])
    assert mae_loss(pred, target, mask, norm_pix=False).item() == 1.0


def test_prediction_shapes_and_decoder_width():
    model = tiny_mae("method.decoder_embed_dim=48", "method.decoder_depth=2")
    pred, m = model.reconstruct(torch.randn(2, 3, 16, 16))
    assert pred.shape == (2, 16, 4 * 4 * 3)
    assert m.ids_keep.shape == (2, 4)
    assert model.decoder.embed.out_features == 48 and len(model.decoder.blocks) == 2
    assert not model.decoder.pos_embed.requires_grad


def test_default_decoder_is_the_papers():
    cfg = build_config(None, [])
    assert (cfg.method.decoder_embed_dim, cfg.method.decoder_depth, cfg.method.decoder_num_heads) == (
        512,
        8,
        16,
    )
    assert cfg.method.norm_pix_loss and cfg.method.mask_ratio == 0.75


def test_loss_falls_on_a_small_fixed_batch():
    model = tiny_mae()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    demo = build_source("demo:train")
    views = eval_view(16, DataConfig(crop_pct=1.0))  # real images, resized to 16 px
    imgs = torch.stack([views(demo.load(i)[0])["image"] for i in range(8)])
    noise = torch.rand(8, 16, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(60):
        loss = model({"image": imgs}, noise=noise).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_forward_equals_an_independent_implementation_of_the_reference():
    from mimkit.interop import to_official
    from tests import reference

    model = tiny_mae()
    imgs = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(4))
    noise = torch.rand(3, 16, generator=torch.Generator().manual_seed(6))
    expected = reference.mae_forward_loss(
        to_official(model)["model"], imgs, noise, mask_ratio=0.75, norm_pix=True, heads=2, decoder_heads=2
    )
    torch.testing.assert_close(model({"image": imgs}, noise=noise).loss, expected, rtol=1e-5, atol=1e-6)


def test_the_loaders_noise_sets_the_mask_unless_noise_is_given():
    """The training view carries the sample's mask noise; ``batch["noise"]`` then sets the mask, and an
    explicit ``noise`` still wins."""
    model = tiny_mae()
    views = model.train_transform(DataConfig(crop_pct=1.0))(build_source("demo:train").load(0)[0])
    assert views["image"].shape == (3, 16, 16) and views["noise"].shape == (16,)
    g = torch.Generator().manual_seed(3)
    imgs = torch.randn(3, 3, 16, 16, generator=g)
    a, b = torch.rand(3, 16, generator=g), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        given = model({"image": imgs}, noise=a).loss
        assert torch.equal(model({"image": imgs, "noise": a}).loss, given)
        assert torch.equal(model({"image": imgs, "noise": b}, noise=a).loss, given)
        assert not torch.equal(model({"image": imgs, "noise": b}).loss, given)
