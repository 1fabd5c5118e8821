"""Tests for distcnn.data: source readers -> build -> load_split round trips, Split.batch against
the float64 formula, every bad input (exit code 2, one `error:` line, no traceback), and the
shipped data/mnist.h5."""

from __future__ import annotations

import gzip
import os
import re
import sys
import tracemalloc
import types
from pathlib import Path

import h5py
import numpy as np
import pytest

import distcnn
from distcnn import data
from distcnn.data import DEFAULT_DATASET, Split, load_split, main, read_idx
from distcnn.errors import UsageError

# ---------------------------------------------------------------------------------------------
# Helpers: writers for the source formats and for raw (unvalidated) dataset files
# ---------------------------------------------------------------------------------------------

_IDX_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    """IDX: 0, 0, type code, ndim, big-endian uint32 dims, big-endian data."""
    header = bytes([0, 0, _IDX_CODES[array.dtype], array.ndim])
    header += np.asarray(array.shape, dtype=">u4").tobytes()
    payload = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    path.write_bytes(gzip.compress(payload) if compress else payload)
    return path


def write_csv(path: Path, images: np.ndarray, labels: np.ndarray, header: bool) -> Path:
    """One row per image: flattened pixels then the label; .gz name -> gzip-compressed."""
    flat = images.reshape(len(images), -1)
    rows = []
    if header:
        rows.append(",".join([f"pixel{i}" for i in range(flat.shape[1])] + ["label"]))
    for pixels, label in zip(flat, labels, strict=True):
        rows.append(",".join([f"{v:g}" for v in pixels.tolist()] + [str(label)]))
    text = "\n".join(rows) + "\n"
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def write_raw_h5(path: Path, splits: dict, attrs: dict) -> Path:
    """Dataset file written straight with h5py, bypassing every check (for bad-file tests)."""
    with h5py.File(path, "w") as f:
        for key, value in attrs.items():
            f.attrs[key] = value
        for name, (images, labels) in splits.items():
            f.create_dataset(f"{name}/images", data=images)
            f.create_dataset(f"{name}/labels", data=labels)
    return path


def synthetic(n=12, shape=(1, 5, 5), classes=3, dtype=np.uint8, seed=0):
    """images (n, C, H, W) and labels (n,) int64 covering every class."""
    rng = np.random.default_rng(seed)
    if dtype == np.uint8:
        images = rng.integers(0, 256, size=(n, *shape), dtype=np.uint8)
    else:
        images = rng.standard_normal((n, *shape), dtype=np.float32)
    labels = np.arange(n, dtype=np.int64) % classes
    return images, labels


def run(capsys, argv: list[str]) -> tuple[int, str, str]:
    """main(argv) -> (exit code, stdout, last stderr line); never a traceback on stderr."""
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    return code, out, last


def assert_usage_error(capsys, argv: list[str], *fragments: str) -> str:
    code, _, last = run(capsys, argv)
    assert code == 2, last
    assert last.startswith("error: ")
    for fragment in fragments:
        assert fragment in last
    return last


# ---------------------------------------------------------------------------------------------
# Round trips: source file -> build -> load_split
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_idx_round_trip(tmp_path, capsys, compress, dtype):
    train_x, train_y = synthetic(12, (1, 6, 7), dtype=dtype)
    test_x, test_y = synthetic(5, (1, 6, 7), dtype=dtype, seed=1)
    ext = ".gz" if compress else ""
    sources = []
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        images = write_idx(tmp_path / f"{name}-images{ext}", x[:, 0], compress)  # (N, H, W)
        labels = write_idx(tmp_path / f"{name}-labels{ext}", y.astype(np.uint8), compress)
        sources.append(f"{images},{labels}")
    out = tmp_path / "d.h5"
    code, stdout, _ = run(capsys, ["build", "-o", out, "--train", sources[0], "--test", sources[1]])
    assert code == 0 and "wrote" in stdout
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        split = load_split(out, name)
        assert split.images.dtype == dtype and split.labels.dtype == np.int64
        np.testing.assert_array_equal(split.images, x)
        np.testing.assert_array_equal(split.labels, y)
        assert split.num_classes == 3 and split.mean is None and split.std is None


