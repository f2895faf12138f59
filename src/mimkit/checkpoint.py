"""Checkpoint files: atomic writes, safe reads that name a damaged file, RNG capture. Pure I/O: what a
checkpoint holds is read by :mod:`mimkit.interop.load`."""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# the temporary names save_atomic and the run logs write (nothing else of a user's is matched)
STALE = re.compile(r"\.(?:[^/]+\.pt|summary\.json|metrics\.jsonl)\.tmp\d*")


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or written; the message names the file."""


class UnsafeCheckpoint(CheckpointError):
    """A well-formed checkpoint that pickles types outside the allowed set (a safe load refuses them)."""


class OutputPathError(ValueError):
    """An output path that would destroy an input or replace something that is not a file."""


def check_output(
    path: str | Path,
    inputs: Sequence[str | Path] = (),
    what: str = "output",
    *,
    kind: tuple[str, Callable[[Path], bool]] | None = None,
) -> Path:
    """A path a command may write a file to: not a special file (a device, a pipe: renaming over it would
    replace it), not a folder, and not one of the files or folders the command reads (writing it would
    destroy the input). ``kind``: (what the command writes, a test of a file's first bytes): an existing
    file is replaced only when it is of that kind (an earlier output), never a run's config, a checkpoint
    or a tokenizer given by mistake. Checked before any work."""
    path = Path(path)
    if path.exists() and not path.is_file():
        found = "a folder" if path.is_dir() else "not a regular file (a device, pipe or socket)"
        raise OutputPathError(f"{what} '{path}' is {found}: give the path of a file to write")
    for source in inputs:
        source = Path(source)
        try:
            same = path.exists() and source.exists() and os.path.samefile(path, source)
        except OSError:
            same = False
        if same:
            raise OutputPathError(
                f"{what} '{path}' is the input '{source}': writing it would destroy it; give another path"
            )
    if kind is not None and path.is_file() and path.stat().st_size and not _is_kind(path, kind[1]):
        raise OutputPathError(
            f"{what} '{path}' exists and is not {kind[0]}: writing would replace it; give another path, or "
            "remove it first"
        )
    return path


def _is_kind(path: Path, test: Callable[[Path], bool]) -> bool:
    try:
        return test(path)
    except (OSError, ValueError):
        return False


def is_safetensors(path: Path) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    size = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return 2 <= size < path.stat().st_size and head[8:] == b"{"


def is_npz(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return all(name.endswith(".npy") for name in archive.namelist())


def is_png(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def is_json(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(1) in (b"{", b"[")


def save_atomic(state: dict, path: str | Path) -> Path:
    """Write to a temporary file beside ``path`` then rename, so a crash never leaves half a checkpoint. A
    failed write (full disk, no permission) removes its temporary file and names the path."""
    path = check_output(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(state, tmp)
        # the rename is atomic only once the data is on disk
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):  # a read-only folder refuses even this
            tmp.unlink()
        raise CheckpointError(
            f"could not write checkpoint '{path}': {_first_line(err)}{_free_space(path.parent)}"
        ) from err
    return path


def _free_space(folder: Path) -> str:
    """How much room the folder's disk has left (torch reports a full disk as an 'unexpected pos')."""
    try:
        return f" ({shutil.disk_usage(folder).free / 2**20:.1f} MiB free on its disk)"
    except OSError:
        return ""


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files (``.NAME.tmpPID`` of a checkpoint, ``.summary.json.tmp``,
    ``.metrics.jsonl.tmp``) that a process killed while writing left in ``folder``. Only call it while
    holding the folder's run lock: then no other process is writing there."""
    folder = Path(folder)
    stale = sorted(p for p in folder.iterdir() if STALE.fullmatch(p.name)) if folder.is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def _damage(path: Path, err: BaseException) -> str:
    """What is wrong with a file torch could not load, in plain words (torch's own messages suggest
    loading it unsafely, which is no help for damaged bytes)."""
    if not zipfile.is_zipfile(path):
        return f"not a complete PyTorch archive; {type(err).__name__}"
    return f"a damaged archive: {_first_line(err)}"


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def load(path: str | Path) -> dict:
    """A checkpoint read with torch's safe loader. A file that is truncated or not a checkpoint at all is
    a :class:`CheckpointError` naming it; a well-formed file that pickles types outside the allowed set is
    an :class:`UnsafeCheckpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    state = safe_load(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    return state


def safe_load(path: Path) -> Any:
    """What a torch file holds, read with torch's weights-only unpickler; a refused type is an
    :class:`UnsafeCheckpoint` that says so (never a hint to load it unsafely), damage a CheckpointError."""
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: truncated or not a checkpoint (an empty file)")
    try:
        with warnings.catch_warnings():  # damaged bytes can look like an odd pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the safe unpickler raises many types on damaged bytes
        # torch names a refused global in one of two ways, depending on its version
        refused = re.search(r"Unsupported global: GLOBAL (\S+)|unsupported GLOBAL (\S+) whose", str(err))
        if isinstance(err, pickle.UnpicklingError) and refused:
            name = (refused.group(1) or refused.group(2)).rstrip(",.")
            raise UnsafeCheckpoint(
                f"{path}: refused as unsafe: it holds a pickled '{name}', which could run code when loaded; "
                "mimkit never loads such a file"
            ) from err
        raise CheckpointError(f"{path}: truncated or not a checkpoint ({_damage(path, err)})") from err
    return state


def _to_bytes(t: torch.Tensor) -> bytes:
    return t.cpu().numpy().tobytes()


def _from_bytes(b: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(b), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """Every generator the training step draws from, as plain Python values (they travel between ranks
    as objects, and ``torch.load(weights_only=True)`` reads them)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": _to_bytes(torch.get_rng_state()),
        "python": random.getstate(),
        "numpy": (name, keys.astype(np.uint32).tobytes(), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [_to_bytes(s) for s in torch.cuda.get_rng_state_all()]
    return state


def seed_cpu(seed: int) -> None:
    """Seed the CPU generators a view or a step may draw from: torch's, Python's and NumPy's (timm's
    RandAugment and Mixup draw from NumPy), leaving the GPUs' alone (in a training process they carry the
    run's own stream: drop path, dropout)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (1 << 32))


def seed_all(seed: int) -> None:
    """Seed every generator a training step may draw from: :func:`seed_cpu`'s and the GPUs'."""
    seed_cpu(seed)
    torch.cuda.manual_seed_all(seed)


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(_from_bytes(state["torch"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_from_bytes(s) for s in state["cuda"]])


def resolve_checkpoint(path: str | Path) -> Path:
    """A run folder means its last.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.exists():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    return path
