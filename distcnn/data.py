"""Datasets: the HDF5 file that training reads, the readers that build it, and its CLI.

File layout (see INTERFACE.md, "Dataset file (HDF5)"):

    /<split>/images   (N, C, H, W) uint8 (0..255) or float32
    /<split>/labels   (N,) integers in [0, num_classes)
    root attrs        num_classes (required); mean, std (optional, scalar or (C,));
                      source, license, created_by (informational)

Splits are `train` (required for training), `val` and `test` (optional).

`load_split` validates a split and returns a `Split` whose images stay as stored (compact);
`Split.batch` turns sample indices into normalised float32 inputs (B, C, H, W) without
allocating. The readers (`read_idx`, `read_csv`, `read_npz`) turn source files into
images (N, C, H, W) and labels (N,); `write_dataset` writes them atomically.

Command line:

    python -m distcnn.data build -o OUT.h5 --train SRC [--val SRC] [--test SRC] ...
    python -m distcnn.data info FILE [--split NAME]

Every bad input raises `UsageError` with a one-line message naming the value and the fix; the CLI
prints it as `error: <message>` and exits with code 2.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import re
import shlex
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distcnn.errors import ArgumentParser, UsageError

# The shipped default dataset (`--data` default); resolved next to the package in a source checkout.
DEFAULT_DATASET = Path(__file__).resolve().parent.parent / "data" / "mnist.h5"

SPLITS = ("train", "val", "test")
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_FINITE_CHECK_ROWS = 4096  # samples per block when scanning float32 images for NaN/inf

# IDX type codes (third byte of the magic number) -> big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


# ---------------------------------------------------------------------------------------------
# Validation shared by the readers, write_dataset and load_split
# ---------------------------------------------------------------------------------------------


def _check_shapes(images_shape: tuple, labels_shape: tuple, images_name: str, labels_name: str):
    """Images must be (N, C, H, W) with N > 0 and labels (N,)."""
    if len(images_shape) != 4:
        raise UsageError(
            f"{images_name} has shape {tuple(images_shape)}; it must be 4-D (N, C, H, W): "
            "add the channel axis (C=1 for grey images)"
        )
    if len(labels_shape) != 1:
        raise UsageError(
            f"{labels_name} has shape {tuple(labels_shape)}; it must be 1-D (N,): "
            "store one integer class index per image"
        )
    if images_shape[0] != labels_shape[0]:
        raise UsageError(
            f"{images_name} has {images_shape[0]} images but {labels_name} has "
            f"{labels_shape[0]} labels: give exactly one label per image"
        )
    if images_shape[0] == 0:
        raise UsageError(f"{images_name} is empty (N = 0): give at least one image or drop it")
    if min(images_shape[1:]) == 0:
        raise UsageError(
            f"{images_name} has shape {tuple(images_shape)} with a zero-sized axis: "
            "C, H and W must be at least 1"
        )


def _check_image_dtype(dtype: np.dtype, images_name: str) -> None:
    if dtype not in IMAGE_DTYPES:
        raise UsageError(
            f"{images_name} has dtype {dtype}; it must be uint8 (0..255) or float32: "
            "rebuild it with python -m distcnn.data build"
        )


def _check_finite(images: Any, images_name: str) -> None:
    """Scan float images (ndarray or h5py dataset, (N, ...)) block by block for NaN/inf."""
    if np.dtype(images.dtype).kind != "f":
        return
    for start in range(0, images.shape[0], _FINITE_CHECK_ROWS):
        block = np.asarray(images[start : start + _FINITE_CHECK_ROWS])
        bad = ~np.isfinite(block)
        if bad.any():
            where = np.unravel_index(int(np.argmax(bad)), block.shape)
            n = start + int(where[0])
            raise UsageError(
                f"{images_name} has a non-finite pixel ({block[where]}) in image {n}: "
                "replace NaN/inf pixels with finite values"
            )


def _labels_as_int64(labels: np.ndarray, labels_name: str) -> np.ndarray:
    """(N,) labels of any integer dtype (or whole-number floats, as CSV gives) -> int64."""
    if labels.dtype.kind in "iu":
        return labels.astype(np.int64, copy=False)
    if labels.dtype.kind == "f":
        finite = np.isfinite(labels)
        whole = finite & (labels == np.round(np.where(finite, labels, 0)))
        if whole.all():
            return labels.astype(np.int64)
        i = int(np.argmin(whole))
        raise UsageError(
            f"{labels_name} has a non-integer label {labels[i]} at index {i}: "
            "labels must be integer class indices"
        )
    raise UsageError(
        f"{labels_name} has dtype {labels.dtype}; labels must be integer class indices"
    )


def _check_label_range(labels: np.ndarray, num_classes: int, labels_name: str, fix: str) -> None:
    """Labels (N,) int64 must lie in [0, num_classes); `fix` ends the message."""
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        i = int(np.argmax(bad))
        raise UsageError(
            f"labels in {labels_name} must be in [0, {num_classes}); "
            f"found {labels[i]} at index {i}: {fix}"
        )


def _check_num_classes(value: Any, name: str, fix: str) -> int:
    """num_classes must be an integer >= 2 (a scalar, possibly a NumPy one)."""
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu" or int(arr) < 2:
        raise UsageError(f"{name} is {value!r}; it must be an integer >= 2: {fix}")
    return int(arr)


def _norm_vector(value: Any, channels: int, name: str) -> np.ndarray:
    """Root attr `mean` or `std`: a scalar or length 1 or C -> float32 (C,)."""
    arr = np.asarray(value)
    if arr.dtype.kind not in "iuf" or arr.ndim > 1 or arr.size not in (1, channels):
        raise UsageError(
            f"{name} is {value!r}; it must be a number or {channels} numbers (one per channel): "
            "rebuild with python -m distcnn.data build --normalize or delete the attribute"
        )
    vec = np.broadcast_to(arr.astype(np.float32).reshape(-1), (channels,)).copy()  # (C,)
    if not np.isfinite(vec).all():
        raise UsageError(f"{name} is {value!r}; it must be finite: fix or delete the attribute")
    return vec


def _norm_stats(mean: Any, std: Any, channels: int, where: str) -> tuple:
    """Validated (mean, std) as float32 (C,) each, or (None, None)."""
    if mean is None and std is None:
        return None, None
    if mean is None or std is None:
        missing = "mean" if mean is None else "std"
        raise UsageError(
            f"{where} has only one of the attributes mean/std ({missing} is missing): "
            "set both or neither"
        )
    mean_c = _norm_vector(mean, channels, f"attribute mean of {where}")
    std_c = _norm_vector(std, channels, f"attribute std of {where}")
    if (std_c <= 0).any():
        raise UsageError(
            f"attribute std of {where} is {std!r}; every std must be > 0: "
            "fix it or delete mean and std"
        )
    return mean_c, std_c


# ---------------------------------------------------------------------------------------------
# A loaded split and its batches
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Split:
    """One split held in memory, as stored: images (N, C, H, W) uint8 or float32, labels (N,).

    `mean` and `std` are float32 (C,) or None. `batch` turns sample indices into normalised
    float32 inputs; uint8 pixels go through a per-channel 256-entry lookup table.
    """

    images: np.ndarray  # (N, C, H, W) uint8 or float32
    labels: np.ndarray  # (N,) int64
    num_classes: int
    mean: np.ndarray | None = None  # (C,) float32
    std: np.ndarray | None = None  # (C,) float32
    _lut: np.ndarray = field(init=False, repr=False)  # (C*256,) float32, uint8 images only
    _lut_offset: np.ndarray = field(init=False, repr=False)  # (C, 1, 1) intp: c*256
    _scratch: dict = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype not in IMAGE_DTYPES:
            raise ValueError(
                f"images must be (N, C, H, W) uint8 or float32, got "
                f"{self.images.shape} {self.images.dtype}"
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}")
        self.mean, self.std = _norm_stats(self.mean, self.std, self.image_shape[0], "Split")
        channels = self.image_shape[0]
        mean = np.zeros(channels) if self.mean is None else self.mean.astype(np.float64)
        std = np.ones(channels) if self.std is None else self.std.astype(np.float64)
        levels = np.arange(256, dtype=np.float64) / 255.0  # (256,)
        table = (levels[None, :] - mean[:, None]) / std[:, None]  # (C, 256)
        self._lut = table.astype(np.float32).reshape(-1)  # (C*256,)
        self._lut_offset = (np.arange(channels, dtype=np.intp) * 256).reshape(channels, 1, 1)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def _buffer(self, name: str, n: int, dtype: type) -> np.ndarray:
        """Scratch (n, C, H, W) array, allocated once and grown only for a larger batch."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < n:
            buf = np.empty((n, *self.image_shape), dtype=dtype)
            self._scratch[name] = buf
        return buf[:n]

    def batch(self, idx: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """Normalised float32 inputs (len(idx), C, H, W) for the samples `idx` (B,) intp.

        uint8: x/255 then (x - mean)/std, by one gather from the lookup table; float32:
        (x - mean)/std, or as stored without mean/std. With `out` (B_max >= B, C, H, W) float32
        C-contiguous, the result is written into out[:B] and that view is returned; the scratch
        buffers are reused, so repeated calls allocate nothing that grows with B. Not thread-safe.
        """
        idx = np.asarray(idx)
        n = idx.shape[0]
        if out is None:
            out = np.empty((n, *self.image_shape), dtype=np.float32)  # (B, C, H, W)
        elif (
            out.dtype != np.float32
            or out.shape[1:] != self.image_shape
            or out.shape[0] < n
            or not out.flags.c_contiguous
        ):
            raise ValueError(
                f"out must be C-contiguous float32 (>= {n}, {self.image_shape}), got "
                f"{out.dtype} {out.shape}"
            )
        dst = out[:n]  # (B, C, H, W)
        channels = self.image_shape[0]
        if n == 0:
            return dst
        if idx.min() < 0 or idx.max() >= len(self):  # the takes below use mode="clip"
            raise IndexError(f"sample index out of range [0, {len(self)})")
        if self.images.dtype == np.uint8:
            pixels = self._buffer("pixels", n, np.uint8)  # (B, C, H, W)
            np.take(self.images, idx, axis=0, out=pixels, mode="clip")
            codes = self._buffer("codes", n, np.intp)  # (B, C, H, W): c*256 + pixel
            np.copyto(codes, pixels)  # widen in place (np.add would use a cast buffer)
            if channels > 1:  # NumPy may use its fixed-size (64 KiB) ufunc buffer here
                codes += self._lut_offset
            np.take(self._lut, codes, out=dst, mode="clip")
        else:
            np.take(self.images, idx, axis=0, out=dst, mode="clip")
            if self.mean is not None:
                dst -= self.mean.reshape(-1, 1, 1)  # views, no copy
                dst /= self.std.reshape(-1, 1, 1)
        return dst


# ---------------------------------------------------------------------------------------------
# Reading dataset files
# ---------------------------------------------------------------------------------------------


def _open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an existing HDF5 file read-only, or raise UsageError saying what is wrong."""
    p = Path(path)
    if not p.exists():
        raise UsageError(
            f"dataset file {p} does not exist: check the path, or build one with "
            "python -m distcnn.data build"
        )
    if p.is_dir():
        raise UsageError(f"dataset path {p} is a directory: give the .h5 file inside it")
    if not h5py.is_hdf5(p):
        raise UsageError(
            f"{p} is not an HDF5 file: give a dataset built with python -m distcnn.data build"
        )
    try:
        return h5py.File(p, "r")
    except OSError as exc:
        raise UsageError(f"cannot open {p} as HDF5 ({exc}): rebuild the file") from None


def _file_num_classes(f: h5py.File, path: Path) -> int:
    if "num_classes" not in f.attrs:
        raise UsageError(
            f"{path} has no root attribute num_classes: set it, or rebuild the file with "
            "python -m distcnn.data build --num-classes K"
        )
    return _check_num_classes(
        f.attrs["num_classes"],
        f"root attribute num_classes of {path}",
        "set it to the number of classes",
    )


def _file_splits(f: h5py.File) -> list[str]:
    """Groups at the root that hold images and labels, train/val/test first."""
    names = [k for k in f if isinstance(f[k], h5py.Group) and "images" in f[k]]
    return sorted(names, key=lambda s: (SPLITS.index(s) if s in SPLITS else len(SPLITS), s))


def _split_datasets(f: h5py.File, path: Path, split: str) -> tuple[h5py.Dataset, h5py.Dataset]:
    """The (images, labels) datasets of a split, with shapes and dtypes checked."""
    if split not in f or not isinstance(f[split], h5py.Group):
        have = ", ".join(_file_splits(f)) or "none"
        raise UsageError(
            f"{path} has no split '{split}' (splits in the file: {have}): "
            "choose one of those or rebuild the file with it"
        )
    for name in ("images", "labels"):
        if not isinstance(f[split].get(name), h5py.Dataset):
            raise UsageError(
                f"{path} has no dataset /{split}/{name}: rebuild the file with "
                "python -m distcnn.data build"
            )
    images, labels = f[split]["images"], f[split]["labels"]
    images_name, labels_name = f"/{split}/images in {path}", f"/{split}/labels in {path}"
    _check_shapes(images.shape, labels.shape, images_name, labels_name)
    _check_image_dtype(images.dtype, images_name)
    if labels.dtype.kind not in "iu":
        raise UsageError(
            f"{labels_name} has dtype {labels.dtype}; labels must be integer class indices: "
            "store them as integers"
        )
    return images, labels


def _file_labels(f: h5py.File, path: Path, split: str, num_classes: int) -> np.ndarray:
    """(N,) int64 labels of a split, range-checked."""
    labels = f[split]["labels"][()].astype(np.int64, copy=False)
    _check_label_range(
        labels,
        num_classes,
        f"/{split}/labels",
        "fix the labels or set the root attribute num_classes",
    )
    return labels


def load_split(path: str | os.PathLike, split: str) -> Split:
    """Load and validate one split of a dataset file.

    Returns a Split with images (N, C, H, W) as stored (uint8 or float32), labels (N,) int64,
    num_classes and the root attrs mean/std broadcast to (C,). Raises UsageError naming the file,
    the dataset inside it, the bad value and the fix.
    """
    path = Path(path)
    with _open_h5(path) as f:
        num_classes = _file_num_classes(f, path)
        images_ds, _ = _split_datasets(f, path, split)
        try:
            labels = _file_labels(f, path, split, num_classes)
        except UsageError as exc:
            raise UsageError(f"{path}: {exc}") from None
        images = images_ds[()]  # (N, C, H, W)
        _check_finite(images, f"/{split}/images in {path}")
        mean, std = _norm_stats(f.attrs.get("mean"), f.attrs.get("std"), images.shape[1], path)
    return Split(images=images, labels=labels, num_classes=num_classes, mean=mean, std=std)


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute as plain Python (str, number or list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def dataset_summary(path: str | os.PathLike) -> dict:
    """Validated summary of a dataset file.

    Returns {"path", "num_classes", "splits": {name: {"n", "image_shape" (C, H, W), "dtype",
    "class_counts" (num_classes,) list}}, "attrs": {source, license, mean, std, ...}}.
    Checks everything load_split checks, scanning float32 pixels block by block.
    """
    path = Path(path)
    with _open_h5(path) as f:
        num_classes = _file_num_classes(f, path)
        names = _file_splits(f)
        if not names:
            raise UsageError(
                f"{path} has no splits (groups with images and labels): "
                "build it with python -m distcnn.data build"
            )
        splits = {}
        for name in names:
            images, _ = _split_datasets(f, path, name)
            try:
                labels = _file_labels(f, path, name, num_classes)
            except UsageError as exc:
                raise UsageError(f"{path}: {exc}") from None
            _check_finite(images, f"/{name}/images in {path}")
            splits[name] = {
                "n": int(images.shape[0]),
                "image_shape": tuple(int(s) for s in images.shape[1:]),
                "dtype": str(images.dtype),
                "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
            }
        channels = {s["image_shape"][0] for s in splits.values()}
        for c in channels:
            _norm_stats(f.attrs.get("mean"), f.attrs.get("std"), c, path)
        attrs = {k: _attr_value(v) for k, v in f.attrs.items() if k != "num_classes"}
    return {"path": str(path), "num_classes": num_classes, "splits": splits, "attrs": attrs}


# ---------------------------------------------------------------------------------------------
# Writing dataset files
# ---------------------------------------------------------------------------------------------


def write_dataset(
    path: str | os.PathLike,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    attrs: dict,
) -> None:
    """Write {split: (images (N, C, H, W) uint8/float32, labels (N,) int)} to an HDF5 file.

    Root attrs: num_classes plus `attrs` (e.g. source, license, created_by, mean, std). The file
    is written to a temporary file in the same directory (name not ending in .h5) and moved into
    place with os.replace, so readers never see a half-written file. Datasets are chunked along N
    and gzip-compressed.
    """
    path = Path(path)
    num_classes = _check_num_classes(num_classes, "num_classes", "pass --num-classes K (K >= 2)")
    if "train" not in splits:
        raise UsageError("a dataset needs a train split: pass --train SRC")
    if "num_classes" in attrs:
        raise ValueError("pass num_classes as its own argument, not in attrs")
    shapes = {}
    for name, (images, labels) in splits.items():
        images_name, labels_name = f"{name} images", f"{name} labels"
        _check_shapes(images.shape, labels.shape, images_name, labels_name)
        _check_image_dtype(images.dtype, images_name)
        labels = _labels_as_int64(np.asarray(labels), labels_name)
        _check_label_range(labels, num_classes, labels_name, "fix the labels or raise num_classes")
        _check_finite(images, images_name)
        shapes[name] = tuple(images.shape[1:])
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{k} {v}" for k, v in shapes.items())
        raise UsageError(
            f"splits have different image shapes ({listed}): all splits need the same (C, H, W)"
        )
    _norm_stats(attrs.get("mean"), attrs.get("std"), shapes["train"][0], "the dataset")

    directory = path.parent
    if not directory.is_dir():
        raise UsageError(f"output directory {directory} does not exist: create it first")
    if path.is_dir():
        raise UsageError(f"output {path} is a directory: give a file name such as {path}/data.h5")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["num_classes"] = np.int64(num_classes)
            for key, value in attrs.items():
                f.attrs[key] = value
            for name, (images, labels) in splits.items():
                group = f.create_group(name)
                row_bytes = int(np.prod(images.shape[1:])) * images.dtype.itemsize
                rows = max(1, min(images.shape[0], (1 << 20) // row_bytes))  # ~1 MiB chunks
                group.create_dataset(
                    "images",
                    data=images,
                    chunks=(rows, *images.shape[1:]),
                    compression="gzip",
                    compression_opts=9,
                )
                group.create_dataset(
                    "labels",
                    data=np.asarray(labels).astype(np.int64),
                    chunks=(min(len(labels), 1 << 16),),
                    compression="gzip",
                    compression_opts=9,
                )
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc}): check the path and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Source readers: IDX, CSV, npz
# ---------------------------------------------------------------------------------------------


def _read_bytes(path: str | os.PathLike) -> bytes:
    """Whole file, gunzipped if it starts with the gzip magic number."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"source file {p} does not exist: check the path")
    raw = p.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError) as exc:
        raise UsageError(f"{p} is not a valid gzip file ({exc}): re-download it") from None


