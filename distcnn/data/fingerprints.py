"""A dataset file's fingerprint: what a run trained on, cheap to compute and the same everywhere.

`fingerprint(path)` returns a JSON-serialisable dict:

    {"version": 1, "num_classes": K,
     "splits": {name: {"n": N, "image_shape": [C, H, W], "dtype": "uint8"|"float32",
                       "hash": "<16 hex>"}, ...},
     "hash": "<16 hex>"}

A split's hash is SHA-256 (first 16 hex digits) over its shape, its dtype, ALL its labels (as
little-endian int64) and a fixed strided sample of its image rows (`SAMPLE_ROWS` rows at
round(linspace(0, N - 1, SAMPLE_ROWS)), as little-endian bytes), so it costs a few dozen chunk
reads whatever N is. The file's hash covers num_classes, mean/std and every split's hash. The
value depends only on the contents (never on the path, the host, the chunking or compression),
so every rank and every host computes the same one for the same data. It is not a proof of
identity: two files that differ only in pixels of unsampled rows have the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distcnn import safefile
from distcnn.data.dataset import _file_num_classes, _file_splits, _open_h5

VERSION = 1
SAMPLE_ROWS = 64  # image rows hashed per split


def _digest(h: Any) -> str:
    return h.hexdigest()[:16]


def sample_rows(n: int) -> np.ndarray:
    """The strided sample of row indices (<= SAMPLE_ROWS, increasing, unique) hashed for N rows."""
    k = min(n, SAMPLE_ROWS)
    return np.unique(np.round(np.linspace(0, n - 1, k)).astype(np.int64))


def _split_fingerprint(group: Any) -> dict[str, Any]:
    images, labels = group["images"], group["labels"]
    n = int(images.shape[0])
    h = hashlib.sha256()
    h.update(json.dumps([list(images.shape), str(images.dtype)]).encode())
    h.update(np.ascontiguousarray(labels[()], dtype="<i8").tobytes())
    if n:
        rows = images[sample_rows(n)]  # (k, C, H, W): one read per sampled row's chunk
        h.update(np.ascontiguousarray(rows, dtype=rows.dtype.newbyteorder("<")).tobytes())
    return {
        "n": n,
        "image_shape": [int(s) for s in images.shape[1:]],
        "dtype": str(images.dtype),
        "hash": _digest(h),
    }


def fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """The fingerprint of the dataset file at `path` (see the module docstring).

    Raises UsageError when the file cannot be opened or has no num_classes; it does not validate
    pixels or labels (load_split does).
    """
    path = Path(path)
    fix = "rebuild it with python -m distcnn.data build"
    with _open_h5(path) as f, safefile.h5_errors(path, "dataset file", fix):
        num_classes = _file_num_classes(f, path)
        names = [name for name in _file_splits(f) if "labels" in f[name]]
        for name in names:  # sizes checked before the labels are read
            safefile.check_dataset(f[name]["labels"], path, "dataset file", fix)
        splits = {name: _split_fingerprint(f[name]) for name in names}
        stats = [
            np.asarray(f.attrs[k], dtype="<f4").reshape(-1).tolist() if k in f.attrs else None
            for k in ("mean", "std")
        ]
    h = hashlib.sha256()
    h.update(json.dumps([num_classes, stats, {k: v["hash"] for k, v in splits.items()}]).encode())
    return {"version": VERSION, "num_classes": num_classes, "splits": splits, "hash": _digest(h)}


def describe(fp: dict[str, Any] | None) -> str:
    """One short line for messages: `train 60000x1x28x28 uint8, test 10000, hash 0123abcd...`."""
    if not fp:
        return "none recorded"
    parts = []
    for name, s in fp.get("splits", {}).items():
        shape = "x".join(str(d) for d in [s["n"], *s["image_shape"]])
        parts.append(f"{name} {shape} {s['dtype']}")
    return f"{', '.join(parts)}, {fp.get('num_classes')} classes, hash {fp.get('hash')}"
