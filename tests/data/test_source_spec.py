"""From a spec to a source (mimkit.data.source_spec): class names checked between splits and npz parts,
labels checked where a source is opened, per-class held-out splits, recorded tokenizers."""

from __future__ import annotations

import re
import shutil

import numpy as np
import pytest

from mimkit.configs import build_config
from mimkit.data import build_source
from mimkit.models.tokenizer import (
    DEMO_TOKENIZER,
)
from mimkit.runs.tokenize import tokenize
from mimkit.tokens.dataset import open_tokens
from tests.data.test_sources import write_solid


def test_training_and_evaluation_sources_must_name_the_same_classes(tmp_path):
    from mimkit.data.sources import check_same_classes

    write_solid(tmp_path / "A" / "a", [(255, 0, 0)])
    write_solid(tmp_path / "A" / "b", [(0, 255, 0)])
    write_solid(tmp_path / "A" / "c", [(0, 0, 255)])
    write_solid(tmp_path / "B" / "a", [(255, 0, 0)])
    write_solid(tmp_path / "B" / "c", [(0, 0, 255)])
    A, B = build_source(str(tmp_path / "A")), build_source(str(tmp_path / "B"))
    message = f"classes differ between '{A.name}' (a, b, c) and '{B.name}' (a, c): only in '{A.name}': b"
    with pytest.raises(ValueError, match=re.escape(message)):
        check_same_classes(A, B)
    check_same_classes(A, A)
    check_same_classes(build_source("demo:train", max_images=64), build_source("demo:val"))
    check_same_classes(build_source("synthetic:64"), build_source("synthetic:32"))

    def npz(name: str, labels: list[int], class_names: list[str] | None = None):
        arrays = {"x": np.zeros((len(labels), 4, 4, 3), np.uint8), "y": np.asarray(labels)}
        if class_names is not None:
            arrays["class_names"] = np.asarray(class_names)
        np.savez(tmp_path / f"{name}.npz", **arrays)
        return build_source(str(tmp_path / f"{name}.npz"))

    # names stored in the files are compared by name and order
    with pytest.raises(ValueError, match=r"\(a, b, c\) and .* \(b, a, c\): the same names in another order"):
        check_same_classes(npz("n1", [0, 1, 2], ["a", "b", "c"]), npz("n2", [0, 1, 2], ["b", "a", "c"]))
    # names numbered from the labels: a split may lack the top labels, but not reach past the other's classes
    full, short = npz("d1", [0, 1, 2, 3]), npz("d2", [0, 1])
    assert full.classes_from_labels and short.classes == ("0", "1")
    check_same_classes(full, short)
    check_same_classes(short, full)
    check_same_classes(A, short)
    with pytest.raises(ValueError, match=r"'.*d1\.npz' has labels up to 3 but '.*A' names only 3 classes"):
        check_same_classes(A, full)


def test_npz_parts_naming_different_classes_are_an_error(tmp_path):
    for i, names in enumerate((["a", "b"], ["b", "a"])):
        np.savez(
            tmp_path / f"p{i}.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.arange(2), class_names=names
        )
    with pytest.raises(ValueError, match=r"npz files name different classes: .*p0\.npz \(a, b\); .*p1\.npz"):
        build_source(str(tmp_path / "p*.npz"))


def test_a_relative_tokenizer_is_recorded_absolute(tmp_path, monkeypatch):
    from mimkit.runs.pretrain import token_reader

    (tmp_path / "tok").mkdir()
    shutil.copy(DEMO_TOKENIZER, tmp_path / "tok" / "tokenizer.pt")
    monkeypatch.chdir(tmp_path)
    cfg = build_config("mtm_demo", ["data.tokenizer=tok"])
    assert token_reader(cfg) == cfg.data.tokenizer == str(tmp_path / "tok")


@pytest.mark.slow
def test_a_token_datasets_held_out_split_is_per_class(tmp_path):
    tokenize("demo", "demo:val", str(tmp_path / "tokens"), max_images=100, progress=False)
    val = build_source(f"{tmp_path / 'tokens'}#val=0.1")
    labels = np.asarray(open_tokens(tmp_path / "tokens").labels)
    per_class = np.bincount(labels, minlength=10)
    # a tenth of each class, at least one and never the whole of a class of two or more
    expected = [min(max(1, round(0.1 * n)), max(n - 1, 1)) if n else 0 for n in per_class]
    assert np.bincount(labels[val.indices], minlength=10).tolist() == expected
    assert sum(expected) == 11  # a split that ignored the labels would hold out exactly 10


def _npz(path, y=None, names=True):
    arrays = {"x": np.zeros((4, 8, 8, 3), np.uint8)}
    if y is not None:
        arrays["y"] = np.asarray(y)
    if names:
        arrays["class_names"] = np.array(["a", "b", "c"])
    np.savez(path, **arrays)
    return str(path)


def test_labels_are_checked_where_a_source_is_opened(tmp_path, capsys):
    unlabelled = build_source(_npz(tmp_path / "nolabels.npz"))
    assert not unlabelled.has_labels and unlabelled.load(0)[1] == -1
    assert "'class_names' but no labels 'y': read as unlabelled images" in capsys.readouterr().err
    tokenize("demo", str(tmp_path / "nolabels.npz"), str(tmp_path / "tok"), progress=False)
    assert open_tokens(tmp_path / "tok").labels is None  # no column of -1 "labels"
    for y, bad in (([0, 1, -3, 2], "label -3 of record 2"), ([0, 99, 1, 2], "label 99 of record 1")):
        path = _npz(tmp_path / f"bad{bad[6:9].strip()}.npz", y)
        with pytest.raises(
            ValueError, match=rf"{bad} is not a class index \(1 such labels\); labels must be 0..2"
        ):
            build_source(path)
    with pytest.raises(
        ValueError,
        match=r"label -1 of record 0 is not a class index .* must be 0..999999 \(unnamed classes\)",
    ):
        build_source(_npz(tmp_path / "neg.npz", [-1, 0, 1, 2], names=False))