def test_read_idx_4d_and_int32(tmp_path):
    x = np.arange(2 * 3 * 4 * 5, dtype=np.int32).reshape(2, 3, 4, 5) - 7
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "a", x, False)), x)
    np.testing.assert_array_equal(read_idx(write_idx(tmp_path / "b.gz", x, True)), x)


@pytest.mark.parametrize("header", [False, True])
@pytest.mark.parametrize("suffix", [".csv", ".csv.gz"])
def test_csv_round_trip(tmp_path, capsys, header, suffix):
    x, y = synthetic(10, (1, 4, 4), classes=4)
    src = write_csv(tmp_path / f"train{suffix}", x, y, header)
    out = tmp_path / "d.h5"
    assert run(capsys, ["build", "-o", out, "--train", src])[0] == 0
    split = load_split(out, "train")
    assert split.images.dtype == np.uint8
    np.testing.assert_array_equal(split.images, x)
    np.testing.assert_array_equal(split.labels, y)
    assert split.num_classes == 4


def test_csv_shape_and_float_pixels(tmp_path, capsys):
    x, y = synthetic(8, (3, 2, 4), dtype=np.float32)
    x = np.round(x, 3)  # exact in the %g text, then float32 on both sides
    src = write_csv(tmp_path / "train.csv", x, y, header=False)
    out = tmp_path / "d.h5"
    assert run(capsys, ["build", "-o", out, "--train", src, "--shape", "3,2,4"])[0] == 0
    split = load_split(out, "train")
    assert split.images.dtype == np.float32 and split.image_shape == (3, 2, 4)
    np.testing.assert_array_equal(split.images, x)
    np.testing.assert_array_equal(split.labels, y)


