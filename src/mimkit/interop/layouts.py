"""What every official layout shares: reading a file (the official ones pickle an argparse.Namespace),
wrapper prefixes, block counts, and loading a converted state into a mimkit method."""

from __future__ import annotations

import argparse
import pickle
import re
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from mimkit import checkpoint
from mimkit.methods import Method

WRAPPER_PREFIXES = ("module.", "backbone.", "base_encoder.")
TEACHER = "teacher.module."


def strip_prefixes(state: dict[str, Any], prefixes: Iterable[str]) -> dict[str, Any]:
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for prefix in prefixes:
                if key.startswith(prefix):
                    key, changed = key[len(prefix) :], True
        out[key] = value
    return out


def read(source: str | Path | dict, *, trust: bool = False) -> dict[str, Any]:
    """A checkpoint as a dict. Official files pickle an argparse.Namespace ('args'); that type is allowed,
    anything else needs ``trust=True`` (only for files whose origin you trust)."""
    if isinstance(source, dict):
        return source
    if trust:
        try:
            return torch.load(source, map_location="cpu", weights_only=False)
        except (EOFError, RuntimeError, pickle.UnpicklingError) as err:
            raise checkpoint.CheckpointError(f"{source}: truncated or not a checkpoint ({err})") from err
    torch.serialization.add_safe_globals([argparse.Namespace])
    # a refused file is said to be unsafe, and no message suggests loading it anyway (the Python API's
    # ``trust`` is documented above, for files the caller made)
    return checkpoint.load(source)


def count_blocks(state: dict[str, Any], prefix: str) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(rf"{re.escape(prefix)}(\d+)\.", k))}
    return max(ids) + 1 if ids else 0


def load_into(model: Method, state: dict[str, Any], method: str, source: Any) -> None:
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"{source}: entries this {method} model does not have: {sorted(unexpected)[:8]}")
    if lost := sorted(k for k in missing if k.startswith("encoder.")):
        raise ValueError(f"{source}: encoder entries missing: {lost[:8]}")
    if missing:
        parts = ", ".join(sorted({k.split(".")[0] for k in missing}))
        print(f"note: {source} has no {parts} weights; those are freshly initialised", file=sys.stderr)
