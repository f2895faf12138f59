"""A ViT-VQGAN-style image tokenizer (Yu et al. 2022; the layout of the ViT-VQGAN implementation SeiT
used): a ViT encoder over pixel patches, a factorised low-dimensional code space (a Linear to ``code_dim``
before quantisation, l2-normalised codes matched by cosine), and a ViT decoder back to pixels.

The quantiser is ``vector-quantize-pytorch``'s (cosine codebook, EMA updates, k-means initialisation,
dead-code restarts) rather than our own. After training, :meth:`VQTokenizer.prune` keeps the codes that
were used and numbers them 0..K'-1 (SeiT's ImageNet tokens use 391 of 8,192 codes): ``encode`` then
matches against the kept codes only and returns compact ids, and :meth:`VQTokenizer.codebook` is the
compact [K', code_dim] table a token dataset stores.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn
from vector_quantize_pytorch import VectorQuantize

from mimkit.checkpoint import CheckpointError, load, save_atomic
from mimkit.models.pos_embed import sincos_2d

TOKENIZER_KIND = "mimkit-tokenizer"
# The tokenizer shipped in the package (a few MB), named "demo" wherever a tokenizer is asked for: trained
# on CIFAR-10 training images that are not the demo set's (see data/demo/README.md for the command).
DEMO_TOKENIZER_NAME = "demo"
DEMO_TOKENIZER = Path(__file__).resolve().parents[1] / "data" / "demo" / "tokenizer.pt"


def tokenizer_record(tokenizer: str | Path, dataset_dir: str | Path) -> dict[str, str]:
    """How a token dataset names its tokenizer so that moving both together keeps the link: the shipped
    one by its name, another by its absolute path and its path relative to the dataset's folder."""
    if str(tokenizer) == DEMO_TOKENIZER_NAME:
        return {"tokenizer": DEMO_TOKENIZER_NAME}
    resolved = tokenizer_file(tokenizer).resolve()
    try:
        relative = os.path.relpath(resolved, Path(dataset_dir).resolve())
    except ValueError:  # another drive
        relative = str(resolved)
    return {"tokenizer": str(resolved), "tokenizer_relative": relative}


def recorded_tokenizer_path(meta: dict[str, Any], dataset_dir: str | Path) -> str | None:
    """The tokenizer a dataset's header names, found where it was or where it is beside the dataset now;
    None when it names none. Raises FileNotFoundError naming both places and ``--tokenizer`` when gone."""
    recorded = meta.get("tokenizer")
    if not recorded:
        return None
    if recorded == DEMO_TOKENIZER_NAME or tokenizer_file(recorded).exists():
        return str(recorded)
    relative = meta.get("tokenizer_relative")
    if relative and tokenizer_file(Path(dataset_dir) / relative).exists():
        return str(Path(dataset_dir) / relative)
    beside = f" nor at '{Path(dataset_dir) / relative}'" if relative else ""
    raise FileNotFoundError(
        f"the token data '{dataset_dir}' records its tokenizer at '{recorded}'{beside}, which is gone: "
        "give its tokenizer with --tokenizer PATH (data.tokenizer=PATH in a config)"
    )


def absolute_tokenizer(path: str) -> str:
    """How a run's config records its tokenizer: the shipped one by name, another by its absolute path
    (so that the run's later commands find it from any folder)."""
    return path if path == DEMO_TOKENIZER_NAME else str(Path(path).expanduser().resolve())


def tokenizer_file(path: str | Path) -> Path:
    """The tokenizer.pt a name means: ``demo`` (the shipped one), a run folder, or the file itself."""
    if str(path) == DEMO_TOKENIZER_NAME:
        return DEMO_TOKENIZER
    path = Path(path).expanduser()
    return path / "tokenizer.pt" if path.is_dir() else path


@dataclass(frozen=True)
class TokenizerShape:
    """Everything that fixes a tokenizer's weights' shapes (saved with it, and enough to rebuild it)."""

    img_size: int = 256
    patch_size: int = 8
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    codebook_size: int = 8192
    code_dim: int = 32
    channels: int = 3

    def __post_init__(self) -> None:
        for name in (
            "img_size",
            "patch_size",
            "embed_dim",
            "depth",
            "num_heads",
            "codebook_size",
            "code_dim",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"tokenizer {name} must be an integer >= 1; got {value!r}")
        if self.img_size % self.patch_size:
            raise ValueError(
                f"tokenizer img_size {self.img_size} is not divisible by its patch_size {self.patch_size}"
            )
        if self.embed_dim % self.num_heads or self.embed_dim % 4:
            raise ValueError(
                f"tokenizer embed_dim {self.embed_dim} must be divisible by num_heads {self.num_heads} and "
                "by 4 (the sin-cos position table)"
            )

    @property
    def grid(self) -> int:
        return self.img_size // self.patch_size


class Quantized(NamedTuple):
    codes: torch.Tensor  # [N, L, code_dim], l2-normalised, straight-through
    ids: torch.Tensor  # [N, L] ids of the full codebook
    loss: torch.Tensor  # the quantiser's commitment term (its codebook moves by EMA)


