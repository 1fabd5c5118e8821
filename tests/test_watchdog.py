"""The watchdog (distcnn.comm) from MPI start-up to exit: it names a rank that stopped after it
arrived at a collective, it covers the drain of the arrival announcements, and a setup error on
one rank only (`Comm.settle`) ends the job within seconds with that rank's message.

Small scripts drive Comm directly, so each case is exact rather than a race."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_SPEC, make_images, mpirun

from distcnn.data import write_dataset

pytestmark = pytest.mark.mpi
LIMIT = 15.0

SCRIPT = """
import sys, time
import numpy as np
from mpi4py import MPI
from distcnn.comm import Comm

case = sys.argv[1]
comm = Comm(MPI.COMM_WORLD, timeout=float(sys.argv[2]))
buf = np.ones(4)
for _ in range(3):
    comm.allreduce_sum(buf)
if case == "stuck-after-arriving":
    if comm.rank == 2:  # announces its arrival, then never takes part (nor polls)
        comm._collective("test collective", lambda wait: time.sleep(120))
    else:
        comm.allreduce_sum(buf, "test collective")
elif case == "late-to-broadcast":
    if comm.rank == 2:
        time.sleep(120)  # the root and rank 1 complete the broadcast without it
    comm.bcast(buf, 0, "test broadcast")
    if comm.rank != 2:
        print(f"rank {comm.rank} past the broadcast", flush=True)
    time.sleep(120)
elif case == "error-on-one-rank":
    if comm.rank == 1:
        comm.settle("its dataset is unreadable on this host", "test setup")
    else:
        comm.guard("before a split")  # the others went on into a collective
print("unreachable", flush=True)
"""


def script_run(tmp_path: Path, case: str, timeout: float, ranks: int = 3) -> tuple:
    path = tmp_path / "watchdog.py"
    path.write_text(SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [mpirun(), "-n", str(ranks), sys.executable, str(path), case, str(timeout)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=90)
    return res, time.monotonic() - t0


def test_a_rank_stuck_after_it_arrived_is_named(tmp_path: Path) -> None:
    """#15 class 7: every rank had announced its arrival, so the report used to say
    "none (all arrived; MPI itself is stuck)". The ping names the rank that cannot answer."""
    res, took = script_run(tmp_path, "stuck-after-arriving", 2)
    assert res.returncode != 0
    assert "unreachable" not in res.stdout
    said = re.findall(r"\[rank (\d)\] error: collective #\d+ \(test collective\).*", res.stderr)
    assert said and set(said) <= {"0", "1"}, res.stderr
    assert (
        "ranks that did not arrive: none (all arrived); ranks not answering (stopped, or stuck "
        "outside MPI): 2. Aborting the job." in res.stderr
    )
    assert took < 2 + LIMIT


def test_the_arrival_drain_is_under_the_watchdog(tmp_path: Path) -> None:
    """A broadcast completes on the root (and here on rank 1) before rank 2 arrives; waiting
    for rank 2's announcement afterwards used to block forever, outside the watchdog."""
    res, took = script_run(tmp_path, "late-to-broadcast", 2)
    assert res.returncode != 0
    assert "past the broadcast" not in res.stdout
    assert "(test broadcast) waited" in res.stderr
    assert "ranks that did not arrive: 2. Aborting the job." in res.stderr
    assert took < 2 + LIMIT


def test_settle_ends_the_job_with_the_failing_ranks_message(tmp_path: Path) -> None:
    """Rank 1 fails alone while ranks 0 and 2 wait in a barrier it will never join: after
    SETTLE_GRACE_SECONDS it prints its own error and aborts with exit code 2."""
    res, took = script_run(tmp_path, "error-on-one-rank", 300)
    assert res.returncode == 2, res.stderr
    assert "error: [rank 1] its dataset is unreadable on this host" in res.stderr
    assert "waited" not in res.stderr  # not the watchdog: that would take 300 s
    assert took < LIMIT


def test_sigstop_of_a_training_rank_is_named(tmp_path: Path) -> None:
    """A real run, rank 2 stopped with SIGSTOP mid-training: whichever point it stopped at
    (before arriving, or after), the report names rank 2."""
    data = tmp_path / "tiny.h5"
    write_dataset(data, {"train": make_images(100, 3, 8, 1)}, num_classes=3, attrs={})
    args = [
        "--data", str(data), "--model", TINY_SPEC, "--batch-size", "11", "--epochs", "200",
        "--checkpoint-dir", "ck", "--collective-timeout", "3", "--no-progress",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [mpirun(), "-n", "3", sys.executable, "-m", "distcnn.train", *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        out = ""
        pids: dict[int, int] = {}
        assert proc.stdout is not None
        for line in proc.stdout:  # the rank table maps rank 2 to its PID
            out += line
            m = re.match(r"rank (\d+): host \S+ pid (\d+) local_rank \d+$", line.strip())
            if m:
                pids[int(m.group(1))] = int(m.group(2))
            if line.startswith("distcnn: "):
                break
        time.sleep(1.0)  # well into training
        os.kill(pids[2], signal.SIGSTOP)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    named = re.search(
        r"ranks that did not arrive: (2\.|none \(all arrived\); ranks not answering "
        r"\(stopped, or stuck outside MPI\): 2\.)",
        err,
    )
    assert named, err
    assert took < 3 + LIMIT