def _looks_like_idx(head: bytes) -> bool:
    """True if the first 4 bytes are an IDX magic number (0, 0, type code, ndim)."""
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and head[3] > 0


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw, detected by magic number.

    Magic: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions; then one big-endian uint32 per
    dimension and the data. Returns the array in native byte order, e.g. (N, 28, 28) uint8 for
    MNIST images, (N,) uint8 for labels.
    """
    data = _read_bytes(path)
    if not _looks_like_idx(data[:4]):
        raise UsageError(
            f"{path} is not an IDX file (magic {data[:4].hex() or 'missing'}): give MNIST-style "
            "IDX files (.gz or raw), or a .csv/.npz source"
        )
    dtype, ndim = _IDX_DTYPES[data[2]], data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise UsageError(f"{path} has a bad IDX header ({ndim} dimensions): re-download it")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise UsageError(
            f"{path} holds {len(data) - header} data bytes but its header {dims} needs "
            f"{expected}: the file is truncated or corrupt, re-download it"
        )
    array = np.frombuffer(data, dtype=dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _as_image_dtype(images: np.ndarray, name: str) -> np.ndarray:
    """Images of any numeric dtype -> uint8 (integers in 0..255) or float32 (finite)."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind in "iu":
        if images.size and (images.min() < 0 or images.max() > 255):
            raise UsageError(
                f"{name} has integer pixels in [{images.min()}, {images.max()}], outside 0..255: "
                "scale them to 0..255 or store them as floats"
            )
        return images.astype(np.uint8)
    if images.dtype.kind == "f":
        _check_finite(images, name)
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            out = images.astype(np.float32)
        _check_finite(out, f"{name} (as float32)")
        return out
    raise UsageError(f"{name} has dtype {images.dtype}: pixels must be numbers")


