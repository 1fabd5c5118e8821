"""Everything that talks to other ranks: collectives with a stall watchdog, and fail-fast.

A single process is a communicator of size 1 on the same code path. Every collective here is
non-blocking underneath and waited on by polling, which gives three things at once:
- a watchdog: a rank that waits longer than `timeout` seconds aborts the whole job, naming the
  ranks that never arrived (each rank announces its arrival at collective #k to the others with a
  tiny point-to-point message before joining it; the announcements are drained afterwards, under
  the same deadline) and, when every rank arrived, the ranks that no longer answer a ping (a
  rank stopped or stuck outside MPI after it arrived);
- ranks that wait do not spin a core for long, which matters when ranks outnumber cores;
- no thread is needed, so no MPI thread-safety question arises.

The gradient allreduce has a faster path for ranks that share a node: `reduce_buffer` hands out
a buffer that lives in an MPI-3 shared-memory window, and `allreduce_sum_view` on it has each
rank add its slice of everyone's buffers into one node-wide sum that all ranks then read, with
no MPI message for the data (see `NodeReducer`). Across nodes it becomes hierarchical. Every
other buffer takes MPI_Iallreduce, and DISTCNN_ALLREDUCE=mpi turns the shared path off.

MPI calls that have no non-blocking form (communicator splits, the shared-window allocation)
are entered only right after a watchdog-covered collective, so no rank can sit in one while
another rank is stuck or has failed before it. A setup error found on some ranks only is
settled by `settle`, a point-to-point exchange: when the other ranks are elsewhere (in a
collective the failing rank will never join), the failing rank prints its own error and ends the
job with exit code 2 within a few seconds instead of leaving them waiting.

Distributed touch points in the rest of the code are labelled `# MPI:` so one grep shows them.
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np

from distcnn.mpienv import MPI

_ARRIVE_TAG = 7
_PING_TAG = 8  # "are you alive?", sent by a rank whose deadline passed
_PONG_TAG = 9  # the answer, from any rank that is polling (waiting in a collective)
_SETTLE_TAG = 10  # a rank's setup outcome (None or its error), see Comm.settle
# A rank whose setup failed waits this long for the others to reach the same settle point; if
# they do not (they are in a collective it will never join), it prints its error and aborts.
SETTLE_GRACE_SECONDS = 3.0
_SPIN_SECONDS = 0.002  # poll without sleeping this long; then sleep between polls
_NAP_SECONDS = 0.0002
_ABORT_GRACE_SECONDS = 0.2


# alternating pairs of gradient sums timed at start-up to choose the path (Comm._calibrate)
CALIBRATION_ROUNDS = 24
# the shared-memory sum is kept only when it is at least this much faster than MPI_Iallreduce
SHARED_MARGIN = 0.9


class CollectiveTimeout(RuntimeError):
    pass


def choose_shared(t_shared: float, t_mpi: float) -> bool:
    """Whether the measured shared-memory sum (seconds per call) wins over MPI_Iallreduce: it
    must be faster by SHARED_MARGIN, since it holds a window and two barriers per step."""
    return t_shared <= SHARED_MARGIN * t_mpi


class NodeReducer:
    """Allreduce (sum) through shared memory for the ranks of one node, hierarchical across nodes.

    The L ranks of a node share one MPI window. Each rank's segment holds G, its gradient buffer
    (n elements, handed to the model so the backward pass writes straight into it); local rank
    0's segment also holds S, the node's sum (n elements), which every rank reads. The n
    elements are cut into L slices on cache-line bounds; local rank l owns slice l. One
    allreduce is:

      1. barrier: every G on the node is final;
      2. rank l adds slice l of G_0, G_1, ..., G_{L-1} (in that order) into S; with several
         nodes, that slice of S is then summed across the nodes by an MPI allreduce among the
         ranks with local rank l (one per node, each holding the same slice);
      3. barrier: S is final, and every rank reads the whole sum from it: no copy back.

    No further synchronisation is needed: G_q's slice l is read by rank l only in step 2, before
    the second barrier, and rank q rewrites G_q only after it; S is rewritten only in step 2 of
    the next allreduce, after its first barrier, which a rank reaches only once it has finished
    reading S (so S is handed out read-only, and readers must be done with it before their next
    collective). The order of the sum is fixed, so runs on the same layout of ranks are bitwise
    repeatable. Each rank moves about one slice of bytes across cores, where MPI copies the
    data through its own buffers both ways.

    The barriers and the cross-node allreduce are non-blocking requests handed to `wait`, so the
    caller's watchdog covers them.
    """

    def __init__(self, node: MPI.Comm, cross: MPI.Comm | None, n: int, dtype: np.dtype) -> None:
        self.node, self.cross = node, cross
        self.n, self.dtype = int(n), np.dtype(dtype)
        L, self.rank = node.Get_size(), node.Get_rank()
        line = max(1, 64 // self.dtype.itemsize)  # slices start on 64-byte cache lines
        step = -(-self.n // (L * line)) * line
        self.bounds = [min(self.n, q * step) for q in range(L + 1)]
        self.bounds[-1] = self.n
        info = MPI.Info.Create()
        info.Set("alloc_shared_noncontig", "true")  # each segment on its owner's own pages
        mine = 2 * self.n if self.rank == 0 else self.n
        self.win = MPI.Win.Allocate_shared(mine * self.dtype.itemsize, self.dtype.itemsize,
                                           info=info, comm=node)  # fmt: skip
        info.Free()
        segs = []
        for q in range(L):
            mem, _ = self.win.Shared_query(q)
            segs.append(
                np.frombuffer(mem, dtype=self.dtype, count=2 * self.n if q == 0 else self.n)
            )
        self.G = [seg[: self.n] for seg in segs]  # (n,) each rank's gradient buffer
        self.S = segs[0][self.n :]  # (n,) the node's sum
        self.result = self.S.view()
        self.result.flags.writeable = False  # readers share it: nobody may write
        self.buffer = self.G[self.rank]
        self.buffer[...] = 0
        lo, hi = self.bounds[self.rank], self.bounds[self.rank + 1]
        self._parts = [g[lo:hi] for g in self.G]  # this rank's slice of every G, in rank order
        self._mine = self.S[lo:hi]  # where this rank writes its slice of the sum
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, so Win.Sync orders the memory

    def owns(self, buf: np.ndarray) -> bool:
        return buf is self.buffer

    def allreduce(self, wait: Callable[[MPI.Request], None]) -> np.ndarray:
        """Sum every rank's G; returns the read-only (n,) sum (valid until the next call)."""
        parts, mine = self._parts, self._mine
        self.win.Sync()
        wait(self.node.Ibarrier())
        self.win.Sync()
        if mine.size:
            np.add(parts[0], parts[1], out=mine)
            for part in parts[2:]:
                mine += part
        if self.cross is not None:
            wait(self.cross.Iallreduce(MPI.IN_PLACE, mine, op=MPI.SUM))
        self.win.Sync()
        wait(self.node.Ibarrier())
        self.win.Sync()
        return self.result

    def free(self) -> None:
        self.win.Unlock_all()
        self.win.Free()


