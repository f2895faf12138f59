"""The codebook of a token dataset: loading SeiT's ``codebook.ckpt``, turning ids into vector maps and
back, and token synonyms (the nearest codebook rows of each code) for synonym replacement.

Rows are used exactly as stored: SeiT feeds them to the ViT as they are and normalises only inside the
nearest-neighbour search, so :func:`embed` never rescales them and :func:`requantize` normalises copies.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save

from mimkit.checkpoint import CheckpointError, safe_load
from mimkit.tokens.records import write_atomic

__all__ = [
    "build_synonyms",
    "check_ids",
    "embed",
    "load_codebook",
    "load_synonyms",
    "requantize",
    "save_codebook",
    "save_synonyms",
    "synonym_counts",
    "synonym_table",
]

SAFETENSORS_KEY = "codebook"
TORCH_SUFFIXES = (".ckpt", ".pt", ".pth")


def _first_line(err: BaseException) -> str:
    """The informative line of an error: torch's weights-only refusals open with a long generic preamble
    and put the reason after 'WeightsUnpickler error:'."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    for number, line in enumerate(lines):
        if "WeightsUnpickler error:" in line:
            rest = line.split("WeightsUnpickler error:", 1)[1].strip()
            return rest or (lines[number + 1] if number + 1 < len(lines) else type(err).__name__)
    return lines[0] if lines else type(err).__name__


def _check_codebook(codebook: object, origin: str) -> torch.Tensor:
    """A codebook is a 2-D floating tensor [K, D] with at least one row and one column."""
    if not isinstance(codebook, torch.Tensor):
        found = type(codebook).__name__
        if isinstance(codebook, dict):
            found += f" with keys {sorted(map(str, codebook))[:8]}"
        raise ValueError(f"{origin}: expected a codebook tensor [K, D], found a {found}")
    if codebook.ndim != 2 or 0 in codebook.shape:
        raise ValueError(
            f"{origin}: expected a 2-D codebook tensor [K, D], found shape {tuple(codebook.shape)}"
        )
    if not codebook.is_floating_point():
        raise ValueError(f"{origin}: expected a floating-point codebook, found dtype {codebook.dtype}")
    return codebook


