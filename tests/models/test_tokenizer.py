"""The VQ tokenizer model (mimkit.models.tokenizer): pruned codes, loading errors, and the shipped
tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mimkit import checkpoint
from mimkit.models.tokenizer import (
    DEMO_TOKENIZER,
    TokenizerShape,
    VQTokenizer,
    load_tokenizer,
    save_tokenizer,
)
from mimkit.models.vit import ViTEncoder, build_encoder


def test_the_shipped_tokenizer_is_small_pruned_and_states_its_quality(demo_tokenizer):
    assert DEMO_TOKENIZER.stat().st_size < 5_000_000
    model, info = demo_tokenizer.model, demo_tokenizer.info
    assert model.pruned and model.shape.grid == 8 and model.shape.img_size == 32
    report = info["report"]
    # held-out reconstructions far above the mean image, and the codebook in use
    assert report["psnr_on"] == "demo:val (held out)"
    assert report["psnr"] > report["psnr_mean_image"] + 6
    assert report["codes_used"] == model.vocab_size and report["perplexity"] > 100
    assert report["warnings"] == []
    assert "none of the demo set's" in info["trained_on"]


def small_tokenizer(codebook: int = 64, seed: int = 0) -> VQTokenizer:
    torch.manual_seed(seed)
    shape = TokenizerShape(
        img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, codebook_size=codebook
    )
    return VQTokenizer(shape, kmeans_init=False).eval()


def test_pruned_codes_map_back_to_their_ids_and_decode(tmp_path: Path) -> None:
    tok = small_tokenizer()
    counts = torch.zeros(64, dtype=torch.long)
    counts[[3, 7, 20, 63]] = torch.tensor([5, 1, 9, 2])
    kept = tok.prune(counts)
    assert kept.tolist() == [3, 7, 20, 63] and tok.vocab_size == 4
    assert torch.equal(tok.codebook(), tok.full_codebook()[[3, 7, 20, 63]])
    ids = tok.encode(torch.rand(5, 3, 32, 32))
    assert ids.shape == (5, 8, 8) and ids.dtype == torch.long and int(ids.max()) < 4
    assert tok.decode(ids).shape == (5, 3, 32, 32)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 4\); got 0\.\.4"):
        tok.decode(torch.full((1, 8, 8), 4).index_fill_(1, torch.tensor([0]), 0))
    with pytest.raises(ValueError, match="already pruned"):
        tok.prune(counts)
    save_tokenizer(tok, tmp_path / "t.pt", mean=(0.0,) * 3, std=(1.0,) * 3)
    again = load_tokenizer(tmp_path / "t.pt")
    x = torch.rand(3, 3, 32, 32)
    assert torch.equal(again.model.encode(x), tok.encode(x))
    assert torch.equal(again.model.decode(tok.encode(x)), tok.decode(tok.encode(x)))


def test_load_tokenizer_names_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(
        FileNotFoundError, match=r"expected a tokenizer\.pt written by `mimkit tokenizer train`"
    ):
        load_tokenizer(tmp_path)
    checkpoint.save_atomic({"kind": "something", "model": {}}, tmp_path / "x.pt")
    with pytest.raises(
        checkpoint.CheckpointError, match=r"x.pt: not a mimkit tokenizer \(kind 'something'\)"
    ):
        load_tokenizer(tmp_path / "x.pt")


def small_token_encoder() -> ViTEncoder:
    """A one-block encoder of the centre 6 x 6 cells of small_tokenizer's 8 x 8 grids, two cells a patch."""
    return build_encoder(
        "vit_tiny",
        img_size=6,
        patch_size=2,
        embed_dim=32,
        depth=1,
        num_heads=2,
        stem="token_ids",
        vocab_size=64,
    )