class _ViTStack(nn.Module):
    """Fixed sin-cos positions, pre-norm blocks with a Tanh MLP and no qkv bias, a final LayerNorm: the
    transformer of ViT-VQGAN's encoder and decoder."""

    def __init__(self, shape: TokenizerShape) -> None:
        super().__init__()
        self.register_buffer(
            "pos_embed", sincos_2d(shape.embed_dim, shape.grid, cls_token=False).float(), persistent=False
        )
        self.blocks = nn.Sequential(
            *(
                # torch's LayerNorm (eps 1e-5) as ViT-VQGAN's, not timm's default (1e-6)
                Block(
                    shape.embed_dim,
                    shape.num_heads,
                    shape.mlp_ratio,
                    qkv_bias=False,
                    act_layer=nn.Tanh,
                    norm_layer=nn.LayerNorm,
                )
                for _ in range(shape.depth)
            )
        )
        self.norm = nn.LayerNorm(shape.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.blocks(x + self.pos_embed))


class VQTokenizer(nn.Module):
    """Images [N, C, H, W] (in the normalisation the tokenizer was trained with) <-> id grids [N, h, w]."""

    def __init__(
        self,
        shape: TokenizerShape,
        *,
        commitment_weight: float = 0.25,
        codebook_decay: float = 0.8,
        kmeans_init: bool = True,
        dead_code_threshold: float = 2.0,
    ) -> None:
        super().__init__()
        self.shape = shape
        d, p = shape.embed_dim, shape.patch_size
        self.patch_embed = nn.Conv2d(shape.channels, d, kernel_size=p, stride=p)
        self.encoder = _ViTStack(shape)
        self.pre_quant = nn.Linear(d, shape.code_dim)
        self.quantizer = VectorQuantize(
            dim=shape.code_dim,
            codebook_size=shape.codebook_size,
            use_cosine_sim=True,
            decay=codebook_decay,
            kmeans_init=kmeans_init,
            threshold_ema_dead_code=dead_code_threshold,
            commitment_weight=commitment_weight,
        )
        self.post_quant = nn.Linear(shape.code_dim, d)
        self.decoder = _ViTStack(shape)
        self.to_pixels = nn.ConvTranspose2d(d, shape.channels, kernel_size=p, stride=p)
        # the kept codes after pruning (ids of the full codebook, in compact-id order); empty: not pruned
        self.register_buffer("kept_codes", torch.zeros(0, dtype=torch.long))
        self.apply(_init_weights)

    # -- the training path --------------------------------------------------------------------------
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """[N, L, code_dim] pre-quantisation features."""
        c = self.shape.channels
        if (
            images.dim() != 4
            or images.shape[1] != c
            or tuple(images.shape[-2:]) != (self.shape.img_size,) * 2
        ):
            raise ValueError(
                f"the tokenizer takes images [N, {c}, {self.shape.img_size}, {self.shape.img_size}]; got "
                f"{tuple(images.shape)}"
            )
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        return self.pre_quant(self.encoder(x))

    def quantize(self, features: torch.Tensor) -> Quantized:
        codes, ids, loss = self.quantizer(features)
        return Quantized(codes, ids, loss)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """[N, L, code_dim] codes -> images [N, C, H, W]."""
        n, g = codes.shape[0], self.shape.grid
        x = self.decoder(self.post_quant(codes))
        return self.to_pixels(x.transpose(1, 2).reshape(n, -1, g, g))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, Quantized]:
        q = self.quantize(self.features(images))
        return self.decode_codes(q.codes), q

    # -- the token path ------------------------------------------------------------------------------
    @property
    def pruned(self) -> bool:
        return self.kept_codes.numel() > 0

    @property
    def vocab_size(self) -> int:
        """K: the number of ids ``encode`` returns (the kept codes once pruned)."""
        return self.kept_codes.numel() if self.pruned else self.shape.codebook_size

    def full_codebook(self) -> torch.Tensor:
        """[codebook_size, code_dim], l2-normalised as the quantiser matches them."""
        return F.normalize(self.quantizer.codebook.detach().float(), dim=-1)

    def codebook(self) -> torch.Tensor:
        """[K, code_dim]: the rows ids index (the kept ones once pruned), l2-normalised."""
        table = self.full_codebook()
        return table[self.kept_codes] if self.pruned else table

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Id grids [N, h, w] (int64): the nearest code by cosine, among the kept codes once pruned."""
        features = F.normalize(self.features(images).float(), dim=-1)
        ids = (features @ self.codebook().T).argmax(dim=-1)
        g = self.shape.grid
        return ids.reshape(-1, g, g)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Id grids [N, h, w] -> images [N, C, H, W] in the training normalisation."""
        if ids.dim() != 3 or tuple(ids.shape[1:]) != (self.shape.grid,) * 2:
            raise ValueError(
                f"the tokenizer decodes id grids [N, {self.shape.grid}, {self.shape.grid}]; got "
                f"{tuple(ids.shape)}"
            )
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}"
            )
        codes = self.codebook()[ids.flatten(1)]
        return self.decode_codes(codes.to(self.post_quant.weight.dtype))

    @torch.no_grad()
    def prune(self, counts: torch.Tensor) -> torch.Tensor:
        """Keep the codes with a non-zero count (``counts`` [codebook_size] over the full ids), numbered in
        order of their full id; returns the kept full ids. Called on an unpruned tokenizer only."""
        if self.pruned:
            raise ValueError("this tokenizer is already pruned; prune the full one")
        if counts.shape != (self.shape.codebook_size,):
            raise ValueError(
                f"expected counts of shape [{self.shape.codebook_size}]; got {tuple(counts.shape)}"
            )
        kept = torch.nonzero(counts > 0).flatten()
        if kept.numel() == 0:
            raise ValueError("no code was used; nothing to keep")
        self.kept_codes = kept.to(self.kept_codes.device)
        return kept

    @torch.no_grad()
    def match_codebook(self, rows: torch.Tensor, min_cosine: float = 0.999) -> torch.Tensor:
        """Keep the codes that a released compact codebook holds, in its order, so that ``encode`` gives
        that release's ids (SeiT ships 391 rows of the tokenizer's 8,192 and not the mapping): row i is
        the code it points the same way as (cosine >= ``min_cosine``: the release may store the rows raw
        or normalised). Returns the kept full ids."""
        if self.pruned:
            raise ValueError("this tokenizer is already pruned; match the full one")
        if rows.dim() != 2 or rows.shape[1] != self.shape.code_dim:
            raise ValueError(
                f"a codebook of [K, {self.shape.code_dim}] rows matches this tokenizer; "
                f"got {tuple(rows.shape)}"
            )
        table = self.full_codebook()
        cosine = F.normalize(rows.float().to(table.device), dim=-1) @ table.T
        best, kept = cosine.max(dim=1)
        unmatched = torch.nonzero(best < min_cosine).flatten().tolist()
        if unmatched:
            raise ValueError(
                f"{len(unmatched)} of {len(rows)} codebook rows match no code of this tokenizer (first: "
                f"row {unmatched[0]}, best cosine {float(best[unmatched[0]]):.4f}); it was made by another "
                "tokenizer"
            )
        if len(set(kept.tolist())) != len(kept):
            raise ValueError("two codebook rows match the same code; the codebook has duplicate rows")
        self.kept_codes = kept.to(self.kept_codes.device)
        return kept


