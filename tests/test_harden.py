"""Hostile input (issue #15): every bad file or request is refused up front with exit 2 and one
line naming it — no traceback, no hang, no allocation bomb, nothing silently wrong — and no file
given as input changes. Classes: 1 size before allocation, 4 readers that cannot hang or crash,
5 silently wrong results, 7 the watchdog on evaluate, 9 messages that mislead, 10 the repository
stands alone and runs without MPI."""

from __future__ import annotations

import hashlib
import io
import json
import os
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import ROOT, TINY_SPEC, run_train

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn import safefile
from distcnn.errors import UsageError
from distcnn.model import Model
from distcnn.restore import inference_info

MEAN, STD = 0.25, 0.5  # the tiny datasets' recorded normalisation


# -- helpers ----------------------------------------------------------------------------------


def snapshot(*paths: Path) -> dict[Path, tuple[bytes, int]]:
    """Bytes and mtime of files, to prove a refused command changed none of them."""
    return {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in paths if p.is_file()}


def assert_unchanged(before: dict[Path, tuple[bytes, int]]) -> None:
    for p, (data, mtime) in before.items():
        assert p.read_bytes() == data and p.stat().st_mtime_ns == mtime, p


def last_error(err: str) -> str:
    """The one-line message: stderr's last line, 'error: ...', and no traceback anywhere."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: "), err
    return line


def cli(module: str, *args: str, env: dict | None = None, timeout: float = 60) -> tuple:
    """(exit code, stdout, stderr, seconds) of `python -m module args` in a fresh process."""
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", module, *args],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    return r.returncode, r.stdout, r.stderr, time.perf_counter() - t0


@pytest.fixture
def norm_data(tmp_path: Path) -> Path:
    """tiny 3-class 8x8 uint8 dataset with root mean/std (so dropping them changes results)."""
    from conftest import make_images

    path = tmp_path / "norm.h5"
    datamod.write_dataset(
        path,
        {"train": make_images(60, 3, 8, 1), "test": make_images(30, 3, 8, 2)},
        3,
        {"mean": np.float32(MEAN), "std": np.float32(STD)},
    )
    return path


def make_ck(path: Path, data: Path, record: bool = True, scale: float = 1.0) -> Path:
    """A TINY_SPEC checkpoint for `data` (seeded weights times `scale`), with or without the
    inference record."""
    split = datamod.load_split(data, "train")
    model = Model(TINY_SPEC, split.image_shape, split.num_classes)
    model.init_params(3)
    model.params *= scale
    inference = {}
    if record:
        inference = inference_info(
            split.images.dtype, split.mean, split.std, split.image_shape, split.num_classes
        )
    ck = ckpt.Checkpoint(
        params={k: v.copy() for k, v in model.param_views.items()},
        velocity={k: np.zeros_like(v) for k, v in model.param_views.items()},
        step=7,
        epoch=0,
        offset=0,
        world_size=1,
        seed=3,
        best_val=-1.0,
        num_classes=split.num_classes,
        input_shape=split.image_shape,
        model=TINY_SPEC,
        config={"data": str(data), "model": TINY_SPEC, "seed": 3},
        inference=inference,
    )
    ckpt.save(path, ck)
    return path


@pytest.fixture
def ck_path(tmp_path: Path, norm_data: Path) -> Path:
    return make_ck(tmp_path / "ckpt-00000007.h5", norm_data)


def reference_probs(ck_path: Path, images: np.ndarray) -> np.ndarray:
    """Softmax of Model.forward on (x/255 - MEAN)/STD, computed here by hand."""
    ck = ckpt.load(ck_path)
    model = Model(ck.model, tuple(ck.input_shape), ck.num_classes)
    for name, view in model.param_views.items():
        view[...] = ck.params[name]
    x = ((images.astype(np.float64) / 255.0 - MEAN) / STD).astype(np.float32)
    z = model.forward(x).astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def rewrite_tensor(path: Path, name: str, value: np.ndarray | None = None, **create) -> None:
    """Replace /model/<name> (its sha256 recomputed, so only the content is wrong)."""
    with h5py.File(path, "r+") as f:
        del f["model"][name]
        if value is not None:
            d = f["model"].create_dataset(name, data=value, **create)
            d.attrs["sha256"] = hashlib.sha256(
                np.ascontiguousarray(value).view(np.uint8)
            ).hexdigest()
        else:
            f["model"].create_dataset(name, **create)


def redigest(path: Path, **attrs) -> None:
    """Set root attributes and recompute the attributes digest, as a crafted file would."""
    with h5py.File(path, "r+") as f:
        for k, v in attrs.items():
            f.attrs[k] = v
        plain = {
            k: (
                v.decode() if isinstance(v, bytes) else v.item() if isinstance(v, np.generic) else v
            )
            for k, v in f.attrs.items()
        }
        f.attrs["attrs_sha256"] = ckpt._attrs_digest(plain)


# -- class 4 and 9: special files, data outside the file, damaged HDF5 ------------------------


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "missing"])
def test_special_files_are_named_for_what_they_are(tmp_path, ck_path, kind, capsys):
    from distcnn import evaluate, predict

    target = tmp_path / "thing.h5"
    if kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "device":
        target = Path(os.devnull)
    words = {
        "fifo": "is a named pipe (FIFO), not a regular file",
        "directory": "is a directory, not a file",
        "device": "is a character device, not a regular file",
        "missing": "does not exist",
    }[kind]
    before = snapshot(ck_path)
    t0 = time.perf_counter()
    for call in (
        lambda: evaluate.main([str(target)]),  # as the checkpoint
        lambda: evaluate.main([str(ck_path), "--data", str(target)]),  # as the dataset
        lambda: predict.main([str(ck_path), str(target)]),  # as an image
        lambda: predict.main([str(target), str(ck_path)]),
    ):
        assert call() == 2
        line = last_error(capsys.readouterr().err)
        assert str(target) in line and words in line, line
        assert "no such file" not in line or kind == "missing"
    assert time.perf_counter() - t0 < 20
    assert_unchanged(before)


def _fifo_outside(tmp_path: Path, how: str, data: Path) -> Path:
    """A copy of `data` whose /test/images lives outside the file, in a FIFO nobody writes."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    bad = tmp_path / f"{how}.h5"
    bad.write_bytes(data.read_bytes())
    with h5py.File(bad, "r+") as f:
        shape = f["test/images"].shape
        del f["test/images"]
        if how == "external-link":
            f["test/images"] = h5py.ExternalLink(str(fifo), "/images")
        elif how == "external-storage":
            f.create_dataset("test/images", shape, "u1", external=[(str(fifo), 0, 1 << 30)])
        else:  # virtual
            layout = h5py.VirtualLayout(shape, "u1")
            layout[...] = h5py.VirtualSource(str(fifo), "images", shape, "u1")
            f.create_virtual_dataset("test/images", layout)
    return bad