@pytest.mark.parametrize(
    "shape,dtype", [((1, 5, 5), np.uint8), ((3, 4, 4), np.float32), ((2, 3, 3), np.uint8)]
)
def test_npz_round_trip(tmp_path, capsys, shape, dtype):
    x, y = synthetic(9, shape, dtype=dtype)
    stored = x[:, 0] if shape[0] == 1 else x  # (N, H, W) for single-channel
    np.savez(tmp_path / "train.npz", images=stored, labels=y.astype(np.int32))
    out = tmp_path / "d.h5"
    argv = ["build", "-o", out, "--train", tmp_path / "train.npz", "--num-classes", "7"]
    argv += ["--layout", "nchw"]  # (N, 3, 4, 4) and (N, 2, 3, 3) read either way
    assert run(capsys, argv + ["--source", "synthetic", "--license", "CC0"])[0] == 0
    split = load_split(out, "train")
    np.testing.assert_array_equal(split.images, x)
    np.testing.assert_array_equal(split.labels, y)
    assert split.num_classes == 7
    attrs = data.dataset_summary(out)["attrs"]
    assert attrs["source"] == "synthetic" and attrs["license"] == "CC0"
    assert attrs["created_by"].startswith("distcnn.data build -o ")
    assert set(os.listdir(tmp_path)) == {"train.npz", "d.h5"}  # no temporary file left


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_normalize_stores_train_channel_stats(tmp_path, capsys, dtype):
    x, y = synthetic(20, (3, 4, 4), dtype=dtype)
    np.savez(tmp_path / "train.npz", images=x, labels=y)
    np.savez(tmp_path / "val.npz", images=x[:5] // 2 if dtype == np.uint8 else x[:5], labels=y[:5])
    out = tmp_path / "d.h5"
    argv = ["build", "-o", out, "--train", tmp_path / "train.npz", "--normalize"]
    assert run(capsys, argv + ["--val", tmp_path / "val.npz", "--layout", "nchw"])[0] == 0
    x64 = x.astype(np.float64) / (255.0 if dtype == np.uint8 else 1.0)
    split = load_split(out, "val")
    assert split.mean.shape == (3,) and split.mean.dtype == np.float32
    np.testing.assert_allclose(split.mean, x64.mean(axis=(0, 2, 3)), rtol=1e-6)
    np.testing.assert_allclose(split.std, x64.std(axis=(0, 2, 3)), rtol=1e-6)


def test_info_prints_splits_counts_and_attrs(tmp_path, capsys):
    x, y = synthetic(12, (1, 4, 4), classes=3)
    np.savez(tmp_path / "t.npz", images=x, labels=y)
    out = tmp_path / "d.h5"
    argv = ["build", "-o", out, "--train", tmp_path / "t.npz", "--license", "MIT"]
    run(capsys, [*argv, "--layout", "nchw"])
    code, stdout, _ = run(capsys, ["info", out])
    assert code == 0
    assert "3 classes" in stdout and "train" in stdout and "(1, 4, 4)" in stdout
    assert "0:4 1:4 2:4" in stdout and "license: MIT" in stdout
    code, stdout, _ = run(capsys, ["info", out, "--split", "train"])
    assert code == 0 and "12 x (1, 4, 4) uint8" in stdout


def test_write_failure_keeps_previous_file(tmp_path, capsys, monkeypatch):
    x, y = synthetic(6, (1, 3, 3))
    out = tmp_path / "d.h5"
    data.write_dataset(out, {"train": (x, y)}, 3, {"source": "first"})

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(data.build.os, "replace", fail)
    with pytest.raises(UsageError, match="disk full"):
        data.write_dataset(out, {"train": (x[:2], y[:2])}, 3, {"source": "second"})
    assert os.listdir(tmp_path) == ["d.h5"]  # the temporary file is gone
    assert len(load_split(out, "train")) == 6


# ---------------------------------------------------------------------------------------------
# Split.batch
# ---------------------------------------------------------------------------------------------


def reference_batch(split: Split, idx: np.ndarray) -> np.ndarray:
    """The float64 formula: x/255 for uint8 (as stored for float32), then (x - mean)/std."""
    x = split.images[idx].astype(np.float64)  # (B, C, H, W)
    if split.images.dtype == np.uint8:
        x = x / 255.0
    if split.mean is not None:
        mean = split.mean.astype(np.float64)[:, None, None]
        std = split.std.astype(np.float64)[:, None, None]
        x = (x - mean) / std
    return x


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("normalized", [False, True])
def test_batch_matches_float64_formula(dtype, normalized):
    x, y = synthetic(30, (3, 5, 4), dtype=dtype)
    mean = np.array([0.2, 0.5, -0.1], np.float32) if normalized else None
    std = np.array([0.3, 1.7, 0.05], np.float32) if normalized else None
    split = Split(images=x, labels=y, num_classes=3, mean=mean, std=std)
    idx = np.array([29, 0, 7, 7, 15], dtype=np.intp)
    out = np.full((8, 3, 5, 4), 99.0, np.float32)  # larger than the batch
    got = split.batch(idx, out)
    assert got.shape == (5, 3, 5, 4) and got.dtype == np.float32
    assert np.shares_memory(got, out) and got.base is out
    assert (out[5:] == 99.0).all()  # rows past the batch untouched
    np.testing.assert_allclose(got, reference_batch(split, idx), rtol=1e-6, atol=1e-6)
    if dtype == np.float32 and not normalized:
        np.testing.assert_array_equal(got, x[idx])  # passthrough, bit for bit
    fresh = split.batch(idx)  # without out: a new array with the same values
    np.testing.assert_array_equal(fresh, got)


def test_batch_scalar_stats_broadcast_to_channels():
    x, y = synthetic(4, (2, 3, 3))
    split = Split(images=x, labels=y, num_classes=3, mean=np.float32(0.5), std=np.float32(0.25))
    assert split.mean.shape == (2,) and split.std.tolist() == [0.25, 0.25]
    idx = np.arange(4)
    np.testing.assert_allclose(split.batch(idx), reference_batch(split, idx), atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_batch_reuses_buffers_without_allocating(channels):
    """After the first call, batch allocates nothing that grows with the batch (B=400)."""
    x, y = synthetic(800, (channels, 16, 16))
    ones = np.ones(channels, np.float32)
    split = Split(images=x, labels=y, num_classes=3, mean=ones / 2, std=ones)
    idx = np.arange(0, 800, 2, dtype=np.intp)  # (400,)
    out = np.empty((400, channels, 16, 16), np.float32)
    split.batch(idx, out)  # first call sizes the scratch buffers
    tracemalloc.start()
    for _ in range(3):
        split.batch(idx, out)
        split.batch(idx[:100], out)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # at most NumPy's fixed-size ufunc buffer (64 KiB); one batch of codes would be 8 * out.nbytes/4
    assert peak < 100_000, f"batch allocated {peak} bytes (out is {out.nbytes})"


def test_batch_rejects_bad_index_and_out():
    x, y = synthetic(5, (1, 3, 3))
    split = Split(images=x, labels=y, num_classes=3)
    with pytest.raises(IndexError):
        split.batch(np.array([0, 5]))
    with pytest.raises(IndexError):
        split.batch(np.array([-1]))
    with pytest.raises(ValueError):
        split.batch(np.array([0, 1]), out=np.empty((1, 1, 3, 3), np.float32))
    with pytest.raises(ValueError):
        split.batch(np.array([0]), out=np.empty((1, 1, 3, 3), np.float64))


# ---------------------------------------------------------------------------------------------
# Bad inputs to build
# ---------------------------------------------------------------------------------------------


def _npz(tmp_path, name="bad.npz", **arrays) -> Path:
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def test_build_negative_label(tmp_path, capsys):
    x, y = synthetic(6, (1, 2, 2))
    y[3] = -1
    src = write_csv(tmp_path / "t.csv", x, y, header=False)
    out = tmp_path / "d.h5"
    assert_usage_error(
        capsys,
        ["build", "-o", out, "--train", src],
        "must be in [0, 3); found -1 at index 3: fix the labels",
    )
    assert not out.exists()


def test_build_label_beyond_num_classes(tmp_path, capsys):
    x, y = synthetic(6, (1, 2, 2))
    y[4] = 5
    src = _npz(tmp_path, images=x, labels=y)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src, "--num-classes", "3", "--layout=nchw"],
        "must be in [0, 3); found 5 at index 4",
        "--num-classes",
    )


