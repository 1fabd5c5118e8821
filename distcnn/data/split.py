"""A split as the trainer sees it: sample indices in, normalised float32 inputs out.

This is the batch interface of the training loop (one object per split, whatever the data
mode). Every kind of split has `labels` (N,) int64 in memory, `num_classes`, `image_shape`
(C, H, W), `mean`/`std`, `len()`, and

    batch(idx, out=None, epoch=0) -> (B, C, H, W) float32   the samples idx (B,) of the split
    prefetch(plan)                                           hint: the index arrays asked next
    close()                                                  release files / shared memory

`batch` gathers the STORED pixels of the samples (how is the only thing that differs between
the kinds), applies the split's `augment` hook to them, then normalises: uint8 through a
per-channel 256-entry lookup table ((x/255 - mean)/std), float32 by (x - mean)/std. The gather
and the normalisation are the same code for every kind, so the batches are bitwise identical.

    Split          images in memory: this process's own array, or a view of a node-wide MPI
                   shared-memory window (distcnn.data.shared)
    SplitView      a subset of another split by row indices (e.g. --val-fraction), no copy
    StreamSplit    images read from the file as needed, prefetched (distcnn.data.stream)

Augmentation hook: `augment(pixels, rows, epoch)` edits pixels (B, C, H, W) in the stored dtype
in place, before normalisation (so a shift can pad with 0, black, for either dtype); rows (B,)
are the samples' row numbers in the file's split, so the augmented sample depends on (seed,
epoch, sample) only, never on the rank count or the data mode. None: no augmentation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distcnn.data.checks import IMAGE_DTYPES, _norm_stats

# augment(pixels (B, C, H, W) stored dtype, in place; rows (B,) int64 file rows; epoch)
Augment = Callable[[np.ndarray, np.ndarray, int], None]


class Batches:
    """The normalised-batch machinery shared by every kind of split (see the module docstring).

    Subclasses set `labels`, `num_classes`, `mean`, `std`, `image_shape`, `dtype` (stored), call
    `_init_batches()`, and implement `_gather(rows, out)`: out[:] = stored pixels of rows.
    """

    labels: np.ndarray
    num_classes: int
    mean: np.ndarray | None
    std: np.ndarray | None
    augment: Augment | None = None

    def _init_batches(self) -> None:
        channels = self.image_shape[0]
        self.mean, self.std = _norm_stats(self.mean, self.std, channels, "Split")
        mean = np.zeros(channels) if self.mean is None else self.mean.astype(np.float64)
        std = np.ones(channels) if self.std is None else self.std.astype(np.float64)
        levels = np.arange(256, dtype=np.float64) / 255.0  # (256,)
        table = (levels[None, :] - mean[:, None]) / std[:, None]  # (C, 256)
        self._lut = table.astype(np.float32).reshape(-1)  # (C*256,)
        self._lut_offset = (np.arange(channels, dtype=np.intp) * 256).reshape(channels, 1, 1)
        self._scratch: dict[str, np.ndarray] = {}

    @property
    def image_shape(self) -> tuple[int, int, int]:
        raise NotImplementedError

    @property
    def dtype(self) -> np.dtype:
        raise NotImplementedError

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        raise NotImplementedError

    def prefetch(self, plan: Iterable[np.ndarray]) -> None:
        """Hint: the index arrays `batch` will be asked for next, in order (in memory: no-op)."""

    def close(self) -> None:
        """Release what the split holds open (in memory: nothing)."""

    def _buffer(self, name: str, n: int, dtype: Any) -> np.ndarray:
        """Scratch (n, C, H, W) array, allocated once and grown only for a larger batch."""
        buf = self._scratch.get(name)
        if buf is None or buf.shape[0] < n:
            buf = np.empty((n, *self.image_shape), dtype=dtype)
            self._scratch[name] = buf
        return buf[:n]

    def batch(self, idx: np.ndarray, out: np.ndarray | None = None, epoch: int = 0) -> np.ndarray:
        """Normalised float32 inputs (len(idx), C, H, W) for the samples `idx` (B,) intp.

        uint8: x/255 then (x - mean)/std, by one gather from the lookup table; float32:
        (x - mean)/std, or as stored without mean/std. With `out` (B_max >= B, C, H, W) float32
        C-contiguous, the result is written into out[:B] and that view is returned; the scratch
        buffers are reused, so repeated calls allocate nothing that grows with B. `epoch` keys
        the augmentation. Not thread-safe.
        """
        return self._batch(np.asarray(idx), out, epoch, self.augment)

    def _batch(
        self, idx: np.ndarray, out: np.ndarray | None, epoch: int, augment: Augment | None
    ) -> np.ndarray:
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
        if n == 0:
            return dst
        if idx.min() < 0 or idx.max() >= len(self):  # the gathers use mode="clip"
            raise IndexError(f"sample index out of range [0, {len(self)})")
        if self.dtype == np.uint8:
            pixels = self._buffer("pixels", n, np.uint8)  # (B, C, H, W)
            self._gather(idx, pixels)
            if augment is not None:
                augment(pixels, idx, epoch)
            codes = self._buffer("codes", n, np.intp)  # (B, C, H, W): c*256 + pixel
            np.copyto(codes, pixels)  # widen in place (np.add would use a cast buffer)
            if self.image_shape[0] > 1:  # NumPy may use its fixed-size (64 KiB) ufunc buffer
                codes += self._lut_offset
            np.take(self._lut, codes, out=dst, mode="clip")
        else:
            self._gather(idx, dst)
            if augment is not None:
                augment(dst, idx, epoch)
            if self.mean is not None:
                dst -= self.mean.reshape(-1, 1, 1)  # views, no copy
                dst /= self.std.reshape(-1, 1, 1)
        return dst

    def subset(self, rows: np.ndarray) -> SplitView:
        """The samples `rows` (M,) of this split as a split of their own (no copy of pixels)."""
        return SplitView(self, rows)


@dataclass(eq=False)
class Split(Batches):
    """One split held in memory, as stored: images (N, C, H, W) uint8 or float32, labels (N,).

    `mean` and `std` are float32 (C,) or None. The images may be this process's own array or a
    read-only view of a shared-memory window (then `owner` keeps the window alive).
    """

    images: np.ndarray  # (N, C, H, W) uint8 or float32
    labels: np.ndarray  # (N,) int64
    num_classes: int
    mean: np.ndarray | None = None  # (C,) float32
    std: np.ndarray | None = None  # (C,) float32
    augment: Augment | None = field(default=None, repr=False)
    owner: Any = field(default=None, repr=False)  # e.g. the shared window the images live in

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype not in IMAGE_DTYPES:
            raise ValueError(
                f"images must be (N, C, H, W) uint8 or float32, got "
                f"{self.images.shape} {self.images.dtype}"
            )
        if self.labels.shape != self.images.shape[:1]:
            raise ValueError(f"labels {self.labels.shape} do not match images {self.images.shape}")
        self._init_batches()

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of one image."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def dtype(self) -> np.dtype:
        return self.images.dtype

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        np.take(self.images, rows, axis=0, out=out, mode="clip")

    def close(self) -> None:
        if self.owner is not None:
            self.owner.close()
            self.owner = None


class SplitView(Batches):
    """Samples `rows` (M,) of a base split, as a split: sample i is the base's rows[i].

    Its labels are a copy (M,); pixels are gathered from the base on demand. The augmentation
    hook is the view's own (a training subset augments, a validation subset of the same base
    does not) and is keyed by the base's row numbers.
    """

    def __init__(self, base: Batches, rows: np.ndarray, augment: Augment | None = None) -> None:
        self.base = base
        self.rows = np.asarray(rows, dtype=np.int64)
        self.labels = base.labels[self.rows]
        self.num_classes, self.mean, self.std = base.num_classes, base.mean, base.std
        self.augment = augment

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.base.image_shape

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    def _batch(
        self, idx: np.ndarray, out: np.ndarray | None, epoch: int, augment: Augment | None
    ) -> np.ndarray:
        if idx.shape[0] and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"sample index out of range [0, {len(self)})")
        return self.base._batch(self.rows[idx], out, epoch, augment)

    def prefetch(self, plan: Iterable[np.ndarray]) -> None:
        self.base.prefetch(self.rows[idx] for idx in plan)

    def close(self) -> None:
        self.base.close()
