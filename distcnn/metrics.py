"""What a run reports: rank 0's console and metrics log, the step window and epoch sums that
the records average, and the wall time per phase.

Nothing here is a collective: every rank keeps the same sums (they come from the step's reduced
values), and rank 0 alone prints and writes. A step costs a few float additions here; records
are built only every `--log-every` steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distcnn.comm import Comm

# Phases of the run timed on rank 0 (every rank times its own; rank 0's go to the log and to
# --profile). "data" is building this rank's batch (and, with --deterministic, adding the
# micro-shard sums); "comm" the step's collective, waiting for slower ranks included.
PHASES = ("data", "forward", "backward", "comm", "optimizer", "checkpoint", "eval")
STEP_PHASES = PHASES[:-1]  # eval happens between steps


@dataclass
class Phases:
    """Wall time per phase of the run, for the log and --profile."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


@dataclass
class LogWindow:
    """The metrics being averaged for the log; saved in checkpoints so that a resumed run logs
    exactly what an uninterrupted one does: the step window (steps since the last multiple of
    --log-every, sums over its finite steps) and the epoch's (loss * images, correct, images)."""

    start: int = 0  # the step the current window follows
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    steps: int = 0  # finite steps in the window
    epoch_sums: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def add(self, loss: float, acc: float, images: int) -> None:
        """One finite step's global mean loss and accuracy over `images` images."""
        self.loss_sum += loss
        self.acc_sum += acc
        self.steps += 1
        e = self.epoch_sums
        e[0] += loss * images
        e[1] += acc * images
        e[2] += images

    def restart(self, step: int) -> None:
        self.start, self.loss_sum, self.acc_sum, self.steps = step, 0.0, 0.0, 0

    def as_saved(self) -> dict[str, Any]:
        return {
            "window": [self.start, self.loss_sum, self.acc_sum, self.steps],
            "epoch_sums": [float(x) for x in self.epoch_sums],
        }

    @classmethod
    def from_saved(cls, saved: dict[str, Any] | None, step: int) -> LogWindow:
        """From a checkpoint's extra["log_state"]; without one the window starts at `step`."""
        if not saved:
            return cls(start=step)
        ws, ls, acs, w = saved["window"]
        return cls(int(ws), ls, acs, int(w), np.array(saved["epoch_sums"], dtype=np.float64))


class Console:
    """Rank 0's printing and metrics log; silent on other ranks."""

    def __init__(self, comm: Comm, log_path: str | None, resumed_step: int | None) -> None:
        self.on = comm.rank == 0
        self.log_path = log_path
        self.resumed_step = resumed_step
        self.log_failed = False

    def continue_log(self) -> None:
        """Once setup has succeeded (a refused resume leaves the log alone): drop the records
        past the step resumed from."""
        path, step = self.log_path, self.resumed_step
        if self.on and path and step is not None and Path(path).exists():
            self._truncate_log(Path(path), step)

    @staticmethod
    def _truncate_log(path: Path, step: int) -> None:
        """Drop records past the resumed step, so they are not repeated (atomic rewrite).
        Only ever called on a log distcnn wrote (rundir.check_log refuses any other file);
        events (the supervisor's attempts) are kept whatever their step."""
        kept = []
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict) and (rec.get("kind") == "event" or rec.get("step", 0) <= step):
                kept.append(line)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)

    def print(self, *args: Any) -> None:
        if self.on:
            print(*args, flush=True)

    def warn(self, msg: str) -> None:
        if self.on:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def record(self, rec: dict[str, Any]) -> None:
        """Append one record. A log that cannot be written (a full disk) does not stop the
        training: one warning says from which step records are missing."""
        if not (self.on and self.log_path):
            return
        try:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            if not self.log_failed:
                self.log_failed = True
                self.warn(
                    f"cannot append to the metrics log {self.log_path} ({e.strerror or e}); "
                    f"its records from step {rec.get('step')} on are missing"
                )


class Metrics:
    """The step and epoch records of a run, averaged over the window in `window`.

    lr_at(step) is the learning rate used by that step (0-based); images/s counts global images
    per wall-clock second since the previous record (or the epoch's start)."""

    def __init__(
        self,
        window: LogWindow,
        phases: Phases,
        log_every: int,
        n_train: int,
        lr_at: Callable[[int], float],
    ) -> None:
        self.window = window
        self.phases = phases
        self.log_every = log_every
        self.n_train = n_train
        self.lr_at = lr_at
        self.mark_step = window.start
        self.restart_clocks(window.start)

    def restart_clocks(self, step: int) -> None:
        """At the start of training: the first record's rates count from here."""
        now = time.perf_counter()
        self.t_record, self.images_since = now, 0
        self.t_epoch, self.images_epoch = now, 0
        self.mark_step, self.mark_phases = step, dict(self.phases.seconds)

    def add(self, loss: float, acc: float, images: int, finite: bool) -> None:
        """After every step (a skipped, non-finite step counts its images but not its values)."""
        self.images_since += images
        self.images_epoch += images
        if finite:
            self.window.add(loss, acc, images)

    def step_record(self, step: int, epoch: int, offset: int, last: bool) -> dict[str, Any] | None:
        """The step record due after `step` (every --log-every steps and at the last step)."""
        if step % self.log_every and not last:
            return None
        w, now = self.window, time.perf_counter()
        steps = step - self.mark_step
        rec: dict[str, Any] = {
            "kind": "step",
            "time": time.time(),
            "step": step,
            "epoch": epoch + offset / self.n_train,
            "loss": w.loss_sum / w.steps if w.steps else None,
            "accuracy": w.acc_sum / w.steps if w.steps else None,
            "lr": self.lr_at(step - 1),
            "images_per_sec": self.images_since / max(1e-9, now - self.t_record),
            # mean seconds per step in each phase since the previous record (rank 0)
            "phase_seconds": {
                k: (self.phases.seconds[k] - self.mark_phases[k]) / max(1, steps)
                for k in STEP_PHASES
            },
        }
        if w.steps < step - w.start:
            rec["skipped_steps"] = step - w.start - w.steps
        self.t_record, self.images_since = now, 0
        self.mark_step, self.mark_phases = step, dict(self.phases.seconds)
        if step % self.log_every == 0:  # windows end at multiples of --log-every
            w.restart(step)
        return rec

    def epoch_record(self, step: int, epoch: int) -> dict[str, Any]:
        """The record of the epoch that just ended (its sums then start afresh)."""
        sums, now = self.window.epoch_sums, time.perf_counter()
        n = sums[2]
        rec = {
            "kind": "epoch",
            "time": time.time(),
            "step": step,
            "epoch": epoch,
            "loss": sums[0] / n if n else None,
            "accuracy": sums[1] / n if n else None,
            "images_per_sec": self.images_epoch / max(now - self.t_epoch, 1e-9),
        }
        sums[:] = 0  # before anything saves (best.h5): the checkpoint holds the new epoch's sums
        return rec

    def new_epoch(self) -> None:
        """After the epoch's summary, validation and saves: the next epoch's clock starts."""
        self.t_epoch, self.images_epoch = time.perf_counter(), 0