def test_build_non_integer_label(tmp_path, capsys):
    src = tmp_path / "t.csv"
    src.write_text("1,2,3,4,0\n5,6,7,8,1.5\n")
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src],
        "non-integer label 1.5 at index 1",
    )


@pytest.mark.parametrize(
    "images,labels,fragment",
    [
        (np.zeros((4, 9), np.uint8), np.zeros(4, np.int64), "must be (N, H, W), (N, C, H, W) or"),
        (np.zeros((4, 1, 2, 2, 2), np.uint8), np.zeros(4, np.int64), "or (N, H, W, C)"),
        (np.zeros((4, 3, 3), np.uint8), np.zeros((4, 1), np.int64), "must be 1-D (N,)"),
        (np.zeros((4, 3, 3), np.uint8), np.zeros(3, np.int64), "4 images but labels"),
        (np.zeros((0, 3, 3), np.uint8), np.zeros(0, np.int64), "is empty (N = 0)"),
        (np.zeros((4, 3, 3), np.int64) + 300, np.arange(4) % 2, "outside 0..255"),
        (np.zeros((4, 3, 3), np.uint8), np.array([0.0, 1.0, 0.5, 1.0]), "non-integer label 0.5"),
        (np.zeros((4, 3, 3), np.uint8), np.array(["a", "b", "a", "b"]), "integer class indices"),
    ],
    ids=["2d", "5d", "labels-2d", "n-mismatch", "empty", "int-range", "float-label", "str-label"],
)
def test_build_bad_npz(tmp_path, capsys, images, labels, fragment):
    src = _npz(tmp_path, images=images, labels=labels)
    assert_usage_error(capsys, ["build", "-o", tmp_path / "d.h5", "--train", src], fragment)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_build_non_finite_pixels(tmp_path, capsys, bad):
    x, y = synthetic(5, (1, 3, 3), dtype=np.float32)
    x[2, 0, 1, 1] = bad
    src = _npz(tmp_path, images=x, labels=y)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src, "--layout", "nchw"],
        f"non-finite pixel ({bad}) in image 2",
    )


