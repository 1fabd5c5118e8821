"""MPI when it is there, a one-process stand-in when it is not needed, one line when it is.

`from distcnn.mpienv import MPI` gives mpi4py's MPI module whenever it loads. When it cannot
load (no MPI library: neither the `mpi` extra, `pip install 'distcnn[mpi]'`, nor a system MPI)
and the process was not started by an MPI launcher with several ranks, it gives `SELF`: a
stand-in whose COMM_WORLD is one rank of size 1, so a single process runs the same code path
(every collective of distcnn.comm short-cuts at size 1) without MPI. When a launcher did start
several ranks, importing this module raises `MPIUnavailable` (a UsageError: exit 2) whose one
line says what to install.

`AVAILABLE` says which case holds; `REASON` keeps the loader's last line for `doctor`-like
reports.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from distcnn.errors import UsageError
from distcnn.launcher import launched_rank, launched_ranks


class MPIUnavailable(UsageError):
    """Several ranks were launched but this Python cannot load an MPI library; `rank` is this
    process's rank as the launcher numbered it."""

    rank = 0


class _Op:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"MPI.{self.name} (stand-in)"


class _SelfComm:
    """COMM_WORLD of one process: rank 0 of 1. Only what a size-1 run calls exists."""

    def Get_rank(self) -> int:  # noqa: N802 - mpi4py's names
        return 0

    def Get_size(self) -> int:  # noqa: N802
        return 1

    def Split_type(self, *args: Any, **kwargs: Any) -> _SelfComm:  # noqa: N802
        return self

    def Split(self, *args: Any, **kwargs: Any) -> _SelfComm:  # noqa: N802
        return self

    def Dup(self) -> _SelfComm:  # noqa: N802
        return self

    def Free(self) -> None:  # noqa: N802
        pass

    def Barrier(self) -> None:  # noqa: N802
        pass

    barrier = Barrier

    # mpi4py's pickle-based lowercase collectives, for one rank: the object itself
    def bcast(self, obj: Any, root: int = 0) -> Any:
        return obj

    def allreduce(self, obj: Any, op: Any = None) -> Any:
        return obj

    def allgather(self, obj: Any) -> list[Any]:
        return [obj]

    def gather(self, obj: Any, root: int = 0) -> list[Any]:
        return [obj]

    def __getattr__(self, name: str) -> Any:
        raise MPIUnavailable(f"MPI {name} is needed but no MPI library is loaded: {INSTALL}")

    def Abort(self, code: int = 1) -> None:  # noqa: N802
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


class _SelfMPI:
    """The part of mpi4py's MPI module a one-process run touches; anything else is refused
    with the install line."""

    class Exception(RuntimeError):  # noqa: A001, N818 - mirrors MPI.Exception
        pass

    def __init__(self) -> None:
        self.COMM_WORLD = _SelfComm()
        self.COMM_SELF = self.COMM_WORLD
        self.COMM_TYPE_SHARED = 0
        for name in ("IN_PLACE", "SUM", "MIN", "MAX", "MODE_NOCHECK"):
            setattr(self, name, _Op(name))

    @staticmethod
    def Get_processor_name() -> str:  # noqa: N802
        return socket.gethostname()

    @staticmethod
    def Get_library_version() -> str:  # noqa: N802
        return "none (no MPI library loaded; one process)"

    @staticmethod
    def Wtime() -> float:  # noqa: N802
        import time

        return time.perf_counter()

    def __getattr__(self, name: str) -> Any:
        raise MPIUnavailable(f"MPI.{name} is needed but no MPI library is loaded: {INSTALL}")


INSTALL = (
    "pip install 'distcnn[mpi]' (the MPICH wheel, gives mpirun), or install your cluster's MPI "
    "and rebuild mpi4py against it (pip install --no-binary mpi4py mpi4py)"
)

AVAILABLE = True
REASON = ""
try:
    from mpi4py import MPI  # type: ignore[no-redef]
except (ImportError, RuntimeError, OSError) as _e:
    AVAILABLE = False
    _lines = [line.strip() for line in str(_e).splitlines() if line.strip()]
    REASON = _lines[-1] if _lines else type(_e).__name__
    if launched_ranks() > 1:
        _err = MPIUnavailable(
            f"{launched_ranks()} ranks were launched but this Python cannot load an MPI library "
            f"({REASON}): {INSTALL}"
        )
        _err.rank = launched_rank()  # only rank 0 prints it
        raise _err from None
    MPI = _SelfMPI()  # type: ignore[assignment]