@pytest.mark.parametrize("how", ["external-link", "external-storage", "virtual"])
def test_data_outside_the_file_is_refused_without_hanging(tmp_path, ck_path, norm_data, how):
    """Before: every rank blocked forever opening the FIFO. Now: exit 2 within seconds."""
    bad = _fifo_outside(tmp_path, how, norm_data)
    before = snapshot(bad, ck_path)
    code, out, err, secs = cli("distcnn.evaluate", str(ck_path), "--data", str(bad), timeout=60)
    assert code == 2, err
    line = last_error(err)
    words = {"external-link": "is an external link to another file",
             "external-storage": "keeps its data in external raw files",
             "virtual": "is a virtual dataset"}[how]  # fmt: skip
    assert str(bad) in line and "/test/images" in line and words in line, line
    assert secs < 30
    assert_unchanged(before)


def test_checkpoint_tensor_as_external_link_is_refused(tmp_path, ck_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with h5py.File(ck_path, "r+") as f:
        del f["model/fc1.bias"]
        f["model/fc1.bias"] = h5py.ExternalLink(str(fifo), "/x")
    with pytest.raises(ckpt.CheckpointError, match="/model/fc1.bias is an external link"):
        ckpt.load(ck_path)


def _patch_filter_id(path: Path, old: int, new: int) -> None:
    """Rewrite the filter id in a dataset's pipeline message (object header v1, no checksum)."""
    raw = bytearray(path.read_bytes())
    name = raw.find(b"lzf\0")
    at = raw.rfind(struct.pack("<H", old), 0, name)
    assert name > 0 and name - at < 16
    raw[at : at + 2] = struct.pack("<H", new)
    path.write_bytes(bytes(raw))


def test_damaged_hdf5_each_gets_one_line(tmp_path, ck_path, norm_data, capsys):
    """Null dataspace, an unknown filter, a corrupted chunk, unwritten chunks, a huge attribute:
    each refused by name (before: tracebacks, or zeros read as data)."""
    from distcnn import evaluate

    cases = {}
    null = tmp_path / "null.h5"
    null.write_bytes(norm_data.read_bytes())
    with h5py.File(null, "r+") as f:
        del f["test/images"]
        f["test/images"] = h5py.Empty("u1")
    cases[null] = "/test/images has a null dataspace"

    filt = tmp_path / "filter.h5"
    filt.write_bytes(norm_data.read_bytes())
    with h5py.File(filt, "r+") as f:
        a = f["test/images"][()]
        del f["test/images"]
        f.create_dataset("test/images", data=a, chunks=(10, 1, 8, 8), compression="lzf")
    _patch_filter_id(filt, 32000, 32999)
    cases[filt] = "is compressed with HDF5 filter 32999"

    chunk = tmp_path / "chunk.h5"
    with h5py.File(norm_data) as src, h5py.File(chunk, "w") as f:
        for k, v in src.attrs.items():
            f.attrs[k] = v
        for s in ("train", "test"):
            f.create_dataset(f"{s}/labels", data=src[f"{s}/labels"][()])
            a = np.random.default_rng(0).integers(0, 255, src[f"{s}/images"].shape, np.uint8)
            f.create_dataset(f"{s}/images", data=a, chunks=(10, 1, 8, 8), compression="gzip")
        offset = f["test/images"].id.get_chunk_info(1).byte_offset
    raw = bytearray(chunk.read_bytes())
    raw[offset + 8 : offset + 40] = bytes(32)  # inside the deflate stream of one chunk
    chunk.write_bytes(bytes(raw))
    cases[chunk] = "/test/images has a damaged chunk at (10, 0, 0, 0)"

    holes = tmp_path / "holes.h5"
    holes.write_bytes(norm_data.read_bytes())
    with h5py.File(holes, "r+") as f:
        shape = f["test/images"].shape
        del f["test/images"]
        d = f.create_dataset("test/images", shape, "u1", chunks=(10, 1, 8, 8))
        d[:10] = 1  # one chunk of three written
    cases[holes] = "/test/images, declared (30, 1, 8, 8) uint8 (1.88 KiB), holds 1 of its 3"

    attr = tmp_path / "attr.h5"
    with h5py.File(norm_data) as src, h5py.File(attr, "w", libver="latest") as f:
        for name in ("train/images", "train/labels", "test/images", "test/labels"):
            f[name] = src[name][()]
        f.attrs["num_classes"] = 3
        f.attrs["mean"] = np.zeros(5 << 20, np.float32)  # 20 MiB of "mean" (dense storage)
        f.attrs["std"] = np.float32(1)
    cases[attr] = "attribute 'mean' declares 20 MiB"

    for path, words in cases.items():
        before = snapshot(path)
        t0 = time.perf_counter()
        assert evaluate.main([str(ck_path), "--data", str(path)]) == 2, path
        line = last_error(capsys.readouterr().err)
        assert str(path) in line and words in line, line
        assert "\n" not in line and time.perf_counter() - t0 < 10
        assert_unchanged(before)


def test_data_info_reads_what_it_summarises(tmp_path, norm_data, capsys):
    """A chunk whose deflate stream is damaged (HDF5 itself returns it as other pixels) and
    images of another split in a file whose num_classes is absurd: data info refuses both
    (before: reported as fine / a MemoryError)."""
    bad = tmp_path / "bad.h5"
    with h5py.File(norm_data) as src, h5py.File(bad, "w") as f:
        for k, v in src.attrs.items():
            f.attrs[k] = v
        for name in ("train/images", "train/labels", "test/images", "test/labels"):
            f.create_dataset(name, data=src[name][()], chunks=True, compression="gzip")
        info = f["train/images"].id.get_chunk_info(0)
    raw = bytearray(bad.read_bytes())
    raw[info.byte_offset + info.size - 6] ^= 0x55  # inside the stream, near its checksum
    bad.write_bytes(bytes(raw))
    before = snapshot(bad)
    assert datamod.main(["info", str(bad)]) == 2
    line = last_error(capsys.readouterr().err)
    assert f"{bad}: /train/images has a damaged chunk at (0, 0, 0, 0)" in line, line
    huge = tmp_path / "classes.h5"
    huge.write_bytes(norm_data.read_bytes())
    with h5py.File(huge, "r+") as f:
        f.attrs["num_classes"] = 10**9
    for call in (["info", str(huge)], ["info", str(huge), "--split", "test"]):
        assert datamod.main(call) == 2
        line = last_error(capsys.readouterr().err)
        assert "is 1,000,000,000, more than the 65,536 classes distcnn supports" in line, line
    assert_unchanged(before)


def test_locked_file_is_not_called_damaged(tmp_path, ck_path):
    """A dataset another process has open for writing: wait, do not rebuild."""
    code = (
        "import h5py, sys, time\n"
        "f = h5py.File(sys.argv[1], 'a')\n"
        "print('open', flush=True)\n"
        "time.sleep(60)\n"
    )
    data = tmp_path / "busy.h5"
    data.write_bytes(Path(ckpt.load(ck_path).config["data"]).read_bytes())
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(data)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "open"
        with pytest.raises(UsageError) as e:
            datamod.load_split(data, "test")
    finally:
        holder.kill()
        holder.wait()
    msg = str(e.value)
    assert "is locked by another process" in msg and "rebuild" not in msg
    assert "HDF5_USE_FILE_LOCKING=FALSE" in msg


def test_unreadable_file_says_permission(tmp_path, monkeypatch):
    """(Simulated: the suite may run as root, who reads any file.)"""
    f = tmp_path / "secret.h5"
    f.write_bytes(b"x")
    real_open = os.open

    def deny(path, *a, **k):
        if str(path) == str(f):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr(os, "open", deny)
    with pytest.raises(UsageError) as e:
        safefile.check_file(f, "checkpoint")
    assert str(e.value) == (
        f"checkpoint {f} is not readable (permission denied): chmod u+r it, or run as a user "
        "who may read it"
    )


# -- class 1: sizes before allocation ----------------------------------------------------------


def test_checkpoint_tensor_declared_huge_is_refused_before_reading(ck_path):
    """A parameter declared (10^6, 10^6) float32 = 3.6 TiB in a file of a few KB."""
    rewrite_tensor(ck_path, "fc1.weight", shape=(10**6, 10**6), dtype="f4", chunks=(1000, 1000))
    t0 = time.perf_counter()
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load(ck_path)
    assert "/model/fc1.weight, declared (1000000, 1000000) float32, needs 3.64 TiB" in str(e.value)
    assert "4,000,000,000,000 bytes" in str(e.value)
    assert time.perf_counter() - t0 < 5


def test_model_implied_by_checkpoint_is_sized_first(ck_path):
    """num_classes = 10^9 with small tensors: the model it implies (fc2: 16 x 10^9) is refused
    before it is built, naming the bytes."""
    from distcnn import restore

    redigest(ck_path, num_classes=10**9)
    with pytest.raises(UsageError, match=r"parameters .* needs [0-9.]+ GiB"):
        restore.load_model(ck_path)


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--model", "flatten,dense:1000000000,dense"], "with 68,000,000,003 parameters"),
        (["--batch-size", str(10**12)], "a per-rank batch of 1,000,000,000,000 images"),
    ],
)
@pytest.mark.parametrize("dry", [True, False])
def test_train_refuses_requests_bigger_than_memory(tmp_path, norm_data, flags, words, dry, capsys):
    from distcnn import train

    run = tmp_path / "run"
    args = ["--data", str(norm_data), "--checkpoint-dir", str(run), *flags]
    before = snapshot(norm_data)
    t0 = time.perf_counter()
    assert train.main(args + (["--dry-run"] if dry else [])) == 2
    line = last_error(capsys.readouterr().err)
    assert words in line and "more than the" in line and "bytes" in line, line
    assert time.perf_counter() - t0 < 10
    assert not list(run.glob("*.h5")) if run.exists() else True
    assert_unchanged(before)


