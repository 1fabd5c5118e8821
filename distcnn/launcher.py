"""What an MPI launcher told this process through its environment, without loading MPI.

Standard library only, so the commands and readers that never talk to other ranks (predict,
data, the HDF5 probe in distcnn.safefile) can ask "was I started as one of several ranks?"
without importing mpi4py (whose import initialises MPI).
"""

from __future__ import annotations

import os

_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE", "SLURM_STEP_NUM_TASKS")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "SLURM_PROCID")


def launched_ranks() -> int:
    """Ranks an MPI launcher (mpirun/mpiexec/srun) started, from its environment; 1 if none."""
    for var in _SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


def launched_rank() -> int:
    """This process's rank according to the launcher's environment (0 if not launched)."""
    for var in _RANK_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 0