def _init_weights(module: nn.Module) -> None:
    """ViT-VQGAN's: trunc-normal Linear weights (std 0.02), zero biases, unit LayerNorms; convs keep
    torch's init."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def psnr(reconstruction: torch.Tensor, target: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Per-image PSNR in dB of images on a [0, peak] scale (values are clamped to it first)."""
    mse = (reconstruction.float().clamp(0, peak) - target.float().clamp(0, peak)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(peak**2 / mse.clamp_min(1e-12))


def perplexity(counts: torch.Tensor) -> float:
    """exp(entropy) of a code histogram: the number of equally used codes it is worth."""
    p = counts.double() / counts.sum().clamp_min(1)
    p = p[p > 0]
    return float(math.exp(-(p * p.log()).sum()))


def save_tokenizer(
    tokenizer: VQTokenizer, path: str | Path, *, mean: tuple[float, ...], std: tuple[float, ...], **extra: Any
) -> Path:
    """One file that rebuilds the tokenizer: its shape, the pixel normalisation it takes, its weights
    (kept codes included) and ``extra`` (code counts, where it was trained)."""
    state = {
        "kind": TOKENIZER_KIND,
        "shape": asdict(tokenizer.shape),
        "mean": list(mean),
        "std": list(std),
        "state_dict": {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()},
        **extra,
    }
    return save_atomic(state, path)


class LoadedTokenizer(NamedTuple):
    model: VQTokenizer
    mean: tuple[float, ...]
    std: tuple[float, ...]
    info: dict[str, Any]


def load_tokenizer(path: str | Path) -> LoadedTokenizer:
    """A tokenizer written by :func:`save_tokenizer` (a run folder: its ``tokenizer.pt``; ``demo``: the
    shipped one), in eval mode."""
    path = tokenizer_file(path)
    if not path.exists():
        raise FileNotFoundError(
            f"no tokenizer at '{path}' (expected a tokenizer.pt written by `mimkit tokenizer train`, its "
            "run folder, or 'demo' for the one shipped with mimkit)"
        )
    state = load(path)
    if state.get("kind") != TOKENIZER_KIND:
        raise CheckpointError(
            f"{path}: not a mimkit tokenizer (kind {state.get('kind')!r}); `mimkit tokenizer train` writes "
            "one as tokenizer.pt in its run folder"
        )
    shape = TokenizerShape(**state["shape"])
    model = VQTokenizer(shape, kmeans_init=False)
    sd = state["state_dict"]
    model.kept_codes = sd["kept_codes"].clone()  # resized before loading: its length is the pruned K
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: tokenizer weights do not fit (missing {missing}, unexpected {unexpected})"
        )
    model.eval()
    info = {k: v for k, v in state.items() if k not in ("state_dict", "shape", "mean", "std", "kind")}
    return LoadedTokenizer(model, tuple(state["mean"]), tuple(state["std"]), info)
