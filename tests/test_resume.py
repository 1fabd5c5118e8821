"""Stopping and resuming `python -m distcnn.train`: exact resume on the same and on another
number of ranks, preemption signals, refused checkpoints, and saves that fail.

Every comparison is against an uninterrupted run of the same configuration: bitwise where the
arithmetic is the same (same world size, or --deterministic), allclose otherwise."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, TINY_SPEC, make_images, mpirun

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn.data import write_dataset

BASE = ["--model", TINY_SPEC, "--batch-size", "16", "--seed", "3", "--lr", "0.1", "--no-progress"]


def train(args: list[str], ranks: int = 1, **kw) -> subprocess.CompletedProcess:
    """python -m distcnn.train: a plain process for 1 rank, mpirun for more; kw go to run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [mpirun(), "-n", str(ranks)] if ranks > 1 else []
    return subprocess.run(
        [*launcher, sys.executable, "-m", "distcnn.train", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=kw.pop("timeout", 120),
        **kw,
    )


def ok(r: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def last_error(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr, r.stderr
    return lines[-1]


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Parameters and optimizer velocity of a checkpoint, verified on the way."""
    ck = ckpt.load(path)
    return {
        **{"p/" + k: v for k, v in ck.params.items()},
        **{"v/" + k: v for k, v in ck.velocity.items()},
    }


def assert_bitwise(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    assert list(x) == list(y)
    for k in x:
        assert np.array_equal(x[k], y[k]), f"{k} differs between {a} and {b}"


def assert_close(a: Path, b: Path) -> None:
    x, y = arrays(a), arrays(b)
    for k in x:
        np.testing.assert_allclose(x[k], y[k], rtol=1e-4, atol=1e-5, err_msg=k)


def records(log: Path) -> list[dict]:
    """The log's records, without each attempt's rank table (a `ranks` record: not a metric)."""
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    return [r for r in recs if r["kind"] != "ranks"]


def metrics(recs: list[dict], after: int) -> list[tuple]:
    """Everything of the records past step `after` that does not depend on the clock."""
    keep = ("kind", "step", "epoch", "loss", "accuracy", "lr", "val_loss", "val_accuracy")
    return [tuple(r.get(k) for k in keep) for r in recs if r["step"] > after]


def snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    return {
        p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.iterdir())
    }


def newest(directory: Path) -> Path:
    return ckpt.list_checkpoints(directory)[0][1]


# ---------------------------------------------------------------------------------------------
# Exact resume, same number of ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ranks", [pytest.param(1, marks=pytest.mark.slow), pytest.param(2, marks=pytest.mark.mpi)]
)
def test_stop_and_resume_is_bitwise_identical(tmp_path, tiny_data, ranks):
    """--val-fraction 0.2 leaves 80 train images: 5 steps of 16 per epoch, 30 steps in all.
    Stopped at 7 (mid-epoch, mid log window) and at 10 (an epoch boundary, with validation and
    best.h5 written at that very step), then resumed with --resume auto and no --max-steps."""
    common = [
        *BASE, "--data", str(tiny_data), "--epochs", "6", "--val-fraction", "0.2",
        "--log-every", "3", "--checkpoint-every", "4", "--keep", "50",
    ]  # fmt: skip
    full = tmp_path / "full"
    ok(
        train(
            [*common, "--checkpoint-dir", str(full), "--log", str(tmp_path / "full.jsonl")], ranks
        )
    )
    ref = records(tmp_path / "full.jsonl")
    assert ckpt.load(newest(full)).step == 30
    for k in (7, 10):
        d, log = tmp_path / f"part{k}", tmp_path / f"part{k}.jsonl"
        ok(
            train(
                [*common, "--checkpoint-dir", str(d), "--log", str(log), "--max-steps", str(k)],
                ranks,
            )
        )
        stopped = ckpt.load(d / ckpt.file_name(k))  # the final save at the step limit
        assert (stopped.step, stopped.world_size) == (k, ranks)
        assert (stopped.epoch, stopped.offset) == ((1, 32) if k == 7 else (2, 0))
        assert records(log)[-1]["kind"] == "test" and records(log)[-2]["step"] == k
        before = snapshot(d)
        n_lines = len(records(log))
        # flags not given come from the checkpoint (data, model, --log ...), except --max-steps
        r = ok(
            train(
                ["--resume", "auto", "--checkpoint-dir", str(d), "--checkpoint-every", "1"], ranks
            )
        )
        assert f"resuming from {d / ckpt.file_name(k)} at step {k}" in r.stderr
        after = snapshot(d)
        new_steps = sorted(ckpt.load(d / n).step for n in after if n not in before)
        assert new_steps == list(range(k + 1, 31))  # the first step done is k + 1
        for name, (digest, mtime) in before.items():
            # best.h5 may improve later on; run.json and status.json are the run's live state
            if name not in ("best.h5", "run.json", "status.json"):
                assert after[name] == (digest, mtime), f"{name} was rewritten by the resumed run"
        assert_bitwise(full / ckpt.file_name(30), d / ckpt.file_name(30))
        assert_bitwise(full / "best.h5", d / "best.h5")
        assert ckpt.load(d / "best.h5").best_val == ckpt.load(full / "best.h5").best_val
        got = records(log)
        assert metrics(got, k) == metrics(ref, k)  # same losses, averaged over the same steps
        appended = got[n_lines:]
        assert appended[0] == {**appended[0], "kind": "run", "step": k}  # where it resumed
        assert all(x["step"] > k for x in appended[1:])
        keys = [(x["kind"], x["step"]) for x in got]
        assert len(keys) == len(set(keys)), "a record was repeated"
    # resuming at (or past) the step limit does nothing and exits 0
    log_before = log.read_text()
    r = ok(train(["--resume", "auto", "--checkpoint-dir", str(d), "--max-steps", "12"], ranks))
    assert "already at step 30 of 12: nothing to do" in r.stdout
    assert snapshot(d) == after and log.read_text() == log_before


# ---------------------------------------------------------------------------------------------
# Resume on another number of ranks
# ---------------------------------------------------------------------------------------------


@pytest.mark.mpi
def test_resume_on_another_number_of_ranks(tmp_path, tiny_data):
    """100 images, 7 steps of 16 per epoch, 35 steps; stopped at step 10 and resumed for 25
    more. Default mode: saved at 4, resumed at 2 and at 1, allclose to the uninterrupted 4-rank
    run. --deterministic: 4 -> 2 and 1 -> 4, bitwise equal to the uninterrupted run."""
    common = [*BASE, "--data", str(tiny_data), "--epochs", "5", "--checkpoint-every", "100"]

    def run(name: str, ranks: int, *extra: str) -> Path:
        d = tmp_path / name
        ok(train([*common, "--checkpoint-dir", str(d), *extra], ranks))
        return d

    full4 = newest(run("full4", 4))
    saved4 = run("part4", 4, "--max-steps", "10") / ckpt.file_name(10)
    for m in (2, 1):
        d = tmp_path / f"from4at{m}"
        r = ok(train(["--resume", str(saved4), "--checkpoint-dir", str(d)], m))
        assert "at step 10 (written by 4 rank(s))" in r.stderr
        assert ckpt.load(newest(d)).step == 35 and ckpt.load(newest(d)).world_size == m
        assert_close(full4, newest(d))

    det = "--deterministic"
    full = newest(run("full1det", 1, det))
    for saved_at, resumed_at in ((4, 2), (1, 4)):
        part = run(f"part{saved_at}det", saved_at, det, "--max-steps", "10")
        d = tmp_path / f"det{saved_at}to{resumed_at}"
        ok(
            train(
                ["--resume", str(part / ckpt.file_name(10)), "--checkpoint-dir", str(d)], resumed_at
            )
        )
        assert_bitwise(full, newest(d))


# ---------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------


def _rank_pids(root_pid: int) -> dict[int, int]:
    """{rank: pid} of the MPI processes below root_pid (their rank is in their environment)."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    ranks = {}
    for pid in parent:
        p = pid
        while p in parent and p != root_pid:
            p = parent[p]
        if p != root_pid or pid == root_pid:
            continue
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in env:
            if item.startswith((b"PMI_RANK=", b"OMPI_COMM_WORLD_RANK=")):
                ranks[int(item.split(b"=", 1)[1])] = pid
    return ranks


def _interrupt(args: list[str], ranks: int, target: str, sig: int) -> subprocess.CompletedProcess:
    """Start a run, wait for its first progress line, then freeze every rank (SIGSTOP) so the
    run cannot end before the signal lands, send `sig` to `target` ("rank1" or "mpirun"),
    and let the ranks go on."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", "distcnn.train", *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        head = []
        for line in proc.stdout:
            head.append(line)
            if line.startswith("step "):
                break
        pids = _rank_pids(proc.pid)
        assert sorted(pids) == list(range(ranks)), (pids, head)
        for pid in pids.values():
            os.kill(pid, signal.SIGSTOP)
        os.kill(pids[1] if target == "rank1" else proc.pid, sig)
        time.sleep(0.05)  # let mpirun forward it while the ranks are frozen
        for pid in pids.values():
            os.kill(pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, "".join(head) + out, err)


@pytest.mark.mpi
def test_preemption_stops_every_rank_at_one_step_and_resumes_exactly(tmp_path, tiny_data):
    """SIGTERM to rank 1 only; SIGUSR1 to rank 1 only in --deterministic mode (the flag rides
    the allgather there); SIGTERM to mpirun itself (MPICH's Hydra forwards it to every rank).
    Each run stops at one step on every rank, saves it, exits 0, and its resumption ends
    bitwise equal to the uninterrupted run."""
    common = [
        *BASE, "--data", str(tiny_data), "--epochs", "30", "--log-every", "2",
        "--checkpoint-every", "1000", "--keep", "5",
    ]  # fmt: skip
    common.remove("--no-progress")  # progress lines tell the test the loop is running
    total = 30 * 7
    refs = {}
    for mode in ("default", "det"):
        flags = ["--deterministic"] if mode == "det" else []
        d = tmp_path / f"ref-{mode}"
        ok(train([*common, *flags, "--checkpoint-dir", str(d), "--log", f"{d}.jsonl"], 2))
        refs[mode] = (d / ckpt.file_name(total), records(Path(f"{d}.jsonl")))
    cases = [
        ("default", "rank1", signal.SIGTERM, "a signal on another rank"),
        ("det", "rank1", signal.SIGUSR1, "a signal on another rank"),
        ("default", "mpirun", signal.SIGTERM, "SIGTERM on rank 0"),
    ]
    for mode, target, sig, who in cases:
        flags = ["--deterministic"] if mode == "det" else []
        d = tmp_path / f"{mode}-{target}-{sig.name}"
        log = Path(f"{d}.jsonl")
        r = _interrupt(
            [*common, *flags, "--checkpoint-dir", str(d), "--log", str(log)], 2, target, sig
        )
        assert r.returncode == 0, r.stdout + r.stderr
        line = [x for x in r.stdout.splitlines() if x.startswith("preempted")]
        assert len(line) == 1, r.stdout
        assert line[0].startswith(f"preempted ({who}): stopped at step "), line
        s = int(line[0].split("stopped at step ")[1].split(",")[0])
        assert 2 <= s < total
        assert line[0].endswith(f"checkpoint {d / ckpt.file_name(s)} saved; exiting 0")
        assert ckpt.load(newest(d)).step == s  # saved (the replica check there passed too)
        assert [x for x in records(log) if x["kind"] == "step"][-1]["step"] == s
        assert max(x["step"] for x in records(log)) == s
        ok(train(["--resume", "auto", "--checkpoint-dir", str(d)], 2))
        ref_ckpt, ref_log = refs[mode]
        assert_bitwise(ref_ckpt, d / ckpt.file_name(total))
        assert metrics(records(log), s) == metrics(ref_log, s)


# ---------------------------------------------------------------------------------------------
# Refusals, and --resume auto falling back
# ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_refusals_exit_2_with_one_message_and_auto_falls_back(tmp_path, tiny_data, capsys):
    from test_checkpoint import DAMAGE, _damage, _flip_byte_in_dataset

    common = [*BASE, "--data", str(tiny_data), "--epochs", "2", "--checkpoint-every", "4"]
    d = tmp_path / "ck"
    log = tmp_path / "log.jsonl"
    ok(train([*common, "--checkpoint-dir", str(d), "--max-steps", "8", "--log", str(log)]))
    good, older = d / ckpt.file_name(8), d / ckpt.file_name(4)
    log_text = log.read_text()

    assert datamod.main(["info", str(good)]) == 0
    out = capsys.readouterr().out
    assert "checksum status: ok" in out and "step 8, epoch 1 (+16 samples), written by 1" in out

    for how in [x for x in DAMAGE if x != "edited attribute"]:
        bad = tmp_path / f"{how.replace(' ', '-')}.h5"
        shutil.copy(good, bad)
        message = _damage(bad, how)
        r = train(["--resume", str(bad)])
        assert r.returncode == 2, (how, r.stderr)
        err = last_error(r)
        assert err.startswith(f"error: checkpoint {bad}") and message in err, (how, err)

    other = "conv:8:3,relu,maxpool:2,flatten,dense:16,relu,dense"
    r = train(["--resume", str(older), "--model", other])
    assert r.returncode == 2
    err = last_error(r)
    assert err.startswith(f"error: checkpoint {older} does not fit this model: ")
    assert log.read_text() == log_text  # a refused resume does not cut the log back to step 4
    for part in (
        "model/conv1.weight: expected (8, 1, 3, 3), found (4, 1, 3, 3)",
        "velocity/conv1.bias: expected (8,), found (4,)",
        "model/fc1.weight: expected (16, 128), found (16, 24)",
        "model/conv2.weight: not in this model, found (6, 4, 3, 3)",
    ):
        assert part in err, part

    four = tmp_path / "four.h5"
    write_dataset(four, {"train": make_images(100, 4, 8, 5)}, num_classes=4, attrs={})
    r = train(["--resume", str(good), "--data", str(four)])
    assert r.returncode == 2
    err = last_error(r)
    assert "num_classes: expected 4, found 3" in err
    assert "model/fc2.weight: expected (4, 16), found (3, 16)" in err

    # auto: the newest is damaged and a crashed save left a temporary behind
    _flip_byte_in_dataset(good, "model/fc1.weight")
    (d / "ckpt-00000009.h5.tmp").write_bytes((d / ckpt.file_name(4)).read_bytes()[:1000])
    r = ok(train(["--resume", "auto", "--checkpoint-dir", str(d), "--log-every", "100"]))
    assert (
        "warning: --resume auto: skipped 1 newer checkpoint that does not verify "
        f"(ckpt-00000008.h5: checkpoint {good}: /model/fc1.weight fails its sha256" in r.stderr
    )
    assert f"removed {d / 'ckpt-00000009.h5.tmp'}, left by an interrupted save" in r.stderr
    assert f"resuming from {d / ckpt.file_name(4)} at step 4" in r.stderr
    assert not list(d.glob("*.tmp"))
    full = tmp_path / "full"
    ok(train([*common, "--checkpoint-dir", str(full)]))
    assert_bitwise(full / ckpt.file_name(14), d / ckpt.file_name(14))

    # nothing that verifies: refuse rather than start over next to damaged files
    only = tmp_path / "only"
    only.mkdir()
    shutil.copy(d / ckpt.file_name(14), only / ckpt.file_name(14))
    _flip_byte_in_dataset(only / ckpt.file_name(14), "model/conv1.bias")
    r = train(["--resume", "auto", "--checkpoint-dir", str(only)])
    assert r.returncode == 2
    assert last_error(r).startswith(f"error: --resume auto: no checkpoint in {only} verifies")


# ---------------------------------------------------------------------------------------------
# Saves that fail
# ---------------------------------------------------------------------------------------------


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return r.returncode == 0


@pytest.mark.mpi
def test_failed_saves_end_every_rank_with_one_message(tmp_path, tiny_data):
    common = [*BASE, "--data", str(tiny_data), "--epochs", "3", "--checkpoint-every", "4"]
    d = tmp_path / "ck"
    ok(train([*common, "--checkpoint-dir", str(d), "--max-steps", "8"]))
    before = snapshot(d)

    # A file size limit makes the save at step 12 fail as a full disk would. It is set after
    # MPI starts: MPICH's UCX transport writes shared-memory files bigger than the limit.
    shim = tmp_path / "limited_train.py"
    shim.write_text(
        "import resource, runpy, sys\n"
        "from mpi4py import MPI  # noqa: F401  (MPI up first)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (8000, 8000))\n"
        "sys.argv[0] = 'distcnn.train'\n"
        "runpy.run_module('distcnn.train', run_name='__main__')\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [mpirun(), "-n", "2", sys.executable, str(shim), "--resume", "auto"]
    cmd += ["--checkpoint-dir", str(d)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stdout + r.stderr
    assert last_error(r) == (
        f"error: saving the checkpoint of step 12 in {d} failed: [Errno 27] File too large "
        f"(writing {d / 'ckpt-00000012.h5.tmp'}); the previous checkpoint "
        f"{d / ckpt.file_name(8)} (step 8) is intact"
    )
    assert r.stderr.count("error:") == 1
    # nothing new, nothing changed, no temporary left (but the run's own state files)
    live = ("run.json", "status.json", "metrics.jsonl")
    after = snapshot(d)
    assert {k: v for k, v in after.items() if k not in live} == {
        k: v for k, v in before.items() if k not in live
    }
    status = json.loads((d / "status.json").read_text())
    assert status["state"] == "failed" and status["last_failure"]["rank"] == 0
    assert "File too large" in status["last_failure"]["message"]
    before = after
    # the limit also stops MPICH from creating the shared-memory gradient window: every rank
    # falls back to MPI_Iallreduce together, and says so
    assert "gradient allreduce: MPI_Iallreduce (the shared-memory window failed" in r.stdout
    ckpt.load(d / ckpt.file_name(8))

    # an unusable --checkpoint-dir (below a regular file: root cannot write there either)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = train(["--resume", str(d / ckpt.file_name(8)), "--checkpoint-dir", str(blocker / "ck")], 2)
    assert r.returncode == 2
    assert last_error(r) == (
        f"error: --checkpoint-dir {blocker / 'ck'} is unusable (Not a directory); "
        "give a writable directory"
    )
    assert r.stderr.count("error:") == 1 and snapshot(d) == before

    # a real full disk, where this machine lets us mount a tiny tmpfs (one checkpoint fits)
    small = tmp_path / "small"
    if not _mount_tmpfs(small, "40k"):  # one checkpoint and the run's small files fit
        pytest.skip("cannot mount a tmpfs here; the RLIMIT_FSIZE case above stands in for it")
    try:
        r = train([*common, "--checkpoint-dir", str(small)], 2, timeout=60)
        assert r.returncode == 1, r.stdout + r.stderr
        err = last_error(r)
        assert err.startswith(f"error: saving the checkpoint of step 8 in {small} failed: ")
        assert "No space left on device" in err
        assert sorted(n for n in os.listdir(small) if ".h5" in n) == [ckpt.file_name(4)]
        assert ckpt.load(small / ckpt.file_name(4)).step == 4
    finally:
        subprocess.run(["umount", str(small)], check=False)
