"""Everything that talks to other ranks: collectives with a stall watchdog, and fail-fast.

A single process is a communicator of size 1 on the same code path. Every collective here is
non-blocking underneath and waited on by polling, which gives three things at once:
- a watchdog: a rank that waits longer than `timeout` seconds aborts the whole job, naming the
  ranks that never arrived (each rank announces its arrival at collective #k to the others with a
  tiny point-to-point message before joining it; the announcements are drained afterwards);
- ranks that wait do not spin a core for long, which matters when ranks outnumber cores;
- no thread is needed, so no MPI thread-safety question arises.

Distributed touch points in the rest of the code are labelled `# MPI:` so one grep shows them.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
import zlib
from collections.abc import Callable
from typing import Any

import numpy as np
from mpi4py import MPI

_ARRIVE_TAG = 7
_SPIN_SECONDS = 0.002  # poll without sleeping this long; then sleep between polls
_NAP_SECONDS = 0.0002
_ABORT_GRACE_SECONDS = 0.2


class CollectiveTimeout(RuntimeError):
    pass


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
        self._diag = mpi_comm.Dup() if self.size > 1 else None
        self._arrive = np.zeros(1, dtype=np.int64)
        self._arrive_in = np.zeros(1, dtype=np.int64)

    @classmethod
    def world(cls, timeout: float | None = None) -> Comm:
        return cls(MPI.COMM_WORLD, timeout)

    # -- collectives -------------------------------------------------------------------------

    def allreduce_sum(self, buf: np.ndarray, what: str = "allreduce") -> None:
        """In-place sum of buf over all ranks (one MPI_Iallreduce)."""
        if self.size == 1:
            self.seq += 1
            return
        self._run(lambda: self.mpi.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM), what)

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
        import pickle

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

    def check_replicas(self, params: np.ndarray) -> list[int]:
        """Ranks whose parameters differ bitwise from rank 0's (empty when all agree)."""
        mine = np.array([zlib.crc32(params.view(np.uint8))], dtype=np.int64)
        every = np.zeros((self.size, 1), dtype=np.int64)
        self.allgather(mine, every, "replica check")
        return [r for r in range(self.size) if every[r, 0] != every[0, 0]]

    # -- waiting with a watchdog -------------------------------------------------------------

    def _run(self, start: Callable[[], MPI.Request], what: str) -> None:
        self.seq += 1
        t0 = time.perf_counter()
        sends = []
        if self.timeout is not None:
            self._arrive[0] = self.seq
            for r in range(self.size):
                if r != self.rank:
                    sends.append(self._diag.Isend(self._arrive, dest=r, tag=_ARRIVE_TAG))
        req = start()
        self._wait(req, what, t0)
        if self.timeout is not None:
            for r in range(self.size):  # everyone arrived, so these are already here
                if r != self.rank:
                    self._diag.Recv(self._arrive_in, source=r, tag=_ARRIVE_TAG)
            MPI.Request.Waitall(sends)
        self.comm_seconds += time.perf_counter() - t0

    def _wait(self, req: MPI.Request, what: str, t0: float) -> None:
        if self.timeout is None:
            req.Wait()
            return
        deadline = t0 + self.timeout
        while not req.Test():
            now = time.perf_counter()
            if now - t0 > _SPIN_SECONDS:
                if now > deadline:
                    self._stalled(what, now - t0)
                time.sleep(_NAP_SECONDS)

    def missing_ranks(self) -> list[int]:
        """Ranks whose arrival at the current collective has not been announced to this rank."""
        missing = []
        for r in range(self.size):
            if r != self.rank and not self._diag.Iprobe(source=r, tag=_ARRIVE_TAG):
                missing.append(r)
        return missing

    def _stalled(self, what: str, waited: float) -> None:
        missing = self.missing_ranks()
        names = ", ".join(str(r) for r in missing) or "none (all arrived; MPI itself is stuck)"
        print(
            f"[rank {self.rank}] error: collective #{self.seq} ({what}) waited {waited:.1f} s, "
            f"longer than --collective-timeout {self.timeout:g}; ranks that did not arrive: "
            f"{names}. Aborting the job.",
            file=sys.stderr,
            flush=True,
        )
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
