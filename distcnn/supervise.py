"""`python -m distcnn.supervise`: run the training under mpirun and restart it when it fails.

    python -m distcnn.supervise [-n N] [--hostfile F] [--max-restarts K] [--min-ranks M]
        [--backoff S] [--backoff-max S] [--launcher CMD] -- TRAIN_FLAGS...

Each attempt is `<launcher> python -m distcnn.train TRAIN_FLAGS`; every attempt after the first
adds `--resume auto`, so it continues from the newest valid checkpoint of the run. What happens
next is decided by the attempt's outcome:

    done          the job finished (exit 0)                             -> exit 0
    bad-input     the job exited 2 (bad flags or input)                 -> exit 2, no restart
    preempted     SIGTERM/SIGUSR1 reached the job, it saved, exited 0   -> restart at once, free
    stopped       the supervisor itself was signalled, the job saved    -> exit 0 (130: SIGINT)
    interrupted   the job was stopped by SIGINT (exit 130)              -> exit 130, no restart
    crashed       a rank was killed by a signal (e.g. SIGKILL)          -> restart (costs 1)
    timeout       the collective watchdog aborted the job               -> restart (costs 1)
    failed        any other non-zero exit                               -> restart (costs 1)

Restarts that cost wait `--backoff * 2**(k-1)` seconds (capped at `--backoff-max`) before the
k-th; when `--max-restarts` are spent, the supervisor exits 1 with a table of every attempt. A
host blamed for two failed attempts in a row is left out of the hostfile of the next attempt,
which runs on the remaining slots while at least `--min-ranks` remain.

Standard library only (plus distcnn's error type): the supervisor never imports NumPy or MPI.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from distcnn.errors import ArgumentParser, UsageError

LAUNCHER_ENV = "DISTCNN_LAUNCHER"
RESTARTS_ENV = "DISTCNN_RESTARTS"
SUPERVISOR_FILE = "supervisor.json"
HOSTS_FILE = "supervisor.hosts"

# outcome -> (restart?, costs budget?)
POLICY: dict[str, tuple[bool, bool]] = {
    "done": (False, False),
    "bad-input": (False, False),
    "stopped": (False, False),
    "interrupted": (False, False),
    "preempted": (True, False),
    "crashed": (True, True),
    "timeout": (True, True),
    "failed": (True, True),
}

# -- the job's output: what it tells about a failure ----------------------------------------------

RANK_TABLE_RE = re.compile(r"^rank (\d+): host (\S+) pid (\d+) local_rank (\d+)\s*$")
RANK_LINE_RE = re.compile(r"^\[rank (\d+)\]")
# the collective watchdog: "... longer than --collective-timeout 5; ranks that did not arrive: 1"
# or "...: none (all arrived); ranks not answering (stopped, or stuck outside MPI): 1"
TIMEOUT_RE = re.compile(r"longer than --collective-timeout")
STUCK_RE = re.compile(r"(?:ranks that did not arrive|ranks not answering \([^)]*\)): (\d+)")
# MPICH Hydra: "=   PID 7860 RUNNING AT vm" (then "EXIT CODE: 9", "KILLED BY SIGNAL: 9")
HYDRA_PID_RE = re.compile(r"PID (\d+) RUNNING AT (\S+)")
HYDRA_SIGNAL_RE = re.compile(r"KILLED BY SIGNAL|EXIT STRING: .*\(signal \d+\)")
# Slurm srun: "srun: error: node2: task 3: Killed"
SRUN_TASK_RE = re.compile(r"^srun: error: (\S+): tasks? (\d+)[-,\d]*: (.*)$")
PREEMPTED_RE = re.compile(r"^preempted \(")
# progress lines: "step     37/60  epoch ..." and "epoch 1/6  step 10/60  ..."
STEP_RE = re.compile(r"^(?:epoch \S+\s+)?step\s+(\d+)/\d+")


@dataclass
class Watch:
    """What one attempt's output said: the rank table, the first failing rank, and more."""

    rank_hosts: dict[int, str] = field(default_factory=dict)
    rank_pids: dict[int, int] = field(default_factory=dict)
    failing_rank: int | None = None
    failing_host: str | None = None
    message: str | None = None
    timeout: bool = False
    signalled: bool = False
    preempted: bool = False
    last_step: int | None = None
    _killed_pid: int | None = None

    def line(self, text: str) -> None:
        text = text.rstrip("\r\n")
        m = RANK_TABLE_RE.match(text)
        if m:
            r = int(m.group(1))
            self.rank_hosts[r] = m.group(2)
            self.rank_pids[r] = int(m.group(3))
            return
        if TIMEOUT_RE.search(text):
            # the watchdog names the stuck rank; it, not the reporter, is the failing one
            self.timeout = True
            m = STUCK_RE.search(text)
            if m:
                self._blame(int(m.group(1)), text)
                return
        m = RANK_LINE_RE.match(text)
        if m:
            self._blame(int(m.group(1)), text)
            return
        m = HYDRA_PID_RE.search(text)
        if m:
            self._killed_pid = int(m.group(1))
            if self.failing_host is None:
                self.failing_host = m.group(2)
            return
        if HYDRA_SIGNAL_RE.search(text):
            self.signalled = True
            if self.message is None:
                self.message = text.strip("= ")
            return
        m = SRUN_TASK_RE.match(text)
        if m:
            if "Killed" in m.group(3) or "signal" in m.group(3).lower():
                self.signalled = True
            self._blame(int(m.group(2)), text, m.group(1))
            return
        if PREEMPTED_RE.match(text):
            self.preempted = True
        m = STEP_RE.match(text)
        if m:
            self.last_step = int(m.group(1))

    def _blame(self, rank: int, text: str, host: str | None = None) -> None:
        if self.failing_rank is None:
            self.failing_rank = rank
            self.message = text
            if host:
                self.failing_host = host

    def resolve(self, rank_to_host: Callable[[int], str | None]) -> None:
        """Fill in the failing rank (from a killed PID) and its host (rank table, hostfile)."""
        if self.failing_rank is None and self._killed_pid is not None:
            for r, pid in self.rank_pids.items():
                if pid == self._killed_pid:
                    self.failing_rank = r
        if self.failing_rank is not None:
            host = self.rank_hosts.get(self.failing_rank) or rank_to_host(self.failing_rank)
            if host and (self.failing_host is None or self.failing_rank in self.rank_hosts):
                self.failing_host = host


