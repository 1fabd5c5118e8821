"""What rank 0 shows while training: a live bar on a terminal, plain lines elsewhere, one
summary line per epoch, and the --profile table at the end.

A tqdm bar (optional extra `progress`) is drawn on stderr when stderr is a terminal; without
tqdm, or when stderr is a file or a pipe (CI logs, Slurm output), a plain line is printed every
`--log-every` steps instead. `--no-progress` leaves only the epoch summaries. Nothing here is a
collective, and a step costs one counter update: all of it stays off the hot path.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


def fmt_metric(v: float | None) -> str:
    """A loss or accuracy with 4 decimals; "-" when there is none (every step skipped)."""
    return "-" if v is None else f"{v:.4f}"


def hms(seconds: float) -> str:
    """Seconds as H:MM:SS."""
    if seconds != seconds:  # NaN: not known yet
        return "-:--:--"
    s = int(max(0.0, seconds) + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class Progress:
    """Rank 0's view of the run; silent on other ranks (`on` False)."""

    def __init__(self, on: bool, total_steps: int, start_step: int, enabled: bool) -> None:
        self.on = on
        self.show_steps = on and enabled
        self.total = total_steps
        self.start_step = start_step
        self.t0 = time.perf_counter()
        self.bar: Any = None
        if self.show_steps and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(
                    total=total_steps,
                    initial=start_step,
                    unit="step",
                    file=sys.stderr,
                    dynamic_ncols=True,
                    mininterval=0.5,
                )

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self, step: int) -> float:
        """Seconds left at this session's average pace (evaluation and saving included)."""
        done = step - self.start_step
        return self.elapsed() / done * (self.total - step) if done > 0 else float("nan")

    def update(self, step: int, rec: dict[str, Any] | None) -> None:
        """After every step; rec is the step record when one was logged at this step."""
        if not self.show_steps:
            return
        if self.bar is not None:
            self.bar.update(1)
            if rec is not None:
                self.bar.set_postfix(
                    loss=fmt_metric(rec["loss"]), acc=fmt_metric(rec["accuracy"]), refresh=False
                )
        elif rec is not None:
            print(
                f"step {step:>6}/{self.total}  epoch {rec['epoch']:.2f}  "
                f"loss {fmt_metric(rec['loss'])}  acc {fmt_metric(rec['accuracy'])}  "
                f"lr {rec['lr']:.4g}  {rec['images_per_sec']:.0f} img/s  eta {hms(self.eta(step))}",
                flush=True,
            )

    def line(self, text: str) -> None:
        """A line that must not tear the bar (epoch summaries, the end)."""
        self._emit(text, sys.stdout)

    def warn(self, text: str) -> None:
        """A line on stderr (warnings, the final error) that does not tear the bar."""
        self._emit(text, sys.stderr)

    def _emit(self, text: str, stream: TextIO) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.write(text, file=stream)
        else:
            print(text, file=stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def profile_table(
    phases: dict[str, float], steps: int, layers: list[tuple[str, float, float]]
) -> str:
    """The --profile table: each phase and each layer's forward/backward as a share of the step.

    phases: seconds per phase over `steps` steps (eval is reported apart, outside the step);
    layers: (name, forward seconds, backward seconds) per layer.
    """
    in_step = {k: v for k, v in phases.items() if k != "eval"}
    total = sum(in_step.values()) or 1e-12
    steps = max(1, steps)

    def row(name: str, seconds: float, indent: int = 0) -> str:
        label = " " * indent + name
        return (
            f"  {label:<26} {seconds:>9.3f} {1e3 * seconds / steps:>9.3f} "
            f"{100 * seconds / total:>6.1f}%"
        )

    lines = [
        f"profile (rank 0): {steps} steps, {1e3 * total / steps:.2f} ms per step",
        f"  {'phase':<26} {'seconds':>9} {'ms/step':>9} {'share':>7}",
    ]
    for name, seconds in in_step.items():
        lines.append(row(name, seconds))
        if name in ("forward", "backward") and layers:
            col = 1 if name == "forward" else 2
            for layer in layers:
                lines.append(row(layer[0], layer[col], indent=4))
            rest = seconds - sum(layer[col] for layer in layers)
            lines.append(row("loss, calls" if col == 1 else "calls", rest, indent=4))
    lines.append(row("step total", total))
    if "eval" in phases:
        lines.append(f"  {'evaluation (not in steps)':<26} {phases['eval']:>9.3f}")
    return "\n".join(lines)
