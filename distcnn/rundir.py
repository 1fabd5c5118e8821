"""The run directory (`--checkpoint-dir`): one path names one run and holds all of it.

    ckpt-<8 digits>.h5   checkpoints (root attribute run_id), the newest --keep of this run
    best.h5              the best by validation accuracy
    run.json             run id, resolved config, created time, host, world size
    status.json          the live state (distcnn.status shows it)
    metrics.jsonl        the metrics log, unless --log names another file
    lock                 host and PID of the live job using the directory

Rules: a run never deletes or changes another run's files (pruning and `--resume auto` look
only at checkpoints carrying this run's id); a new run (no `--resume`) refuses a directory that
holds another run; a live lock (same host, PID alive and a distcnn process; or another host)
refuses a second job at once; a lock whose PID is dead on this host is stale and replaced.

Rank 0 alone calls these; the decisions travel in the setup checks of distcnn.train.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from distcnn.errors import UsageError

RUN_FILE = "run.json"
STATUS_FILE = "status.json"
METRICS_FILE = "metrics.jsonl"
LOCK_FILE = "lock"


def new_run_id() -> str:
    """A fresh run id: the UTC start time and 6 random hex digits (sortable, unique)."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def read_json(path: Path) -> dict[str, Any] | None:
    """A small JSON object file, or None when it is missing or not one."""
    try:
        with open(path, "rb") as f:
            raw = f.read(1 << 20)
        obj = json.loads(raw)
    except (OSError, ValueError):
        return None
    return obj if isinstance(obj, dict) else None


def write_json_atomic(path: Path, obj: dict[str, Any]) -> None:
    """Write obj as strict JSON to path through a temporary file and a rename (readers never
    see half a file). Raises OSError."""
    text = json.dumps(obj, sort_keys=True, allow_nan=False) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o644)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def dir_run_id(directory: str | os.PathLike) -> str | None:
    """The run id recorded in the directory's run.json, or None."""
    info = read_json(Path(directory) / RUN_FILE)
    rid = info.get("run_id") if info else None
    return rid if isinstance(rid, str) and rid else None


def check_writable_dir(path: str) -> None:
    """Create --checkpoint-dir and prove it writable, or raise UsageError (exit 2)."""
    d = Path(path)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", suffix=".tmp", dir=d)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        reason = e.strerror or str(e)
        raise UsageError(
            f"--checkpoint-dir {path} is unusable ({reason}); give a writable directory"
        ) from None


# -- the lock ---------------------------------------------------------------------------------