# -- hostfiles -------------------------------------------------------------------------------------


@dataclass
class Host:
    name: str
    slots: int


def read_hostfile(path: str) -> tuple[list[Host], str]:
    """Hosts and slots of an MPICH (`host:slots`) or Open MPI (`host slots=N`) hostfile, and
    which of the two forms it uses (so a rewritten file keeps it). A bare host has 1 slot."""
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise UsageError(
            f"--hostfile {path} cannot be read ({e.strerror}); give an existing file"
        ) from None
    hosts: list[Host] = []
    style = "mpich"
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([^\s:]+)(?::(\d+))?", line)
        m2 = re.fullmatch(r"(\S+)\s+(?:slots|max_slots)=(\d+)(?:\s+\S+=\S+)*", line)
        if m2:
            style = "openmpi"
            name, slots = m2.group(1), int(m2.group(2))
        elif m:
            name, slots = m.group(1), int(m.group(2) or 1)
        else:
            raise UsageError(
                f"--hostfile {path} line {n} ({line!r}) is neither host:slots nor "
                "'host slots=N'; fix the line"
            )
        if slots < 1:
            raise UsageError(f"--hostfile {path} line {n}: {slots} slots; give at least 1")
        hosts.append(Host(name, slots))
    if not hosts:
        raise UsageError(f"--hostfile {path} names no host; add lines like node1:4")
    return hosts, style


def write_hostfile(path: Path, hosts: list[Host], style: str) -> None:
    """The hosts of the next attempt, in the form the user's hostfile used (atomic)."""
    lines = [
        f"{h.name} slots={h.slots}" if style == "openmpi" else f"{h.name}:{h.slots}" for h in hosts
    ]
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("# distcnn.supervise: the hosts of the next attempt\n" + "\n".join(lines) + "\n")
    os.replace(tmp, path)