def test_build_float64_overflowing_float32(tmp_path, capsys):
    x, y = synthetic(5, (1, 3, 3), dtype=np.float32)
    src = _npz(tmp_path, images=x.astype(np.float64) * 1e300, labels=y)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src, "--layout", "nchw"],
        "non-finite pixel",
        "as float32",
    )


@pytest.mark.parametrize("text", ["1,28", "a,b,c", "0,4,4", "1,4,4,1", "-1,4,4"])
def test_build_bad_shape_flag(tmp_path, capsys, text):
    x, y = synthetic(4, (1, 4, 4))
    src = write_csv(tmp_path / "t.csv", x, y, header=False)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src, f"--shape={text}"],
        f"--shape {text} is not C,H,W",
    )


def test_build_shape_pixel_count_mismatch(tmp_path, capsys):
    x, y = synthetic(4, (1, 4, 4))
    src = write_csv(tmp_path / "t.csv", x, y, header=False)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src, "--shape", "2,4,4"],
        "has 32 pixels but the rows",
        "16",
    )


def test_build_non_square_csv_asks_for_shape(tmp_path, capsys):
    x, y = synthetic(4, (1, 3, 4))
    src = write_csv(tmp_path / "t.csv", x, y, header=True)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src],
        "12 pixels",
        "pass --shape C,H,W",
    )


def test_build_ragged_csv(tmp_path, capsys):
    src = tmp_path / "t.csv"
    src.write_text("a,b,c,d,label\n1,2,3,4,0\n1,2,3,4,1\n1,2,3,1\n")
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", src],
        "line 4 has 4 columns but the first row has 5",
    )


def test_build_csv_garbage_and_header_only(tmp_path, capsys):
    src = tmp_path / "t.csv"
    src.write_text("1,2,3,4,0\n1,x,3,4,1\n")
    assert_usage_error(
        capsys, ["build", "-o", tmp_path / "d.h5", "--train", src], "non-numeric value"
    )
    src.write_text("p1,p2,p3,p4,label\n")
    assert_usage_error(capsys, ["build", "-o", tmp_path / "d.h5", "--train", src], "no data rows")


def test_build_missing_and_unknown_sources(tmp_path, capsys):
    out = tmp_path / "d.h5"
    assert_usage_error(
        capsys, ["build", "-o", out, "--train", tmp_path / "nope.csv"], "nope.csv does not exist"
    )
    x, y = synthetic(4, (1, 3, 3))
    images = write_idx(tmp_path / "img.gz", x[:, 0], compress=True)
    assert_usage_error(
        capsys, ["build", "-o", out, "--train", images], "is an IDX file; give its labels file too"
    )
    assert_usage_error(
        capsys,
        ["build", "-o", out, "--train", f"{images},{tmp_path / 'lab'}"],
        "lab does not exist",
    )
    (tmp_path / "x.dat").write_bytes(b"hello world")
    assert_usage_error(
        capsys, ["build", "-o", out, "--train", tmp_path / "x.dat"], "cannot tell the format"
    )
    (tmp_path / "x.npz").write_bytes(b"not a zip")
    assert_usage_error(
        capsys, ["build", "-o", out, "--train", tmp_path / "x.npz"], "cannot read", ".npz"
    )
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "no" / "d.h5", "--train", _npz(tmp_path, images=x, labels=y)],
        "does not exist",
    )


