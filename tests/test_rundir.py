"""Run directories that never lose work: run ids in checkpoints, pruning and --resume auto by
run, a new run refused in another run's directory, the lock, logs distcnn did not write left
alone, and messages after a failed save that say what is really left."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_SPEC
from test_checkpoint import make_ck

from distcnn import checkpoint as ckpt
from distcnn import rundir
from distcnn.saver import SaveFailed, Saver
from distcnn.train import main

ARGS = ["--model", TINY_SPEC, "--batch-size", "16", "--no-progress"]


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def last_err(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and not any(line.startswith("Traceback") for line in err), err
    return err[-1]


def test_a_second_run_in_the_same_directory_is_refused(tiny_data, tmp_path, capsys) -> None:
    """The issue's case: a second, shorter training started in the same --checkpoint-dir used
    to prune its own new checkpoints (the older run's steps were higher) and --resume auto then
    went on with the older run. Now the second run is refused before it writes anything."""
    d = tmp_path / "run"
    base = ["--data", str(tiny_data), *ARGS, "--checkpoint-dir", str(d)]
    assert main([*base, "--max-steps", "9", "--checkpoint-every", "3", "--keep", "2"]) == 0
    run_id = json.loads((d / "run.json").read_text())["run_id"]
    assert {ckpt.run_id_of(p) for _, p in ckpt.list_checkpoints(d)} == {run_id}
    before = snapshot(d)
    capsys.readouterr()
    assert main([*base, "--max-steps", "4"]) == 2
    assert last_err(capsys) == (
        f"error: --checkpoint-dir {d} holds run {run_id} (see {d / 'run.json'}); continue it "
        "with --resume auto, or give another --checkpoint-dir"
    )
    assert snapshot(d) == before
    # a directory from before run ids (checkpoints, no run.json) is refused the same way
    (d / "run.json").unlink()
    before = snapshot(d)
    assert main([*base, "--max-steps", "4"]) == 2
    assert last_err(capsys) == (
        f"error: --checkpoint-dir {d} holds another run's checkpoints (2 files, newest "
        "ckpt-00000009.h5); continue it with --resume auto, or give another --checkpoint-dir"
    )
    assert snapshot(d) == before


def test_pruning_and_resume_auto_see_only_this_runs_files(tiny_data, tmp_path, capsys) -> None:
    d, other = tmp_path / "run", tmp_path / "other"
    common = ["--data", str(tiny_data), *ARGS, "--checkpoint-every", "2", "--keep", "2"]
    assert main([*common, "--checkpoint-dir", str(other), "--max-steps", "20"]) == 0
    assert main([*common, "--checkpoint-dir", str(d), "--max-steps", "4"]) == 0
    mine = json.loads((d / "run.json").read_text())["run_id"]
    # another run's newer checkpoints land in this directory (copied by hand, say)
    for s in (18, 20):
        (d / ckpt.file_name(s)).write_bytes((other / ckpt.file_name(s)).read_bytes())
    foreign = {
        n: v for n, v in snapshot(d).items() if n in (ckpt.file_name(18), ckpt.file_name(20))
    }
    capsys.readouterr()
    assert main(["--resume", "auto", "--checkpoint-dir", str(d), "--max-steps", "10"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {d / ckpt.file_name(4)} at step 4" in err
    assert f"passed over 2 checkpoints of other runs in {d} (this run is {mine})" in err
    after = snapshot(d)
    assert {n: after[n] for n in foreign} == foreign  # untouched: bytes and mtime
    ours = [p.name for _, p in ckpt.of_run(d, mine)]
    assert ours == [ckpt.file_name(10), ckpt.file_name(8)]  # --keep 2 of this run's own


def test_resume_auto_summarises_a_thousand_junk_files(tmp_path) -> None:
    good = ckpt.save(tmp_path / ckpt.file_name(1), make_ck(1))
    for s in range(2, 1002):
        (tmp_path / ckpt.file_name(s)).write_bytes(b"junk")
    path, notes = ckpt.newest_valid(tmp_path, None)
    assert path == good and len(notes) == 1
    assert notes[0].startswith("--resume auto: skipped 1000 newer checkpoints that do not verify")
    assert notes[0].endswith("; and 997 more)") and len(notes[0]) < 1000


def test_the_lock_stops_a_second_live_job_and_stale_locks_are_replaced(
    tiny_data, tmp_path, capsys
) -> None:
    d = tmp_path / "run"
    args = ["--data", str(tiny_data), *ARGS, "--epochs", "1000", "--checkpoint-dir", str(d)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    first = subprocess.Popen(
        [sys.executable, "-m", "distcnn.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        t0 = time.monotonic()
        status = None
        while time.monotonic() - t0 < 60:  # until it trains and says so in status.json
            status = rundir.read_json(d / "status.json")
            if status and status["state"] == "running" and status["step"] > 0:
                break
            assert first.poll() is None, first.communicate()
            time.sleep(0.05)
        assert status and status["pid"] == first.pid and status["host"] == socket.gethostname()
        lock = json.loads((d / "lock").read_text())
        assert (lock["pid"], lock["host"]) == (first.pid, socket.gethostname())
        capsys.readouterr()
        t0 = time.monotonic()
        assert main(["--resume", "auto", "--checkpoint-dir", str(d)]) == 2
        assert time.monotonic() - t0 < 10
        line = last_err(capsys)
        assert line.startswith(
            f"error: --checkpoint-dir {d} is in use by a live job (pid {first.pid} on "
            f"{socket.gethostname()} since "
        ), line
        assert line.endswith("wait for it to end or give another --checkpoint-dir")
    finally:
        first.send_signal(signal.SIGTERM)  # it saves and ends; its lock goes with it
        out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert not (d / "lock").exists()
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "preempted" and status["last_checkpoint"].endswith(".h5")

    # a stale lock: same host, its process gone
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (d / "lock").write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid}))
    capsys.readouterr()
    assert main(["--resume", "auto", "--checkpoint-dir", str(d), "--max-steps", "1"]) == 0
    assert (
        f"warning: removed the stale lock {d / 'lock'} (pid {dead.pid} on "
        f"{socket.gethostname()} is not running)" in capsys.readouterr().err
    )
    # a lock from another host cannot be proved stale: refused, naming the file to delete
    (d / "lock").write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": 0}))
    assert main(["--resume", "auto", "--checkpoint-dir", str(d)]) == 2
    assert last_err(capsys) == (
        f"error: --checkpoint-dir {d} is in use by pid 1 on host elsewhere since 00:00:00 UTC; "
        f"wait for it to end, or if that job is gone, delete {d / 'lock'}"
    )


def test_a_log_distcnn_did_not_write_is_never_touched(tiny_data, tmp_path, capsys) -> None:
    """#15 class 6: resuming rewrote a notes.md used as --log (263 lines to 3)."""
    notes = tmp_path / "notes.md"
    notes.write_text("".join(f"line {i} of my notes\n" for i in range(263)))
    stat0 = notes.stat()
    d = tmp_path / "run"
    base = ["--data", str(tiny_data), *ARGS, "--checkpoint-dir", str(d)]
    message = (
        f"error: --log {notes} was not written by distcnn (its first line is not a metrics "
        "record); give a new file, distcnn only appends to its own logs"
    )
    assert main([*base, "--log", str(notes), "--max-steps", "2"]) == 2
    assert last_err(capsys) == message
    assert main([*base, "--max-steps", "2"]) == 0
    assert main(["--resume", "auto", "--checkpoint-dir", str(d), "--log", str(notes)]) == 2
    assert last_err(capsys) == message
    assert (
        notes.stat().st_mtime_ns == stat0.st_mtime_ns and len(notes.read_text().split("\n")) == 264
    )
    for bad, msg in (
        (tmp_path / "no" / "log.jsonl", f"the folder {tmp_path / 'no'} does not exist"),
        (tmp_path, f"--log {tmp_path} is a directory; give the path of a file"),
    ):
        assert main([*base, "--log", str(bad), "--resume", "auto"]) == 2
        assert msg in last_err(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes read-only files")
def test_a_read_only_log_is_refused(tiny_data, tmp_path, capsys) -> None:
    log = tmp_path / "log.jsonl"
    log.write_text("")
    log.chmod(0o444)
    args = ["--data", str(tiny_data), *ARGS, "--checkpoint-dir", str(tmp_path / "r")]
    assert main([*args, "--log", str(log)]) == 2
    assert last_err(capsys) == f"error: --log {log} is read-only; give a writable file"


def test_the_run_directory_holds_the_run(tiny_data, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("DISTCNN_RESTARTS", "2")
    d = tmp_path / "run"
    assert main(["--data", str(tiny_data), *ARGS, "--checkpoint-dir", str(d), "--epochs", "2"]) == 0
    assert sorted(p.name for p in d.iterdir()) == [
        "ckpt-00000014.h5", "metrics.jsonl", "run.json", "status.json",
    ]  # fmt: skip
    run = json.loads((d / "run.json").read_text())
    assert run["config"]["epochs"] == 2 and run["host"] == socket.gethostname()
    assert run["metrics_log"] == str(d / "metrics.jsonl") and run["world_size"] == 1
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "run" and recs[0]["run_id"] == run["run_id"]
    assert [r["step"] for r in recs if r["kind"] == "step"] == [10, 14]
    status = json.loads((d / "status.json").read_text())
    assert (status["state"], status["step"], status["total_steps"]) == ("done", 14, 14)
    assert status["run_id"] == run["run_id"] == ckpt.load(d / ckpt.file_name(14)).run_id
    assert status["restarts"] == 2 and status["last_failure"] is None
    assert status["last_checkpoint"] == str(d / ckpt.file_name(14))


class _Rank0:
    rank, size = 0, 1

    def bcast_object(self, obj, root=0, what=""):
        return obj


def _saver(d: Path, run_id: str = "r1") -> Saver:
    from distcnn.metrics import Phases

    state = dataclasses.replace(make_ck(3), run_id=run_id)
    return Saver(_Rank0(), run_id, str(d), 1, 2, Phases(), lambda: state, lambda: None)


def test_messages_after_a_failed_save_say_what_is_left(tmp_path) -> None:
    d = tmp_path / "run"
    d.mkdir()
    s = _saver(d)
    (d / "best.h5").mkdir()  # best.h5 cannot be written
    with pytest.raises(SaveFailed) as e:
        s.save(3, best=True)
    assert str(e.value).startswith(f"saving best.h5 of step 3 in {d} failed: ")
    assert str(e.value).endswith("; no earlier checkpoint of this run is on disk")
    # the regular checkpoint was not written either: it would record a best that is not saved
    assert not (d / ckpt.file_name(3)).exists()
    (d / "best.h5").rmdir()
    s.save(3)
    assert ckpt.of_run(d, "r1") == [(3, d / ckpt.file_name(3))]
    for p in d.iterdir():
        p.unlink()
    d.rmdir()  # the run directory deleted under the run
    with pytest.raises(SaveFailed) as e:
        s.save(4)
    assert str(e.value).endswith(
        f"; the run directory {d} is gone, and with it every checkpoint of the run"
    )
    d.mkdir()
    ckpt.save(d / ckpt.file_name(3), dataclasses.replace(make_ck(3), run_id="r1"))
    (d / ckpt.file_name(4)).mkdir()  # the next save fails; the one before it is there
    with pytest.raises(SaveFailed) as e:
        s.save(4)
    assert str(e.value).endswith(
        f"; the previous checkpoint {d / ckpt.file_name(3)} (step 3) is intact"
    )


def test_resuming_on_another_training_split_is_refused(tiny_data, tmp_path, capsys) -> None:
    """#15 class 2: another --val-fraction (or a smaller train split) crashed with
    ZeroDivisionError; now exit 2 before any work, nothing changed."""
    d = tmp_path / "run"
    args = ["--data", str(tiny_data), *ARGS, "--checkpoint-dir", str(d), "--val-fraction", "0.2"]
    assert main([*args, "--max-steps", "7"]) == 0
    before = snapshot(d)
    path = d / ckpt.file_name(7)
    capsys.readouterr()
    assert main(["--resume", str(path), "--val-fraction", "0.5"]) == 2
    assert last_err(capsys) == (
        f"error: checkpoint {path} was trained on 80 training samples, this run has 50 "
        "(--val-fraction 0.5); resume with the dataset and --val-fraction it was trained with, "
        "or start a new run in another --checkpoint-dir"
    )
    assert snapshot(d) == before


def test_a_test_split_of_another_image_shape_is_refused_up_front(tmp_path, capsys) -> None:
    """#15 class 2: it used to fail after the whole run, at the final evaluation."""
    import h5py
    from conftest import make_images

    path = tmp_path / "mixed.h5"
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = 3
        for split, size in (("train", 8), ("test", 12)):
            images, labels = make_images(40, 3, size, 1)
            f[f"{split}/images"], f[f"{split}/labels"] = images, labels
    d = tmp_path / "run"
    assert main(["--data", str(path), *ARGS, "--checkpoint-dir", str(d)]) == 2
    assert last_err(capsys) == (
        f"error: --data {path}: the test split's images are (1, 12, 12) but train's are "
        "(1, 8, 8); rebuild the file with one image shape"
    )
    assert not list(d.glob("*"))