def test_dataset_declaring_huge_images_is_refused_before_allocating(tmp_path, capsys):
    """A 3 KB file declaring (10^8, 1, 28, 28) uint8 images (73 GiB): train --dry-run and
    data info refuse it at once, naming the bytes (before: a MemoryError after minutes)."""
    from distcnn import train

    bomb = tmp_path / "bomb.h5"
    with h5py.File(bomb, "w") as f:
        f.attrs["num_classes"] = 10
        f.create_dataset("train/images", (10**8, 1, 28, 28), "u1", chunks=(1000, 1, 28, 28),
                         compression="gzip")  # fmt: skip
        f.create_dataset("train/labels", (10**8,), "i8", chunks=(10**5,), compression="gzip")
    assert bomb.stat().st_size < 10_000
    before = snapshot(bomb)
    t0 = time.perf_counter()
    assert train.main(["--data", str(bomb), "--dry-run"]) == 2
    line = last_error(capsys.readouterr().err)
    # (whichever of its datasets is looked at first: the fingerprint reads the labels)
    assert "declared (100000000" in line and "holds 0 of its" in line, line
    assert datamod.main(["info", str(bomb)]) == 2
    assert "(73 GiB), holds 0 of its 100000 chunks" in last_error(capsys.readouterr().err)
    # chunks that do exist but declare more than memory: the size itself is refused
    with h5py.File(bomb, "r") as f:
        with pytest.raises(UsageError, match=r"needs 73 GiB \(78,400,000,000 bytes\), more"):
            safefile.require_bytes(
                safefile.shape_bytes(f["train/images"].shape, 1), "declared", "fix"
            )
    assert time.perf_counter() - t0 < 10
    assert_unchanged(before)