def test_build_corrupt_idx(tmp_path, capsys):
    x, y = synthetic(4, (1, 3, 3))
    images = write_idx(tmp_path / "img", x[:, 0], compress=False)
    labels = write_idx(tmp_path / "lab", y.astype(np.uint8), compress=False)
    images.write_bytes(images.read_bytes()[:-1])  # truncated
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", f"{images},{labels}"],
        "truncated or corrupt",
    )
    images.write_bytes(b"\x01\x02\x08\x03" + bytes(40))  # bad magic
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", f"{images},{labels}"],
        "is not an IDX file",
    )
    write_idx(images, x[:3, 0], compress=False)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", f"{images},{labels}"],
        "3 images but",
        "4 labels",
    )


def test_build_splits_with_different_shapes(tmp_path, capsys):
    a = _npz(tmp_path, "a.npz", images=synthetic(4, (1, 3, 3))[0], labels=np.arange(4) % 2)
    b = _npz(tmp_path, "b.npz", images=synthetic(4, (1, 4, 4))[0], labels=np.arange(4) % 2)
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", a, "--test", b, "--layout", "nchw"],
        "different image shapes",
    )


def test_argparse_errors_exit_2(tmp_path, capsys):
    assert_usage_error(capsys, ["build", "-o", tmp_path / "d.h5"], "--train")
    assert_usage_error(
        capsys,
        ["build", "-o", tmp_path / "d.h5", "--train", "x.csv", "--num-classes", "ten"],
        "invalid int value",
    )
    assert_usage_error(capsys, ["frobnicate"], "invalid choice")
    assert_usage_error(capsys, [], "required")


