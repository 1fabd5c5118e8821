"""The dataset file on disk: opening it, finding and validating its splits, loading one.

File layout (see INTERFACE.md, "Dataset file (HDF5)"):

    /<split>/images   (N, C, H, W) uint8 (0..255) or float32
    /<split>/labels   (N,) integers in [0, num_classes)
    root attrs        num_classes (required); mean, std (optional, scalar or (C,));
                      source, license, created_by (informational)

Splits are `train` (required for training), `val` and `test` (optional).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

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

# The shipped default dataset (`--data` default); resolved next to the package in a source checkout.
DEFAULT_DATASET = Path(__file__).resolve().parent.parent.parent / "data" / "mnist.h5"


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
        return self.n * (int(np.prod(self.image_shape)) * self.dtype.itemsize + 8)


def split_info(path: str | os.PathLike, split: str) -> SplitInfo:
    """Open and validate a split's metadata: num_classes, shapes, dtypes, mean/std (UsageError
    naming the file, the dataset, the bad value and the fix). Pixels and labels are not read."""
    path = Path(path)
    with _open_h5(path) as f:
        num_classes = _file_num_classes(f, path)
        images_ds, _ = _split_datasets(f, path, split)
        c, h, w = (int(s) for s in images_ds.shape[1:])
        mean, std = _norm_stats(f.attrs.get("mean"), f.attrs.get("std"), c, path)
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
            raise UsageError(f"{path}: {exc}") from None
        f[split]["images"].read_direct(images)  # chunk by chunk, no temporary of the whole
    _check_finite(images, f"/{split}/images in {path}")


def load_split(path: str | os.PathLike, split: str) -> Split:
    """Load and validate one split of a dataset file into this process's memory.

    Returns a Split with images (N, C, H, W) as stored (uint8 or float32), labels (N,) int64,
    num_classes and the root attrs mean/std broadcast to (C,). Raises UsageError naming the file,
    the dataset inside it, the bad value and the fix.
    """
    info = split_info(path, split)
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
        text += "; random sample reads are slow (rebuild with --layout sample to stream it)"
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
                raise UsageError(f"{path}: {exc}") from None
            _check_finite(images, f"/{name}/images in {path}")
            splits[name] = {
                "n": int(images.shape[0]),
                "image_shape": tuple(int(s) for s in images.shape[1:]),
                "dtype": str(images.dtype),
                "class_counts": np.bincount(labels, minlength=num_classes).tolist(),
                "layout": layout_text(images),
            }
        channels = {s["image_shape"][0] for s in splits.values()}
        for c in channels:
            _norm_stats(f.attrs.get("mean"), f.attrs.get("std"), c, path)
        attrs = {k: _attr_value(v) for k, v in f.attrs.items() if k != "num_classes"}
    return {"path": str(path), "num_classes": num_classes, "splits": splits, "attrs": attrs}