def test_source_headers_declaring_huge_arrays_are_refused(tmp_path, capsys):
    """data build: an .npz header claiming 909 TiB, an IDX header whose size overflows int64 to
    0, a gzip bomb — each refused from its header or at the cap, naming the number."""
    out = tmp_path / "out.h5"
    npz = tmp_path / "huge.npz"
    big = 15_625_000_000_000  # (big, 8, 8) uint8 = 909 TiB
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        buf, {"descr": "|u1", "fortran_order": False, "shape": (big, 8, 8)}
    )
    with zipfile.ZipFile(npz, "w") as z:  # a few hundred bytes on disk
        z.writestr("images.npy", buf.getvalue() + bytes(64))
        z.writestr("labels.npy", b"")
    t0 = time.perf_counter()
    assert datamod.main(["build", "-o", str(out), "--train", str(npz)]) == 2
    line = last_error(capsys.readouterr().err)
    assert f"array 'images', declared ({big}, 8, 8) uint8, needs 909 TiB" in line, line

    # IDX: dims 2^16 x 2^16 x 2^16 x 2^16 = 2^64 bytes: their int64 product wraps to 0
    idx = tmp_path / "wrap-idx3-ubyte"
    dims = (1 << 16,) * 4
    with np.errstate(over="ignore"):
        assert int(np.prod(np.array(dims, dtype=np.int64))) == 0  # what the old reader computed
    idx.write_bytes(struct.pack(">BBBB4I", 0, 0, 8, 4, *dims))
    labels = tmp_path / "labels-idx1-ubyte"
    labels.write_bytes(struct.pack(">BBBBI", 0, 0, 8, 1, 0))
    assert datamod.main(["build", "-o", str(out), "--train", f"{idx},{labels}"]) == 2
    line = last_error(capsys.readouterr().err)
    assert "whose header declares" in line and "needs" in line and "bytes" in line, line

    # gzip bomb: a few KB unpacking to 40 MB of CSV zeros, against a 10 MB cap (a tenth of
    # DISTCNN_MAX_BYTES=1e8)
    bomb = tmp_path / "bomb.csv.gz"
    z = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"0," * (1 << 19)
    with open(bomb, "wb") as f:
        for _ in range(40):
            f.write(z.compress(chunk))
        f.write(z.flush())
    os.environ["DISTCNN_MAX_BYTES"] = "1e8"
    try:
        assert datamod.main(["build", "-o", str(out), "--train", str(bomb)]) == 2
    finally:
        del os.environ["DISTCNN_MAX_BYTES"]
    line = last_error(capsys.readouterr().err)
    assert "unpacked) more than 9.54 MiB (10,000,000 bytes" in line, line
    assert "decompression bomb" in line and time.perf_counter() - t0 < 30
    assert not out.exists()


