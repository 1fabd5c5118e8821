"""The dataset file on disk: opening it, finding and validating its splits, loading one.

File layout (see docs/interface.md, "Dataset file (HDF5)"):

    /<split>/images   (N, C, H, W) uint8 (0..255) or float32
    /<split>/labels   (N,) integers in [0, num_classes)
    root attrs        num_classes (required); mean, std (optional, scalar or (C,));
                      source, license, created_by (informational)

Splits are `train` (required for training), `val` and `test` (optional).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distcnn import safefile
from distcnn.data.checks import (
    SPLITS,
    _check_finite,
    _check_image_dtype,
    _check_label_range,
    _check_num_classes,
    _check_shapes,
    _norm_stats,
)
from distcnn.data.split import Split
from distcnn.errors import UsageError

# The shipped default dataset (`--data` default): full MNIST. A non-editable install carries it
# as package data (distcnn/_shipped/mnist.h5, see pyproject.toml); a source checkout or an
# editable install has it in the repository's data/ folder.
_INSTALLED_DATASET = Path(__file__).resolve().parent.parent / "_shipped" / "mnist.h5"
_CHECKOUT_DATASET = Path(__file__).resolve().parent.parent.parent / "data" / "mnist.h5"


def default_dataset() -> Path:
    """The shipped MNIST file of this installation (the checkout's path if neither exists)."""
    return _INSTALLED_DATASET if _INSTALLED_DATASET.is_file() else _CHECKOUT_DATASET


DEFAULT_DATASET = default_dataset()


_WHAT = "dataset file"
_FIX = "check the path, or build one with python -m distcnn.data build"
_DAMAGED = "rebuild it with python -m distcnn.data build"


def _open_h5(path: str | os.PathLike) -> h5py.File:
    """Open an existing HDF5 file read-only through distcnn.safefile (special files, data
    outside the file and HDF5 errors refused with one line), or raise UsageError."""
    p = Path(path)
    if not p.exists() and p in (_INSTALLED_DATASET, _CHECKOUT_DATASET):
        raise UsageError(
            "the default dataset mnist.h5 is missing from this distcnn installation: reinstall "
            "from a checkout that has data/mnist.h5 (pip install .), or pass --data FILE.h5"
        )
    return safefile.open_h5(path, _WHAT, _FIX, _DAMAGED)


def _read(ds: h5py.Dataset, path: Path) -> np.ndarray:
    """A whole dataset, size-checked before it is allocated; damage is one line."""
    return safefile.read_dataset(ds, path, _WHAT, _DAMAGED)


def _attr(f: h5py.File, key: str, path: Path) -> Any:
    return safefile.read_attr(f, key, path, _WHAT, "fix or delete the attribute")


def _file_num_classes(f: h5py.File, path: Path) -> int:
    value = _attr(f, "num_classes", path)
    if value is None:
        raise UsageError(
            f"{path} has no root attribute num_classes: set it, or rebuild the file with "
            "python -m distcnn.data build --num-classes K"
        )
    return _check_num_classes(
        value,
        f"root attribute num_classes of {path}",
        "set it to the number of classes",
    )


def _file_splits(f: h5py.File) -> list[str]:
    """Groups at the root that hold images and labels, train/val/test first."""
    # (a name that is not UTF-8, which h5py hands back as bytes, is no split of ours)
    names = [
        k for k in f if isinstance(k, str) and isinstance(f[k], h5py.Group) and "images" in f[k]
    ]
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
    for ds in (images, labels):  # readable at all (a null dataspace, an unknown filter, ...)?
        safefile.check_dataset(ds, path, _WHAT, _DAMAGED, whole=False)
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
    labels = _read(f[split]["labels"], path).astype(np.int64, copy=False)
    _check_label_range(
        labels,
        num_classes,
        f"/{split}/labels",
        "fix the labels or set the root attribute num_classes",
    )
    return labels


@dataclass(frozen=True)
class SplitInfo:
    """What every rank knows of a split before reading any pixel (all of it validated)."""

    path: Path
    name: str
    n: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    dtype: np.dtype  # stored: uint8 or float32
    num_classes: int
    mean: np.ndarray | None  # (C,) float32
    std: np.ndarray | None  # (C,) float32

    @property
    def nbytes(self) -> int:
        """Bytes of the images and labels (int64) in memory."""
        return self.n * (math.prod(self.image_shape) * self.dtype.itemsize + 8)  # exact ints


def _verify_sha(ds: h5py.Dataset, values: np.ndarray, path: Path) -> None:
    """Compare data read whole with the dataset's sha256 attribute (written by data build)."""
    want = _attr(ds, "sha256", path)
    if want is None:  # a file from before the checksums, or made by other tools
        return
    want = want.decode() if isinstance(want, bytes) else str(want)
    if hashlib.sha256(np.ascontiguousarray(values, dtype=ds.dtype)).hexdigest() != want:
        raise UsageError(
            f"{_WHAT} {path}: {ds.name} fails its sha256 checksum (the file is damaged): {_DAMAGED}"
        )


def split_info(path: str | os.PathLike, split: str) -> SplitInfo:
    """Open and validate a split's metadata: num_classes, shapes, dtypes, mean/std (UsageError
    naming the file, the dataset, the bad value and the fix). Pixels and labels are not read."""
    path = Path(path)
    with _open_h5(path) as f:
        num_classes = _file_num_classes(f, path)
        images_ds, _ = _split_datasets(f, path, split)
        c, h, w = (int(s) for s in images_ds.shape[1:])
        mean, std = _norm_stats(_attr(f, "mean", path), _attr(f, "std", path), c, path)
        return SplitInfo(
            path, split, int(images_ds.shape[0]), (c, h, w), np.dtype(images_ds.dtype),
            num_classes, mean, std,
        )  # fmt: skip


def read_split_into(info: SplitInfo, images: np.ndarray, labels: np.ndarray) -> None:
    """Fill images (N, C, H, W) stored dtype and labels (N,) int64 from the file, validating the
    label range and (float32) that every pixel is finite; UsageError otherwise."""
    path, split = info.path, info.name
    with _open_h5(path) as f:
        try:
            labels[...] = _file_labels(f, path, split, info.num_classes)
        except UsageError as exc:
            raise UsageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
        ds = f[split]["images"]
        safefile.verify_chunks(ds, path, _WHAT, _DAMAGED)  # HDF5 hands back damaged chunks
        with safefile.h5_errors(path, _WHAT, _DAMAGED):
            ds.read_direct(images)  # chunk by chunk, no temporary of the whole
        _verify_sha(ds, images, path)
        _verify_sha(f[split]["labels"], labels, path)
    _check_finite(images, f"/{split}/images in {path}")


def load_split(path: str | os.PathLike, split: str) -> Split:
    """Load and validate one split of a dataset file into this process's memory.

    Returns a Split with images (N, C, H, W) as stored (uint8 or float32), labels (N,) int64,
    num_classes and the root attrs mean/std broadcast to (C,). Raises UsageError naming the file,
    the dataset inside it, the bad value and the fix.
    """
    info = split_info(path, split)
    safefile.require_bytes(
        info.nbytes, f"{_WHAT} {info.path}: /{split} ({info.n:,} images of {info.image_shape})",
        "use --data-mode stream, or a smaller split",
    )  # fmt: skip
    images = np.empty((info.n, *info.image_shape), dtype=info.dtype)
    labels = np.empty(info.n, dtype=np.int64)
    read_split_into(info, images, labels)
    return Split(images, labels, info.num_classes, info.mean, info.std)


def _attr_value(value: Any) -> Any:
    """An HDF5 attribute as plain Python (str, number or list)."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def layout_text(images: h5py.Dataset) -> str:
    """How a split's images are stored, for `data info`: e.g. "contiguous, uncompressed"."""
    from distcnn.data.rows import layout_of

    info = layout_of(images)
    text = info["layout"]
    if info["chunk_rows"]:
        text += f" ({info['chunk_rows']} images per chunk)"
    text += ", " + ("+".join(info["filters"]) if info["filters"] else "uncompressed")
    if info["kind"] != "contiguous":
        text += "; random sample reads are slow (rebuild with --storage sample to stream it)"
    return text


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
                raise UsageError(str(exc) if str(path) in str(exc) else f"{path}: {exc}") from None
            # read what is summarised: every chunk decodes (a damaged one is refused here)
            safefile.check_dataset(images, path, _WHAT, _DAMAGED, whole=False)
            safefile.verify_chunks(images, path, _WHAT, _DAMAGED)
            with safefile.h5_errors(path, _WHAT, _DAMAGED):
                _check_finite(images, f"/{name}/images in {path}")
                digest = hashlib.sha256()
                for start in range(0, images.shape[0], 4096):
                    digest.update(np.ascontiguousarray(images[start : start + 4096]))
            want = _attr(images, "sha256", path)
            want = want.decode() if isinstance(want, bytes) else want
            if want is not None and digest.hexdigest() != str(want):
                raise UsageError(
                    f"{_WHAT} {path}: {images.name} fails its sha256 checksum (the file is "
                    f"damaged): {_DAMAGED}"
                )
            _verify_sha(f[name]["labels"], _read(f[name]["labels"], path), path)
            splits[name] = {
                "n": int(images.shape[0]),
                "image_shape": tuple(int(s) for s in images.shape[1:]),
                "dtype": str(images.dtype),
                "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
                "layout": layout_text(images),
            }
        channels = {s["image_shape"][0] for s in splits.values()}
        for c in channels:
            _norm_stats(_attr(f, "mean", path), _attr(f, "std", path), c, path)
        attrs = {k: _attr_value(_attr(f, k, path)) for k in f.attrs if k != "num_classes"}
    return {"path": str(path), "num_classes": num_classes, "splits": splits, "attrs": attrs}