def _is_live_distcnn(pid: int) -> bool:
    """On this host: is pid a running process that looks like distcnn (not a reused PID)?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # alive; cannot tell what it is
    return b"distcnn" in cmd or b"python" in cmd


class Lock:
    """`lock` in the run directory: {"host", "pid", "run_id", "since"}, made with O_EXCL."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_FILE
        self.held = False

    def acquire(self, run_id: str) -> str | None:
        """Take the lock, or raise UsageError naming the live job; returns a note when a stale
        lock was replaced."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "run_id": run_id}
        note = None
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = read_json(self.path)
                stale = self._stale(other)
                if stale is None:
                    raise UsageError(self._busy_message(other)) from None
                try:
                    self.path.unlink()
                except FileNotFoundError:
                    pass
                except OSError as e:
                    raise UsageError(
                        f"--checkpoint-dir {self.path.parent}: cannot remove the stale lock "
                        f"{self.path} ({e.strerror}); remove it by hand"
                    ) from None
                note = f"removed the stale lock {self.path} ({stale})"
                continue
            except OSError as e:
                raise UsageError(
                    f"--checkpoint-dir {self.path.parent}: cannot create {self.path} "
                    f"({e.strerror}); give a writable directory"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({**me, "since": time.time()}, f)
            self.held = True
            return note
        raise UsageError(f"--checkpoint-dir {self.path.parent}: the lock keeps changing; retry")

    def _stale(self, other: dict[str, Any] | None) -> str | None:
        """Why the existing lock is stale, or None when it belongs to a live job (or cannot be
        proved dead: another host)."""
        if other is None:
            # unreadable or half-written: a job that died while taking it, or one taking it now
            try:
                age = time.time() - self.path.stat().st_mtime
            except OSError:
                return "gone"
            return "empty or damaged, 10 s old" if age > 10 else None
        pid, host = other.get("pid"), other.get("host")
        if host != socket.gethostname() or not isinstance(pid, int):
            return None
        if pid == os.getpid():
            return "left by this process"
        return None if _is_live_distcnn(pid) else f"pid {pid} on {host} is not running"

    def _busy_message(self, other: dict[str, Any] | None) -> str:
        d = self.path.parent
        if other is None:
            return (
                f"--checkpoint-dir {d} is being locked by another job right now ({self.path}); "
                "wait for it to end or use another directory"
            )
        host, pid = other.get("host"), other.get("pid")
        since = other.get("since")
        when = ""
        if isinstance(since, (int, float)):
            when = time.strftime(" since %H:%M:%S UTC", time.gmtime(since))
        if host == socket.gethostname():
            return (
                f"--checkpoint-dir {d} is in use by a live job (pid {pid} on {host}{when}); "
                "wait for it to end or give another --checkpoint-dir"
            )
        return (
            f"--checkpoint-dir {d} is in use by pid {pid} on host {host}{when}; wait for it to "
            f"end, or if that job is gone, delete {self.path}"
        )

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            other = read_json(self.path)
            if other and other.get("pid") == os.getpid():
                self.path.unlink()
        except OSError:
            pass


# -- the metrics log --------------------------------------------------------------------------


def is_distcnn_log(path: Path) -> bool:
    """Whether a non-empty file was written by distcnn: its first line is a JSON object with a
    `kind` (every record distcnn or its supervisor writes has one)."""
    try:
        with open(path, "rb") as f:
            first = f.readline(1 << 16)
        rec = json.loads(first)
    except (OSError, ValueError):
        return False
    return isinstance(rec, dict) and isinstance(rec.get("kind"), str)


def check_log(path: str, flag: str = "--log") -> None:
    """Refuse a metrics log that cannot be written, or that distcnn did not write (appending
    to it, or dropping records from it on resume, would change a file we do not own)."""
    p = Path(path)
    parent = p.parent
    if not parent.is_dir():
        raise UsageError(
            f"{flag} {path}: the folder {parent} does not exist; create it or give another path"
        )
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give the path of a file")
    if p.exists():
        if not p.is_file():
            raise UsageError(f"{flag} {path} is not a regular file; give the path of a file")
        if not os.access(p, os.W_OK):
            raise UsageError(f"{flag} {path} is read-only; give a writable file")
        if p.stat().st_size and not is_distcnn_log(p):
            raise UsageError(
                f"{flag} {path} was not written by distcnn (its first line is not a metrics "
                "record); give a new file, distcnn only appends to its own logs"
            )
    elif not os.access(parent, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {parent} is read-only; give another path")


# -- the run directory ------------------------------------------------------------------------


class RunDir:
    """Rank 0's view of the run directory: ownership, the lock, run.json and status.json."""

    def __init__(self, path: str, run_id: str, log_path: str | None = None) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self.log_path = log_path or str(self.path / METRICS_FILE)
        self.lock = Lock(self.path)

    def prepare(self, new_run: bool, resumed_from: str | None) -> list[str]:
        """Before any work: the directory is writable, this job holds its lock, it holds no
        other run, and the log can be written. Raises UsageError (exit 2); returns notes."""
        check_writable_dir(str(self.path))
        notes = []
        note = self.lock.acquire(self.run_id)
        if note:
            notes.append(note)
        try:
            self._check_owner(new_run, resumed_from)
            check_log(
                self.log_path,
                "--log"
                if self.log_path != str(self.path / METRICS_FILE)
                else "the run's metrics log",
            )
        except UsageError:
            self.release()
            raise
        return notes

    def _check_owner(self, new_run: bool, resumed_from: str | None) -> None:
        d, rid = self.path, dir_run_id(self.path)
        if rid is not None and rid != self.run_id:
            whose = (
                f"; {resumed_from} belongs to run {self.run_id or '(none)'}" if resumed_from else ""
            )
            raise UsageError(
                f"--checkpoint-dir {d} holds run {rid} (see {d / RUN_FILE}){whose}; continue it "
                "with --resume auto, or give another --checkpoint-dir"
            )
        if not new_run:
            return
        from distcnn import checkpoint as ckpt

        files = ckpt.list_checkpoints(d)
        best = d / "best.h5"
        if files or best.exists():
            newest = files[0][1].name if files else best.name
            n = len(files) + best.exists()
            raise UsageError(
                f"--checkpoint-dir {d} holds another run's checkpoints ({n} file"
                f"{'s' if n > 1 else ''}, newest {newest}); continue it with --resume auto, or "
                "give another --checkpoint-dir"
            )

    def write_run_json(self, config: dict[str, Any], world_size: int, step: int) -> None:
        """run.json: the run id, resolved config, created time and host (created is kept from
        an earlier invocation of the same run)."""
        path = self.path / RUN_FILE
        old = read_json(path) or {}
        now = time.time()
        write_json_atomic(
            path,
            {
                "run_id": self.run_id,
                "created": old.get("created", now) if old.get("run_id") == self.run_id else now,
                "started": now,
                "start_step": step,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "world_size": world_size,
                "config": config,
                "metrics_log": self.log_path,
            },
        )

    def release(self) -> None:
        self.lock.release()
