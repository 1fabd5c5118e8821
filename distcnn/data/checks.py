"""Checks shared by the readers, the writer and the loader: shapes, dtypes, labels, mean/std.

Every check raises `UsageError` with a one-line message naming the value and the fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distcnn.errors import UsageError

SPLITS = ("train", "val", "test")
IMAGE_DTYPES = (np.dtype(np.uint8), np.dtype(np.float32))
_FINITE_CHECK_ROWS = 4096  # samples per block when scanning float32 images for NaN/inf


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


MAX_CLASSES = 1 << 16  # documented in docs/interface.md ("Limits")


def _check_num_classes(value: Any, name: str, fix: str) -> int:
    """num_classes must be an integer >= 2 (a scalar, possibly a NumPy one)."""
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "iu" or int(arr) < 2:
        raise UsageError(f"{name} is {value!r}; it must be an integer >= 2: {fix}")
    if int(arr) > MAX_CLASSES:  # class counts, logits and the K x K confusion matrix scale with K
        raise UsageError(
            f"{name} is {int(arr):,}, more than the {MAX_CLASSES:,} classes distcnn supports "
            f"(its K x K confusion matrix alone would need {8 * int(arr) ** 2:,} bytes): {fix}"
        )
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
