"""CIFAR-10's binary batches (`data_batch_1.bin` ... `data_batch_5.bin`, `test_batch.bin`).

Each file is a sequence of 3,073-byte records: one label byte (0..9), then the 3,072 pixel bytes
of one 32x32 colour image, channel-major (the 1,024 red values row by row, then green, then
blue) — exactly one (3, 32, 32) uint8 image in C, H, W order. The files are read as raw bytes
(no pickle, nothing executed); a length that is not a whole number of records is refused.

A source names one file, several separated by commas, or a glob pattern (quoted, so the shell
leaves it to us) whose matches are read in name order: `'cifar-10-batches-bin/data_batch_*.bin'`.
"""

from __future__ import annotations

import glob
import os
from pathlib import Path

import numpy as np

from distcnn.errors import UsageError

IMAGE_SHAPE = (3, 32, 32)
RECORD = 1 + 3 * 32 * 32  # label byte + pixels: 3,073 bytes
_CIFAR100_RECORD = 2 + 3 * 32 * 32  # coarse + fine label bytes


def is_cifar_source(spec: str) -> bool:
    """True when every comma-separated part of `spec` names a .bin file (or a .bin pattern)."""
    parts = spec.split(",")
    return all(p.lower().endswith(".bin") for p in parts) and all(parts)


def expand(spec: str) -> list[Path]:
    """The files of a CIFAR source: comma-separated names, each possibly a glob pattern."""
    files: list[Path] = []
    for part in spec.split(","):
        if glob.has_magic(part):
            matches = sorted(glob.glob(part))
            if not matches:
                raise UsageError(
                    f"the pattern {part} matches no file: check the folder, e.g. "
                    "'cifar-10-batches-bin/data_batch_*.bin'"
                )
            files.extend(Path(m) for m in matches)
        else:
            files.append(Path(part))
    for path in files:
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise UsageError(
                f"CIFAR-10 batch {path} {what}: give the .bin files of the binary version "
                "(data_batch_*.bin, test_batch.bin)"
            )
    return files


def read_cifar_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One binary batch -> images (N, 3, 32, 32) uint8 and labels (N,) int64."""
    path = Path(path)
    size = path.stat().st_size
    if size == 0 or size % RECORD:
        hint = ""
        if size and size % _CIFAR100_RECORD == 0:
            hint = " (it is a whole number of 3,074-byte CIFAR-100 records, which are not read)"
        raise UsageError(
            f"{path} has {size:,} bytes, not a positive multiple of the 3,073-byte CIFAR-10 "
            f"record{hint}: give an intact CIFAR-10 binary batch (data_batch_*.bin, test_batch.bin)"
        )
    records = np.fromfile(path, dtype=np.uint8).reshape(-1, RECORD)  # (N, 3073)
    labels = records[:, 0].astype(np.int64)  # (N,)
    images = np.ascontiguousarray(records[:, 1:]).reshape(-1, *IMAGE_SHAPE)  # (N, 3, 32, 32)
    return images, labels


def read_cifar(spec: str) -> tuple[np.ndarray, np.ndarray]:
    """All the batches of a source, concatenated in order: images (N, 3, 32, 32), labels (N,)."""
    parts = [read_cifar_file(p) for p in expand(spec)]
    if len(parts) == 1:
        return parts[0]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    return images, labels
