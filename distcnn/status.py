"""`python -m distcnn.status RUN_DIR [--watch] [--json]`: the state of a run, live or not.

The trainer's rank 0 keeps `RUN_DIR/status.json` current (StatusFile below: written atomically
at start, at each step record (every --log-every steps), after each checkpoint and at every
change of state); a supervisor adds `RUN_DIR/supervisor.json`. This command shows both:
a running, finished, failed, preempted or supervised run. A status that says running while its
process is gone (same host, PID dead) is shown as stale.

status.json (strict JSON, no NaN):
    run_id, state (starting|running|done|failed|preempted|interrupted), step, total_steps,
    epoch, loss, accuracy, images_per_sec, eta_seconds, last_checkpoint, restarts,
    last_failure (null or {rank, host, step, message}), updated (Unix time), world_size, pid,
    host

Standard library only.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from distcnn.errors import ArgumentParser, UsageError

STATUS_FILE = "status.json"
SUPERVISOR_FILE = "supervisor.json"
STATES = ("starting", "running", "done", "failed", "preempted", "interrupted")
FINAL = ("done", "failed", "preempted", "interrupted")
MIN_INTERVAL = 1.0  # seconds between writes while running (state changes are written at once)


def strict(v: Any) -> Any:
    """v with every non-finite float replaced by None (strict JSON has no NaN)."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict(x) for x in v]
    return v


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read(1 << 22))
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Strict JSON through a temporary file in the same directory and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(strict(obj), sort_keys=True, allow_nan=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise


class StatusFile:
    """Rank 0's status.json. Writes never raise: a status that cannot be written must not
    stop the training (the next write tries again)."""

    def __init__(self, run_dir: str | os.PathLike, run_id: str, total_steps: int, world: int):
        self.path = Path(run_dir) / STATUS_FILE
        previous = _read_json(self.path) or {}
        same_run = previous.get("run_id") == run_id
        self.data: dict[str, Any] = {
            "run_id": run_id,
            "state": "starting",
            "step": 0,
            "total_steps": total_steps,
            "epoch": 0,
            "loss": None,
            "accuracy": None,
            "images_per_sec": None,
            "eta_seconds": None,
            "last_checkpoint": previous.get("last_checkpoint") if same_run else None,
            "restarts": _restarts(),
            # the run's last failure stays visible while a restarted attempt runs
            "last_failure": previous.get("last_failure") if same_run else None,
            "updated": time.time(),
            "world_size": world,
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }
        self.last_write = 0.0
        self.error: str | None = None  # the first write error, for one warning

    def update(self, force: bool = False, **fields: Any) -> None:
        """Merge fields; write now if forced (a change of state, a checkpoint) or if the last
        write is MIN_INTERVAL old."""
        self.data.update(fields)
        now = time.time()
        if not force and now - self.last_write < MIN_INTERVAL:
            return
        self.data["updated"] = now
        try:
            write_atomic(self.path, self.data)
            self.last_write = now
        except (OSError, ValueError) as e:
            if self.error is None:
                self.error = f"cannot write {self.path}: {getattr(e, 'strerror', None) or e}"


def _restarts() -> int:
    try:
        return max(0, int(os.environ.get("DISTCNN_RESTARTS", "0")))
    except ValueError:
        return 0


# -- the command ------------------------------------------------------------------------------


def _alive(status: dict[str, Any]) -> bool | None:
    """Whether the process that writes a non-final status is still there (None: cannot tell,
    another host)."""
    if status.get("host") != socket.gethostname() or not isinstance(status.get("pid"), int):
        return None
    try:
        os.kill(status["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def collect(run_dir: Path) -> dict[str, Any]:
    """The run's status, with supervisor.json merged in when present; UsageError when the
    directory holds neither."""
    if not run_dir.is_dir():
        raise UsageError(f"{run_dir} is not a directory; give a run directory (--checkpoint-dir)")
    status = _read_json(run_dir / STATUS_FILE)
    sup = _read_json(run_dir / SUPERVISOR_FILE)
    if status is None and sup is None:
        raise UsageError(
            f"{run_dir} has no status.json (or it is unreadable): not a run directory, or its "
            "run has not started yet; give the --checkpoint-dir of a run"
        )
    out: dict[str, Any] = dict(status or {})
    if status is not None and status.get("state") not in FINAL:
        alive = _alive(status)
        out["alive"] = alive
        if alive is False:
            out["stale"] = True
    out["supervisor"] = sup
    return strict(out)


def _fmt_time(t: Any) -> str:
    if not isinstance(t, (int, float)):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(t))


def _hms(s: Any) -> str:
    if not isinstance(s, (int, float)):
        return "-"
    s = int(s + 0.5)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def render(info: dict[str, Any], now: float | None = None) -> str:
    """The text view of collect()'s result."""
    now = time.time() if now is None else now
    lines = []
    if info.get("run_id") is not None:
        state = str(info.get("state"))
        if info.get("stale"):
            state += f" (stale: pid {info.get('pid')} on {info.get('host')} is gone)"
        lines.append(
            f"run {info['run_id']}  {state}  (pid {info.get('pid')} on {info.get('host')}, "
            f"{info.get('world_size')} rank(s))"
        )
        step, total = info.get("step") or 0, info.get("total_steps") or 0
        pct = f" ({100 * step / total:.1f} %)" if total else ""
        part = [f"step {step}/{total}{pct}", f"epoch {info.get('epoch')}"]
        for key, name, fmt in (
            ("loss", "loss", "{:.4f}"),
            ("accuracy", "accuracy", "{:.4f}"),
            ("images_per_sec", "img/s", "{:,.0f}"),
        ):
            v = info.get(key)
            if isinstance(v, (int, float)):
                part.append(
                    f"{name} {fmt.format(v)}"
                    if key != "images_per_sec"
                    else f"{fmt.format(v)} {name}"
                )
        if info.get("state") in ("starting", "running"):
            part.append(f"eta {_hms(info.get('eta_seconds'))}")
        lines.append("  ".join(part))
        lines.append(f"last checkpoint: {info.get('last_checkpoint') or 'none yet'}")
        fail = info.get("last_failure")
        tail = ""
        if isinstance(fail, dict):
            tail = (
                f"  last failure: rank {fail.get('rank')} on {fail.get('host')} at step "
                f"{fail.get('step')}: {fail.get('message')}"
            )
        lines.append(f"restarts: {info.get('restarts', 0)}{tail}")
        updated = info.get("updated")
        if isinstance(updated, (int, float)):
            lines.append(f"updated {max(0.0, now - updated):.0f} s ago ({_fmt_time(updated)})")
    sup = info.get("supervisor")
    if isinstance(sup, dict):
        lines.append(
            f"supervisor: {sup.get('state')}, restarts {sup.get('restarts')} of "
            f"{sup.get('max_restarts')}"
        )
        attempts = sup.get("attempts") or []
        if attempts:
            lines.append(
                f"  {'attempt':<8} {'start':<9} {'end':<9} {'ranks':>5} {'exit':>5}  "
                f"{'outcome':<12} {'failing':<20} {'step':>6}"
            )
        for a in attempts:
            if not isinstance(a, dict):
                continue
            failing = "-"
            if a.get("failing_rank") is not None:
                failing = f"rank {a['failing_rank']} ({a.get('failing_host') or '?'})"
            exit_code = a.get("exit_code")
            lines.append(
                f"  {a.get('n', '?')!s:<8} {_fmt_time(a.get('start')):<9} "
                f"{_fmt_time(a.get('end')):<9} {a.get('ranks', '-')!s:>5} "
                f"{'-' if exit_code is None else exit_code!s:>5}  {a.get('outcome') or '-':<12} "
                f"{failing:<20} {a.get('step_reached', '-')!s:>6}"
            )
    return "\n".join(lines)


def _finished(info: dict[str, Any]) -> bool:
    sup = info.get("supervisor")
    if isinstance(sup, dict) and sup.get("state") not in (None, "done", "failed", "stopped"):
        return False
    return info.get("state") in FINAL or bool(info.get("stale"))


def main(argv: list[str] | None = None) -> int:
    p = ArgumentParser(
        prog="python -m distcnn.status",
        description="Show the state of a run (its --checkpoint-dir): running, finished, failed, "
        "preempted or supervised.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (--checkpoint-dir)")
    p.add_argument("--watch", action="store_true", help="refresh until the run has ended")
    p.add_argument("--json", action="store_true", help="one strict JSON object (per refresh)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    try:
        args = p.parse_args(argv)
        if not (0.05 <= args.interval <= 3600):
            raise UsageError(f"--interval {args.interval} must be between 0.05 and 3600 seconds")
        run_dir = Path(args.run_dir)
        info = collect(run_dir)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        while True:
            if args.json:
                print(json.dumps(info, sort_keys=True, allow_nan=False), flush=True)
            else:
                print(render(info), flush=True)
            if not args.watch or _finished(info):
                return 0
            time.sleep(args.interval)
            try:
                info = collect(run_dir)
            except UsageError as e:
                print(f"error: {e}", file=sys.stderr, flush=True)
                return 2
            if not args.json:
                print()
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