def test_png_declared_huge_is_refused_from_its_header(tmp_path, ck_path, capsys):
    """A 100000 x 100000 PNG of 67 bytes: refused by its size before any decoding (before:
    DecompressionBombError traceback)."""
    from distcnn import predict

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    png = tmp_path / "huge.png"
    ihdr = struct.pack(">IIBBBBB", 100000, 100000, 8, 0, 0, 0, 0)
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    pytest.importorskip("PIL")
    assert predict.main([str(ck_path), str(png)]) == 2
    line = last_error(capsys.readouterr().err)
    assert "image " + str(png) + " is 100000x100000 pixels but the model takes 8x8" in line


def test_memory_limit_and_its_env_cap(monkeypatch):
    monkeypatch.setenv("DISTCNN_MAX_BYTES", "1000")
    assert safefile.memory_limit() == 1000
    safefile.require_bytes(1000, "x", "y")
    with pytest.raises(UsageError, match=r"x needs 1001 B \(1,001 bytes\), more than the 1000 B"):
        safefile.require_bytes(1001, "x", "y")
    monkeypatch.setenv("DISTCNN_MAX_BYTES", "lots")
    with pytest.raises(UsageError, match="DISTCNN_MAX_BYTES='lots' is not a number"):
        safefile.memory_limit()
    monkeypatch.delenv("DISTCNN_MAX_BYTES")
    assert safefile.memory_limit() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# -- class 5: silently wrong results ------------------------------------------------------------


