"""Fault injection for tests and drills: DISTCNN_FAULT=<rank>:<step>:<mode>.

Off unless the variable is set. Modes: `raise` (an exception on that rank at that step),
`exit` (sys.exit(3)), `hang` (block forever, for the watchdog), `nan` (a non-finite gradient
on that rank at that step: see Trainer).
"""

from __future__ import annotations

import os
import sys
import time

from distcnn.errors import UsageError

MODES = ("raise", "exit", "hang", "nan")


def fault_from_env(rank: int) -> tuple[int, str] | None:
    """DISTCNN_FAULT=<rank>:<step>:<mode> -> (step, mode) for this rank, None otherwise."""
    spec = os.environ.get("DISTCNN_FAULT", "").strip()
    if not spec:
        return None
    try:
        r, s, mode = spec.split(":")
        r_i, s_i = int(r), int(s)
    except ValueError:
        raise UsageError(
            f"DISTCNN_FAULT={spec!r} is malformed; use <rank>:<step>:<{'|'.join(MODES)}>"
        ) from None
    if mode not in MODES:
        raise UsageError(f"DISTCNN_FAULT mode {mode!r} is unknown; use raise, exit, hang or nan")
    return (s_i, mode) if r_i == rank else None


def inject_fault(mode: str, step: int, rank: int) -> None:
    """Carry out a fault that happens before the step (every mode but nan)."""
    if mode == "raise":
        raise RuntimeError(f"DISTCNN_FAULT: injected failure on rank {rank} at step {step}")
    if mode == "exit":
        sys.exit(3)
    if mode == "hang":
        while True:
            time.sleep(3600)
