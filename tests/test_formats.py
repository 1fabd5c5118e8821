"""The formats people have: CIFAR-10 binary batches, NHWC .npz (Keras), and the converter's care
for files: it records file names only, never overwrites a source, and replaces only a dataset it
wrote unless told --force. All on small synthetic files in those formats."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from distcnn.data import dataset_summary, load_split, main


def run(capsys, argv: list) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err.strip().splitlines()[-1] if err.strip() else ""


def refused(capsys, argv: list) -> str:
    """The one error line of a build that must exit 2."""
    code, _, last = run(capsys, argv)
    assert code == 2, last
    assert last.startswith("error: ")
    return last[len("error: ") :]


def images_for(n: int, shape: tuple, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(0, 10, n)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 binary batches
# ---------------------------------------------------------------------------------------------


def write_cifar(path: Path, images: np.ndarray, labels: np.ndarray) -> Path:
    """Records of one label byte + 3,072 pixel bytes (R plane, G plane, B plane, row-major),
    written field by field so the test does not share the reader's reshape."""
    out = bytearray()
    for img, lab in zip(images, labels, strict=True):
        out.append(int(lab))
        for c in range(3):
            for y in range(32):
                out.extend(bytes(int(v) for v in img[c, y]))
    path.write_bytes(bytes(out))
    return path