class Comm:
    """A communicator wrapper: rank, size, and the handful of collectives the trainer uses.

    timeout: seconds a rank may wait in one collective before it aborts the job (None: forever).
    """

    def __init__(self, mpi_comm: MPI.Comm, timeout: float | None = None) -> None:
        self.mpi = mpi_comm
        self.rank = mpi_comm.Get_rank()
        self.size = mpi_comm.Get_size()
        self.timeout = timeout
        self.seq = 0  # collectives entered so far; identical on every rank
        self.comm_seconds = 0.0  # wall time spent inside collectives (waiting included)
        self._arrive = np.zeros(1, dtype=np.int64)
        self._arrive_in = np.zeros((max(1, self.size), 1), dtype=np.int64)
        self._ping = np.zeros(1, dtype=np.int64)
        self._in_flight: list[tuple[np.ndarray, MPI.Request]] = []  # pings/pongs being sent
        self._arrivals: dict[int, MPI.Request] = {}
        self._reducer: NodeReducer | None = None
        self._diag: MPI.Comm | None = None
        if self.size > 1:
            # MPI: the watchdog's own channel; its arrivals go over mpi_comm itself this once
            self._diag = mpi_comm
            self._diag = self._collective("start-up (communicator duplicate)", self._idup)
        # how the gradient buffer is summed, for the user: set by reduce_buffer
        self.allreduce_path = "MPI_Iallreduce" if self.size > 1 else "none (1 rank)"
        # called with the watchdog's message just before it aborts (rank 0's status.json)
        self.on_stall: Callable[[str], None] | None = None

    @classmethod
    def world(cls, timeout: float | None = None) -> Comm:
        return cls(MPI.COMM_WORLD, timeout)

    def _idup(self, wait: Callable[[MPI.Request], None]) -> MPI.Comm:
        new, req = self.mpi.Idup()
        wait(req)
        return new

    def guard(self, what: str) -> None:
        """A watchdog-covered barrier, entered right before an MPI call that cannot be waited
        on with a deadline (a communicator split, a window allocation or free): every rank is
        then known to be alive and at the same point, so the blocking call returns promptly."""
        if self.size > 1:
            self._run(self.mpi.Ibarrier, what)

    # -- the gradient buffer -----------------------------------------------------------------

    def reduce_buffer(self, n: int, dtype: np.dtype = np.float32) -> np.ndarray:
        """A zeroed (n,) buffer for repeated `allreduce_sum_view` (or `allreduce_sum`) calls, one
        per Comm.

        When several ranks share a node it lives in an MPI shared-memory window and is summed by
        a NodeReducer; otherwise (one process, one rank per node, nodes with different numbers
        of ranks, or DISTCNN_ALLREDUCE=mpi) it is a plain array summed with MPI_Iallreduce.
        Collective: every rank must call it.
        """
        if self._reducer is not None:
            raise RuntimeError("reduce_buffer: this Comm already has one")
        layout = self._node_layout()
        if layout is None:
            return np.zeros(n, dtype=dtype)
        node, cross = layout
        self.guard("before the shared window")  # MPI: Win.Allocate_shared blocks
        try:
            reducer: NodeReducer | None = NodeReducer(node, cross, n, np.dtype(dtype))
            failed = ""
        except MPI.Exception as e:  # e.g. /dev/shm too small, or a file-size limit
            reducer, failed = None, str(e).strip().splitlines()[-1].strip(" :")
        ok = np.array([0 if failed else 1], dtype=np.int64)
        self._run(lambda: self.mpi.Iallreduce(MPI.IN_PLACE, ok, op=MPI.MIN), "shared window")
        if not ok[0]:  # every rank falls back together (a window that did open is left alone)
            self.allreduce_path = "MPI_Iallreduce (the shared-memory window failed" + (
                f": {failed})" if failed else " on another rank)"
            )
            return np.zeros(n, dtype=dtype)
        assert reducer is not None
        L = node.Get_size()
        nodes = self.size // L
        shared = f"shared memory ({L} ranks per node" + (
            f", MPI across {nodes} nodes" if nodes > 1 else ""
        )
        if os.environ.get("DISTCNN_ALLREDUCE", "auto") == "shm":
            self.allreduce_path = shared + ", DISTCNN_ALLREDUCE=shm)"
        else:  # auto: keep the shared path only where it measures faster here
            t_shm, t_mpi = self._calibrate(reducer)
            times = f"{1e3 * t_shm:.3f} ms against {1e3 * t_mpi:.3f} ms for MPI_Iallreduce"
            if not choose_shared(t_shm, t_mpi):
                reducer.free()
                self.allreduce_path = (
                    f"MPI_Iallreduce (measured faster at start-up: {1e3 * t_mpi:.3f} ms against "
                    f"{1e3 * t_shm:.3f} ms through shared memory)"
                )
                return np.zeros(n, dtype=dtype)
            self.allreduce_path = shared + f"; measured at start-up: {times})"
        self._reducer = reducer
        return reducer.buffer

    def _calibrate(self, reducer: NodeReducer) -> tuple[float, float]:
        """Seconds per gradient sum through `reducer` and through MPI_Iallreduce of the same
        size, as a training step uses them: each rank first rewrites its buffer (so the lines
        sit modified in its own core's cache, as after a backward pass) and afterwards reads the
        whole sum (as the optimizer does). CALIBRATION_ROUNDS alternating pairs; per path the
        median over the calls, then the slowest rank's median (so every rank decides alike).
        Collective."""
        plain = np.zeros(reducer.n, dtype=reducer.dtype)
        fill = np.ones(reducer.n, dtype=reducer.dtype)
        times: dict[str, list[float]] = {"shm": [], "mpi": []}

        def shm() -> None:
            reducer.buffer[...] = fill
            float(self._collective("allreduce calibration", reducer.allreduce).sum())

        def mpi() -> None:
            plain[...] = fill
            self._run(
                lambda: self.mpi.Iallreduce(MPI.IN_PLACE, plain, op=MPI.SUM),
                "allreduce calibration",
            )
            float(plain.sum())

        for i in range(CALIBRATION_ROUNDS + 2):  # the first two pairs warm both paths up
            for name, fn in (("shm", shm), ("mpi", mpi)) if i % 2 else (("mpi", mpi), ("shm", shm)):
                t0 = time.perf_counter()
                fn()
                if i >= 2:
                    times[name].append(time.perf_counter() - t0)
        reducer.buffer[...] = 0
        med = np.array([float(np.median(times["shm"])), float(np.median(times["mpi"]))])
        self._run(lambda: self.mpi.Iallreduce(MPI.IN_PLACE, med, op=MPI.MAX), "calibration")
        return float(med[0]), float(med[1])

    def _node_layout(self) -> tuple[MPI.Comm, MPI.Comm | None] | None:
        """(node comm, cross-node comm or None) when the shared-memory path applies, else None.

        DISTCNN_ALLREDUCE=mpi turns the path off; DISTCNN_NODE_SIZE=k (tests, debugging) groups
        consecutive blocks of k ranks as if each block were a node, which exercises the
        hierarchical path on one machine. The decision is made collectively, so every rank
        takes the same path.
        """
        if self.size == 1:
            return None
        mode = os.environ.get("DISTCNN_ALLREDUCE", "auto")
        fake = os.environ.get("DISTCNN_NODE_SIZE", "")
        self.guard("before the node split")  # MPI: Split/Split_type block
        if fake.isdigit() and int(fake) > 0:
            node = self.mpi.Split(self.rank // int(fake), self.rank)
        else:
            node = self.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        local, L = node.Get_rank(), node.Get_size()
        sizes = np.array([L, -L, 1 if mode == "mpi" else 0], dtype=np.int64)
        self._run(
            lambda: self.mpi.Iallreduce(MPI.IN_PLACE, sizes, op=MPI.MAX), "node layout"
        )  # the same decision on every rank: equal node sizes > 1, and nobody opted out
        if sizes[2] or sizes[0] != -sizes[1] or L == 1:
            node.Free()
            if sizes[2]:
                self.allreduce_path = "MPI_Iallreduce (DISTCNN_ALLREDUCE=mpi)"
            return None
        cross = self.mpi.Split(local, self.rank)
        if cross.Get_size() == 1:
            cross.Free()
            cross = None
        return node, cross

    def close(self) -> None:
        """Free the shared window (collective); the Comm then falls back to MPI_Iallreduce."""
        if self._reducer is not None:
            self.guard("before freeing the shared window")  # MPI: Win.Free blocks
            self._reducer.free()
            self._reducer = None

    # -- collectives -------------------------------------------------------------------------

    def allreduce_sum(self, buf: np.ndarray, what: str = "allreduce") -> None:
        """In-place sum of buf over all ranks (one MPI_Iallreduce; the buffer from
        `reduce_buffer` is summed through shared memory and the sum copied back)."""
        out = self.allreduce_sum_view(buf, what)
        if out is not buf:
            buf[...] = out

    def allreduce_sum_view(self, buf: np.ndarray, what: str = "allreduce") -> np.ndarray:
        """The sum of buf over all ranks, without a copy where possible.

        For the buffer from `reduce_buffer` on the shared-memory path this returns the node's
        read-only sum and leaves buf holding this rank's own values; read what you need from
        the result before this Comm's next collective. Otherwise buf is summed in place and
        returned.
        """
        if self.size == 1:
            self.seq += 1
            return buf
        reducer = self._reducer
        if reducer is not None and reducer.owns(buf):
            return self._collective(what, reducer.allreduce)
        self._run(lambda: self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), what)
        return buf

    def allgather(self, send: np.ndarray, recv: np.ndarray, what: str = "allgather") -> None:
        """recv (size, *send.shape) gets every rank's send buffer, in rank order."""
        if self.size == 1:
            self.seq += 1
            recv[0] = send
            return
        self._run(lambda: self.mpi.Iallgather(send, recv), what)

    def bcast(self, buf: np.ndarray, root: int = 0, what: str = "broadcast") -> None:
        """buf on every rank becomes root's buf."""
        if self.size == 1:
            self.seq += 1
            return
        self._run(lambda: self.mpi.Ibcast(buf, root=root), what)

    def bcast_object(self, obj: Any, root: int = 0, what: str = "broadcast") -> Any:
        """Small picklable objects (decisions, configs): the size first, then the bytes."""
        if self.size == 1:
            self.seq += 1
            return obj
        data = pickle.dumps(obj) if self.rank == root else b""
        n = np.array([len(data)], dtype=np.int64)
        self.bcast(n, root, what)
        raw = np.frombuffer(data, dtype=np.uint8).copy() if self.rank == root else None
        if raw is None:
            raw = np.empty(int(n[0]), dtype=np.uint8)
        self.bcast(raw, root, what)
        return pickle.loads(raw.tobytes())

    def gather_objects(self, obj: Any, what: str = "gather") -> list[Any]:
        """Every rank's small picklable object, in rank order, on every rank."""
        if self.size == 1:
            self.seq += 1
            return [obj]
        return [self.bcast_object(obj, root=r, what=what) for r in range(self.size)]

    def gather_to_root(self, obj: Any, root: int = 0, what: str = "gather") -> list[Any] | None:
        """Every rank's small picklable object, in rank order, on `root` (None elsewhere):
        two collectives (the sizes, then the bytes) whatever the number of ranks."""
        if self.size == 1:
            self.seq += 1
            return [obj]
        data = np.frombuffer(pickle.dumps(obj), dtype=np.uint8).copy()
        sizes = np.zeros(self.size, dtype=np.int64)
        mine = np.array([data.size], dtype=np.int64)
        self._run(lambda: self.mpi.Igather(mine, sizes, root=root), what)
        counts = sizes.astype(np.int32) if self.rank == root else None
        recv = None
        if self.rank == root:
            displs = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
            buf = np.empty(int(sizes.sum()), dtype=np.uint8)
            recv = [buf, counts, displs, MPI.BYTE]
        self._run(lambda: self.mpi.Igatherv(data, recv, root=root), what)
        if self.rank != root:
            return None
        return [pickle.loads(buf[d : d + c].tobytes()) for d, c in zip(displs, counts, strict=True)]

    def check_replicas(self, params: np.ndarray) -> list[int]:
        """Ranks whose parameters differ bitwise from rank 0's (empty when all agree)."""
        mine = np.array([zlib.crc32(params.view(np.uint8))], dtype=np.int64)
        every = np.zeros((self.size, 1), dtype=np.int64)
        self.allgather(mine, every, "replica check")
        return [r for r in range(self.size) if every[r, 0] != every[0, 0]]

    # -- settling a setup step -------------------------------------------------------------

    def settle(self, err: str | None, what: str = "setup check") -> str | None:
        """Every rank's outcome of a setup step (None, or its one-line error), exchanged
        point to point; returns the error every rank acts on, the same everywhere: rank 0's,
        else the first failing rank's prefixed `[rank k]` (unprefixed when every failing rank
        has the same one).

        Works even when ranks disagree about where they are: a rank with an error that the
        others do not join within SETTLE_GRACE_SECONDS (they are waiting in a collective it
        will never enter, e.g. its dataset is unreadable on its host only) prints
        `error: [rank k] <its error>` and ends the job with exit code 2. A rank without an
        error waits under the watchdog like in any collective.
        """
        if self.size == 1:
            self.seq += 1
            return err
        assert self._diag is not None
        self.seq += 1
        t0 = time.perf_counter()
        msg = np.frombuffer(pickle.dumps((self.seq, err)), dtype=np.uint8).copy()
        peers = [r for r in range(self.size) if r != self.rank]
        sends = [self._diag.Isend(msg, dest=r, tag=_SETTLE_TAG) for r in peers]
        got: dict[int, str | None] = {self.rank: err}
        status = MPI.Status()
        while len(got) < self.size:
            progressed = False
            for r in peers:
                if r not in got and self._diag.Iprobe(source=r, tag=_SETTLE_TAG, status=status):
                    raw = np.empty(status.Get_count(MPI.BYTE), dtype=np.uint8)
                    self._diag.Recv(raw, source=r, tag=_SETTLE_TAG)
                    seq, their = pickle.loads(raw.tobytes())
                    if seq != self.seq:  # the ranks' collectives are out of step: a bug
                        their = their or f"out of step (at collective #{seq}, not #{self.seq})"
                    got[r] = their
                    progressed = True
            if progressed or len(got) == self.size:
                continue
            now = time.perf_counter()
            if err is not None and now - t0 > SETTLE_GRACE_SECONDS:
                prefix = f"[rank {self.rank}] " if self.rank else ""
                print(f"error: {prefix}{err}", file=sys.stderr, flush=True)
                self.abort(2)
            if self.timeout is not None and now - t0 > self.timeout:
                missing = [r for r in peers if r not in got]
                self._stalled(what, now - t0, missing)
            self._answer_pings()
            time.sleep(_NAP_SECONDS if now - t0 < 0.05 else 10 * _NAP_SECONDS)
        MPI.Request.Waitall(sends)
        self.comm_seconds += time.perf_counter() - t0
        errors = [got[r] for r in range(self.size)]
        for r, e in enumerate(errors):
            if e:
                return e if r == 0 or all(x == e for x in errors) else f"[rank {r}] {e}"
        return None

    # -- waiting with a watchdog -------------------------------------------------------------

    def _run(self, start: Callable[[], MPI.Request], what: str) -> None:
        self._collective(what, lambda wait: wait(start()))

    def _collective(self, what: str, body: Callable[[Callable[[MPI.Request], None]], Any]) -> Any:
        """One collective, numbered: announce arrival (for the watchdog), run `body`, which
        waits on its MPI requests through the `wait` it is given, then drain the announcements
        (under the same deadline: a collective can complete on one rank before every rank has
        arrived, e.g. a broadcast's root). Returns what `body` returns."""
        self.seq += 1
        t0 = time.perf_counter()
        if self.timeout is None:
            result = body(lambda req: req.Wait())
            self.comm_seconds += time.perf_counter() - t0
            return result
        diag = self._diag
        assert diag is not None
        self._arrive[0] = self.seq
        sends, recvs = [], {}
        for r in range(self.size):
            if r != self.rank:
                recvs[r] = diag.Irecv(self._arrive_in[r], source=r, tag=_ARRIVE_TAG)
                sends.append(diag.Isend(self._arrive, dest=r, tag=_ARRIVE_TAG))
        self._arrivals = recvs
        result = body(lambda req: self._wait(req, what, t0))
        for req in recvs.values():
            self._wait(req, what, t0)
        MPI.Request.Waitall(sends)
        self.comm_seconds += time.perf_counter() - t0
        return result

    def _wait(self, req: MPI.Request, what: str, t0: float) -> None:
        if self.timeout is None:
            req.Wait()
            return
        deadline = t0 + self.timeout
        polls = 0
        while not req.Test():
            now = time.perf_counter()
            if now - t0 > _SPIN_SECONDS:
                if now > deadline:
                    self._stalled(what, now - t0)
                polls += 1
                if polls % 16 == 0:
                    self._answer_pings()
                time.sleep(_NAP_SECONDS)

    def missing_ranks(self) -> list[int]:
        """Ranks whose arrival at the current collective has not been announced to this rank."""
        return [r for r, req in self._arrivals.items() if not req.Get_status()]

    def _send_small(self, value: int, dest: int, tag: int) -> None:
        """A fire-and-forget 8-byte message; its buffer is kept until the send is done."""
        assert self._diag is not None
        self._in_flight = [(b, q) for b, q in self._in_flight if not q.Get_status()]
        buf = np.array([value], dtype=np.int64)
        self._in_flight.append((buf, self._diag.Isend(buf, dest=dest, tag=tag)))

    def _answer_pings(self) -> None:
        """Answer every pending "are you alive?" (ranks poll here while they wait)."""
        if self._diag is None:
            return
        status = MPI.Status()
        while self._diag.Iprobe(source=MPI.ANY_SOURCE, tag=_PING_TAG, status=status):
            src = status.Get_source()
            self._diag.Recv(self._ping, source=src, tag=_PING_TAG)
            self._send_small(int(self._ping[0]), src, _PONG_TAG)

    def unresponsive_ranks(self, ranks: list[int], grace: float) -> list[int]:
        """Of `ranks`, those that do not answer a ping within `grace` seconds: stopped (SIGSTOP,
        a debugger) or stuck outside MPI. Every waiting rank answers pings while it polls."""
        assert self._diag is not None
        for r in ranks:
            self._send_small(self.seq, r, _PING_TAG)
        pending, answer = set(ranks), np.zeros(1, dtype=np.int64)
        status, end = MPI.Status(), time.perf_counter() + grace
        while pending and time.perf_counter() < end:
            while self._diag.Iprobe(source=MPI.ANY_SOURCE, tag=_PONG_TAG, status=status):
                self._diag.Recv(answer, source=status.Get_source(), tag=_PONG_TAG)
                pending.discard(status.Get_source())
            self._answer_pings()
            time.sleep(0.002)
        return sorted(pending)

    def _stalled(self, what: str, waited: float, missing: list[int] | None = None) -> None:
        missing = self.missing_ranks() if missing is None else missing
        silent: list[int] = []
        if not missing:  # everyone arrived: a rank that cannot answer is holding everyone up
            peers = [r for r in range(self.size) if r != self.rank]
            silent = self.unresponsive_ranks(peers, min(2.0, max(0.5, (self.timeout or 0) / 4)))
        if missing:
            names = ", ".join(str(r) for r in missing)
        else:
            names = "none (all arrived" + ("" if silent else "; MPI itself is stuck") + ")"
        stopped = ""
        if silent:
            stopped = "; ranks not answering (stopped, or stuck outside MPI): " + ", ".join(
                str(r) for r in silent
            )
        msg = (
            f"collective #{self.seq} ({what}) waited {waited:.1f} s, longer than "
            f"--collective-timeout {self.timeout:g}; ranks that did not arrive: {names}{stopped}"
        )
        print(f"[rank {self.rank}] error: {msg}. Aborting the job.", file=sys.stderr, flush=True)
        if self.on_stall is not None:
            try:
                self.on_stall(msg)
            except Exception:
                pass
        self.abort(1)

    # -- ending the job ----------------------------------------------------------------------

    def abort(self, code: int = 1) -> None:
        """End every rank of the job now (MPI_Abort); in a single process, exit."""
        sys.stderr.flush()
        sys.stdout.flush()
        if MPI.COMM_WORLD.Get_size() > 1:
            # The launcher forwards our output through a pipe and stops forwarding once it tears
            # the job down; a moment's grace lets the `[rank k]` traceback reach the user.
            time.sleep(_ABORT_GRACE_SECONDS)
            MPI.COMM_WORLD.Abort(code)
        os._exit(code)


def run_or_abort(fn: Callable[[], int], comm: Comm) -> int:
    """Run fn(); if it raises (or calls sys.exit with a non-zero code) on any rank, print that
    rank's traceback as `[rank k] ...` and abort the whole job, so no other rank is left waiting
    in a collective. With plain `mpirun python -m distcnn.train` (no `-m mpi4py`) an uncaught
    exception would otherwise hang the job."""
    try:
        return fn()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 0 or comm.size == 1:
            raise
        print(f"[rank {comm.rank}] exited with code {code}; aborting the job", file=sys.stderr)
        comm.abort(code)
        return code
    except KeyboardInterrupt:
        if comm.size == 1:
            raise
        comm.abort(130)
        return 130
    except BaseException:
        tb = traceback.format_exc().rstrip("\n").splitlines()
        print("\n".join(f"[rank {comm.rank}] {line}" for line in tb), file=sys.stderr, flush=True)
        if comm.size > 1:
            comm.abort(1)
        return 1
