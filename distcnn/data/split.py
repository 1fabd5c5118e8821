"""One split held in memory (`Split`) and its normalised float32 batches."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from distcnn.data.checks import IMAGE_DTYPES, _norm_stats


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
    # augment(pixels (B, C, H, W) stored dtype, edited in place; rows (B,); epoch): applied to
    # the gathered stored pixels before normalisation (distcnn.augment.Augment). None: off.
    augment: Callable[[np.ndarray, np.ndarray, int], None] | None = field(default=None, repr=False)
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

    def batch(self, idx: np.ndarray, out: np.ndarray | None = None, epoch: int = 0) -> np.ndarray:
        """Normalised float32 inputs (len(idx), C, H, W) for the samples `idx` (B,) intp.

        uint8: x/255 then (x - mean)/std, by one gather from the lookup table; float32:
        (x - mean)/std, or as stored without mean/std. With `out` (B_max >= B, C, H, W) float32
        C-contiguous, the result is written into out[:B] and that view is returned; the scratch
        buffers are reused, so repeated calls allocate nothing that grows with B. `epoch` keys
        the augmentation (if any). Not thread-safe.
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
            if self.augment is not None:
                self.augment(pixels, idx, epoch)
            codes = self._buffer("codes", n, np.intp)  # (B, C, H, W): c*256 + pixel
            np.copyto(codes, pixels)  # widen in place (np.add would use a cast buffer)
            if channels > 1:  # NumPy may use its fixed-size (64 KiB) ufunc buffer here
                codes += self._lut_offset
            np.take(self._lut, codes, out=dst, mode="clip")
        else:
            np.take(self.images, idx, axis=0, out=dst, mode="clip")
            if self.augment is not None:
                self.augment(dst, idx, epoch)
            if self.mean is not None:
                dst -= self.mean.reshape(-1, 1, 1)  # views, no copy
                dst /= self.std.reshape(-1, 1, 1)
        return dst
