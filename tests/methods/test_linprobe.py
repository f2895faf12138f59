"""The linear probe (mimkit.methods.linprobe): LARS as MAE uses it, and a probe that separates what is
separable."""

import torch

from mimkit.configs import build_config
from mimkit.data.loader import FeatureDataset
from mimkit.distributed import init_distributed
from mimkit.methods import LinearProbe
from mimkit.methods.base import Trainable
from mimkit.train.engine import Trainer
from mimkit.train.optim import build_optimizers
from tests.methods.test_finetune import tiny_encoder
from tests.runs.test_classify import TASK


def test_lars_follows_maes_rule():
    """One step: 2-D tensors move by lr * trust * |w| / |g| * g (no weight decay here), 1-D ones by lr * g."""
    layer = torch.nn.Linear(4, 3)
    layer.weight.grad, layer.bias.grad = torch.randn(3, 4), torch.randn(3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    optim = build_config(None, ["optim.name=lars", "optim.weight_decay=0"]).optim
    module = Trainable()
    module.layer = layer
    opt = build_optimizers(module, optim, lr=2.0, device=torch.device("cpu"))["main"]
    opt.step()
    trust = 0.001 * w.norm() / layer.weight.grad.norm()
    torch.testing.assert_close(
        layer.weight.detach(), w - 2.0 * trust * layer.weight.grad, rtol=1e-4, atol=1e-6
    )
    torch.testing.assert_close(layer.bias.detach(), b - 2.0 * layer.bias.grad)


def test_linear_probe_separates_separable_features(tmp_path):
    """A probe trained by the engine on cached features of 4 Gaussian clusters classifies held-out samples."""
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(4, 64, generator=g)

    def sample(n):
        labels = torch.arange(n) % 4
        return centres[labels] + torch.randn(n, 64, generator=g), labels

    cfg = build_config(
        None,
        [
            *TASK,
            "method=linprobe",
            "optim.name=lars",
            "optim.lr=6.4",
            "optim.weight_decay=0",
            "optim.epochs=10",
            f"run.out={tmp_path}",
        ],
    )
    probe = LinearProbe(tiny_encoder(), cfg.method, num_classes=4, pool="mean")
    train_x, train_y = sample(256)
    Trainer(probe, cfg, init_distributed("cpu"), tmp_path).fit(FeatureDataset(train_x, train_y, seed=0))
    probe.eval()
    test_x, test_y = sample(200)
    accuracy = (probe.head(test_x).argmax(1) == test_y).float().mean().item()
    assert accuracy > 0.9  # chance: 0.25
