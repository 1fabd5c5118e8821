"""Stragglers: which rank is persistently slower than the others, named with its host.

Every rank times its own compute per step (from the start of the step to its arrival at the
step's collective: batch, forward, backward). Every `every` steps it puts its mean over the
window into its own slot of the step's reduce buffer, which the allreduce (or the allgather of
--deterministic) carries anyway: no extra round trip. Every rank then holds every rank's time
and makes the same decision; rank 0 reports. A rank slower than the median by more than
`margin` (a fraction) and by more than MIN_EXCESS seconds, in PERSIST windows in a row, is a
straggler: one warning and one metrics record per window while it lasts.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PERSIST = 2  # windows in a row before a rank is named
MIN_EXCESS = 1e-3  # seconds per step: below this, a relative difference is noise


class StragglerWatch:
    """Per-rank compute times over windows of `every` steps, and the verdicts."""

    def __init__(self, rank: int, size: int, every: int, margin: float) -> None:
        self.rank, self.size = rank, size
        self.every, self.margin = every, margin
        self.hosts: list[str] = ["?"] * size  # set once the ranks have shared them
        self.seconds = 0.0  # this rank's compute time in the current window
        self.steps = 0
        self.streak = np.zeros(size, dtype=np.int64)  # windows in a row each rank was slow

    def add(self, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1

    def slot_value(self, step: int) -> float:
        """What this rank puts in its slot for the step numbered `step` (1-based): its mean
        seconds per step when the window ends there, else 0."""
        if self.size == 1 or step % self.every:
            return 0.0
        return self.seconds / max(1, self.steps)

    def window(self, step: int, slots: np.ndarray) -> list[dict[str, Any]]:
        """At the end of a window (every rank the same slots): one record per straggler that has
        lasted PERSIST windows or more. Starts the next window."""
        if self.size == 1 or step % self.every:
            return []
        self.seconds, self.steps = 0.0, 0
        times = np.asarray(slots, dtype=np.float64)
        median = float(np.median(times))
        slow = (times > median * (1.0 + self.margin)) & (times - median > MIN_EXCESS)
        self.streak = np.where(slow, self.streak + 1, 0)
        out = []
        for r in np.flatnonzero(self.streak >= PERSIST):
            out.append(
                {
                    "kind": "straggler",
                    "step": step,
                    "rank": int(r),
                    "host": self.hosts[r],
                    "seconds": float(times[r]),
                    "median": median,
                    "windows": int(self.streak[r]),
                    "first_step": step - int(self.streak[r]) * self.every + 1,
                }
            )
        return out


def describe(rec: dict[str, Any]) -> str:
    """The warning for a straggler record."""
    excess = 100.0 * (rec["seconds"] / rec["median"] - 1.0) if rec["median"] > 0 else float("inf")
    return (
        f"rank {rec['rank']} (host {rec['host']}) is slower than the others: "
        f"{1e3 * rec['seconds']:.1f} ms of compute per step against the median "
        f"{1e3 * rec['median']:.1f} ms (+{excess:.0f} %), steps {rec['first_step']} to "
        f"{rec['step']}"
    )
