"""--sync-bn --deterministic: batch statistics of the global batch, the same bits on 1, 2, 4 or
8 ranks.

In --deterministic mode a rank computes the gradient of each of its micro-shards (of the
DET_SHARDS fixed parts of the global batch) on its own, so that the sums can be added in a
fixed tree. A batch norm with global statistics needs every micro-shard's sums before any of
them can go on, so here each micro-shard of the rank runs as a lane: its own Model (its own
workspaces and gradient buffer, the same parameters and running statistics) in its own thread,
and every batch norm's sums meet at a barrier. One thread then allgathers the lanes' sums of
every rank (MPI, the other lanes wait) and adds them in micro-shard order 0, 1, ..., 7: the
same float64 additions whatever the rank count. The lanes run the same layers, so they reach
the barriers in the same order; an empty micro-shard calls its batch norms' sums with zeros.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np


class LaneSync:
    """The meeting point of `lanes` lanes on each rank for every batch-norm sum."""

    def __init__(self, comm: Any, lanes: int) -> None:
        self.comm, self.lanes = comm, lanes
        self.slots: list[np.ndarray | None] = [None] * lanes
        self.total = np.zeros(0)
        self.what = "sync-bn sums"
        self.barrier = threading.Barrier(lanes, action=self._combine)
        # One lane computes at a time (the others wait at the barrier or for this lock): no
        # concurrent BLAS calls, and the machine's cores stay with the ranks.
        self.lock = threading.Lock()

    def for_lane(self, j: int) -> Callable[[np.ndarray], np.ndarray]:
        """The `sync` function of lane j's batch norms."""

        def sync(v: np.ndarray) -> np.ndarray:
            self.slots[j] = np.asarray(v, dtype=np.float64)
            self.lock.release()
            try:
                self.barrier.wait()
            finally:
                self.lock.acquire()
            return self.total.copy()

        return sync

    def _combine(self) -> None:
        """Run by one lane while the others wait: every rank's lanes' sums, in micro-shard
        order, added one after another."""
        mine = np.stack(self.slots)  # (lanes, S)
        gathered = np.empty((self.comm.size, *mine.shape))
        self.comm.allgather(mine, gathered, self.what)  # MPI: one per batch norm and direction
        flat = gathered.reshape(-1, mine.shape[1])  # micro-shard order: rank-major
        total = flat[0].copy()
        for row in flat[1:]:
            total += row
        self.total = total


def run_lanes(work: list[Callable[[], Any]], sync: LaneSync) -> list[Any]:
    """Run each lane's work in its own thread; their results in order. A failing lane breaks
    the barrier so that the others stop too; the first error is raised once all have ended."""
    results: list[Any] = [None] * len(work)
    errors: list[BaseException] = []

    def lane(j: int) -> None:
        try:
            with sync.lock:
                results[j] = work[j]()
        except threading.BrokenBarrierError:
            pass  # another lane failed
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)
            sync.barrier.abort()

    threads = [threading.Thread(target=lane, args=(j,)) for j in range(len(work))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