def host_of_rank(rank: int, hosts: list[Host]) -> str | None:
    """The host MPICH and Open MPI put `rank` on when they fill each host's slots in order."""
    total = sum(h.slots for h in hosts)
    if total == 0:
        return None
    r = rank % total
    for h in hosts:
        if r < h.slots:
            return h.name
        r -= h.slots
    return None


# -- the command line ------------------------------------------------------------------------------


@dataclass
class Options:
    ranks: int
    hostfile: str | None
    max_restarts: int
    min_ranks: int
    backoff: float
    backoff_max: float
    launcher: list[str] | None  # a command template, or None: the mpirun beside this Python
    train_flags: list[str]


def _parser() -> ArgumentParser:
    p = ArgumentParser(
        prog="python -m distcnn.supervise",
        description="Run python -m distcnn.train under mpirun; restart it from the newest valid "
        "checkpoint (--resume auto) when it fails. Training flags go after `--`.",
        usage="%(prog)s [-n N] [--hostfile F] [--max-restarts K] [--min-ranks M] "
        "[--backoff S] [--backoff-max S] [--launcher CMD] -- TRAIN_FLAGS...",
    )
    p.add_argument(
        "-n",
        "--ranks",
        type=int,
        metavar="N",
        help="ranks (default: the hostfile's slots, else SLURM_NTASKS, else 1)",
    )
    p.add_argument("--hostfile", metavar="F", help="MPICH host:slots or Open MPI 'host slots=N'")
    p.add_argument(
        "--max-restarts",
        type=int,
        default=3,
        metavar="K",
        help="restarts after failures, over the whole job (default 3)",
    )
    p.add_argument(
        "--min-ranks",
        type=int,
        default=1,
        metavar="M",
        help="stop when leaving out failing hosts would leave fewer ranks (default 1)",
    )
    p.add_argument(
        "--backoff",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds before the first restart, doubling after each (default 1)",
    )
    p.add_argument(
        "--backoff-max",
        type=float,
        default=60.0,
        metavar="S",
        help="longest wait between attempts (default 60)",
    )
    p.add_argument(
        "--launcher",
        metavar="CMD",
        help=f"launcher command template instead of mpirun (also ${LAUNCHER_ENV}); "
        "{n}, {hostfile}, {hosts}, {nodes} are replaced, e.g. 'srun -n {n}'",
    )
    return p


def parse_args(argv: list[str]) -> Options:
    """The supervisor's own flags (before `--`) and the training flags (after it); UsageError
    (exit 2, one line) for anything wrong, before anything is launched."""
    if "--" in argv:
        i = argv.index("--")
        own, train = argv[:i], argv[i + 1 :]
    else:
        own, train = argv, []
    p = _parser()
    ns, unknown = p.parse_known_args(own)
    if unknown:
        raise UsageError(
            f"unknown supervisor flag {unknown[0]!r}; put training flags after `--`, e.g. "
            "python -m distcnn.supervise -n 2 -- --epochs 3"
        )
    if ns.max_restarts < 0:
        raise UsageError(f"--max-restarts {ns.max_restarts} is negative; give 0 or more")
    if not (ns.backoff >= 0 and ns.backoff < float("inf")):
        raise UsageError(f"--backoff {ns.backoff} is not a finite number >= 0; e.g. --backoff 1")
    if not (ns.backoff_max >= ns.backoff and ns.backoff_max < float("inf")):
        raise UsageError(
            f"--backoff-max {ns.backoff_max} is below --backoff {ns.backoff} or not finite; "
            "give a number at least --backoff"
        )
    slots = None
    if ns.hostfile is not None:
        hosts, _ = read_hostfile(ns.hostfile)
        slots = sum(h.slots for h in hosts)
    ranks = ns.ranks
    if ranks is None:
        env_ntasks = os.environ.get("SLURM_NTASKS", "")
        ranks = slots or (int(env_ntasks) if env_ntasks.isdigit() else 1)
    if ranks < 1:
        raise UsageError(f"-n {ranks} is not a positive number of ranks; e.g. -n 2")
    if ns.min_ranks < 1 or ns.min_ranks > ranks:
        raise UsageError(
            f"--min-ranks {ns.min_ranks} must be between 1 and the {ranks} rank(s) of the job"
        )
    template = ns.launcher if ns.launcher is not None else os.environ.get(LAUNCHER_ENV)
    launcher = None
    if template is not None:
        where = "--launcher" if ns.launcher is not None else LAUNCHER_ENV
        try:
            launcher = shlex.split(template)
        except ValueError as e:
            raise UsageError(
                f"{where} {template!r} does not parse ({e}); fix its quoting"
            ) from None
        if not launcher:
            raise UsageError(f"{where} is empty; give a command such as 'srun -n {{n}}'")
        if shutil.which(launcher[0]) is None:
            raise UsageError(f"{where}: {launcher[0]!r} is not an executable; fix the command")
    else:
        _find_mpirun()  # raise now if there is none
    if any(a == "--dry-run" for a in train):
        raise UsageError("--dry-run is not supervised; run python -m distcnn.train --dry-run")
    return Options(
        ranks=ranks,
        hostfile=ns.hostfile,
        max_restarts=ns.max_restarts,
        min_ranks=ns.min_ranks,
        backoff=ns.backoff,
        backoff_max=ns.backoff_max,
        launcher=launcher,
        train_flags=train,
    )


