"""The CIFAR downloads users have (python and binary batches) and held-out splits of any source."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

from mimkit.configs import ConfigError, build_config
from mimkit.data.source_spec import build_source

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_download(root: Path, per_batch: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """Both CIFAR-10 layouts of the same images: pickled batches as Python writes them (bytes keys,
    protocol 2) and the binary records (a label byte, then 3,072 bytes, channel-major)."""
    rng = np.random.default_rng(0)
    py, binary = root / "cifar-10-batches-py", root / "cifar-10-batches-bin"
    py.mkdir(parents=True)
    binary.mkdir(parents=True)
    with open(py / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [c.encode() for c in CLASSES]}, f, protocol=2)
    (binary / "batches.meta.txt").write_text("\n".join(CLASSES) + "\n\n")
    images, labels = [], []
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        y = [int(v) for v in rng.integers(0, 10, per_batch)]
        with open(py / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": y, b"batch_label": b"b"}, f, protocol=2)
        np.concatenate([np.array(y, np.uint8)[:, None], data], 1).tofile(binary / f"{name}.bin")
        if name != "test_batch":
            images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
            labels.extend(y)
    return np.concatenate(images), np.array(labels)


def test_python_and_binary_batches_read_the_same_images(tmp_path):
    images, labels = make_download(tmp_path / "data")
    py = build_source(str(tmp_path / "data" / "cifar-10-batches-py"))
    binary = build_source(str(tmp_path / "data" / "cifar-10-batches-bin"))
    assert len(py) == len(binary) == 100  # the five training batches
    assert py.classes == binary.classes == tuple(CLASSES)
    np.testing.assert_array_equal(py.x, images)
    np.testing.assert_array_equal(binary.x, images)
    np.testing.assert_array_equal(py.y, labels)
    image, label = py.load(3)
    assert tuple(image.shape) == (3, 32, 32) and label == labels[3]
    test = build_source(str(tmp_path / "data" / "cifar-10-batches-bin" / "test_batch.bin"))
    assert len(test) == 20 and test.classes == tuple(CLASSES)


def test_a_download_root_with_one_cifar_folder_is_read_and_with_two_is_refused(tmp_path):
    make_download(tmp_path / "data")
    with pytest.raises(ValueError, match="holds cifar-10-batches-py and cifar-10-batches-bin: name the one"):
        build_source(str(tmp_path / "data"))
    os.rename(tmp_path / "data" / "cifar-10-batches-bin", tmp_path / "elsewhere")
    assert len(build_source(str(tmp_path / "data"))) == 100


class _Boom:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_pickle_that_would_run_code_is_refused_not_run(tmp_path):
    make_download(tmp_path)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "wb") as f:
        pickle.dump({b"data": _Boom(), b"labels": [0]}, f, protocol=2)
    with pytest.raises(
        ValueError, match=r"data_batch_2: not a CIFAR python batch \(refused '(posix|os)\.system'"
    ):
        build_source(str(tmp_path / "cifar-10-batches-py"))


def _glob(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _short(data: bytes) -> bytes:
    return b"U" + bytes([len(data)]) + data  # a Python 2 str, read as bytes


def _batch_with(array: bytes) -> bytes:
    """A protocol-2 pickle {b'data': <array>, b'labels': []} around hand-written array opcodes."""
    return b"\x80\x02}(" + _short(b"data") + array + _short(b"labels") + b"]u."


def _dtype(name: bytes) -> bytes:
    return _glob("numpy", "dtype") + b"X" + len(name).to_bytes(4, "little") + name + b"\x85R"


HOSTILE = {
    # object dtype with a list of the wrong length as its state: numpy's own __setstate__ would crash
    "object array": _batch_with(
        _glob("numpy.core.multiarray", "_reconstruct")
        + _glob("numpy", "ndarray")
        + b"K\x00\x85"
        + _short(b"b")
        + b"\x87R"
        + b"(K\x01J\xe8\x03\x00\x00\x85"
        + _dtype(b"O")
        + b"\x89]tb"
    ),
    # 100 million uint8 asked for by 190 bytes, never filled
    "huge array": _batch_with(
        _glob("numpy.core.multiarray", "_reconstruct")
        + _glob("numpy", "ndarray")
        + b"J\x00\xe1\xf5\x05\x85"
        + _dtype(b"u1")
        + b"\x87R"
    ),
    # a buffer shorter than its shape
    "short buffer": _batch_with(
        _glob("numpy.core.multiarray", "_reconstruct")
        + _glob("numpy", "ndarray")
        + b"K\x00\x85"
        + _short(b"b")
        + b"\x87R"
        + b"(K\x01J\x00\xe1\xf5\x05\x85"
        + _dtype(b"u1")
        + b"\x89"
        + _short(b"abc")
        + b"tb"
    ),
}


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("object array", "refused dtype 'O': a CIFAR batch holds integer arrays"),
        ("huge array", "refused an array that the file never filled"),
        (
            "short buffer",
            r"refused an array of shape \(100000000,\) whose buffer holds 3 bytes, not 100000000",
        ),
    ],
)
def test_a_crafted_array_is_refused_before_numpy_sees_it(tmp_path, case, message):
    make_download(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(HOSTILE[case])
    with pytest.raises(ValueError, match=f"data_batch_3: not a CIFAR python batch \\({message}"):
        build_source(str(tmp_path / "cifar-10-batches-py"))


def test_a_cut_binary_batch_is_named(tmp_path):
    make_download(tmp_path)
    batch = tmp_path / "cifar-10-batches-bin" / "data_batch_1.bin"
    batch.write_bytes(batch.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"data_batch_1.bin: 61455 bytes is not a whole number of 3073-byte"):
        build_source(str(tmp_path / "cifar-10-batches-bin"))


def test_held_out_split_is_disjoint_stratified_and_fixed():
    train, val = build_source("demo:train#train=0.1"), build_source("demo:train#val=0.1")
    assert len(train) == 1800 and len(val) == 200
    assert not set(train.indices) & set(val.indices)
    labels = build_source("demo:train").y
    assert np.bincount(labels[val.indices], minlength=10).tolist() == [20] * 10
    assert build_source("demo:train#val=0.1").indices == val.indices
    assert val.name == "demo:train#val=0.1" and val.classes == train.classes


def test_val_fraction_makes_the_split_the_run_and_later_commands_read():
    cfg = build_config("demo", ["data.val_fraction=0.1"])
    assert (cfg.data.train, cfg.eval.val) == ("demo:train#train=0.1", "demo:train#val=0.1")
    again = build_config(
        None, [f"data.train={cfg.data.train}", f"eval.val={cfg.eval.val}", "data.val_fraction=0.1"]
    )
    assert again.data.train == "demo:train#train=0.1"  # a saved config is not split twice
    with pytest.raises(ConfigError, match=r"holds out part of data.train as eval.val, but eval.val is given"):
        build_config("demo", ["data.val_fraction=0.1", "eval.val=demo:val"])
    hashed = build_config("demo", ["data.train=/data/set#1", "data.val_fraction=0.1"])
    assert hashed.data.train == "/data/set#1#train=0.1"  # a '#' in the name does not stop the split
    with pytest.raises(ConfigError, match=r"'data.val_fraction' must lie in \[0, 1\); got 1.0"):
        build_config("demo", ["data.val_fraction=1.0"])
    with pytest.raises(ValueError, match="a held-out split is written PATH#train=F or PATH#val=F"):
        build_source("demo:train#val=1.5")
    with pytest.raises(FileNotFoundError, match="data path 'photos#2' does not exist"):
        build_source("photos#2")  # a '#' in a name is a name
