"""Signals at any moment: Ctrl-C (SIGINT) stops like a preemption (the ranks agree, rank 0 saves,
one line says where, exit 130) and a second one ends at once; SIGTERM/SIGUSR1 during start-up
end the job cleanly instead of killing it or being lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_SPEC, mpirun

from distcnn import checkpoint as ckpt

BASE = ["--model", TINY_SPEC, "--batch-size", "16", "--lr", "0.1", "--log-every", "2"]
TOTAL = 30 * 7  # --epochs 30 of 100 samples in batches of 16


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _start(args: list[str], ranks: int | None) -> subprocess.Popen:
    """`python -m distcnn.train ARGS` alone (ranks None) or under mpirun -n ranks."""
    cmd = [sys.executable, "-m", "distcnn.train", *args]
    if ranks is not None:
        cmd = [mpirun(), "-n", str(ranks), *cmd]
    return subprocess.Popen(
        cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _caught(pid: int) -> int:
    """The mask of signals the process catches (SigCgt in /proc), 0 if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def _wait_for_handlers(pids: list[int], timeout: float = 20) -> None:
    want = sum(1 << (s - 1) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1))
    t0 = time.monotonic()
    while not all(_caught(p) & want == want for p in pids):
        assert time.monotonic() - t0 < timeout, "the handlers were never installed"
        time.sleep(0.002)


def _rank_pids(mpirun_pid: int, ranks: int) -> list[int]:
    """The Python processes below mpirun (Hydra's proxy starts them), in no particular order."""
    t0 = time.monotonic()
    while True:
        found = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes()
                    stat = Path(f"/proc/{entry}/stat").read_text()
                except OSError:
                    continue
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if b"distcnn.train" in cmd and ppid != mpirun_pid and int(entry) != mpirun_pid:
                    try:
                        pstat = Path(f"/proc/{ppid}/stat").read_text()
                    except OSError:
                        continue
                    if int(pstat.rsplit(")", 1)[1].split()[1]) == mpirun_pid:
                        found.append(int(entry))
        if len(found) == ranks:
            return found
        assert time.monotonic() - t0 < 20, found
        time.sleep(0.01)


def _finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    return proc.returncode, out, err


def _wait_for_training(proc: subprocess.Popen) -> list[str]:
    """The output lines up to the first progress line (the loop is running)."""
    head = []
    for line in proc.stdout:
        head.append(line)
        if line.startswith("step "):
            return head
    raise AssertionError("".join(head) + proc.stderr.read())


def _arrays(path: Path) -> dict[str, np.ndarray]:
    ck = ckpt.load(path)
    return {**ck.params, **{"v/" + k: v for k, v in ck.velocity.items()}}


def test_ctrl_c_saves_says_where_exits_130_and_resumes_exactly(tmp_path, tiny_data) -> None:
    common = [*BASE, "--data", str(tiny_data), "--epochs", "30", "--checkpoint-every", "1000"]
    ref = tmp_path / "ref"
    rc, out, err = _finish(_start([*common, "--checkpoint-dir", str(ref), "--no-progress"], None))
    assert rc == 0, err

    d = tmp_path / "run"
    proc = _start([*common, "--checkpoint-dir", str(d)], None)
    head = _wait_for_training(proc)
    os.kill(proc.pid, signal.SIGSTOP)  # so the run cannot end before the signal lands
    os.kill(proc.pid, signal.SIGINT)
    os.kill(proc.pid, signal.SIGCONT)
    rc, out, err = _finish(proc)
    assert rc == 130, err
    lines = [x for x in ("".join(head) + out).splitlines() if x.startswith("interrupted")]
    assert len(lines) == 1, out
    s = int(lines[0].split("stopped at step ")[1].split(",")[0])
    assert 2 <= s < TOTAL
    assert lines[0] == (
        f"interrupted (SIGINT on rank 0): stopped at step {s}, checkpoint "
        f"{d / ckpt.file_name(s)} saved; exiting 130"
    )
    assert [p.name for p in d.glob("*.h5")] == [ckpt.file_name(s)]

    rc, out, err = _finish(_start(["--resume", "auto", "--checkpoint-dir", str(d)], None))
    assert rc == 0, err
    a, b = _arrays(ref / ckpt.file_name(TOTAL)), _arrays(d / ckpt.file_name(TOTAL))
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_ends_at_once(tmp_path, tiny_data) -> None:
    """The run hangs in a step (DISTCNN_FAULT), so the first Ctrl-C can never be agreed on:
    the second one ends the process at once, without saving."""
    d = tmp_path / "run"
    args = [*BASE, "--data", str(tiny_data), "--epochs", "30", "--checkpoint-dir", str(d)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "distcnn.train", *args],
        env={**_env(), "DISTCNN_FAULT": "0:5:hang"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    _wait_for_training(proc)
    time.sleep(0.3)  # into the hang at step 5
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.3)
    assert proc.poll() is None  # the first one waits for the step's collective
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGINT)
    rc, out, err = _finish(proc, timeout=10)
    assert time.monotonic() - t0 < 5
    assert rc == 130
    assert err.strip().splitlines()[-1] == "interrupted again: exiting at once without saving"
    assert not list(d.glob("*.h5"))