def _find_mpirun() -> str:
    """The mpirun beside this Python (a venv's MPICH, matching mpi4py), else mpirun/mpiexec on
    PATH; UsageError if there is none."""
    for candidate in (
        Path(sys.executable).parent / "mpirun",
        shutil.which("mpirun"),
        shutil.which("mpiexec"),
    ):
        if candidate and os.access(candidate, os.X_OK):
            return str(candidate)
    raise UsageError(
        "no mpirun beside this Python or on PATH; pip install 'distcnn[mpi]', put your MPI's "
        f"bin on PATH, or give --launcher (or {LAUNCHER_ENV})"
    )


def _flag_value(flags: list[str], name: str) -> str | None:
    """The last value given for --name in a training command line (`--name V` or `--name=V`)."""
    value = None
    for i, a in enumerate(flags):
        if a == name and i + 1 < len(flags):
            value = flags[i + 1]
        elif a.startswith(name + "="):
            value = a.split("=", 1)[1]
    return value


def _without_flag(flags: list[str], name: str) -> list[str]:
    out, skip = [], False
    for i, a in enumerate(flags):
        if skip:
            skip = False
            continue
        if a == name:
            skip = i + 1 < len(flags)
            continue
        if a.startswith(name + "="):
            continue
        out.append(a)
    return out


def run_paths(flags: list[str]) -> tuple[Path, Path]:
    """The run directory (--checkpoint-dir, from the flags or their --config TOML; default
    `checkpoints`) and the metrics log (--log, default the run directory's metrics.jsonl)."""
    toml: dict[str, Any] = {}
    cfg = _flag_value(flags, "--config")
    if cfg:
        try:
            import tomllib  # Python >= 3.11
        except ModuleNotFoundError:  # pragma: no cover
            import tomli as tomllib  # type: ignore[no-redef]
        try:
            toml = tomllib.loads(Path(cfg).read_text())
        except (OSError, ValueError):
            toml = {}  # the training refuses it with its own message (exit 2)
    get = lambda key: _flag_value(flags, "--" + key.replace("_", "-")) or toml.get(key)  # noqa: E731
    run_dir = Path(str(get("checkpoint_dir") or "checkpoints"))
    log = get("log")
    return run_dir, Path(str(log)) if log else run_dir / "metrics.jsonl"


# -- one attempt -----------------------------------------------------------------------------------


@dataclass
class Attempt:
    """One launch of the job, as supervisor.json and the metrics log record it."""

    n: int
    start: float
    ranks: int
    hosts: list[str]
    command: list[str]
    resumed_from: int | None = None  # the newest checkpoint's step when it started
    end: float | None = None
    exit_code: int | None = None
    outcome: str | None = None
    failing_rank: int | None = None
    failing_host: str | None = None
    step_reached: int | None = None
    message: str | None = None

    def record(self) -> dict[str, Any]:
        return asdict(self)


CKPT_NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")