def test_predict_normalises_from_the_checkpoint_when_the_dataset_is_gone(
    tmp_path, ck_path, norm_data, capsys
):
    """Before: the recorded dataset missing, the mean/std were dropped without a word."""
    from distcnn import predict

    images = datamod.load_split(norm_data, "test").images[:6]
    npz = tmp_path / "x.npz"
    np.savez(npz, images=images)
    want = reference_probs(ck_path, images)
    norm_data.rename(tmp_path / "moved.h5")  # the path in the checkpoint's config is gone
    assert predict.main([str(ck_path), str(npz), "--json", "--top-k", "3"]) == 0
    res = json.loads(capsys.readouterr().out)
    for i, p in enumerate(res["predictions"]):
        for c, prob in p["top"]:
            assert prob == pytest.approx(want[i, c], rel=1e-5)


def test_old_checkpoint_without_record_and_without_dataset_is_refused(tmp_path, norm_data, capsys):
    from distcnn import predict

    old = make_ck(tmp_path / "old.h5", norm_data, record=False)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=np.zeros((2, 1, 8, 8), np.uint8))
    norm_data.rename(tmp_path / "moved.h5")
    assert predict.main([str(old), str(npz)]) == 2
    line = last_error(capsys.readouterr().err)
    assert "records no input normalisation" in line and str(norm_data) in line
    assert "give --data the dataset it was trained on" in line
    assert predict.main([str(old), str(npz), "--data", str(tmp_path / "moved.h5")]) == 0


