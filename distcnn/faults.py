"""Fault injection for tests and drills: DISTCNN_FAULT=<rank>:<step>:<mode>[@<attempt>][,...].

Off unless the variable is set. Modes: `raise` (an exception on that rank at that step),
`exit` (sys.exit(3)), `hang` (block forever, for the watchdog), `nan` (a non-finite gradient
on that rank at that step: see Trainer), `kill` (SIGKILL to itself, no traceback, no cleanup),
`kill-save` (rank 0 only: SIGKILL to itself while it writes the checkpoint of that step, after
the temporary file is written and before it is renamed into place).

Faults happen before the step is computed (`kill-save`: after it, during its save). The step
`setup` instead of a number (`1:setup:hang`) puts the fault in the rank's start-up, where it
gathers its facts for the ranks' agreement (distcnn.agree): a rank stuck or failing in setup.
Several faults are separated by commas; `@A` makes one apply only to the attempt whose
DISTCNN_RESTARTS (set by `python -m distcnn.supervise`, 0 when unset) is A, so a supervised
chaos drill can fail each attempt differently. At most one fault per rank and attempt.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass

from distcnn.errors import UsageError

MODES = ("raise", "exit", "hang", "nan", "kill", "kill-save")
SETUP = -1  # the step number `setup` stands for
SETUP_MODES = ("raise", "exit", "hang", "kill")
FORM = f"<rank>:<step>:<{'|'.join(MODES)}>[@<attempt>], comma-separated"


@dataclass(frozen=True)
class Fault:
    rank: int
    step: int
    mode: str
    attempt: int | None  # None: every attempt


def parse(spec: str) -> list[Fault]:
    """The faults of a DISTCNN_FAULT value; UsageError (exit 2) for anything malformed."""
    faults: list[Fault] = []
    for item in (x.strip() for x in spec.split(",")):
        head, _, attempt = item.partition("@")
        try:
            r, s, mode = head.split(":")
            step = SETUP if s == "setup" else int(s)
            f = Fault(int(r), step, mode, int(attempt) if attempt else None)
        except ValueError:
            raise UsageError(f"DISTCNN_FAULT={spec!r} is malformed; use {FORM}") from None
        if mode not in MODES:
            raise UsageError(
                f"DISTCNN_FAULT mode {mode!r} is unknown; use one of {', '.join(MODES)}"
            )
        if f.step == SETUP and mode not in SETUP_MODES:
            raise UsageError(
                f"DISTCNN_FAULT entry {item!r}: at setup use one of {', '.join(SETUP_MODES)}"
            )
        bad_step = f.step < 1 and (f.step != SETUP or s != "setup")
        if f.rank < 0 or bad_step or (f.attempt is not None and f.attempt < 0):
            raise UsageError(
                f"DISTCNN_FAULT entry {item!r}: rank and attempt must be >= 0, step >= 1 or setup"
            )
        if mode == "kill-save" and f.rank != 0:
            raise UsageError(
                f"DISTCNN_FAULT entry {item!r}: kill-save applies to rank 0 (the rank that "
                "writes checkpoints); use 0:<step>:kill-save"
            )
        for g in faults:
            if g.rank == f.rank and (
                g.attempt is None or f.attempt is None or g.attempt == f.attempt
            ):
                raise UsageError(
                    f"DISTCNN_FAULT={spec!r} gives rank {f.rank} two faults in one attempt; "
                    "give one per rank and attempt (qualify them with @<attempt>)"
                )
        faults.append(f)
    return faults


def current_attempt() -> int:
    """DISTCNN_RESTARTS (the supervisor's count of restarts before this attempt), else 0."""
    value = os.environ.get("DISTCNN_RESTARTS", "").strip()
    return int(value) if value.isdigit() else 0


def _mine(rank: int) -> Fault | None:
    spec = os.environ.get("DISTCNN_FAULT", "").strip()
    if not spec:
        return None
    attempt = current_attempt()
    for f in parse(spec):
        if f.rank == rank and f.attempt in (None, attempt):
            return f
    return None


def fault_from_env(rank: int) -> tuple[int, str] | None:
    """(step, mode) of this rank's fault in this attempt, None otherwise. A `kill-save` fault
    is not returned: checkpoint.save carries it out (during_save). Validates the whole value."""
    f = _mine(rank)
    return (f.step, f.mode) if f is not None and f.mode != "kill-save" else None


def at_setup(rank: int) -> None:
    """Called once in start-up (distcnn.agree): carries out `<rank>:setup:<mode>`. A malformed
    DISTCNN_FAULT is left to fault_from_env, which refuses it with exit 2."""
    if "DISTCNN_FAULT" not in os.environ:
        return
    try:
        f = _mine(rank)
    except UsageError:
        return
    if f is not None and f.step == SETUP:
        inject_fault(f.mode, "setup", rank)


def inject_fault(mode: str, step: int | str, rank: int) -> None:
    """Carry out a fault that happens before the step (every mode but nan)."""
    if mode == "raise":
        raise RuntimeError(f"DISTCNN_FAULT: injected failure on rank {rank} at step {step}")
    if mode == "exit":
        sys.exit(3)
    if mode == "kill":
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if mode == "hang":
        while True:
            time.sleep(3600)


def during_save(step: int) -> None:
    """Called by checkpoint.save (only rank 0 saves) between writing the temporary file and
    renaming it: `0:<step>:kill-save` SIGKILLs this process there."""
    if "DISTCNN_FAULT" not in os.environ:
        return
    try:
        f = _mine(0)
    except UsageError:  # refused at start-up already (fault_from_env)
        return
    if f is not None and f.mode == "kill-save" and f.step == step:
        os.kill(os.getpid(), signal.SIGKILL)


def slow_from_env(rank: int) -> float:
    """DISTCNN_SLOW=<rank>:<seconds> -> the extra seconds per step of this rank (0: none)."""
    spec = os.environ.get("DISTCNN_SLOW", "").strip()
    if not spec:
        return 0.0
    try:
        r, s = spec.split(":")
        r_i, s_f = int(r), float(s)
        if not 0 <= s_f <= 60:
            raise ValueError
    except ValueError:
        raise UsageError(
            f"DISTCNN_SLOW={spec!r} is malformed; use <rank>:<seconds>, seconds in [0, 60]"
        ) from None
    return s_f if r_i == rank else 0.0
