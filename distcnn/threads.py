"""BLAS threads per rank, decided before NumPy starts its thread pool.

Precedence: `--threads`, then OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS from the
environment, then the cores this process may use divided by the ranks on this node (at least 1),
so `mpirun -n 4` on 2 cores runs 1 thread per rank instead of 4 ranks x 2 threads fighting.
OpenBLAS and MKL read these variables once, when NumPy is first imported; after that the count
can only be changed through threadpoolctl.
"""

from __future__ import annotations

import os
import sys

_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def choose(flag: int | None, ranks_on_node: int) -> tuple[int, str]:
    """(threads, where the number came from)."""
    if flag is not None:
        return flag, "--threads"
    for var in _VARS:
        value = os.environ.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    return max(1, usable_cores() // max(1, ranks_on_node)), "cores/ranks on this node"


def apply(threads: int) -> None:
    """Set the thread count for BLAS: environment before NumPy loads, threadpoolctl after."""
    for var in _VARS:
        os.environ[var] = str(threads)
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
