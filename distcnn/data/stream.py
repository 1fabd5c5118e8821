"""--data-mode stream: a split whose images stay in the file; each rank reads only its samples.

`StreamSplit` keeps the labels (N,) in memory (8 bytes a sample) and reads image rows with a
`RowReader` when `batch` asks for them. With a plan (`prefetch(plan)`: the index arrays that
`batch` will be asked for, in order; the trainer passes this rank's shard of every coming step)
a background thread reads `depth` steps ahead into a fixed ring of buffers, so reading overlaps
the forward/backward pass and memory stays bounded: depth + 2 buffers of one step's shard,
whatever the file size. `batch` takes the next rows of the plan from the ring; a request that
does not match the plan (the caller strayed from it) is read directly and ends the prefetch, so
the plan only ever changes the speed, never the result. The rows are copied, augmented and
normalised by the same code as in memory (distcnn.data.split), so streamed batches are bitwise
the in-memory ones.

The thread spends its time in os.preadv (the GIL released) on the contiguous layout that
`build` writes; on chunked, compressed files every random row costs a chunk's inflation, which
`distcnn.data.layout_warning` reports at start-up.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from distcnn.data.dataset import SplitInfo, _file_labels, _open_h5, split_info
from distcnn.data.rows import RowReader
from distcnn.data.split import Batches
from distcnn.errors import UsageError

_DONE = object()  # the plan ran out


class Prefetcher:
    """A thread that reads the rows of `plan` (an iterator of (B,) index arrays) ahead, in order,
    into a ring of `depth` + 2 preallocated buffers of `max_rows` rows each."""

    def __init__(
        self, reader: RowReader, plan: Iterator[np.ndarray], depth: int, max_rows: int
    ) -> None:
        self.reader, self.plan = reader, plan
        self.free: queue.Queue = queue.Queue()
        self.full: queue.Queue = queue.Queue()
        for _ in range(depth + 2):  # depth ahead + the one being consumed + the one being filled
            self.free.put(np.empty((max_rows, *reader.row_shape), dtype=reader.dtype))
        self.max_rows = max_rows
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.read_seconds = 0.0  # time the thread spent reading (for the report)
        self.thread = threading.Thread(target=self._run, name="distcnn-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for rows in self.plan:
                rows = np.asarray(rows, dtype=np.int64)
                if rows.shape[0] == 0:
                    continue  # nothing is asked for an empty shard
                if rows.shape[0] > self.max_rows:
                    raise ValueError(f"a plan step has {rows.shape[0]} rows > {self.max_rows}")
                buf = None
                while buf is None:
                    if self.stop.is_set():
                        return
                    try:
                        buf = self.free.get(timeout=0.1)
                    except queue.Empty:
                        continue
                t = time.perf_counter()
                self.reader.read(rows, buf)
                self.read_seconds += time.perf_counter() - t
                self.full.put((rows, buf))
        except BaseException as e:  # reported to the consumer, which re-raises it
            self.error = e
        self.full.put(_DONE)

    def next_block(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The next (rows, buffer) of the plan (waits for it), or None when the plan is done."""
        item = self.full.get()
        if item is _DONE:
            self.full.put(_DONE)
            if self.error is not None:
                raise self.error
            return None
        return item

    def release(self, buf: np.ndarray) -> None:
        self.free.put(buf)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.reader.close()


class StreamSplit(Batches):
    """A split read from the file on demand (see the module docstring).

    depth: steps read ahead by the prefetch thread; max_rows: the largest index array a plan
    step may hold (the trainer's shard of a global batch).
    """

    def __init__(
        self, info: SplitInfo, labels: np.ndarray, depth: int = 4, max_rows: int = 0
    ) -> None:
        self.info = info
        self.labels = labels
        self.num_classes, self.mean, self.std = info.num_classes, info.mean, info.std
        self.depth, self.max_rows = depth, max_rows
        self.reader = RowReader(info.path, info.name)  # this thread's own reads
        self._init_batches()
        self._pre: Prefetcher | None = None
        self._block: tuple[np.ndarray, np.ndarray] | None = None
        self._pos = 0
        self.misses = 0  # requests that did not follow the plan (read directly)
        self.wait_seconds = 0.0  # time batch() waited for the prefetch thread

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.info.image_shape

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype

    @property
    def kind(self) -> str:
        return self.reader.kind

    def prefetch(self, plan: Iterable[np.ndarray]) -> None:
        """Start (or restart) reading ahead along `plan`."""
        self._stop_prefetch()
        if self.max_rows > 0:
            reader = RowReader(self.info.path, self.info.name)
            self._pre = Prefetcher(reader, iter(plan), self.depth, self.max_rows)

    def _stop_prefetch(self) -> None:
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        self._block, self._pos = None, 0

    def close(self) -> None:
        self._stop_prefetch()
        self.reader.close()

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
        n = rows.shape[0]
        if self._pre is not None:
            if self._block is None:
                t = time.perf_counter()
                self._block, self._pos = self._pre.next_block(), 0
                self.wait_seconds += time.perf_counter() - t
            if self._block is not None:
                planned, buf = self._block
                a, b = self._pos, self._pos + n
                if b <= planned.shape[0] and np.array_equal(planned[a:b], rows):
                    out[...] = buf[a:b]
                    self._pos = b
                    if b == planned.shape[0]:
                        self._pre.release(buf)
                        self._block = None
                    return
            self.misses += 1
            self._stop_prefetch()
        self.reader.read(rows, out)


def open_stream(path: str | os.PathLike, split: str, depth: int, max_rows: int) -> StreamSplit:
    """A StreamSplit of /<split> of `path`: metadata validated, labels read and range-checked.

    Pixels are not scanned for NaN/inf here (that would read the whole file); a float32 file
    streamed with a non-finite pixel shows up as a non-finite step (skipped, then stopped by
    --max-bad-steps).
    """
    info = split_info(path, split)
    with _open_h5(info.path) as f:
        try:
            labels = _file_labels(f, info.path, split, info.num_classes)
        except UsageError as exc:
            raise UsageError(f"{info.path}: {exc}") from None
    return StreamSplit(info, labels, depth=depth, max_rows=max_rows)