def _with_channels(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, C, H, W) unchanged; anything else is an error."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        return images
    raise UsageError(f"{name} has shape {images.shape}; images must be (N, H, W) or (N, C, H, W)")


def _csv_shape(pixels: int, shape: tuple[int, int, int] | None, path: Path) -> tuple:
    """(C, H, W) for rows of `pixels` values: the given shape, or 1 x s x s if square."""
    if shape is not None:
        if int(np.prod(shape)) != pixels:
            c, h, w = shape
            raise UsageError(
                f"--shape {c},{h},{w} has {c * h * w} pixels but the rows of {path} have "
                f"{pixels}: give C,H,W with C*H*W = {pixels}"
            )
        return tuple(shape)
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise UsageError(
            f"rows of {path} have {pixels} pixels, not a square single-channel image: "
            "pass --shape C,H,W"
        )
    return (1, side, side)


def read_csv(
    path: str | os.PathLike, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a .csv or .csv.gz file: one image per row, pixels then the label in the LAST column.

    An optional header row (any non-numeric field in the first line) is skipped. `shape` is
    (C, H, W); by default a single-channel square image. Returns images (N, C, H, W), uint8 if
    every pixel is an integer in 0..255 else float32, and labels (N,) int64.
    """
    path = Path(path)
    try:
        text = _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file: give a CSV file") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if lines:
        try:
            [float(v) for v in lines[0][1].split(",")]
        except ValueError:
            lines = lines[1:]  # header row
    if not lines:
        raise UsageError(f"{path} has no data rows: give at least one image per row")
    columns = lines[0][1].count(",") + 1
    for lineno, line in lines:
        if line.count(",") + 1 != columns:
            raise UsageError(
                f"{path} line {lineno} has {line.count(',') + 1} columns but the first row has "
                f"{columns}: every row needs the same number of pixels plus the label"
            )
    if columns < 2:
        raise UsageError(f"{path} has one column: rows need pixels then the label")
    try:
        table = np.loadtxt(
            io.StringIO("\n".join(line for _, line in lines)),
            delimiter=",",
            dtype=np.float64,
            ndmin=2,
        )  # (N, pixels + 1)
    except ValueError as exc:
        raise UsageError(f"{path} has a non-numeric value ({exc}): fix the file") from None
    labels = _labels_as_int64(table[:, -1], f"the last column of {path}")
    pixels = table[:, :-1]  # (N, pixels)
    c, h, w = _csv_shape(pixels.shape[1], shape, path)
    _check_finite(pixels, f"pixels of {path}")
    if ((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels))).all():
        images = pixels.astype(np.uint8)
    else:
        images = _as_image_dtype(pixels, f"pixels of {path}")
    return images.reshape(-1, c, h, w), labels


def read_npz(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a NumPy .npz with keys `images` ((N, H, W) or (N, C, H, W)) and `labels` ((N,)).

    Returns images (N, C, H, W) as uint8 (integer pixels in 0..255) or float32, labels (N,) int64.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"source file {path} does not exist: check the path")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in ("images", "labels") if k not in npz.files]
            if missing:
                raise UsageError(
                    f"{path} has no array {' or '.join(missing)} (it has: "
                    f"{', '.join(npz.files) or 'nothing'}): save it with "
                    "np.savez(path, images=..., labels=...)"
                )
            images, labels = npz["images"], npz["labels"]
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise UsageError(f"cannot read {path} as .npz ({exc}): give a NumPy .npz file") from None
    return _image_label_pair(
        images,
        labels,
        f"images in {path}",
        f"labels in {path}",
        "store one integer class index per image",
    )


def _image_label_pair(
    images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, C, H, W) uint8/float32 and labels as (N,) int64, or a UsageError."""
    images = _with_channels(images, images_name)
    if labels.ndim != 1:
        raise UsageError(f"{labels_name} have shape {labels.shape}; they must be 1-D (N,): {fix}")
    return _as_image_dtype(images, images_name), _labels_as_int64(labels, labels_name)


def _read_idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """IDX images (N, H, W) or (N, C, H, W) and labels (N,) -> images (N, C, H, W), labels."""
    return _image_label_pair(
        read_idx(images_path),
        read_idx(labels_path),
        f"IDX images {images_path}",
        f"IDX labels {labels_path}",
        "give IMAGES,LABELS in that order",
    )


def read_source(
    spec: str, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a --train/--val/--test source: CSV, .npz, or IDX as `IMAGES,LABELS`.

    Returns images (N, C, H, W) uint8 or float32 and labels (N,) int64. `shape` (C, H, W) lays out
    CSV rows; for other sources it must equal the stored image shape.
    """
    if "," in spec and not Path(spec).exists():
        parts = spec.split(",")
        if len(parts) != 2 or not all(parts):
            raise UsageError(
                f"source {spec!r} is not IMAGES,LABELS: give one file, or two IDX files "
                "separated by one comma"
            )
        images, labels = _read_idx_pair(*parts)
    else:
        path = Path(spec)
        name = path.name.lower()
        if not path.is_file():
            raise UsageError(f"source file {path} does not exist: check the path")
        if name.endswith((".csv", ".csv.gz")):
            return read_csv(path, shape)
        with open(path, "rb") as fh:
            head = fh.read(4)
        if name.endswith(".npz") or head == _ZIP_MAGIC:
            images, labels = read_npz(path)
        elif _looks_like_idx(_read_bytes(path)[:4]):
            raise UsageError(
                f"{path} is an IDX file; give its labels file too: IMAGES,LABELS, e.g. "
                f"--train {path},LABELS"
            )
        else:
            raise UsageError(
                f"cannot tell the format of {path}: use .csv, .csv.gz, .npz or IDX files given "
                "as IMAGES,LABELS"
            )
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise UsageError(
            f"--shape {','.join(map(str, shape))} does not match the images of {spec} "
            f"{tuple(images.shape[1:])}: --shape only lays out CSV rows; drop it for this source"
        )
    return images, labels


def channel_stats(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (population) of images (N, C, H, W) -> float32 (C,) each.

    uint8 pixels are scaled to [0, 1] first (computed exactly from a 256-bin histogram);
    float32 pixels are used as stored (accumulated in float64).
    """
    channels = images.shape[1]
    mean = np.empty(channels, dtype=np.float64)  # (C,)
    std = np.empty(channels, dtype=np.float64)  # (C,)
    for c in range(channels):
        if images.dtype == np.uint8:
            counts = np.bincount(images[:, c].reshape(-1), minlength=256)  # (256,)
            levels = np.arange(256) / 255.0
            total = counts.sum()
            mean[c] = counts @ levels / total
            std[c] = np.sqrt(counts @ (levels - mean[c]) ** 2 / total)
        else:
            x = images[:, c].astype(np.float64)
            mean[c], std[c] = x.mean(), x.std()
    return mean.astype(np.float32), std.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(
            f"--shape {text} is not C,H,W: give three positive integers, e.g. --shape 1,28,28"
        )
    return shape  # type: ignore[return-value]


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m distcnn.data",
        description="Build distcnn HDF5 dataset files and summarise dataset or checkpoint files.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,info}")
    build = sub.add_parser(
        "build",
        help="build an HDF5 dataset from CSV, .npz or IDX files",
        description="SRC is a .csv/.csv.gz file (pixels then the label in the last column, "
        "optional header), a .npz with `images` and `labels`, or IDX files given as "
        "IMAGES,LABELS (.gz or raw).",
    )
    build.add_argument("-o", "--output", required=True, help="output .h5 file")
    build.add_argument("--train", required=True, metavar="SRC", help="training split source")
    build.add_argument("--val", metavar="SRC", help="validation split source")
    build.add_argument("--test", metavar="SRC", help="test split source")
    build.add_argument("--num-classes", type=int, metavar="K", help="default: max label + 1")
    build.add_argument("--shape", metavar="C,H,W", help="image shape of CSV rows")
    build.add_argument(
        "--normalize",
        action="store_true",
        help="store per-channel mean/std of the train split (uint8 scaled to [0,1])",
    )
    build.add_argument("--source", default="", help="where the data comes from (stored)")
    build.add_argument("--license", default="", help="license of the data (stored)")
    info = sub.add_parser("info", help="summarise a dataset or checkpoint file")
    info.add_argument("file", help="dataset or checkpoint .h5 file")
    info.add_argument("--split", help="check and show only this split")
    return parser


def _format_dataset(summary: dict) -> str:
    k = summary["num_classes"]
    size = Path(summary["path"]).stat().st_size
    lines = [f"{summary['path']}: distcnn dataset, {k} classes, {size / 1e6:.2f} MB"]
    lines.append(f"  {'split':<8}{'N':>8}  {'image (C, H, W)':<16}dtype")
    for name, s in summary["splits"].items():
        lines.append(f"  {name:<8}{s['n']:>8}  {str(s['image_shape']):<16}{s['dtype']}")
    lines.append("per-class counts:")
    for name, s in summary["splits"].items():
        counts = " ".join(f"{c}:{n}" for c, n in enumerate(s["class_counts"]))
        lines.append(f"  {name}: {counts}")
    if summary["attrs"]:
        lines.append("attrs:")
        for key, value in summary["attrs"].items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _is_checkpoint(path: Path) -> bool:
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return "format_version" in f.attrs and isinstance(f.get("model"), h5py.Group)
    except (OSError, RuntimeError, KeyError):
        # damaged (e.g. truncated): a checkpoint by its name gets the checkpoint report
        return re.fullmatch(r"ckpt-\d{8,}\.h5|best\.h5", path.name) is not None


def _format_checkpoint(path: Path) -> str:
    """Checkpoint summary from distcnn.checkpoint, or root attrs and /model tensors without it."""
    try:
        from distcnn import checkpoint

        summarize = checkpoint.summarize
    except (ImportError, AttributeError):
        summarize = None
    if summarize is not None:
        return summarize(path)
    lines = [f"{path}: distcnn checkpoint (distcnn.checkpoint unavailable; raw view)", "attrs:"]
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            lines.append(f"  {key}: {_attr_value(value)}")
        lines.append("/model:")
        for name, ds in f["model"].items():
            if isinstance(ds, h5py.Dataset):
                lines.append(f"  {name}: {ds.shape} {ds.dtype}")
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if _is_checkpoint(path):
        text = _format_checkpoint(path)
        print(text)
        return 1 if "checksum status: FAILED" in text else 0
    if args.split is not None:
        split = load_split(path, args.split)
        counts = np.bincount(split.labels, minlength=split.num_classes)
        print(
            f"{path} /{args.split}: {len(split)} x {split.image_shape} {split.images.dtype}, "
            f"{split.num_classes} classes, per class: "
            + " ".join(f"{c}:{n}" for c, n in enumerate(counts.tolist()))
        )
        return 0
    print(_format_dataset(dataset_summary(path)))
    return 0


def _cmd_build(args: argparse.Namespace, argv: list[str]) -> int:
    shape = _parse_shape(args.shape) if args.shape is not None else None
    splits = {}
    for name in SPLITS:
        spec = getattr(args, name)
        if spec is not None:
            images, labels = read_source(spec, shape)
            _check_shapes(images.shape, labels.shape, f"--{name} {spec}", f"labels of {spec}")
            splits[name] = (images, labels)
    if args.num_classes is not None:
        num_classes = _check_num_classes(
            args.num_classes, "--num-classes", "give the number of classes"
        )
    else:
        num_classes = max(int(labels.max()) for _, labels in splits.values()) + 1
        if num_classes < 2:
            raise UsageError(
                f"the labels only use class 0 (max label + 1 = {num_classes}): pass --num-classes K"
            )
    for name, (_, labels) in splits.items():
        fix = "fix the labels"
        if args.num_classes is not None:
            fix += " or pass a larger --num-classes"
        _check_label_range(labels, num_classes, f"--{name} {getattr(args, name)}", fix)
    attrs: dict[str, Any] = {
        "source": args.source,
        "license": args.license,
        "created_by": "distcnn.data build " + shlex.join(argv),
    }
    if args.normalize:
        mean, std = channel_stats(splits["train"][0])
        if (std <= 0).any():
            raise UsageError(
                f"the train images have a constant channel (std {std.tolist()}): drop --normalize"
            )
        attrs["mean"], attrs["std"] = mean, std
    write_dataset(args.output, splits, num_classes, attrs)
    parts = [f"{n} {len(lab)} x {im.shape[1:]} {im.dtype}" for n, (im, lab) in splits.items()]
    size = Path(args.output).stat().st_size
    print(f"wrote {args.output} ({size / 1e6:.2f} MB): {', '.join(parts)}; {num_classes} classes")
    if args.normalize:
        fmt = ", ".join(
            f"{m:.4f}/{d:.4f}" for m, d in zip(attrs["mean"], attrs["std"], strict=True)
        )
        print(f"  per-channel mean/std of train: {fmt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distcnn.data {build,info}`; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "build":
            return _cmd_build(args, argv[1:])
        return _cmd_info(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