def load_codebook(path: str | Path) -> torch.Tensor:
    """Read a codebook as float32 [K, D] on the CPU.

    ``.safetensors`` files hold it under the key ``"codebook"``; anything else is read with
    ``torch.load(weights_only=True)`` and must be a bare tensor, SeiT's ``codebook.ckpt`` layout (so no
    pickled code is ever run)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            tensors = load_file(str(path))
        except (SafetensorError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise ValueError(f"{path}: truncated or not a safetensors file ({_first_line(err)})") from err
        if SAFETENSORS_KEY not in tensors:
            raise ValueError(f"{path}: no tensor '{SAFETENSORS_KEY}' (found {sorted(tensors)[:8]})")
        found: object = tensors[SAFETENSORS_KEY]
    else:
        if not path.is_file():
            raise FileNotFoundError(f"codebook '{path}' does not exist")
        try:
            found = safe_load(path)
        except CheckpointError as err:  # damaged, or refused as unsafe: never loaded unsafely
            raise ValueError(str(err)) from err
    return _check_codebook(found, str(path)).to(torch.float32).contiguous()


def save_codebook(codebook: torch.Tensor, path: str | Path) -> Path:
    """Write a bare tensor with ``torch.save`` (SeiT's layout) for ``.ckpt``/``.pt``/``.pth``, or a
    safetensors file with the single key ``"codebook"`` for ``.safetensors``."""
    path = Path(path)
    codebook = _check_codebook(codebook, "codebook").detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        data = save({SAFETENSORS_KEY: codebook})
        write_atomic(path, lambda f: f.write(data))
    elif path.suffix in TORCH_SUFFIXES:
        # clone: saving a view would store its whole base storage
        write_atomic(path, lambda f: torch.save(codebook.clone(), f))
    else:
        raise ValueError(
            f"{path}: unknown codebook file type (use {', '.join(TORCH_SUFFIXES)} or .safetensors)"
        )
    return path


def check_ids(ids: torch.Tensor, vocab_size: int) -> None:
    """Token ids must be an integer tensor in [0, vocab_size): out-of-range ids would otherwise fail deep
    inside an indexing kernel (a device-side assert on a GPU)."""
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(f"token ids must be an integer tensor, got dtype {ids.dtype}")
    if not ids.numel():
        return
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one pass, one device sync
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"token ids must be in [0, {vocab_size}), found values from {lo} to {hi}")


def embed(ids: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Ids [B, H, W] -> emb map [B, D, H, W] of the codebook rows, untouched, on the ids' device."""
    if ids.ndim != 3:
        raise ValueError(f"expected token ids [B, H, W], got shape {tuple(ids.shape)}")
    codebook = _check_codebook(codebook, "codebook").to(ids.device)
    check_ids(ids, codebook.shape[0])
    return F.embedding(ids.long(), codebook).permute(0, 3, 1, 2).contiguous()


def _first_of_equal_rows(rows: torch.Tensor) -> torch.Tensor:
    """For each row, the smallest index of a bit-identical row: duplicate codes then resolve to the first
    id however the matrix product happens to round their (equal) scores."""
    _, inverse = torch.unique(rows, dim=0, return_inverse=True)
    index = torch.arange(rows.shape[0], device=rows.device)
    first = torch.full((int(inverse.max()) + 1,), rows.shape[0], dtype=torch.long, device=rows.device)
    first.scatter_reduce_(0, inverse, index, reduce="amin")
    return first[inverse]


def requantize(emb: torch.Tensor, codebook: torch.Tensor, *, chunk: int = 8192) -> torch.Tensor:
    """Emb map [B, D, H, W] -> ids [B, H, W] of the nearest codebook row by cosine similarity.

    Vectors and rows are l2-normalised and the id minimising the squared distance between them is taken
    (SeiT++'s re-quantization after continuous-space augmentation); identical rows resolve to the
    smallest id (rows equal only up to scale tie in exact arithmetic, and then rounding decides).
    ``chunk`` vectors are scored at a time, so memory is chunk x K scores. Runs in float32 whatever the
    autocast state, because half-precision scores can pick the wrong neighbour (TF32 matmuls, when a
    user enables them on a GPU, can still flip near-ties)."""
    if emb.ndim != 4:
        raise ValueError(f"expected an emb map [B, D, H, W], got shape {tuple(emb.shape)}")
    codebook = _check_codebook(codebook, "codebook")
    if emb.shape[1] != codebook.shape[1]:
        raise ValueError(
            f"emb map has {emb.shape[1]} channels but the codebook rows have {codebook.shape[1]} dimensions"
        )
    if chunk < 1:
        raise ValueError(f"chunk must be a positive number of vectors, got {chunk}")
    batch, dim, height, width = emb.shape
    with torch.no_grad(), torch.autocast(emb.device.type, enabled=False):
        vectors = F.normalize(emb.permute(0, 2, 3, 1).reshape(-1, dim).float(), dim=1)
        rows = F.normalize(codebook.to(emb.device, torch.float32), dim=1)
        # argmin |v - c|^2 = argmax 2 v.c - |c|^2 (|v|^2 is the same for every row; |c|^2 is 0 for a zero row)
        bias = rows.square().sum(1)
        ids = torch.empty(vectors.shape[0], dtype=torch.long, device=emb.device)
        for start in range(0, vectors.shape[0], chunk):
            scores = torch.addmm(bias, vectors[start : start + chunk], rows.T, beta=-1.0, alpha=2.0)
            ids[start : start + chunk] = scores.argmax(1)
        ids = _first_of_equal_rows(rows)[ids]
    return ids.view(batch, height, width)


# ------------------------------------------------------------------------------------------- synonyms


def build_synonyms(
    codebook: torch.Tensor, k: int = 32, *, include_self: bool = False, chunk: int = 1024
) -> dict[int, list[int]]:
    """For each code, the ``k`` codebook rows most similar to it by cosine similarity, most similar first,
    ties broken by the smaller id.

    How SeiT built its synonym file is not published; top-k cosine neighbours is the natural reading. With
    ``include_self=False`` (default) a code never lists itself; with ``include_self=True`` it comes first
    and counts towards ``k``. Lists are shorter than ``k`` only when the codebook has too few rows."""
    codebook = _check_codebook(codebook, "codebook")
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    rows = F.normalize(codebook.detach().cpu().double(), dim=1)
    vocab = rows.shape[0]
    others = min(k - int(include_self), vocab - 1)
    synonyms: dict[int, list[int]] = {}
    for start in range(0, vocab, chunk):
        codes = torch.arange(start, min(start + chunk, vocab))
        similarity = rows[codes] @ rows.T
        similarity[torch.arange(len(codes)), codes] = -torch.inf
        # a stable sort keeps equal similarities in id order
        order = torch.sort(similarity, dim=1, descending=True, stable=True).indices[:, :others]
        for code, ranked in zip(codes.tolist(), order.tolist(), strict=True):
            synonyms[code] = [code, *ranked] if include_self else ranked
    return synonyms


def _validate_synonyms(raw: dict, vocab_size: int | None, origin: str) -> dict[int, list[int]]:
    """Keys must be exactly the ids 0..K-1 (as decimal strings in JSON), values lists of ids in [0, K)."""
    if not isinstance(raw, dict):
        raise ValueError(
            f"{origin}: expected a JSON object mapping token ids to synonym lists, got {type(raw).__name__}"
        )
    vocab = len(raw) if vocab_size is None else vocab_size
    synonyms: dict[int, list[int]] = {}
    for key, value in raw.items():
        if isinstance(key, bool) or not isinstance(key, (int, str)) or str(key) != str(_as_int(key)):
            raise ValueError(f"{origin}: key {key!r} is not a decimal token id")
        code = int(key)
        if not 0 <= code < vocab:
            raise ValueError(f"{origin}: key '{key}' is not a token id in 0..{vocab - 1}")
        if code in synonyms:
            raise ValueError(f"{origin}: token id {code} is listed twice")
        if not isinstance(value, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab for v in value
        ):
            raise ValueError(
                f"{origin}: key '{key}': expected a list of token ids in [0, {vocab}), got {_short(value)}"
            )
        synonyms[code] = list(value)
    missing = [code for code in range(vocab) if code not in synonyms]
    if missing:
        raise ValueError(
            f"{origin}: no entry for token ids {missing[:8]}{' ...' if len(missing) > 8 else ''} "
            f"(expected keys '0'..'{vocab - 1}')"
        )
    return {code: synonyms[code] for code in range(vocab)}


def _as_int(key: int | str) -> int | None:
    try:
        return int(key)
    except ValueError:
        return None


def _short(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def save_synonyms(synonyms: dict[int, list[int]], path: str | Path) -> Path:
    """Write SeiT's synonym JSON: an object with keys "0".."K-1" (in id order) and lists of ids."""
    path = Path(path)
    checked = _validate_synonyms(synonyms, None, "synonyms")
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps({str(code): ranked for code, ranked in checked.items()})
    write_atomic(path, lambda f: f.write(text.encode()))
    return path


def load_synonyms(path: str | Path, vocab_size: int | None = None) -> dict[int, list[int]]:
    """Read and check a synonym JSON (SeiT layout). ``vocab_size`` K, when given, must match the keys;
    otherwise K is the number of keys. Errors name the file and the offending key."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a valid JSON synonym file ({_first_line(err)})") from err
    return _validate_synonyms(raw, vocab_size, str(path))


def synonym_table(synonyms: dict[int, list[int]], thres: int = 5) -> torch.Tensor:
    """LongTensor [K, thres] of the first ``thres`` synonyms of each code, for vectorised replacement.

    Shorter lists are repeated cyclically to fill the row (so a uniform column pick is no longer uniform
    over such a list unless :func:`synonym_counts` is passed along); a code without synonyms maps to
    itself, which makes replacing it a no-op instead of an error."""
    if thres < 1:
        raise ValueError(f"thres must be at least 1, got {thres}")
    checked = _validate_synonyms(synonyms, None, "synonyms")
    rows = []
    for code, ranked in checked.items():
        head = ranked[:thres] or [code]
        rows.append((head * -(-thres // len(head)))[:thres])
    return torch.tensor(rows, dtype=torch.long).view(len(checked), thres)


def synonym_counts(synonyms: dict[int, list[int]], thres: int = 5) -> torch.Tensor:
    """LongTensor [K]: how many leading entries of each :func:`synonym_table` row are real (not cyclic
    padding; at least 1), so that replacement picks uniformly among a list shorter than ``thres``, as SeiT's
    ``random.choice(syn[id][:thres])`` does."""
    checked = _validate_synonyms(synonyms, None, "synonyms")
    return torch.tensor([max(1, min(len(ranked), thres)) for ranked in checked.values()], dtype=torch.long)