def test_cli_subprocess_exit_code(tmp_path):
    """The module runs as `python -m distcnn.data` and ends with code 2 and one error line."""
    import subprocess

    proc = subprocess.run(
        [sys.executable, "-m", "distcnn.data", "info", str(tmp_path / "missing.h5")],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Bad dataset files: load_split and `info` both refuse them
# ---------------------------------------------------------------------------------------------

_X = np.zeros((20, 1, 3, 3), np.uint8)  # (N, C, H, W)
_Y = np.arange(20, dtype=np.int64) % 10  # (N,)
_OK = {"num_classes": 10}


def _labels_with(index: int, value: int) -> np.ndarray:
    y = _Y.copy()
    y[index] = value
    return y


def _float_with(index: int, value: float) -> np.ndarray:
    x = np.zeros((20, 1, 3, 3), np.float32)
    x[index, 0, 2, 1] = value
    return x


BAD_FILES = {
    "negative-label": (
        {"train": (_X, _labels_with(17, -1))},
        _OK,
        "labels in /train/labels must be in [0, 10); found -1 at index 17: "
        "fix the labels or set the root attribute num_classes",
    ),
    "label-too-big": (
        {"train": (_X, _labels_with(3, 10))},
        _OK,
        "must be in [0, 10); found 10 at index 3: fix the labels or set the root attribute",
    ),
    "images-3d": ({"train": (_X[:, 0], _Y)}, _OK, "it must be 4-D (N, C, H, W)"),
    "labels-2d": ({"train": (_X, _Y[:, None])}, _OK, "it must be 1-D (N,)"),
    "n-mismatch": ({"train": (_X, _Y[:19])}, _OK, "has 20 images but /train/labels"),
    "empty": ({"train": (_X[:0], _Y[:0])}, _OK, "is empty (N = 0)"),
    "float64-images": ({"train": (_X.astype(np.float64), _Y)}, _OK, "must be uint8 (0..255) or"),
    "float-labels": ({"train": (_X, _Y.astype(np.float32))}, _OK, "integer class indices"),
    "nan": ({"train": (_float_with(13, np.nan), _Y)}, _OK, "non-finite pixel (nan) in image 13"),
    "inf": ({"train": (_float_with(4, -np.inf), _Y)}, _OK, "non-finite pixel (-inf) in image 4"),
    "no-num-classes": ({"train": (_X, _Y)}, {}, "no root attribute num_classes"),
    "num-classes-1": ({"train": (_X, _Y % 1)}, {"num_classes": 1}, "integer >= 2"),
    "num-classes-str": ({"train": (_X, _Y)}, {"num_classes": "ten"}, "integer >= 2"),
    "std-zero": (
        {"train": (_X, _Y)},
        {"num_classes": 10, "mean": 0.1, "std": 0.0},
        "every std must be > 0",
    ),
    "std-negative": (
        {"train": (_X, _Y)},
        {"num_classes": 10, "mean": [0.1], "std": [-1.0]},
        "must be > 0",
    ),
    "mean-length": (
        {"train": (_X, _Y)},
        {"num_classes": 10, "mean": [0.1, 0.2], "std": [0.3, 0.3]},
        "one per channel",
    ),
    "std-missing": ({"train": (_X, _Y)}, {"num_classes": 10, "mean": 0.1}, "set both or neither"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_dataset_file(tmp_path, capsys, case):
    splits, attrs, message = BAD_FILES[case]
    path = write_raw_h5(tmp_path / "bad.h5", splits, attrs)
    with pytest.raises(UsageError) as info:
        load_split(path, "train")
    assert message in str(info.value) and str(path) in str(info.value)
    assert_usage_error(capsys, ["info", path], message, str(path))
    assert_usage_error(capsys, ["info", path, "--split", "train"], message)


def test_missing_split_lists_the_splits(tmp_path, capsys):
    path = write_raw_h5(tmp_path / "d.h5", {"train": (_X, _Y), "test": (_X, _Y)}, _OK)
    message = "has no split 'val' (splits in the file: train, test)"
    with pytest.raises(UsageError, match=r"no split 'val' \(splits in the file: train, test\)"):
        load_split(path, "val")
    assert_usage_error(capsys, ["info", path, "--split", "val"], message)


def test_missing_file_and_not_hdf5(tmp_path, capsys):
    missing = tmp_path / "missing.h5"
    with pytest.raises(UsageError, match="does not exist"):
        load_split(missing, "train")
    assert_usage_error(capsys, ["info", missing], f"dataset file {missing} does not exist")
    text = tmp_path / "notes.h5"
    text.write_text("hello")
    with pytest.raises(UsageError, match="is not an HDF5 file"):
        load_split(text, "train")
    assert_usage_error(capsys, ["info", text], f"{text} is not an HDF5 file")
    assert_usage_error(capsys, ["info", tmp_path], "is a directory")


# ---------------------------------------------------------------------------------------------
# info on a checkpoint file
# ---------------------------------------------------------------------------------------------


def _fake_checkpoint(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["format_version"] = 1
        f.attrs["step"] = 42
        f.create_dataset("model/conv1.weight", data=np.zeros((16, 1, 3, 3), np.float32))
    return path


def test_info_checkpoint_uses_checkpoint_summarize(tmp_path, capsys, monkeypatch):
    fake = types.ModuleType("distcnn.checkpoint")
    fake.summarize = lambda path: f"CHECKPOINT SUMMARY of {Path(path).name}"
    monkeypatch.setitem(sys.modules, "distcnn.checkpoint", fake)
    monkeypatch.setattr(distcnn, "checkpoint", fake, raising=False)
    code, out, _ = run(capsys, ["info", _fake_checkpoint(tmp_path / "ckpt-00000042.h5")])
    assert code == 0 and "CHECKPOINT SUMMARY of ckpt-00000042.h5" in out


def test_info_checkpoint_fallback_without_module(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "distcnn.checkpoint", None)  # import fails
    monkeypatch.delattr(distcnn, "checkpoint", raising=False)
    code, out, _ = run(capsys, ["info", _fake_checkpoint(tmp_path / "ckpt-00000042.h5")])
    assert code == 0
    assert "step: 42" in out and "conv1.weight: (16, 1, 3, 3) float32" in out


# ---------------------------------------------------------------------------------------------
# The shipped dataset
# ---------------------------------------------------------------------------------------------


# The published label counts of MNIST (training set, then t10k).
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_shipped_mnist_is_the_full_set_with_its_credit():
    assert DEFAULT_DATASET == Path(__file__).resolve().parent.parent / "data" / "mnist.h5"
    summary = data.dataset_summary(DEFAULT_DATASET)
    assert summary["num_classes"] == 10 and list(summary["splits"]) == ["train", "test"]
    train, test = summary["splits"]["train"], summary["splits"]["test"]
    assert train["n"] == 60_000 and test["n"] == 10_000
    assert train["image_shape"] == test["image_shape"] == (1, 28, 28)
    assert train["dtype"] == test["dtype"] == "uint8"
    assert train["class_counts"] == MNIST_TRAIN_COUNTS
    assert test["class_counts"] == MNIST_TEST_COUNTS
    attrs = summary["attrs"]
    assert "Yann LeCun and Corinna Cortes" in attrs["source"]
    assert "CC BY-SA 3.0" in attrs["license"]
    np.testing.assert_allclose(attrs["mean"], [0.1307], atol=1e-4)  # the well-known statistics
    np.testing.assert_allclose(attrs["std"], [0.3081], atol=1e-4)
    assert DEFAULT_DATASET.stat().st_size < 15_000_000


def test_shipped_mnist_records_no_folder():
    """Provenance names files, never a directory of the machine it was built on."""
    attrs = data.dataset_summary(DEFAULT_DATASET)["attrs"]
    for key in ("created_by", "source", "license"):  # no word starts a path (URLs are fine)
        assert not re.search(r"(?:^|[\s'\"=,])(?:/|~|\.\.|[A-Za-z]:\\)", attrs[key]), key
    words = attrs["created_by"].split()
    assert words[:4] == ["distcnn.data", "build", "-o", "mnist.h5"]
    sources = [words[words.index(flag) + 1] for flag in ("--train", "--test")]
    assert sources == [
        "train-images-idx3-ubyte.gz,train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz,t10k-labels-idx1-ubyte.gz",
    ]


# The MNIST distribution's IDX files, if the environment says where they are.
MNIST_DIR = os.environ.get("DISTCNN_MNIST_DIR", "")
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


@pytest.mark.skipif(
    not (MNIST_DIR and all((Path(MNIST_DIR) / f).is_file() for f in MNIST_FILES)),
    reason="set DISTCNN_MNIST_DIR to a folder holding the four MNIST IDX .gz files to compare "
    "data/mnist.h5 with them",
)
def test_shipped_mnist_equals_the_idx_files_pixel_for_pixel():
    """data/mnist.h5 holds exactly the pixels and labels of the IDX files, in their order."""
    src = Path(MNIST_DIR)
    with h5py.File(DEFAULT_DATASET, "r") as f:
        for split, prefix in (("train", "train"), ("test", "t10k")):
            images = read_idx(src / f"{prefix}-images-idx3-ubyte.gz")  # (N, 28, 28) uint8
            labels = read_idx(src / f"{prefix}-labels-idx1-ubyte.gz")  # (N,) uint8
            np.testing.assert_array_equal(f[split]["images"][:, 0], images)
            np.testing.assert_array_equal(f[split]["labels"][()], labels)