def test_sixteen_bit_png_is_scaled_not_binarised(tmp_path, ck_path, norm_data, capsys):
    """A 16-bit PNG holding v * 257 is the 8-bit image v exactly: the same probabilities (before:
    clipped to 0/255)."""
    image = pytest.importorskip("PIL.Image")
    from distcnn import predict

    split = datamod.load_split(norm_data, "test")
    files8, files16 = [], []
    for i in range(3):
        v = split.images[i, 0]
        files8.append(str(tmp_path / f"a{i}.png"))
        files16.append(str(tmp_path / f"b{i}.png"))
        image.fromarray(v).save(files8[-1])
        image.fromarray(v.astype(np.uint16) * 257).save(files16[-1])
        assert image.open(files16[-1]).mode.startswith("I")
    want = reference_probs(ck_path, split.images[:3])
    for files in (files8, files16):
        assert predict.main([str(ck_path), *files, "--json", "--top-k", "3"]) == 0
        res = json.loads(capsys.readouterr().out)
        for i, p in enumerate(res["predictions"]):
            for c, prob in p["top"]:
                assert prob == pytest.approx(want[i, c], rel=1e-4)


def test_transparent_png_is_refused_and_opaque_alpha_is_fine(tmp_path, ck_path, capsys):
    image = pytest.importorskip("PIL.Image")
    from distcnn import predict

    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[..., 3] = 255
    opaque, clear = tmp_path / "opaque.png", tmp_path / "clear.png"
    image.fromarray(rgba).save(opaque)
    rgba[:2, :, 3] = 0
    image.fromarray(rgba).save(clear)
    assert predict.main([str(ck_path), str(opaque), "--json"]) == 0
    got = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    want = reference_probs(ck_path, np.full((1, 1, 8, 8), 200, np.uint8))[0]
    assert got[0][1] == pytest.approx(want.max(), rel=1e-4)
    assert predict.main([str(ck_path), str(clear)]) == 2
    line = last_error(capsys.readouterr().err)
    assert f"image {clear} has 16 of 64 pixels not fully opaque" in line


def test_non_finite_parameters_are_refused_by_every_command(tmp_path, ck_path, capsys):
    """NaN written with a matching checksum (a diverged run): load, evaluate, predict and
    train --resume all refuse it."""
    from distcnn import evaluate, predict, train

    w = ckpt.load(ck_path).params["fc2.weight"].copy()
    w[0, 0] = np.nan
    rewrite_tensor(ck_path, "fc2.weight", w)
    with pytest.raises(ckpt.CheckpointError, match="/model/fc2.weight holds NaN or inf values"):
        ckpt.load(ck_path)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=np.zeros((1, 1, 8, 8), np.uint8))
    before = snapshot(ck_path)
    for call in (
        lambda: evaluate.main([str(ck_path)]),
        lambda: predict.main([str(ck_path), str(npz)]),
        lambda: train.main(["--resume", str(ck_path), "--checkpoint-dir", str(tmp_path / "r")]),
    ):
        assert call() == 2
        line = last_error(capsys.readouterr().err)
        assert "holds NaN or inf values" in line and "use an earlier checkpoint" in line
    assert_unchanged(before)