@pytest.fixture
def cifar_dir(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    x1, y1 = images_for(3, (3, 32, 32), 1)
    x2, y2 = images_for(2, (3, 32, 32), 2)
    xt, yt = images_for(4, (3, 32, 32), 3)
    write_cifar(d / "data_batch_1.bin", x1, y1)
    write_cifar(d / "data_batch_2.bin", x2, y2)
    write_cifar(d / "test_batch.bin", xt, yt)
    return d, np.concatenate([x1, x2]), np.concatenate([y1, y2]), xt, yt


@pytest.mark.parametrize("how", ["glob", "list"])
def test_cifar_batches_build_channel_major_images(tmp_path, capsys, cifar_dir, how):
    d, x, y, xt, yt = cifar_dir
    if how == "glob":
        train = f"{d}/data_batch_*.bin"
    else:
        train = f"{d / 'data_batch_1.bin'},{d / 'data_batch_2.bin'}"
    out = tmp_path / "cifar.h5"
    argv = ["build", "-o", out, "--train", train, "--test", d / "test_batch.bin"]
    code, stdout, _ = run(capsys, [*argv, "--num-classes", "10", "--normalize"])
    assert code == 0
    assert "train 5 x (3, 32, 32) uint8" in stdout
    tr, te = load_split(out, "train"), load_split(out, "test")
    np.testing.assert_array_equal(tr.images, x)  # batch 1 then batch 2, in name order
    np.testing.assert_array_equal(tr.labels, y)
    np.testing.assert_array_equal(te.images, xt)
    np.testing.assert_array_equal(te.labels, yt)
    assert tr.mean.shape == (3,)  # per-channel statistics
    np.testing.assert_allclose(tr.mean, x.mean(axis=(0, 2, 3)) / 255, rtol=1e-6)
    made = dataset_summary(out)["attrs"]["created_by"]
    expected = "data_batch_*.bin" if how == "glob" else "data_batch_1.bin,data_batch_2.bin"
    assert f"--train {expected}" in made.replace("'", "") and str(d) not in made


def test_cifar_pixel_order_is_red_plane_first(tmp_path, capsys):
    """One record with byte k = k % 251: pixel (c, y, x) is byte 1 + c*1024 + y*32 + x."""
    record = bytes([7]) + bytes(k % 251 for k in range(3072))
    (tmp_path / "one.bin").write_bytes(record)
    out = tmp_path / "one.h5"
    assert (
        run(capsys, ["build", "-o", out, "--train", tmp_path / "one.bin", "--num-classes", "10"])[0]
        == 0
    )
    split = load_split(out, "train")
    assert split.labels.tolist() == [7]
    for c, yy, xx in [(0, 0, 0), (0, 0, 31), (0, 1, 0), (1, 0, 0), (2, 31, 31), (1, 17, 5)]:
        assert split.images[0, c, yy, xx] == (c * 1024 + yy * 32 + xx) % 251


@pytest.mark.parametrize(
    "size, fragment",
    [
        (
            3073 * 2 - 1,
            "has 6,145 bytes, not a positive multiple of the 3,073-byte CIFAR-10 record",
        ),
        (0, "has 0 bytes, not a positive multiple"),
        (3074 * 3, "(it is a whole number of 3,074-byte CIFAR-100 records, which are not read)"),
    ],
)
def test_cifar_file_of_the_wrong_size_is_refused(tmp_path, capsys, size, fragment):
    (tmp_path / "data_batch_1.bin").write_bytes(bytes(size))
    out = tmp_path / "d.h5"
    msg = refused(capsys, ["build", "-o", out, "--train", tmp_path / "data_batch_1.bin"])
    assert fragment in msg and msg.endswith(
        ": give an intact CIFAR-10 binary batch (data_batch_*.bin, test_batch.bin)"
    )
    assert not out.exists()


def test_cifar_missing_files_patterns_and_archives(tmp_path, capsys):
    out = tmp_path / "d.h5"
    msg = refused(capsys, ["build", "-o", out, "--train", f"{tmp_path}/data_batch_*.bin"])
    assert msg == (
        f"the pattern {tmp_path}/data_batch_*.bin matches no file: check the folder, e.g. "
        "'cifar-10-batches-bin/data_batch_*.bin'"
    )
    msg = refused(capsys, ["build", "-o", out, "--train", tmp_path / "test_batch.bin"])
    assert msg.startswith(f"CIFAR-10 batch {tmp_path / 'test_batch.bin'} does not exist")
    (tmp_path / "cifar-10-binary.tar.gz").write_bytes(b"\x1f\x8b" + bytes(30))
    msg = refused(capsys, ["build", "-o", out, "--train", tmp_path / "cifar-10-binary.tar.gz"])
    assert "is an archive: extract it first (tar xf cifar-10-binary.tar.gz)" in msg


# ---------------------------------------------------------------------------------------------
# .npz stored NHWC (as Keras gives them) or NCHW
# ---------------------------------------------------------------------------------------------


def test_npz_nhwc_is_read_as_nhwc_not_misread(tmp_path, capsys):
    """(N, 32, 32, 3) can only be NHWC: it becomes (N, 3, 32, 32) with each pixel in place."""
    x, y = images_for(6, (3, 32, 32), 4)
    np.savez(tmp_path / "keras.npz", images=x.transpose(0, 2, 3, 1), labels=y)
    out = tmp_path / "d.h5"
    code, stdout, _ = run(capsys, ["build", "-o", out, "--train", tmp_path / "keras.npz"])
    assert code == 0
    assert "read as NHWC (from the shape), images (3, 32, 32)" in stdout
    np.testing.assert_array_equal(load_split(out, "train").images, x)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_npz_layout_flag_and_stored_layout(tmp_path, capsys, layout):
    x, y = images_for(5, (3, 4, 4), 5)  # (N, 3, 4, 4) reads either way
    stored = x if layout == "nchw" else x.transpose(0, 2, 3, 1)
    src = tmp_path / "a.npz"
    np.savez(src, images=stored, labels=y)
    out = tmp_path / "d.h5"
    msg = refused(capsys, ["build", "-o", out, "--train", src])
    assert msg == (
        f"images in {src} has shape {stored.shape}, which reads as (N, C, H, W) or as "
        "(N, H, W, C): pass --layout nchw or --layout nhwc"
    )
    assert run(capsys, ["build", "-o", out, "--train", src, "--layout", layout])[0] == 0
    np.testing.assert_array_equal(load_split(out, "train").images, x)
    assert f"--layout {layout}" in dataset_summary(out)["attrs"]["created_by"]
    # The file may say it itself; a flag that contradicts it is refused.
    np.savez(src, images=stored, labels=y, layout=layout)
    assert run(capsys, ["build", "-o", out, "--train", src])[0] == 0
    np.testing.assert_array_equal(load_split(out, "train").images, x)
    other = "nhwc" if layout == "nchw" else "nchw"
    msg = refused(capsys, ["build", "-o", out, "--train", src, "--layout", other])
    assert msg == (
        f"--layout {other} contradicts the layout '{layout}' stored in {src}: "
        "drop --layout or fix the file"
    )


def test_npz_wide_channel_axis_needs_the_flag(tmp_path, capsys):
    x, y = images_for(2, (16, 6, 6), 6)  # 16 channels: neither end looks like channels
    np.savez(tmp_path / "f.npz", images=x, labels=y)
    msg = refused(capsys, ["build", "-o", tmp_path / "d.h5", "--train", tmp_path / "f.npz"])
    assert msg.endswith(
        "which reads as (N, C, H, W) or as (N, H, W, C): pass --layout nchw or --layout nhwc"
    )
    argv = ["build", "-o", tmp_path / "d.h5", "--train", tmp_path / "f.npz", "--layout", "nchw"]
    assert run(capsys, argv)[0] == 0
    assert load_split(tmp_path / "d.h5", "train").image_shape == (16, 6, 6)


def test_npz_named_arrays_as_keras_saves_them(tmp_path, capsys):
    """Keras's mnist.npz holds x_train, y_train, x_test, y_test: FILE.npz:IMAGES,LABELS."""
    xtr, ytr = images_for(7, (28, 28), 7)
    xte, yte = images_for(3, (28, 28), 8)
    src = tmp_path / "mnist.npz"
    np.savez(src, x_train=xtr, y_train=ytr, x_test=xte, y_test=yte)
    out = tmp_path / "d.h5"
    msg = refused(capsys, ["build", "-o", out, "--train", src])
    assert msg == (
        f"{src} has no array images or labels (it has: x_train, y_train, x_test, y_test): save "
        "it with np.savez(path, images=..., labels=...) or name its arrays as "
        "mnist.npz:IMAGES,LABELS"
    )
    argv = [
        "build",
        "-o",
        out,
        "--train",
        f"{src}:x_train,y_train",
        "--test",
        f"{src}:x_test,y_test",
    ]
    assert run(capsys, argv)[0] == 0
    np.testing.assert_array_equal(load_split(out, "train").images[:, 0], xtr)
    np.testing.assert_array_equal(load_split(out, "test").labels, yte)
    assert "--train mnist.npz:x_train,y_train" in dataset_summary(out)["attrs"]["created_by"]


# ---------------------------------------------------------------------------------------------
# Files the converter does not own
# ---------------------------------------------------------------------------------------------


def test_output_that_is_a_source_is_refused_and_left_alone(tmp_path, capsys, monkeypatch):
    x, y = images_for(4, (5, 5), 9)
    src = tmp_path / "x.npz"
    np.savez(src, images=x, labels=y)
    before = src.read_bytes()
    msg = refused(capsys, ["build", "-o", src, "--train", src])
    assert msg == f"-o {src} is also the --train source: write the dataset to another file"
    monkeypatch.chdir(tmp_path)  # the same file by another name
    msg = refused(capsys, ["build", "-o", "./x.npz", "--train", "x.npz", "--force"])
    assert msg == "-o x.npz is also the --train source: write the dataset to another file"
    assert src.read_bytes() == before


def test_existing_file_is_replaced_only_if_build_wrote_it(tmp_path, capsys):
    x, y = images_for(4, (5, 5), 10)
    src = tmp_path / "x.npz"
    np.savez(src, images=x, labels=y)
    notes = tmp_path / "notes.h5"
    notes.write_text("my notes\n")
    msg = refused(capsys, ["build", "-o", notes, "--train", src])
    assert msg == (
        f"-o {notes} exists and is not a dataset written by python -m distcnn.data build: "
        "choose another file, or pass --force to replace it"
    )
    assert notes.read_text() == "my notes\n"
    other = tmp_path / "other.h5"  # an HDF5 file of someone else's
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    refused(capsys, ["build", "-o", other, "--train", src])
    with h5py.File(other, "r") as f:
        assert list(f) == ["x"]
    code, stdout, _ = run(capsys, ["build", "-o", other, "--train", src, "--force"])
    assert code == 0 and stdout.startswith(f"replaced {other} ")
    # Its own output it rebuilds without --force.
    code, stdout, _ = run(capsys, ["build", "-o", other, "--train", src])
    assert code == 0 and stdout.startswith(f"replaced {other} ")
    assert len(load_split(other, "train")) == 4


def test_created_by_names_files_only(tmp_path, capsys):
    """Absolute source and output paths are recorded as their file names."""
    deep = tmp_path / "some" / "folder"
    deep.mkdir(parents=True)
    x, y = images_for(4, (5, 5), 11)
    np.savez(deep / "t.npz", images=x, labels=y)
    out = deep / "d.h5"
    argv = ["build", "-o", out.resolve(), "--train", (deep / "t.npz").resolve(), "--source", "s x"]
    assert run(capsys, argv)[0] == 0
    made = dataset_summary(out)["attrs"]["created_by"]
    assert made == "distcnn.data build -o d.h5 --train t.npz --storage sample --source 's x'"
