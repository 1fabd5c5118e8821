"""Stored image rows of one split, read from the HDF5 file on demand into a caller's buffer.

`RowReader(path, split).read(rows, out)` copies the stored bytes of /<split>/images[rows] (any
order, repeats allowed) into out (B, C, H, W) of the stored dtype. How it reads depends on the
dataset's layout, chosen once when the reader opens (`kind`):

- "contiguous": uncompressed and contiguous: the rows sit at known byte offsets, so each run of
  consecutive requested rows is ONE os.preadv straight into `out` (no HDF5 call, no copy, the
  GIL released for the system call);
- "chunks": chunked along N only (each chunk holds whole images), no filter or deflate (gzip):
  each needed chunk is read with one direct chunk read, inflated with zlib and cached (a small
  LRU of `cache_chunks` chunks, so memory stays bounded whatever the file size);
- "hdf5": anything else (other filters, chunks that cut images): h5py's own selection read of
  the sorted distinct rows, then reordered.

Every path returns the same bytes, so what is read never depends on the layout.
"""

from __future__ import annotations

import os
import zlib
from collections import OrderedDict
from pathlib import Path

import h5py
import numpy as np

_DEFLATE = h5py.h5z.FILTER_DEFLATE


def layout_of(ds: h5py.Dataset) -> dict:
    """The storage layout of a dataset: {"layout", "chunk_rows", "filters", "kind"}."""
    plist = ds.id.get_create_plist()
    filters = [plist.get_filter(i) for i in range(plist.get_nfilters())]
    names = []
    for code, _flags, opts, name in filters:
        label = name.decode() if isinstance(name, bytes) else str(name)
        names.append(f"{label}{'-' + str(opts[0]) if code == _DEFLATE and opts else ''}")
    layout = plist.get_layout()
    chunk_rows = int(ds.chunks[0]) if ds.chunks else None
    if layout == h5py.h5d.CONTIGUOUS and not filters and ds.id.get_offset() is not None:
        kind = "contiguous"
    elif (
        layout == h5py.h5d.CHUNKED
        and tuple(ds.chunks[1:]) == tuple(ds.shape[1:])
        and all(code == _DEFLATE for code, *_ in filters)
    ):
        kind = "chunks"
    else:
        kind = "hdf5"
    return {
        "layout": {h5py.h5d.CONTIGUOUS: "contiguous", h5py.h5d.CHUNKED: "chunked"}.get(
            layout, "compact"
        ),
        "chunk_rows": chunk_rows,
        "filters": names,
        "kind": kind,
    }


class RowReader:
    """Reads stored rows of /<split>/images from `path` (its own file handle; not thread-safe:
    one reader per thread)."""

    def __init__(self, path: str | os.PathLike, split: str, cache_chunks: int = 8) -> None:
        self.path = Path(path)
        self.file = h5py.File(self.path, "r")
        self.ds = self.file[split]["images"]
        self.n = int(self.ds.shape[0])
        self.row_shape = tuple(int(s) for s in self.ds.shape[1:])
        self.dtype = np.dtype(self.ds.dtype)
        self.row_bytes = int(np.prod(self.row_shape)) * self.dtype.itemsize
        info = layout_of(self.ds)
        self.kind = info["kind"]
        self.chunk_rows = info["chunk_rows"]
        self._fd = -1
        if self.kind == "contiguous":
            self._offset = int(self.ds.id.get_offset())
            self._fd = os.open(self.path, os.O_RDONLY)
        elif self.kind == "chunks":
            self._deflate = bool(info["filters"])
            self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
            self._cache_chunks = max(1, cache_chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.file.close()

    def read(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """out[:B] = images[rows] (rows (B,) ints in [0, n)); returns out[:B]."""
        rows = np.asarray(rows, dtype=np.int64)
        n = rows.shape[0]
        dst = out[:n]
        if n == 0:
            return dst
        if self.kind == "contiguous":
            self._read_contiguous(rows, dst)
        elif self.kind == "chunks":
            self._read_chunks(rows, dst)
        else:
            distinct, where = np.unique(rows, return_inverse=True)
            block = self.ds[distinct]  # (U, C, H, W), one selection read
            np.take(block, where.reshape(-1), axis=0, out=dst)
        return dst

    def _read_contiguous(self, rows: np.ndarray, dst: np.ndarray) -> None:
        flat = dst.reshape(dst.shape[0], -1).view(np.uint8)  # (B, row_bytes)
        # runs of consecutive rows (in request order) -> one preadv each
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        starts = np.concatenate(([0], breaks))
        stops = np.concatenate((breaks, [rows.shape[0]]))
        rb, fd, base = self.row_bytes, self._fd, self._offset
        for a, b in zip(starts.tolist(), stops.tolist(), strict=True):
            view = memoryview(flat[a:b]).cast("B")
            want, pos, got = (b - a) * rb, base + int(rows[a]) * rb, 0
            while got < want:  # preadv may return fewer bytes (signals, large reads)
                k = os.preadv(fd, [view[got:]], pos + got)
                if k <= 0:
                    raise OSError(f"short read of {self.path} at byte {pos + got}")
                got += k

    def _chunk(self, c: int) -> np.ndarray:
        """Chunk c as (chunk_rows, C, H, W) stored dtype (inflated), from the LRU cache."""
        hit = self._cache.get(c)
        if hit is not None:
            self._cache.move_to_end(c)
            return hit
        origin = (c * self.chunk_rows,) + (0,) * len(self.row_shape)
        mask, raw = self.ds.id.read_direct_chunk(origin)
        if self._deflate and not mask & 1:  # bit 0 set: the filter was skipped for this chunk
            raw = zlib.decompress(raw)
        chunk = np.frombuffer(raw, dtype=self.dtype).reshape(-1, *self.row_shape)
        self._cache[c] = chunk
        if len(self._cache) > self._cache_chunks:
            self._cache.popitem(last=False)
        return chunk

    def _read_chunks(self, rows: np.ndarray, dst: np.ndarray) -> None:
        chunk_of = rows // self.chunk_rows
        order = np.argsort(chunk_of, kind="stable")
        sorted_chunks = chunk_of[order]
        bounds = np.flatnonzero(np.diff(sorted_chunks)) + 1
        for group in np.split(order, bounds):
            c = int(chunk_of[group[0]])
            chunk = self._chunk(c)
            dst[group] = chunk[rows[group] - c * self.chunk_rows]
