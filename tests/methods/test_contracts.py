"""What every method of the catalogue (mimkit.methods.METHODS) must keep, checked on each: a training step
gives a StepOutput, a run stopped and resumed ends on the weights of a straight run, a method with an EMA
teacher moves it, and the official layout round-trips exactly. A new method gets these tests by adding
its tiny settings to :data:`SETTINGS`; until it does, :func:`test_every_method_has_contract_settings`
fails."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn.modules.module import register_module_forward_hook

from mimkit.configs import build_config
from mimkit.data import build_source
from mimkit.interop.official import load_official, to_official
from mimkit.interop.vitvqgan import load_vitvqgan, to_vitvqgan
from mimkit.methods import METHODS, StepOutput, build_method
from mimkit.methods.base import Method, MomentumMethod
from mimkit.models.tokenadapt import load_tokenadapt, to_official_tokenadapt
from mimkit.runs.pretrain import pretrain
from mimkit.runs.tokenadapt import train_tokenadapt
from mimkit.tokens.dataset import write_tokens
from tests.conftest import TINY, straight_and_resumed
from tests.methods.test_mtm import TINY_MTM, VOCAB, tokenize_by_colour
from tests.methods.test_tokenadapt import overrides as tokenadapt_overrides
from tests.methods.test_tokenadapt import tiny_tokenizer
from tests.runs.test_tokenizer_lifecycle import TOKENIZER

HEADS = ["model.num_heads=2", "method.decoder_num_heads=2"]


def _official_round_trip(method: Any, overrides: list[str]) -> tuple[dict, dict]:
    state = to_official(method)
    return state, to_official(load_official(state, method.name, [*HEADS, *overrides]))


def _tokenizer_round_trip(method: Any, overrides: list[str]) -> tuple[dict, dict]:
    state = to_vitvqgan(method.tokenizer)
    return state, to_vitvqgan(load_vitvqgan(state, num_heads=2))


def _tokenadapt_round_trip(method: Any, overrides: list[str]) -> tuple[dict, dict]:
    state = to_official_tokenadapt(method.tokenadapt)
    return state, to_official_tokenadapt(load_tokenadapt(state, num_heads=method.cfg.width // 64))


@dataclass
class Settings:
    """A method's tiny run (``overrides(folder)``: its data may need writing first), the entry point that
    trains it, where to stop it for the resume, and how its official layout goes out and back in."""

    overrides: Callable[[Path], list[str]]
    round_trip: Callable[[Any, list[str]], tuple[dict, dict]]
    run: Callable[..., dict] = pretrain
    stop_at: int = 5
    official_overrides: list[str] = field(default_factory=list)
    approx: tuple[str, ...] = ()  # keys rebuilt rather than kept (fixed tables): equal up to rounding
    saved: tuple[str, ...] = ()  # parts of checkpoint keys that must be there (what a resume needs)
    not_saved: tuple[str, ...] = ()  # and that must not (weights loaded from elsewhere)


def mtm_tokens(folder: Path) -> list[str]:
    path = folder / "tokens"
    if not path.exists():
        source = build_source("demo:train", max_images=64)
        images, labels = zip(*(source.load(i) for i in range(64)), strict=True)
        ids, codebook = tokenize_by_colour(torch.stack(images))
        write_tokens(path, ids, list(labels), codebook=codebook)
    return [*TINY_MTM, f"data.train=tokens:{path}", f"model.vocab_size={VOCAB}"]


def tokenadapt_run(folder: Path) -> list[str]:
    tokenizer = folder / "tokenizer"
    if not tokenizer.exists():
        tokenizer.mkdir(parents=True)
        tiny_tokenizer(tokenizer)
    return tokenadapt_overrides(tokenizer, "optim.epochs=2", "optim.batch_size=8", "method.eval_images=8")


SETTINGS: dict[str, Settings] = {
    "mae": Settings(lambda _: [*TINY, "method=mae"], _official_round_trip),
    "lut": Settings(
        lambda _: [*TINY, "method=lut", "method.head_hidden_dim=32"],
        _official_round_trip,
        official_overrides=["method.head_hidden_dim=32"],
        saved=("teacher.module.",),
    ),
    "latent_mim": Settings(
        lambda _: [*TINY, "method=latent_mim", "method.proj_hidden_dim=32", "method.num_vis=4"],
        _official_round_trip,
        official_overrides=["method.proj_hidden_dim=32", "method.num_vis=4"],
        saved=("teacher.module.projector.",),
    ),
    "mtm": Settings(mtm_tokens, _official_round_trip, approx=("decoder_pos_embed",)),
    "vq_tokenizer": Settings(
        lambda _: [*TOKENIZER, "optim.epochs=2", "data.max_images=64", "optim.batch_size=16"],
        _tokenizer_round_trip,
        saved=("_codebook.embed",),  # the EMA codebook
    ),
    "tokenadapt": Settings(
        tokenadapt_run,
        _tokenadapt_round_trip,
        run=train_tokenadapt,
        stop_at=3,
        saved=("tokenadapt.",),
        not_saved=("loaded", "quantizer"),  # the tokenizer is read from its own file
    ),
}


def test_every_method_has_contract_settings():
    assert set(SETTINGS) == set(METHODS), "give each method of the catalogue its tiny settings here"


def _config(name: str, folder: Path, *extra: str):
    return build_config(None, [*SETTINGS[name].overrides(folder), f"run.out={folder / 'run'}", *extra])


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_run_steps_by_step_outputs_resumes_exactly_and_moves_the_teacher(name, tmp_path):
    """Through the method's own entry point (its data and device stages included), each step's forward
    gives a StepOutput (a finite scalar loss with a gradient, metrics that are numbers); a run stopped and
    resumed ends on the straight run's weights, what must be saved is, and a teacher moved by EMA."""
    settings = SETTINGS[name]
    outputs: list[Any] = []

    def keep(module: torch.nn.Module, args: tuple, out: Any) -> None:
        if isinstance(module, Method) and module.training:
            outputs.append(out)

    handle = register_module_forward_hook(keep)
    try:
        a, b, _ = straight_and_resumed(settings.overrides(tmp_path), tmp_path, settings.stop_at, settings.run)
    finally:
        handle.remove()
    assert outputs and all(isinstance(out, StepOutput) for out in outputs)
    for loss, metrics in outputs:
        assert loss.ndim == 0 and loss.requires_grad and math.isfinite(loss.item())
        for key, value in metrics.items():
            number = value.item() if torch.is_tensor(value) else value
            assert isinstance(number, float | int) and math.isfinite(number), (key, value)

    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert all(any(part in key for key in a) for part in settings.saved), settings.saved
    assert not any(part in key for key in a for part in settings.not_saved), settings.not_saved
    if issubclass(METHODS[name], MomentumMethod):
        # the teacher starts as a copy of the student and follows it by EMA: it moved, and not onto it
        teacher = {k[len("teacher.module.") :]: v for k, v in a.items() if k.startswith("teacher.module.")}
        assert teacher and all(torch.isfinite(v).all() for v in teacher.values() if v.is_floating_point())
        assert any(not torch.equal(v, a[k]) for k, v in teacher.items() if k in a)


def _flat(state: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    if torch.is_tensor(state):
        return {prefix: state}
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {}


@pytest.mark.parametrize("name", list(SETTINGS))
def test_the_official_layout_round_trips_exactly(name, tmp_path):
    settings = SETTINGS[name]
    torch.manual_seed(0)
    method = build_method(_config(name, tmp_path))
    with torch.no_grad():  # away from any initialisation a loader could rebuild instead of reading
        for p in method.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    out, back = (_flat(s) for s in settings.round_trip(method, settings.official_overrides))
    assert out and out.keys() == back.keys()
    for key, value in out.items():
        if any(part in key for part in settings.approx):
            torch.testing.assert_close(back[key], value, rtol=0, atol=1e-6)
        else:
            assert torch.equal(back[key], value), key
