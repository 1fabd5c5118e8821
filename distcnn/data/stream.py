"""--data-mode stream: a split whose images stay in the file; each rank reads only its samples.

`StreamSplit` keeps the labels (N,) in memory (8 bytes a sample) and reads image rows with a
`RowReader` when `batch` asks for them. With a plan (`prefetch(plan)`: the (epoch, index array)
pairs that `batch` will be asked for, in order; the trainer passes this rank's shard of every
coming step) a background thread makes the batches `depth` steps ahead into a fixed ring of
float32 buffers: it reads the rows, augments and normalises them with the same code as in
memory (distcnn.data.split), so streamed batches are bitwise the in-memory ones, and the
training thread only copies a finished batch out. Reading overlaps the forward/backward pass
and memory stays bounded: depth + 2 buffers of one step's shard, whatever the file size. A
request that does not match the plan (the caller strayed from it) is read directly and ends the
prefetch, so the plan only ever changes the speed, never the result.

The thread spends its time in os.preadv (the GIL released) on the contiguous layout that
`build` writes; on chunked, compressed files every random row costs a chunk's inflation, which
`distcnn.data.layout_warning` reports at start-up.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from distcnn.data.dataset import SplitInfo, _file_labels, _open_h5, split_info
from distcnn.data.rows import RowReader
from distcnn.data.split import Augment, Batches
from distcnn.errors import UsageError

_DONE = object()  # the plan ran out
_THREAD_NAP = 0.002  # s the prefetch thread sleeps while every buffer is full
_WAIT_NAP = 0.0002  # s the training thread sleeps while the next batch is not ready


class Prefetcher:
    """A thread that makes the batches of `plan` (an iterator of (epoch, (B,) index array))
    ahead, in order: it reads the rows, augments and normalises them (the split's own code,
    with the thread's own scratch) into a ring of `depth` + 2 preallocated float32 buffers of
    `max_rows` samples each."""

    def __init__(
        self,
        split: StreamSplit,
        reader: RowReader,
        plan: Iterator[tuple[int, np.ndarray]],
        augment: Augment | None,
        depth: int,
        max_rows: int,
    ) -> None:
        self.split, self.reader, self.plan, self.augment = split, reader, plan, augment
        # Plain deques, polled: waking a blocked thread through a queue.Queue cost the training
        # thread ~5 ms per step on a loaded machine (the woken thread preempts the waker);
        # appending to a deque wakes nobody.
        self.free: deque = deque()
        self.full: deque = deque()
        for _ in range(depth + 2):  # depth ahead + the one being consumed + the one being filled
            self.free.append(np.empty((max_rows, *split.image_shape), dtype=np.float32))
        self.max_rows = max_rows
        self.scratch: dict = {}
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.read_seconds = 0.0  # time the thread spent reading and normalising
        self.thread = threading.Thread(target=self._run, name="distcnn-prefetch", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for epoch, rows in self.plan:
                rows = np.asarray(rows, dtype=np.int64)
                n = rows.shape[0]
                if n == 0:
                    continue  # nothing is asked for an empty shard
                if n > self.max_rows:
                    raise ValueError(f"a plan step has {n} rows > {self.max_rows}")
                while not self.free:
                    if self.stop.is_set():
                        return
                    time.sleep(_THREAD_NAP)
                buf = self.free.popleft()
                t = time.perf_counter()
                dst = buf[:n]
                if self.split.dtype == np.uint8:
                    pixels = self.split._buffer("pixels", n, np.uint8, self.scratch)
                else:
                    pixels = dst
                self.reader.read(rows, pixels)
                self.split._normalise(pixels, dst, rows, epoch, self.augment, self.scratch)
                self.read_seconds += time.perf_counter() - t
                self.full.append((epoch, rows, buf))
        except BaseException as e:  # reported to the consumer, which re-raises it
            self.error = e
        self.full.append(_DONE)

    def next_block(self) -> tuple[int, np.ndarray, np.ndarray] | None:
        """The next (epoch, rows, buffer) of the plan (waits for it), or None when it is done."""
        while not self.full:
            time.sleep(_WAIT_NAP)
        item = self.full[0]
        if item is _DONE:
            if self.error is not None:
                raise self.error
            return None
        return self.full.popleft()

    def release(self, buf: np.ndarray) -> None:
        self.free.append(buf)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.reader.close()


class StreamSplit(Batches):
    """A split read from the file on demand (see the module docstring).

    depth: steps made ahead by the prefetch thread; max_rows: the largest index array a plan
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
        self._block: tuple[int, np.ndarray, np.ndarray] | None = None
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

    def _prefetch(self, plan: Iterable[tuple[int, np.ndarray]], augment: Augment | None) -> None:
        """Start (or restart) making batches ahead along `plan`, augmented with `augment`."""
        self._stop_prefetch()
        if self.max_rows > 0:
            reader = RowReader(self.info.path, self.info.name)
            self._pre = Prefetcher(self, reader, iter(plan), augment, self.depth, self.max_rows)

    def _stop_prefetch(self) -> None:
        if self._pre is not None:
            self._pre.close()
            self._pre = None
        self._block, self._pos = None, 0

    def close(self) -> None:
        self._stop_prefetch()
        self.reader.close()

    def _fill(self, idx: np.ndarray, dst: np.ndarray, epoch: int, augment: Augment | None) -> None:
        """The next rows of the plan's current block when they are what is asked (same rows,
        same epoch, same augmentation); otherwise a direct read, which ends the prefetch."""
        pre = self._pre
        if pre is not None:
            if self._block is None:
                t = time.perf_counter()
                self._block, self._pos = pre.next_block(), 0
                self.wait_seconds += time.perf_counter() - t
            if self._block is not None:
                b_epoch, planned, buf = self._block
                a, b = self._pos, self._pos + idx.shape[0]
                if (
                    b <= planned.shape[0]
                    and b_epoch == epoch
                    and augment is pre.augment
                    and np.array_equal(planned[a:b], idx)
                ):
                    dst[...] = buf[a:b]
                    self._pos = b
                    if b == planned.shape[0]:
                        pre.release(buf)
                        self._block = None
                    return
            self.misses += 1
            self._stop_prefetch()
        super()._fill(idx, dst, epoch, augment)

    def _gather(self, rows: np.ndarray, out: np.ndarray) -> None:
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
