"""`python -m distcnn.status`: the state of a finished, running (or stale), failed and supervised
run, as text and as one strict JSON object."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import TINY_SPEC

from distcnn import status as st
from distcnn.train import main as train_main


def strict_loads(text: str) -> dict:
    def no_constants(name: str) -> None:
        raise AssertionError(f"not strict JSON: {name}")

    return json.loads(text, parse_constant=no_constants)


def test_status_file_is_strict_and_throttled(tmp_path: Path) -> None:
    f = st.StatusFile(tmp_path, "r1", 100, 2)
    f.update(True, state="running", loss=float("nan"), eta_seconds=float("inf"))
    first = strict_loads((tmp_path / "status.json").read_text())
    assert first["loss"] is None and first["eta_seconds"] is None and first["world_size"] == 2
    f.update(step=5)  # within a second of the last write: kept for the next one
    assert strict_loads((tmp_path / "status.json").read_text())["step"] == 0
    f.update(True, state="done")
    assert strict_loads((tmp_path / "status.json").read_text())["step"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"]  # no temporary left


def test_status_of_a_finished_run(tiny_data: Path, tmp_path: Path, capsys) -> None:
    d = tmp_path / "run"
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--batch-size", "16", "--epochs", "2"]
    assert train_main([*args, "--checkpoint-dir", str(d), "--no-progress"]) == 0
    capsys.readouterr()
    assert st.main([str(d), "--json"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1
    info = strict_loads(out[0])
    assert (info["state"], info["step"], info["total_steps"], info["supervisor"]) == (
        "done", 14, 14, None,
    )  # fmt: skip
    assert 0 <= info["accuracy"] <= 1 and info["loss"] > 0 and "stale" not in info
    assert st.main([str(d)]) == 0
    text = capsys.readouterr().out
    assert text.startswith(f"run {info['run_id']}  done  (pid {info['pid']} on ")
    assert "step 14/14 (100.0 %)  epoch 2" in text
    assert f"last checkpoint: {d / 'ckpt-00000014.h5'}" in text
    assert st.main([str(d), "--watch", "--interval", "0.1"]) == 0  # ended: returns at once


def test_status_of_a_dead_job_a_supervised_run_and_not_a_run(tmp_path: Path, capsys) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    st.write_atomic(
        tmp_path / "status.json",
        {"run_id": "r9", "state": "running", "step": 40, "total_steps": 100, "epoch": 1.5,
         "pid": gone.pid, "host": socket.gethostname(), "world_size": 2, "restarts": 1,
         "updated": time.time() - 30, "last_checkpoint": None,
         "last_failure": {"rank": 1, "host": "vm", "step": 12, "message": "killed"}},
    )  # fmt: skip
    st.write_atomic(
        tmp_path / "supervisor.json",
        {"state": "running", "max_restarts": 3, "restarts": 1,
         "attempts": [{"n": 1, "start": 0, "end": 10, "ranks": 2, "hosts": ["vm"],
                       "exit_code": 137, "outcome": "crashed", "failing_rank": 1,
                       "failing_host": "vm", "step_reached": 12}]},
    )  # fmt: skip
    assert st.main([str(tmp_path), "--json"]) == 0
    info = strict_loads(capsys.readouterr().out)
    assert info["stale"] is True and info["alive"] is False
    assert info["supervisor"]["attempts"][0]["outcome"] == "crashed"
    assert st.main([str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert f"running (stale: pid {gone.pid} on {socket.gethostname()} is gone)" in text
    assert "restarts: 1  last failure: rank 1 on vm at step 12: killed" in text
    assert "supervisor: running, restarts 1 of 3" in text
    assert "crashed" in text and "rank 1 (vm)" in text

    empty = tmp_path / "empty"
    empty.mkdir()
    assert st.main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"error: {empty} has no status.json (or it is unreadable): not a run directory, or its "
        "run has not started yet; give the --checkpoint-dir of a run"
    )


def test_watch_follows_a_run_until_it_ends(tmp_path: Path, capsys) -> None:
    f = st.StatusFile(tmp_path, "r2", 10, 1)  # this process plays the live job
    f.update(True, state="running", step=3)

    def finish() -> None:
        time.sleep(0.5)
        f.update(True, state="done", step=10)

    t = threading.Thread(target=finish)
    t.start()
    assert st.main([str(tmp_path), "--watch", "--json", "--interval", "0.1"]) == 0
    t.join()
    lines = [strict_loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[0]["state"] == "running" and lines[0]["alive"] is True
    assert lines[-1]["state"] == "done" and lines[-1]["step"] == 10 and len(lines) >= 3


@pytest.mark.parametrize("bad", [["--interval", "0"], []])
def test_status_usage_errors(bad: list[str], tmp_path: Path, capsys) -> None:
    args = [str(tmp_path / "nowhere"), *bad]
    assert st.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and ("--interval" in err or "is not a directory" in err)
    assert os.path.exists(tmp_path) and not (tmp_path / "nowhere").exists()
