"""Small MLP heads (projectors and predictors) in the layout the reference checkpoints use."""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

NORMS = {"bn": nn.BatchNorm1d, "ln": nn.LayerNorm, "none": None}
ACTS = {"relu": partial(nn.ReLU, inplace=True), "gelu": nn.GELU}


def mlp_head(
    depth: int,
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    norm: str = "bn",
    act: str = "relu",
    bias: bool = False,
    last_norm: bool = False,
    ln_eps: float = 1e-6,
) -> nn.Module:
    """``depth`` Linear layers; a norm and an activation after every layer but the last (and a norm after
    the last too if ``last_norm``). As an nn.Sequential its indices match the LUT reference
    (0 Linear, 1 BN, 2 ReLU, 3 Linear for depth 2 with BN); depth 0 is the identity. ``ln_eps`` is the
    LayerNorm epsilon (Latent MIM's projector keeps torch's default 1e-5)."""
    if norm not in NORMS or act not in ACTS:
        raise ValueError(
            f"head norm must be one of {sorted(NORMS)} and act one of {sorted(ACTS)}; got {norm!r}, {act!r}"
        )
    if depth == 0:
        return nn.Identity()
    layers: list[nn.Module] = []
    for i in range(depth):
        last = i == depth - 1
        layers.append(nn.Linear(in_dim if i == 0 else hidden_dim, out_dim if last else hidden_dim, bias=bias))
        if NORMS[norm] is not None and (not last or last_norm):
            width = out_dim if last else hidden_dim
            layers.append(NORMS[norm](width, eps=ln_eps) if norm == "ln" else NORMS[norm](width))
        if not last:
            layers.append(ACTS[act]())
    return nn.Sequential(*layers)


class TokenLogitsHead(nn.Module):
    """SeiT++'s token classifier (MAGE's MlmLayer), general in the patch and the embedding width: one
    Linear per patch to its p * p cells' vectors ((py, px) order, then the width), GELU, LayerNorm, and
    logits against the encoder's id-embedding table plus a learned bias. The table is detached: the head
    shares the input embedding's weights but sends no gradient into them through the tie."""

    def __init__(self, in_dim: int, token_dim: int, patch_size: int, vocab_size: int) -> None:
        super().__init__()
        self.cells, self.token_dim = patch_size * patch_size, token_dim
        self.fc = nn.Linear(in_dim, self.cells * token_dim)
        self.act = nn.GELU()
        self.norm = nn.LayerNorm(token_dim)  # torch's eps, as the reference's
        self.bias = nn.Parameter(torch.zeros(vocab_size))
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """x [N, L, in_dim] (patch tokens, no cls), table [K, token_dim] -> logits [N, L, p * p, K]."""
        h = self.norm(self.act(self.fc(x).unflatten(-1, (self.cells, self.token_dim))))
        return h @ table.detach().to(h.dtype).T + self.bias.to(h.dtype)
