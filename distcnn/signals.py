"""Signals that stop a run cleanly: the ranks agree on them at the next step's collective."""

from __future__ import annotations

import signal
from typing import Any


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the ranks agree on it at the next step's collective."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
