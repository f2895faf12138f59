"""The budget arithmetic of bench/storage_accuracy.py: images per budget from the bytes measured on disk."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from mimkit.tokens.dataset import write_tokens

BENCH = Path(__file__).resolve().parents[2] / "bench" / "storage_accuracy.py"
spec = importlib.util.spec_from_file_location("storage_accuracy", BENCH)
sa = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sa)


def test_images_for_budget_is_the_floor_after_fixed_bytes_and_capped_by_the_pool() -> None:
    assert sa.images_for_budget(1000, 100) == 10
    assert sa.images_for_budget(999, 100) == 9
    assert sa.images_for_budget(1000, 100, fixed=150) == 8
    assert sa.images_for_budget(100, 100, fixed=150) == 0
    assert sa.images_for_budget(10**9, 71.1, fixed=50_000, pool=37_500) == 37_500
    with pytest.raises(ValueError):
        sa.images_for_budget(1000, 0)


def test_pixel_subsets_fit_the_budget_in_the_bytes_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(40, 32, 32, 3), dtype=np.uint8)
    x[20:] //= 32  # larger files first: the mean-based count overshoots, the prefix check pulls it back
    y = np.arange(40) % 4
    names = sa.folder_names(("a", "b", "c", "d"))
    sizes = sa.write_files(x, y, names, tmp_path / "png", "png", 90)
    on_disk = {int(p.stem): p.stat().st_size for p in (tmp_path / "png").glob("*/*.png")}
    assert [on_disk[i] for i in range(40)] == sizes.tolist()
    budget = float(sizes[:25].sum()) + 1
    n = sa.prefix_fitting(sizes, budget, sa.images_for_budget(budget, float(sizes.mean()), pool=40))
    assert sizes[:n].sum() <= budget
    assert n == 25
    folder = sa.pixel_subset(tmp_path / "png", names, y, n, tmp_path / "sub")
    assert sorted(p.name for p in folder.iterdir()) == names  # every class folder, empty ones too
    assert sum(p.stat().st_size for p in folder.glob("*/*")) == sizes[:n].sum()


def test_seit_bytes_count_every_file_and_split_what_grows(tmp_path: Path) -> None:
    ids = np.random.default_rng(0).integers(0, 300, size=(50, 8, 8))
    path = tmp_path / "sub" / "tokens-token.data.bin.gz"
    write_tokens(
        path, ids, np.arange(50) % 3, to="seit", codebook=torch.randn(300, 32), classes=("a", "b", "c")
    )
    files = {p.name: p.stat().st_size for p in path.parent.iterdir()}
    (path.parent / "tokens-tokenize_report.json").write_text("{}")  # a report beside it is not the dataset
    growing, fixed = sa.seit_bytes(path.parent)
    assert growing + fixed == sum(files.values())
    assert "codebook.ckpt" in files and fixed >= files["codebook.ckpt"]
    assert growing == sum(v for k, v in files.items() if k.endswith(sa.SEIT_GROWING))


def test_folder_names_keep_the_label_order() -> None:
    assert sa.folder_names(("airplane", "cat")) == ["airplane", "cat"]
    named = sa.folder_names(("zebra", "ant", "b c"))
    assert named == ["0_zebra", "1_ant", "2_b_c"] and sorted(named) == named
    assert sorted(sa.folder_names(tuple(str(i) for i in range(12)))) == sa.folder_names(
        tuple(str(i) for i in range(12))
    )


@pytest.mark.parametrize("n", [110, 111, 225, 13_283, 37_500])
def test_the_schedule_gives_an_even_batch_within_the_subset_and_about_the_steps(n: int) -> None:
    settings = dict(item.split("=") for item in sa.schedule(n, 128, 100, 0.05))
    batch, epochs = int(settings["optim.batch_size"]), int(settings["optim.epochs"])
    assert batch % 2 == 0 and 2 <= batch <= n  # Mixup/CutMix pair the images of a batch
    assert abs(epochs * (n // batch) - 100) <= max((n // batch) / 2, 6)  # whole epochs


def test_a_misspelt_arm_is_refused_with_the_choices_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    argv = ["storage_accuracy.py", "--work", str(work), "--arms", "png,seitpp_scrach"]
    monkeypatch.setattr("sys.argv", argv)
    assert sa.main() == 2
    assert capsys.readouterr().err == (
        "error: --arms: unknown ['seitpp_scrach'] (did you mean seitpp_scratch?); choose among png, jpeg, "
        "seit, seitpp, seitpp_scratch\n"
    )
    assert not work.exists()


def test_an_unreadable_image_is_skipped_and_named_not_fatal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from PIL import Image

    for i, cls in enumerate(["cat", "cat", "dog"]):
        (tmp_path / cls).mkdir(exist_ok=True)
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    x, y, classes, skipped = sa.load_images(str(tmp_path), "--train", 8)
    assert x.shape == (3, 8, 8, 3) and y.tolist() == [0, 0, 1] and classes == ("cat", "dog")
    assert len(skipped) == 1 and skipped[0].startswith(f"{tmp_path / 'dog' / 'broken.jpg'}: ")
    assert "1 of 4 images unreadable, skipped" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--steps", "1"], "--steps must be at least 2; got 1"),
        (
            ["--steps", "3", "--mtm-share", "0.1"],
            "--steps 3 x --mtm-share 0.1 leaves SeiT++ without an MTM or a fine-tuning step; give more steps "
            "or another share",
        ),
        (["--width", "100", "--heads", "3"], "--width 100 is not a multiple of --heads 3"),
        (["--heldout-images", "-5"], "--heldout-images must be at least 0; got -5"),
    ],
)
def test_bad_settings_are_refused_by_name_before_any_work(
    args: list[str],
    said: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr("sys.argv", ["storage_accuracy.py", "--work", str(tmp_path / "work"), *args])
    assert sa.main() == 2
    assert capsys.readouterr().err == f"error: {said}\n"
    assert not (tmp_path / "work").exists()
