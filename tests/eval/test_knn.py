"""The k-NN evaluation (mimkit.eval.knn) of a token encoder on token datasets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit.data.source_spec import build_source
from mimkit.data.transforms import eval_view
from mimkit.distributed import init_distributed
from mimkit.eval.knn import knn_evaluate
from mimkit.models.tokenizer import save_tokenizer
from mimkit.models.vit import build_encoder
from mimkit.runs.tokenize import tokenize
from tests.models.test_tokenizer import small_token_encoder, small_tokenizer


def tokenized_demo(tmp_path: Path, train: int, val: int) -> None:
    """A 64-code tokenizer (all kept) in tmp_path, and the tokens of the first images of demo:train and
    demo:val under tmp_path/train and tmp_path/val."""
    tok = small_tokenizer(seed=5)
    tok.prune(torch.ones(64, dtype=torch.long))
    save_tokenizer(tok, tmp_path / "tokenizer.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    for split, n in (("train", train), ("val", val)):
        tokenize(
            str(tmp_path / "tokenizer.pt"),
            f"demo:{split}",
            str(tmp_path / split),
            num_workers=0,
            max_images=n,
            progress=False,
        )


def test_knn_of_a_token_encoder_on_token_datasets(tmp_path: Path) -> None:
    tokenized_demo(tmp_path, train=120, val=60)
    train, val = (build_source(str(tmp_path / split)) for split in ("train", "val"))
    torch.manual_seed(0)
    encoder = small_token_encoder()
    env = init_distributed("cpu")
    view = eval_view(6, encoder.input_spec)  # the centre 6x6 cells of the 8x8 grids
    result = knn_evaluate(encoder, train, val, view, env, k=5, pool="mean")
    assert result["val_images"] == 60 and 0 <= result["top1"] <= 100
    pixel = build_encoder("vit_tiny", img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="this encoder takes pixels, but 'tokens:"):
        knn_evaluate(pixel, train, val, eval_view(32, pixel.input_spec), env)