@pytest.mark.mpi
def test_ctrl_c_to_mpirun_stops_both_ranks_at_one_step(tmp_path, tiny_data) -> None:
    """MPICH's mpiexec forwards the first SIGINT to every rank; both agree on one step, rank 0
    saves it, and mpiexec exits 130 like its ranks."""
    d = tmp_path / "run"
    args = [*BASE, "--data", str(tiny_data), "--epochs", "30", "--checkpoint-dir", str(d)]
    proc = _start(args, 2)
    head = _wait_for_training(proc)
    pids = _rank_pids(proc.pid, 2)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    os.kill(proc.pid, signal.SIGINT)
    time.sleep(0.05)  # let mpiexec forward it while the ranks are frozen
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    rc, out, err = _finish(proc)
    assert rc == 130, out + err
    lines = [x for x in ("".join(head) + out).splitlines() if x.startswith("interrupted")]
    assert len(lines) == 1 and lines[0].startswith("interrupted (SIGINT on rank 0): stopped"), out
    s = int(lines[0].split("stopped at step ")[1].split(",")[0])
    assert lines[0].endswith(f"checkpoint {d / ckpt.file_name(s)} saved; exiting 130")
    assert ckpt.load(d / ckpt.file_name(s)).step == s


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_a_signal_during_start_up_ends_the_run_cleanly(sig, tmp_path, tiny_data) -> None:
    """Sent the moment the handlers are in place (before MPI starts and NumPy loads): the run
    stops at the first setup check with one line, exit 0 (130 for SIGINT), nothing written."""
    d = tmp_path / "run"
    proc = _start([*BASE, "--data", str(tiny_data), "--checkpoint-dir", str(d)], None)
    _wait_for_handlers([proc.pid])
    os.kill(proc.pid, sig)
    rc, out, err = _finish(proc)
    code = 130 if sig == signal.SIGINT else 0
    what = "interrupted" if sig == signal.SIGINT else "preempted"
    assert rc == code, out + err
    assert out.strip().splitlines()[-1] == (
        f"{what} ({sig.name} on rank 0) during start-up, before any step: nothing to save; "
        f"exiting {code}"
    )
    assert not list(d.glob("*.h5"))


@pytest.mark.mpi
def test_sigusr1_to_one_rank_during_start_up_stops_both(tmp_path, tiny_data) -> None:
    d = tmp_path / "run"
    proc = _start([*BASE, "--data", str(tiny_data), "--checkpoint-dir", str(d)], 2)
    pids = _rank_pids(proc.pid, 2)
    _wait_for_handlers(pids)
    os.kill(pids[0], signal.SIGUSR1)  # one rank (either) only
    rc, out, err = _finish(proc)
    assert rc == 0, out + err
    last = out.strip().splitlines()[-1]
    assert last.startswith("preempted (") and last.endswith(
        "during start-up, before any step: nothing to save; exiting 0"
    ), out
    assert not list(d.glob("*.h5"))
