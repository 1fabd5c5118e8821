"""Writing dataset files (atomically) and the per-channel statistics `build --normalize` stores."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import h5py
import numpy as np

from distcnn.data.checks import (
    _check_finite,
    _check_image_dtype,
    _check_label_range,
    _check_num_classes,
    _check_shapes,
    _labels_as_int64,
    _norm_stats,
)
from distcnn.errors import UsageError

# The on-disk layouts `build --storage` offers (docs/data.md has the read-throughput figures).
LAYOUTS = ("sample", "compact")


def _checksum(group: h5py.Group) -> None:
    """Attribute sha256 (of the bytes as stored, C order) on a split's images and labels, which
    load_split and data info verify: uncompressed data has no other check against damage."""
    for name in ("images", "labels"):
        ds = group[name]
        ds.attrs["sha256"] = hashlib.sha256(np.ascontiguousarray(ds[()])).hexdigest()


def write_dataset(
    path: str | os.PathLike,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    num_classes: int,
    attrs: dict,
    layout: str = "sample",
) -> None:
    """Write {split: (images (N, C, H, W) uint8/float32, labels (N,) int)} to an HDF5 file.

    Root attrs: num_classes plus `attrs` (e.g. source, license, created_by, mean, std). The file
    is written to a temporary file in the same directory (name not ending in .h5) and moved into
    place with os.replace, so readers never see a half-written file.

    layout (see LAYOUTS): "sample" (the default) stores images contiguous and uncompressed, so
    one sample is one read at a known offset (what --data-mode stream does at every step);
    "compact" stores them gzip-compressed in chunks of ~1 MiB along N, a third of the size for
    MNIST but a chunk's inflation per random sample read. Labels are small and read whole:
    contiguous in "sample", gzip in "compact".
    """
    if layout not in LAYOUTS:
        raise UsageError(f"--storage {layout} is unknown; use one of {', '.join(LAYOUTS)}")
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
                labels = np.asarray(labels).astype(np.int64)
                if layout == "sample":
                    group.create_dataset("images", data=images)  # contiguous, uncompressed
                    group.create_dataset("labels", data=labels)
                    _checksum(group)
                    continue
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
                    data=labels,
                    chunks=(min(len(labels), 1 << 16),),
                    compression="gzip",
                    compression_opts=9,
                )
                _checksum(group)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as exc:
        raise UsageError(f"cannot write {path} ({exc}): check the path and permissions") from None
    finally:
        tmp.unlink(missing_ok=True)


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
