"""Signals that stop a run cleanly, from the first moment of `python -m distcnn.train`.

SIGTERM and SIGUSR1 (a scheduler's preemption) and SIGINT (Ctrl-C) only set a flag; the ranks
agree on it at the next collective (a setup check, or the step's reduce buffer), rank 0 saves
what there is to save, and every rank exits: 0 after a preemption, 130 after SIGINT. A second
SIGINT ends the process at once (exit 130), as users expect from Ctrl-C Ctrl-C.

Under MPICH's `mpiexec` (Hydra) the ranks run in sessions of their own, so Ctrl-C at the
terminal reaches mpiexec alone; it forwards one SIGINT to every rank ("Sending Ctrl-C to
processes as requested") and a second Ctrl-C makes it kill them ("force abort"). SIGTERM and
SIGUSR1 sent to mpiexec are forwarded to every rank too.

Standard library only: `distcnn.train` installs the handlers before MPI starts or NumPy loads.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

CAUGHT = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class StopRequest:
    """What the process was asked: nothing, preempt (SIGTERM/SIGUSR1) or interrupt (SIGINT)."""

    def __init__(self) -> None:
        self._previous: dict[int, Any] = {}
        self.clear()

    def clear(self) -> None:
        self.requested = False  # any of the signals arrived
        self.interrupted = False  # SIGINT among them
        self.signal_name = ""  # the first one

    def install(self) -> StopRequest:
        """Catch the signals (idempotent); restore() puts back what was there."""
        for sig in CAUGHT:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._handler)
        return self

    def restore(self) -> None:
        for sig, old in self._previous.items():
            signal.signal(sig, old if old is not None else signal.SIG_DFL)
        self._previous.clear()

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.interrupted:
            try:
                print("interrupted again: exiting at once without saving", file=sys.stderr)
                sys.stderr.flush()
            finally:
                os._exit(130)
        if not self.requested:
            self.signal_name = signal.Signals(signum).name
        self.requested = True
        self.interrupted = self.interrupted or signum == signal.SIGINT


# The process's one request: train.main installs it first thing; the Trainer reads it.
STOP = StopRequest()


def describe(local: StopRequest, interrupted: bool) -> str:
    """Where an agreed stop came from, for the one line that reports it."""
    if local.requested and local.interrupted == interrupted:
        return f"{local.signal_name if not interrupted else 'SIGINT'} on rank 0"
    return "SIGINT on another rank" if interrupted else "a signal on another rank"