def test_evaluate_json_is_strict_when_the_loss_overflows(tmp_path, norm_data, capsys):
    """Finite but enormous weights: the loss is inf/NaN; --json writes null (before: NaN, which
    strict JSON parsers reject)."""
    from distcnn import evaluate

    big = make_ck(tmp_path / "big.h5", norm_data, scale=1e18)
    assert evaluate.main([str(big), "--json"]) == 0
    out = capsys.readouterr().out

    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    res = json.loads(out, parse_constant=refuse)
    assert res["loss"] is None and res["samples"] == 30


# -- class 7: evaluate has the watchdog ----------------------------------------------------------


@pytest.mark.mpi
def test_evaluate_with_a_stopped_rank_ends_naming_it(ck_path):
    """Before: rank 0 spun in the evaluation allreduce forever."""
    env = {"DISTCNN_FAULT": "1:1:hang"}
    t0 = time.perf_counter()
    r = run_train(
        [str(ck_path), "--collective-timeout", "3"],
        ranks=2,
        env=env,
        timeout=90,
        module="distcnn.evaluate",
    )
    assert r.returncode != 0
    assert "ranks that did not arrive: 1." in r.stderr, r.stderr
    assert time.perf_counter() - t0 < 60


# -- class 10: the repository stands alone; no MPI needed for one process ----------------------

NO_MPI = {"MPI4PY_LIBMPI": "/nonexistent/libmpi.so"}  # mpi4py then cannot load any MPI library


def test_one_process_runs_without_an_mpi_library(tmp_path, norm_data):
    run = tmp_path / "run"
    code, out, err, _ = cli("distcnn.train", "--data", str(norm_data), "--dry-run", env=NO_MPI)
    assert code == 0 and "Traceback" not in err and "params" in out, err
    code, out, err, _ = cli(
        "distcnn.train", "--data", str(norm_data), "--model", TINY_SPEC, "--max-steps", "3",
        "--batch-size", "20", "--checkpoint-dir", str(run), "--no-progress", env=NO_MPI,
    )  # fmt: skip
    assert code == 0, err
    saved = sorted(run.glob("ckpt-*.h5"))
    assert saved and ckpt.load(saved[-1]).step == 3
    code, out, err, _ = cli("distcnn.evaluate", str(saved[-1]), "--json", env=NO_MPI)
    assert code == 0 and json.loads(out)["samples"] == 30, err


def test_several_ranks_without_an_mpi_library_get_one_line(norm_data):
    env = {**NO_MPI, "PMI_SIZE": "2", "PMI_RANK": "0"}  # as mpirun -n 2 would set
    for module in ("distcnn.train", "distcnn.evaluate"):
        code, out, err, _ = cli(module, "--help", env=env)
        assert code == 2
        line = last_error(err)
        assert "2 ranks were launched but this Python cannot load an MPI library" in line
        assert "pip install 'distcnn[mpi]'" in line and len(err.strip().splitlines()) == 1


def test_the_repository_refers_to_no_file_outside_it():
    """No reference to an interface file that is not in the repository, no machine paths."""
    offenders = []
    for p in [ROOT / "README.md", *ROOT.glob("docs/*.md"), *ROOT.glob("data/*.md"),
              *ROOT.glob("distcnn/*.py"), *ROOT.glob("tests/*.py")]:  # fmt: skip
        text = p.read_text()
        if p.name != "test_harden.py" and ("INTERFACE.md" in text or "/work/" in text):
            offenders.append(p.name)
    assert not offenders
    assert (ROOT / "docs" / "interface.md").is_file()
