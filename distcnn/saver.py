"""When and how a run saves: the checkpoint cadence, the replica check before each regular
save, pruning, best.h5, and one outcome that every rank learns.

Rank 0 alone writes; the outcome is broadcast (`# MPI:`), so a failed save raises SaveFailed on
every rank and all end together with one message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from distcnn import checkpoint as ckpt
from distcnn.comm import Comm
from distcnn.metrics import Phases


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; raised on every rank (the outcome is broadcast)."""


class Saver:
    """ckpt-<step>.h5 every `every` steps and at the end, best.h5 on a better validation."""

    def __init__(
        self,
        comm: Comm,
        run_id: str,
        directory: str,
        every: int,
        keep: int,
        phases: Phases,
        state: Callable[[], ckpt.Checkpoint],
        check_replicas: Callable[[], None],
        on_saved: Callable[[Path], None] | None = None,
    ) -> None:
        self.comm = comm
        self.run_id = run_id  # pruning looks only at this run's files
        self.dir = Path(directory)
        self.every = every
        self.keep = keep
        self.phases = phases
        self.state = state  # the checkpoint of the run as it is now
        self.check_replicas = check_replicas
        self.on_saved = on_saved  # rank 0, after each ckpt-<step>.h5 (status.json)
        self.saved_step = -1  # step of the last ckpt-<step>.h5 written by this run

    def due(self, step: int, last: bool) -> bool:
        """A regular save after `step` (the last step's save is the final one)."""
        return step % self.every == 0 and not last

    def checkpoint(self, step: int) -> None:
        """MPI: the replica check, then ckpt-<step>.h5."""
        self.check_replicas()
        self.save(step)

    def save(self, step: int, best: bool = False) -> None:
        """Rank 0 writes ckpt-<step>.h5 (once per step) and, if best, best.h5; everyone learns
        whether it worked, and a failed save raises SaveFailed on every rank."""
        t = time.perf_counter()
        err = ""
        if self.comm.rank == 0:
            what = "the checkpoint"
            try:
                state = self.state()
                if best:  # first: a regular checkpoint never records a best that is not saved
                    what = "best.h5"
                    ckpt.save(self.dir / "best.h5", state)
                    what = "the checkpoint"
                if self.saved_step != step:
                    ckpt.save(self.dir / ckpt.file_name(step), state)
                    self.saved_step = step
                    ckpt.prune(self.dir, self.keep, self.run_id)
                    if self.on_saved is not None:
                        self.on_saved(self.dir / ckpt.file_name(step))
            except Exception as e:  # disk full, directory gone, h5py errors: all end the job
                err = f"saving {what} of step {step} in {self.dir} failed: {e}; "
                err += self._what_is_left()
        err = self.comm.bcast_object(err, 0, "checkpoint outcome")  # MPI: same branch everywhere
        self.phases.add("checkpoint", t)
        if err:
            raise SaveFailed(err)

    def _what_is_left(self) -> str:
        """After a failed save, on rank 0: what the run can still resume from (true words)."""
        if not self.dir.is_dir():
            return f"the run directory {self.dir} is gone, and with it every checkpoint of the run"
        mine = ckpt.of_run(self.dir, self.run_id)
        if not mine:
            return "no earlier checkpoint of this run is on disk"
        step, path = mine[0]
        return f"the previous checkpoint {path} (step {step}) is intact"