def newest_checkpoint_step(run_dir: Path) -> int | None:
    """The step of the newest ckpt-*.h5 in the run directory (by name: saves are renamed into
    place, so a name that exists is a complete file), or None."""
    try:
        steps = [int(m.group(1)) for p in run_dir.iterdir() if (m := CKPT_NAME_RE.match(p.name))]
    except OSError:
        return None
    return max(steps) if steps else None


def read_status(run_dir: Path) -> dict[str, Any] | None:
    try:
        status = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def _pump(src: IO[bytes], dst: IO[str], watch: Watch, lock: threading.Lock) -> None:
    """Copy the job's output through to ours, line by line, and let `watch` read it."""
    for raw in iter(src.readline, b""):
        text = raw.decode("utf-8", errors="replace")
        with lock:
            dst.write(text)
            dst.flush()
            watch.line(text)
    src.close()


def _die_with_parent() -> None:  # pragma: no cover (runs in the child between fork and exec)
    """Linux: the launcher gets SIGTERM if the supervisor dies (SIGKILL), so the job is not
    left running unsupervised (it ends; its output pipe is gone too)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Supervisor:
    """Launch, watch, classify, decide; repeat until done or out of budget."""

    def __init__(self, opts: Options, out: IO[str] | None = None, err: IO[str] | None = None):
        self.opts = opts
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.run_dir, self.log_path = run_paths(opts.train_flags)
        self.hosts: list[Host] = []
        self.style = "mpich"
        if opts.hostfile:
            self.hosts, self.style = read_hostfile(opts.hostfile)
        self.excluded: list[str] = []
        self.blamed: tuple[str, int] | None = None  # (host, failed attempts in a row)
        self.attempts: list[Attempt] = []
        self.budget_used = 0
        self.state = "starting"
        self.proc: subprocess.Popen | None = None
        self.signal_name: str | None = None  # a signal to the supervisor: stop, do not restart
        self.sigints = 0
        self.wakeup = threading.Event()
        self._openmpi: bool | None = None
        self._previous_file: str | None = None  # supervisor.json before we started, if any
        self._wrote_file = False

    # -- signals ---------------------------------------------------------------------------

    def on_signal(self, signum: int, frame: Any = None) -> None:
        """SIGTERM/SIGUSR1/SIGINT to the supervisor: pass it to the job (which saves and stops)
        and do not restart it. A second SIGINT is passed too (the job then ends at once); a
        third kills the launcher."""
        name = signal.Signals(signum).name
        self.signal_name = self.signal_name or name
        self.wakeup.set()
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        if signum == signal.SIGINT:
            self.sigints += 1
            if self.sigints >= 3:
                self._kill_launcher()
                return
        forward = signum
        if signum == signal.SIGTERM and self._is_openmpi():
            forward = signal.SIGUSR1  # Open MPI's mpirun SIGKILLs the ranks ~2 s after a SIGTERM
        try:
            os.kill(proc.pid, forward)
        except ProcessLookupError:
            pass

    def _kill_launcher(self) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _is_openmpi(self) -> bool:
        if self.opts.launcher is not None:
            return False
        if self._openmpi is None:
            try:
                v = subprocess.run(
                    [_find_mpirun(), "--version"], capture_output=True, text=True, timeout=20
                )
                self._openmpi = "Open MPI" in v.stdout + v.stderr or "OpenRTE" in v.stdout
            except (OSError, subprocess.SubprocessError, UsageError):
                self._openmpi = False
        return self._openmpi

    # -- the command of one attempt --------------------------------------------------------

    def active_hosts(self) -> list[Host]:
        return [h for h in self.hosts if h.name not in self.excluded]

    def attempt_ranks(self) -> int:
        if not self.hosts:
            return self.opts.ranks
        return min(self.opts.ranks, sum(h.slots for h in self.active_hosts()))

    def command(self, ranks: int, restart: bool) -> list[str]:
        flags = self.opts.train_flags
        if restart:
            flags = [*_without_flag(flags, "--resume"), "--resume", "auto"]
        hostfile = self.opts.hostfile
        if self.excluded:
            hostfile = str(self.run_dir / HOSTS_FILE)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_hostfile(Path(hostfile), self.active_hosts(), self.style)
        train = [sys.executable, "-m", "distcnn.train", *flags]
        if self.opts.launcher is not None:
            subs = {
                "{n}": str(ranks),
                "{hostfile}": hostfile or "",
                "{hosts}": ",".join(h.name for h in self.active_hosts()),
                "{nodes}": str(len(self.active_hosts()) or 1),
            }
            cmd = []
            for part in self.opts.launcher:
                for k, v in subs.items():
                    part = part.replace(k, v)
                cmd.append(part)
            return cmd + train
        cmd = [_find_mpirun()]
        if self._is_openmpi():
            # Open MPI passes only named variables to remote ranks and refuses more ranks than
            # cores unless told
            for var in (RESTARTS_ENV, "OMP_NUM_THREADS", "PYTHONPATH", "DISTCNN_FAULT"):
                if var in os.environ or var == RESTARTS_ENV:
                    cmd += ["-x", var]
            if not self.hosts and ranks > (os.cpu_count() or 1):
                cmd.append("--oversubscribe")
        cmd += ["-n", str(ranks)]
        if hostfile:
            cmd += ["--hostfile" if self._is_openmpi() else "-f", hostfile]
        return cmd + train

    # -- the files of the run --------------------------------------------------------------

    def write_file(self) -> None:
        """supervisor.json in the run directory (atomic), for `python -m distcnn.status`."""
        path = self.run_dir / SUPERVISOR_FILE
        if not self._wrote_file:
            try:
                self._previous_file = path.read_text()
            except OSError:
                self._previous_file = None
        doc = {
            "state": self.state,
            "max_restarts": self.opts.max_restarts,
            "restarts": max(0, len(self.attempts) - 1),
            "budget_used": self.budget_used,
            "min_ranks": self.opts.min_ranks,
            "excluded_hosts": self.excluded,
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "updated": time.time(),
            "attempts": [a.record() for a in self.attempts],
        }
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(json.dumps(doc, indent=1) + "\n")
            os.replace(tmp, path)
            self._wrote_file = True
        except OSError as e:
            self.say(f"warning: cannot write {path}: {e.strerror}")

    def undo_file(self) -> None:
        """The first attempt was refused (exit 2): leave the directory as it was."""
        path = self.run_dir / SUPERVISOR_FILE
        try:
            if self._previous_file is None:
                path.unlink()
            else:
                path.write_text(self._previous_file)
        except OSError:
            pass

    def log_event(self, a: Attempt) -> None:
        """One `attempt` event in the run's metrics log. It has no `step` key (the step it
        reached is `step_reached`), so a resume, which drops records past the step it resumes
        from, keeps it."""
        rec = {"kind": "event", "event": "attempt", "time": a.end, "attempt": a.n, **a.record()}
        rec["restarts"] = a.n - 1
        rec["duration"] = (a.end or a.start) - a.start
        try:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")
        except OSError as e:
            self.say(f"warning: cannot append to {self.log_path}: {e.strerror}")

    def say(self, msg: str) -> None:
        print(f"supervise: {msg}", file=self.err, flush=True)

    # -- the loop --------------------------------------------------------------------------

    def run(self) -> int:
        restart = False
        while True:
            ranks = self.attempt_ranks()
            if ranks < self.opts.min_ranks:
                left = ", ".join(h.name for h in self.active_hosts()) or "none"
                self.say(
                    f"giving up: {ranks} rank(s) left on the remaining hosts ({left}; left out: "
                    f"{', '.join(self.excluded)}), fewer than --min-ranks {self.opts.min_ranks}"
                )
                return self.finish("failed", 1)
            a = self.launch(ranks, restart)
            code = self.decide(a)
            if code is not None:
                return code
            restart = True

    def launch(self, ranks: int, restart: bool) -> Attempt:
        """Run one attempt to its end, its output passed through, and classify it."""
        n = len(self.attempts) + 1
        cmd = self.command(ranks, restart)
        hosts = [h.name for h in self.active_hosts()] or [socket.gethostname()]
        resumed = newest_checkpoint_step(self.run_dir) if restart else None
        a = Attempt(n, time.time(), ranks, hosts, cmd, resumed_from=resumed)
        self.attempts.append(a)
        self.state = "running"
        self.write_file()
        spent = f" (restart {n - 1}; {self.budget_used} of --max-restarts "
        spent += f"{self.opts.max_restarts} spent)"
        self.say(f"attempt {n}{spent if n > 1 else ''}: {shlex.join(cmd)}")
        env = {**os.environ, RESTARTS_ENV: str(n - 1)}
        watch, lock = Watch(), threading.Lock()
        try:
            self.proc = subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                start_new_session=True,  # a Ctrl-C on the terminal reaches us only; we pass it on
                preexec_fn=_die_with_parent,
            )
        except OSError as e:
            a.end, a.exit_code, a.outcome = time.time(), 127, "failed"
            a.message = f"cannot start {cmd[0]}: {e.strerror}"
            self.say(a.message)
            return a
        if self.signal_name:  # a signal that came while it was starting
            self.on_signal(signal.Signals[self.signal_name])
        pumps = [
            threading.Thread(target=_pump, args=(src, dst, watch, lock), daemon=True)
            for src, dst in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))
        ]
        for t in pumps:
            t.start()
        code = self.proc.wait()
        for t in pumps:
            t.join(timeout=30)  # ranks may hold the pipes a moment longer than the launcher
        self.proc = None
        a.end, a.exit_code = time.time(), code
        self.describe(a, watch)
        return a

    def describe(self, a: Attempt, watch: Watch) -> None:
        """Outcome, failing rank and host, step reached: from the exit code, the output and the
        run's status.json (when this attempt wrote it)."""
        status = read_status(self.run_dir)
        if status is not None and float(status.get("updated") or 0) < a.start - 1:
            status = None  # an older attempt's
        code = a.exit_code if a.exit_code is not None else 1
        state = status.get("state") if status else None
        if self.signal_name:
            a.outcome = "stopped"
        elif code == 0:
            preempted = state == "preempted" or (state is None and watch.preempted)
            a.outcome = "preempted" if preempted else "done"
        elif code == 2:
            a.outcome = "bad-input"
        elif code == 130:
            a.outcome = "interrupted"
        elif watch.timeout:
            a.outcome = "timeout"
        elif code < 0 or watch.signalled:
            a.outcome = "crashed"
        else:
            a.outcome = "failed"
        failure = (status or {}).get("last_failure") or {}
        if (
            watch.failing_rank is None
            and isinstance(failure, dict)
            and a.outcome in ("crashed", "timeout", "failed")
        ):
            if failure.get("rank") is not None:
                watch.failing_rank = int(failure["rank"])
            watch.failing_host = watch.failing_host or failure.get("host")
            watch.message = watch.message or failure.get("message")
        here = None if self.hosts else socket.gethostname()
        watch.resolve(lambda r: host_of_rank(r, self.active_hosts()) or here)
        if a.outcome in ("crashed", "timeout", "failed"):
            a.failing_rank, a.failing_host = watch.failing_rank, watch.failing_host
            a.message = watch.message
        steps = [newest_checkpoint_step(self.run_dir)]
        if status is not None and isinstance(status.get("step"), int):
            steps.append(status["step"])
        else:
            steps.append(watch.last_step)
        known = [s for s in steps if s is not None]
        a.step_reached = max(known) if known else None

    def decide(self, a: Attempt) -> int | None:
        """The exit code of the supervisor, or None: restart (after the backoff)."""
        assert a.outcome is not None
        restart, costs = POLICY[a.outcome]
        if a.outcome == "preempted" and (
            a.step_reached is None
            or (a.resumed_from is not None and a.step_reached <= a.resumed_from)
        ):
            costs = True  # preempted again before a single new step: count it, or it loops
        where = ""
        if a.failing_rank is not None or a.failing_host:
            where = f", rank {a.failing_rank if a.failing_rank is not None else '?'}"
            where += f" on {a.failing_host or '?'}"
        reached = f", step {a.step_reached}" if a.step_reached is not None else ""
        self.say(f"attempt {a.n} ended: {a.outcome} (exit {a.exit_code}{where}{reached})")
        if a.outcome == "bad-input" and a.n == 1:
            # refused before any work: nothing recorded, supervisor.json as it was
            self.undo_file()
            return 2
        self.log_event(a)
        if costs:
            self.blame(a.failing_host)
        elif a.outcome == "preempted":
            self.blamed = None
        if not restart:
            if a.outcome == "stopped":
                code = 130 if self.signal_name == "SIGINT" else (0 if a.exit_code == 0 else 1)
                return self.finish(
                    "stopped", code, f"stopped by {self.signal_name}; not restarting"
                )
            # supervisor.json's final states are done, failed and stopped (the attempt's
            # outcome says more)
            state, code = {"done": ("done", 0), "bad-input": ("failed", 2)}.get(
                a.outcome, ("stopped", 130)
            )
            return self.finish(state, code)
        delay = 0.0
        if costs:
            if self.budget_used >= self.opts.max_restarts:
                self.say(f"giving up: --max-restarts {self.opts.max_restarts} spent")
                return self.finish("failed", 1)
            self.budget_used += 1
            delay = min(self.opts.backoff * 2 ** (self.budget_used - 1), self.opts.backoff_max)
        self.state = "backoff"
        self.write_file()
        why = "a failure" if costs else "a preemption (free)"
        self.say(f"restarting after {why} in {delay:g} s with --resume auto")
        self.wakeup.clear()
        if self.signal_name is None:
            self.wakeup.wait(delay)
        if self.signal_name:
            code = 130 if self.signal_name == "SIGINT" else 0
            return self.finish("stopped", code, f"stopped by {self.signal_name}; not restarting")
        return None

    def blame(self, host: str | None) -> None:
        """Count failed attempts in a row per host; the second in a row leaves the host out."""
        if not host or not self.hosts:
            self.blamed = None
            return
        name = _match_host(host, [h.name for h in self.active_hosts()])
        if name is None:
            self.blamed = None
            return
        count = self.blamed[1] + 1 if self.blamed and self.blamed[0] == name else 1
        self.blamed = (name, count)
        if count >= 2:
            self.excluded.append(name)
            self.blamed = None
            left = sum(h.slots for h in self.active_hosts())
            self.say(
                f"leaving out host {name}: it failed two attempts in a row "
                f"({left} slot(s) left on {len(self.active_hosts())} host(s))"
            )

    def finish(self, state: str, code: int, msg: str | None = None) -> int:
        self.state = state
        self.write_file()
        if msg:
            self.say(msg)
        if len(self.attempts) > 1 or state == "failed":
            print(self.summary(), file=self.err, flush=True)
        return code

    def summary(self) -> str:
        """A table of every attempt: outcome, exit code, failing rank and host, step reached."""
        rows = [
            ("#", "outcome", "exit", "ranks", "failing rank", "host", "resumed", "reached", "s")
        ]
        for a in self.attempts:
            rows.append(
                (
                    str(a.n),
                    a.outcome or "?",
                    str(a.exit_code),
                    str(a.ranks),
                    "-" if a.failing_rank is None else str(a.failing_rank),
                    a.failing_host or "-",
                    "-" if a.resumed_from is None else str(a.resumed_from),
                    "-" if a.step_reached is None else str(a.step_reached),
                    f"{(a.end or time.time()) - a.start:.1f}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [
            f"supervise: {len(self.attempts)} attempt(s), {len(self.attempts) - 1} restart(s), "
            f"{self.budget_used} of --max-restarts {self.opts.max_restarts} spent; final state "
            f"{self.state}" + (f"; left out: {', '.join(self.excluded)}" if self.excluded else "")
        ]
        for r in rows:
            lines.append("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)))
        return "\n".join(line.rstrip() for line in lines)


def _match_host(reported: str, names: list[str]) -> str | None:
    """The hostfile name for a host reported by a rank (`node1.cluster` matches `node1`)."""
    if reported in names:
        return reported
    short = reported.split(".")[0]
    for n in names:
        if n.split(".")[0] == short:
            return n
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        sup = Supervisor(parse_args(argv))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    handled = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
    previous = {s: signal.signal(s, sup.on_signal) for s in handled}
    try:
        return sup.run()
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
