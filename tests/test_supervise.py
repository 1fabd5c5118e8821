"""`python -m distcnn.supervise`: the restart policy against a fake launcher (each attempt does
what a plan says: exit code, output, a checkpoint, a status file), then the real thing under
mpirun: SIGTERM to the supervisor, and the chaos run (ranks SIGKILLed, one killed while it writes
a checkpoint, one hung) that must end bitwise equal to an uninterrupted run."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, mpirun

from distcnn import checkpoint as ckpt
from distcnn import supervise

# The fake launcher: `fake.py -n N --hostfile F python -m distcnn.train FLAGS...`. It appends
# what it was given to calls.jsonl, then plays step DISTCNN_RESTARTS of the plan in plan.json:
#   {"exit": code, "out": [lines], "err": [lines], "ckpt": step, "status": {...}, "term": code}
# ("term": wait for SIGTERM/SIGUSR1/SIGINT, then print and exit with that code).
FAKE = r"""
import json, os, signal, sys, time
from pathlib import Path
here = Path(__file__).parent
args = sys.argv[1:]
n, hostfile = args[1], args[3]
train = args[4:]
attempt = int(os.environ["DISTCNN_RESTARTS"])
hosts = Path(hostfile).read_text() if hostfile else None
with open(here / "calls.jsonl", "a") as f:
    f.write(json.dumps({"n": int(n), "hostfile": hostfile, "hosts": hosts, "train": train,
                        "restarts": attempt}) + "\n")
plan = json.loads((here / "plan.json").read_text())
step = plan[min(attempt, len(plan) - 1)]
run_dir = Path(train[train.index("--checkpoint-dir") + 1])
run_dir.mkdir(parents=True, exist_ok=True)
if "ckpt" in step:
    (run_dir / f"ckpt-{step['ckpt']:08d}.h5").write_bytes(b"")
if "status" in step:
    (run_dir / "status.json").write_text(json.dumps({**step["status"], "updated": time.time()}))
for line in step.get("out", []):
    print(line, flush=True)
for line in step.get("err", []):
    print(line, file=sys.stderr, flush=True)
if "term" in step:
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(s, lambda num, fr: got.append(signal.Signals(num).name))
    print("waiting for a signal", flush=True)
    while not got:
        time.sleep(0.01)
    print(f"fake job got {got[0]}", flush=True)
    sys.exit(step["term"])
sys.exit(step.get("exit", 0))
"""


class Fake:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp
        (tmp / "fake.py").write_text(FAKE)
        self.run_dir = tmp / "run"
        self.launcher = f"{sys.executable} {tmp / 'fake.py'} -n {{n}} --hostfile '{{hostfile}}'"

    def run(self, plan: list[dict], own: list[str], train: list[str] | None = None) -> int:
        (self.dir / "plan.json").write_text(json.dumps(plan))
        train = train or ["--epochs", "2"]
        argv = [*own, "--launcher", self.launcher, "--backoff", "0.01", "--"]
        return supervise.main([*argv, *train, "--checkpoint-dir", str(self.run_dir)])

    def calls(self) -> list[dict]:
        path = self.dir / "calls.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    def doc(self) -> dict:
        return json.loads((self.run_dir / "supervisor.json").read_text())

    def events(self) -> list[dict]:
        log = self.run_dir / "metrics.jsonl"
        return [r for r in map(json.loads, log.read_text().splitlines()) if r["kind"] == "event"]


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def rank_table(*hosts: str, pid0: int = 1000) -> list[str]:
    return ["ranks:"] + [
        f"rank {r}: host {h} pid {pid0 + r} local_rank 0" for r, h in enumerate(hosts)
    ]


KILLED = ["=   PID 1001 RUNNING AT vm", "=   EXIT CODE: 9", "EXIT STRING: Killed (signal 9)"]


def test_done_at_once_is_one_attempt_and_exit_0(fake: Fake, capsys) -> None:
    assert fake.run([{"exit": 0, "out": ["training", "done"]}], ["-n", "2"]) == 0
    out = capsys.readouterr()
    assert "training\ndone\n" in out.out  # the job's output passes through unchanged
    (call,) = fake.calls()
    assert call["n"] == 2 and call["restarts"] == 0 and "--resume" not in call["train"]
    assert call["train"][1:3] == ["-m", "distcnn.train"]
    doc = fake.doc()
    assert doc["state"] == "done" and doc["restarts"] == 0 and doc["max_restarts"] == 3
    (a,) = doc["attempts"]
    assert a["outcome"] == "done" and a["exit_code"] == 0 and a["end"] >= a["start"]
    (ev,) = fake.events()
    assert ev["event"] == "attempt" and ev["outcome"] == "done" and "step" not in ev


def test_failures_restart_with_resume_auto_until_done(fake: Fake, capsys) -> None:
    plan = [
        {"exit": 9, "ckpt": 5, "out": rank_table("vm", "vm"), "err": KILLED},
        {
            "exit": 1,
            "ckpt": 10,
            "err": ["[rank 1] Traceback (most recent call last):", "[rank 1] x"],
        },
        {"exit": 0, "ckpt": 20},
    ]
    train = ["--epochs", "2", "--resume", "old.h5"]
    assert fake.run(plan, ["-n", "2", "--max-restarts", "2"], train) == 0
    calls = fake.calls()
    assert [c["restarts"] for c in calls] == [0, 1, 2]  # DISTCNN_RESTARTS of each attempt
    assert calls[0]["train"][-4:-2] == ["--resume", "old.h5"]
    for c in calls[1:]:  # restarts resume from the newest checkpoint, the user's --resume gone
        assert c["train"].count("--resume") == 1 and "old.h5" not in c["train"]
        assert c["train"][c["train"].index("--resume") + 1] == "auto"
    doc = fake.doc()
    assert doc["state"] == "done" and doc["restarts"] == 2 and doc["budget_used"] == 2
    got = [(a["outcome"], a["failing_rank"], a["failing_host"]) for a in doc["attempts"]]
    # attempt 1: the killed PID 1001 is rank 1 in the rank table
    assert got == [("crashed", 1, "vm"), ("failed", 1, os.uname().nodename), ("done", None, None)]
    assert [a["resumed_from"] for a in doc["attempts"]] == [None, 5, 10]
    assert [a["step_reached"] for a in doc["attempts"]] == [5, 10, 20]
    assert [e["outcome"] for e in fake.events()] == ["crashed", "failed", "done"]
    assert "3 attempt(s), 2 restart(s), 2 of --max-restarts 2 spent" in capsys.readouterr().err


def test_budget_spent_exits_1_with_every_attempt_and_capped_backoff(fake: Fake, capsys) -> None:
    plan = [
        {"exit": 3, "ckpt": 4, "err": ["[rank 1] exited with code 3; aborting the job"]},
        {
            "exit": 1,
            "err": [
                "[rank 0] error: collective #9 (gradient allreduce) waited 2.0 s, longer than "
                "--collective-timeout 2; ranks that did not arrive: 1. Aborting the job."
            ],
        },
        {"exit": 9, "err": KILLED, "out": rank_table("vm", "vm")},
        {
            "exit": 1,
            "status": {"state": "failed", "step": 7, "last_failure": {"rank": 0, "host": "h0"}},
        },
    ]
    own = ["-n", "2", "--max-restarts", "3", "--backoff-max", "0.02"]
    assert fake.run(plan, own) == 1
    err = capsys.readouterr().err
    # waits double from --backoff 0.01 and stop at --backoff-max 0.02
    waits = [x.split(" in ")[1] for x in err.splitlines() if "restarting after" in x]
    assert waits == ["0.01 s with --resume auto", "0.02 s with --resume auto"] + [
        "0.02 s with --resume auto"
    ]
    assert "giving up: --max-restarts 3 spent" in err
    table = err[err.index("supervise: 4 attempt(s)") :].splitlines()
    assert table[0].startswith("supervise: 4 attempt(s), 3 restart(s), 3 of --max-restarts 3")
    assert table[1].split() == [
        "#",
        "outcome",
        "exit",
        "ranks",
        "failing",
        "rank",
        "host",
        "resumed",
        "reached",
        "s",
    ]
    rows = [r.split()[:8] for r in table[2:]]
    here = os.uname().nodename
    assert rows == [
        ["1", "failed", "3", "2", "1", here, "-", "4"],
        ["2", "timeout", "1", "2", "1", here, "4", "4"],  # the rank that did not arrive
        ["3", "crashed", "9", "2", "1", "vm", "4", "4"],
        ["4", "failed", "1", "2", "0", "h0", "4", "7"],  # from status.json's last_failure
    ]
    assert fake.doc()["state"] == "failed"
    assert len(fake.events()) == 4


def test_bad_input_is_not_restarted_and_leaves_nothing(fake: Fake, capsys) -> None:
    assert fake.run([{"exit": 2, "err": ["error: --epochs 0 must be positive"]}], []) == 2
    assert len(fake.calls()) == 1
    assert not (fake.run_dir / "supervisor.json").exists()
    assert not (fake.run_dir / "metrics.jsonl").exists()
    assert capsys.readouterr().err.splitlines()[-1].startswith("supervise: attempt 1 ended: bad")


def test_bad_input_on_a_restart_stops_with_exit_2(fake: Fake) -> None:
    plan = [{"exit": 1, "ckpt": 3}, {"exit": 2}]
    assert fake.run(plan, []) == 2
    assert len(fake.calls()) == 2
    assert [a["outcome"] for a in fake.doc()["attempts"]] == ["failed", "bad-input"]
    assert fake.doc()["state"] == "failed"


@pytest.mark.parametrize("how", ["output", "status"])
def test_preemption_restarts_without_spending_the_budget(fake: Fake, how: str) -> None:
    first: dict = {"exit": 0, "ckpt": 6}
    if how == "output":
        first["out"] = ["preempted (SIGTERM on rank 0): stopped at step 6, checkpoint saved"]
    else:
        first["status"] = {"state": "preempted", "step": 6}
    plan = [first, {"exit": 0, "ckpt": 20, "status": {"state": "done", "step": 20}}]
    assert fake.run(plan, ["--max-restarts", "0"]) == 0
    doc = fake.doc()
    assert [a["outcome"] for a in doc["attempts"]] == ["preempted", "done"]
    assert doc["budget_used"] == 0 and doc["restarts"] == 1


def test_a_preemption_without_progress_costs_the_budget(fake: Fake) -> None:
    plan = [{"exit": 1, "ckpt": 6}, {"exit": 0, "status": {"state": "preempted", "step": 6}}]
    assert fake.run(plan, ["--max-restarts", "1"]) == 1  # no endless free restarts
    assert [a["outcome"] for a in fake.doc()["attempts"]] == ["failed", "preempted"]


def fail_on(host: str, hosts: tuple[str, ...], rank: int) -> dict:
    return {"exit": 1, "out": rank_table(*hosts), "err": [f"[rank {rank}] RuntimeError: boom"]}


def test_a_host_failing_twice_in_a_row_is_left_out(fake: Fake, capsys) -> None:
    hostfile = fake.dir / "hosts"
    hostfile.write_text("# three machines\nna:1\nnb:1\nnc:1\n")
    abc = ("na", "nb", "nc")
    plan = [
        fail_on("nb", abc, 1),
        fail_on("nc", abc, 2),  # another host: nb's streak ends
        fail_on("nb", abc, 1),
        fail_on("nb", abc, 1),  # nb twice in a row: left out
        {"exit": 0},
    ]
    assert fake.run(plan, ["--hostfile", str(hostfile), "--max-restarts", "5"]) == 0
    calls = fake.calls()
    assert [c["n"] for c in calls] == [3, 3, 3, 3, 2]
    assert all(c["hostfile"] == str(hostfile) for c in calls[:4])
    assert calls[4]["hostfile"] == str(fake.run_dir / "supervisor.hosts")
    assert [x for x in calls[4]["hosts"].splitlines() if not x.startswith("#")] == ["na:1", "nc:1"]
    doc = fake.doc()
    assert doc["excluded_hosts"] == ["nb"] and doc["attempts"][4]["hosts"] == ["na", "nc"]
    assert "leaving out host nb: it failed two attempts in a row" in capsys.readouterr().err


def test_open_mpi_hostfiles_are_rewritten_in_their_own_form(fake: Fake) -> None:
    hostfile = fake.dir / "hosts"
    hostfile.write_text("na slots=2\nnb slots=2\n")
    plan = [fail_on("nb", ("na", "na", "nb", "nb"), 3)] * 2 + [{"exit": 0}]
    # rank 3's host as the ranks report it, a longer name than the hostfile's: still matched
    plan = [
        {**p, "out": [x.replace("host nb", "host nb.cluster") for x in p.get("out", [])]}
        for p in plan
    ]
    assert fake.run(plan, ["--hostfile", str(hostfile), "-n", "4"]) == 0
    last = fake.calls()[-1]
    assert last["n"] == 2 and "na slots=2" in last["hosts"] and "nb" not in last["hosts"]


def test_min_ranks_is_a_floor(fake: Fake, capsys) -> None:
    hostfile = fake.dir / "hosts"
    hostfile.write_text("na:2\nnb:2\n")
    plan = [fail_on("nb", ("na", "na", "nb", "nb"), 2)]
    own = ["--hostfile", str(hostfile), "--min-ranks", "3", "--max-restarts", "9"]
    assert fake.run(plan, own) == 1
    assert len(fake.calls()) == 2  # the third attempt would have had 2 ranks
    err = capsys.readouterr().err
    assert "giving up: 2 rank(s) left on the remaining hosts (na; left out: nb), fewer than " in err
    assert "--min-ranks 3" in err and fake.doc()["state"] == "failed"


def start_supervisor(fake: Fake, plan: list[dict], own: list[str]) -> subprocess.Popen:
    (fake.dir / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "distcnn.supervise", "--launcher", fake.launcher, *own, "--"]
    cmd += ["--checkpoint-dir", str(fake.run_dir)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize(
    ("sig", "job_code", "code"), [("SIGTERM", 0, 0), ("SIGUSR1", 0, 0), ("SIGINT", 130, 130)]
)
def test_a_signal_to_the_supervisor_reaches_the_job_and_stops(
    fake: Fake, sig: str, job_code: int, code: int
) -> None:
    p = start_supervisor(fake, [{"term": job_code}, {"exit": 0}], [])
    assert p.stdout is not None
    for line in p.stdout:  # the job is up
        if "waiting for a signal" in line:
            break
    p.send_signal(signal.Signals[sig])
    out, err = p.communicate(timeout=30)
    assert p.returncode == code, err
    assert f"fake job got {sig}" in out  # passed on, once
    assert len(fake.calls()) == 1  # not restarted
    doc = fake.doc()
    assert doc["state"] == "stopped" and doc["attempts"][0]["outcome"] == "stopped"
    assert f"stopped by {sig}; not restarting" in err


def test_sigterm_during_the_backoff_stops_without_restarting(fake: Fake) -> None:
    p = start_supervisor(fake, [{"exit": 1}], ["--backoff", "60"])
    assert p.stderr is not None
    for line in p.stderr:
        if "restarting after a failure in 60 s" in line:
            break
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0 and len(fake.calls()) == 1
    assert fake.doc()["state"] == "stopped" and "stopped by SIGTERM" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--max-restarts", "-1"], "--max-restarts -1 is negative; give 0 or more"),
        (["-n", "0"], "-n 0 is not a positive number of ranks; e.g. -n 2"),
        (["-n", "2", "--min-ranks", "3"], "--min-ranks 3 must be between 1 and the 2 rank(s)"),
        (["--backoff", "2", "--backoff-max", "1"], "--backoff-max 1.0 is below --backoff 2.0"),
        (["--backoff", "nan"], "--backoff nan is not a finite number >= 0"),
        (["--hostfile", "/nonexistent/hosts"], "--hostfile /nonexistent/hosts cannot be read"),
        (["--epochs", "3"], "unknown supervisor flag '--epochs'; put training flags after `--`"),
        (
            ["--launcher", "no-such-launcher -n {n}"],
            "--launcher: 'no-such-launcher' is not an executable",
        ),
        (["--", "--dry-run"], "--dry-run is not supervised"),
    ],
)
def test_bad_supervisor_flags_exit_2_with_one_line(argv: list[str], message: str, capsys) -> None:
    assert supervise.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: " + message), err


def test_hostfile_forms_and_rank_placement(tmp_path: Path) -> None:
    f = tmp_path / "h"
    f.write_text("# c\nn1:4\nn2\n\n")
    hosts, style = supervise.read_hostfile(str(f))
    assert [(h.name, h.slots) for h in hosts] == [("n1", 4), ("n2", 1)] and style == "mpich"
    assert [supervise.host_of_rank(r, hosts) for r in (0, 3, 4, 5)] == ["n1", "n1", "n2", "n1"]
    f.write_text("n1 slots=2 max_slots=4\n")
    assert supervise.read_hostfile(str(f))[1] == "openmpi"
    f.write_text("n1:x\n")
    with pytest.raises(supervise.UsageError, match="line 1 .* is neither host:slots"):
        supervise.read_hostfile(str(f))


def test_run_paths_follow_the_training_flags(tmp_path: Path) -> None:
    assert supervise.run_paths([]) == (Path("checkpoints"), Path("checkpoints/metrics.jsonl"))
    toml = tmp_path / "c.toml"
    toml.write_text('checkpoint_dir = "runs/a"\n')
    assert supervise.run_paths(["--config", str(toml), "--log=l.jsonl"]) == (
        Path("runs/a"),
        Path("l.jsonl"),
    )
    assert supervise.run_paths(["--config", str(toml), "--checkpoint-dir", "b"])[0] == Path("b")


def test_watch_reads_the_failing_rank_from_launcher_output() -> None:
    w = supervise.Watch()
    for line in ["srun: error: node7: task 5: Killed"]:
        w.line(line)
    w.resolve(lambda r: None)
    assert (w.failing_rank, w.failing_host, w.signalled) == (5, "node7", True)
    w = supervise.Watch()
    for line in [*rank_table("a", "b", pid0=50), "=   PID 51 RUNNING AT b", *KILLED[1:]]:
        w.line(line)
    w.resolve(lambda r: None)
    assert (w.failing_rank, w.failing_host, w.signalled) == (1, "b", True)
    w = supervise.Watch()
    w.line(
        "[rank 0] error: collective #7 (gradient allreduce) waited 5.1 s, longer than "
        "--collective-timeout 5; ranks that did not arrive: none (all arrived); ranks not "
        "answering (stopped, or stuck outside MPI): 1. Aborting the job."
    )
    assert (w.timeout, w.failing_rank) == (True, 1)
    w = supervise.Watch()
    w.line("step     37/60  epoch 0.6  loss 1.0")
    assert w.last_step == 37 and w.failing_rank is None


# -- the real supervisor under real mpirun ---------------------------------------------------

TINY = "conv:4:3,relu,maxpool:2,conv:6:3,relu,avgpool:2,flatten,dense:16,relu,dense"


def supervise_cmd(own: list[str], train: list[str]) -> list[str]:
    return [sys.executable, "-m", "distcnn.supervise", *own, "--", *train]


def job_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **extra}


@pytest.mark.mpi
def test_sigterm_to_the_supervisor_saves_the_job_and_does_not_restart(
    tiny_data: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    train = ["--data", str(tiny_data), "--model", TINY, "--batch-size", "10", "--epochs", "5000"]
    train += ["--checkpoint-dir", str(run), "--log-every", "1"]  # progress lines: it trains
    p = subprocess.Popen(
        supervise_cmd(["-n", "2"], train),
        env=job_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
            break
    p.send_signal(signal.SIGTERM)
    rest, err = p.communicate(timeout=60)
    out = "".join(seen) + rest
    assert p.returncode == 0, out + err
    assert "preempted (SIGTERM on rank 0): stopped at step" in out, out + err
    step = int(out.split("stopped at step ")[1].split(",")[0])
    assert (run / f"ckpt-{step:08d}.h5").exists()
    doc = json.loads((run / "supervisor.json").read_text())
    assert doc["state"] == "stopped" and len(doc["attempts"]) == 1
    assert doc["attempts"][0]["outcome"] == "stopped" and doc["attempts"][0]["exit_code"] == 0
    assert "stopped by SIGTERM; not restarting" in err


def chaos_faults(seed: int, every: int) -> list[tuple[int, int, str]]:
    """(rank, step, mode) for attempts 0..3: a SIGKILL, a SIGKILL of rank 0 while it writes the
    checkpoint of a step, a hang, a SIGKILL; steps random (seeded) and increasing, so each
    attempt gets past the checkpoint the previous one resumed from."""
    rng = random.Random(seed)
    k1 = rng.randint(3, 9)
    c2 = rng.choice([m for m in range(every, 20, every) if m > k1])
    h3 = rng.randint(c2 + 1, c2 + 6)
    k4 = rng.randint(h3 + 1, 36)
    return [
        (rng.randint(0, 1), k1, "kill"),
        (0, c2, "kill-save"),
        (rng.randint(0, 1), h3, "hang"),
        (rng.randint(0, 1), k4, "kill"),
    ]


def step_records(log: Path) -> list[tuple]:
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    return [(r["step"], r["loss"], r["accuracy"], r["lr"]) for r in recs if r["kind"] == "step"]


@pytest.mark.mpi
@pytest.mark.slow
def test_chaos_run_heals_itself_and_matches_an_uninterrupted_run(
    tiny_data: Path, tmp_path: Path
) -> None:
    """#12 §4: 2 ranks, --deterministic, under the real supervisor and mpirun; ranks SIGKILLed
    at three random steps (once while rank 0 writes a checkpoint) and once hung (watchdog)."""
    every, total = 4, 40  # 100 images / batch 10 = 10 steps per epoch, 4 epochs
    train = ["--data", str(tiny_data), "--model", TINY, "--batch-size", "10", "--epochs", "4"]
    train += ["--checkpoint-every", str(every), "--deterministic", "--log-every", "1"]
    train += ["--collective-timeout", "3"]
    ref, run = tmp_path / "ref", tmp_path / "run"
    t0 = time.perf_counter()
    r = subprocess.run(
        [
            mpirun(),
            "-n",
            "2",
            sys.executable,
            "-m",
            "distcnn.train",
            *train,
            "--checkpoint-dir",
            str(ref),
            "--log",
            str(ref / "metrics.jsonl"),
        ],
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    t_ref = time.perf_counter() - t0
    assert r.returncode == 0, r.stdout + r.stderr

    faults = chaos_faults(int(os.environ.get("CHAOS_SEED", "12")), every=every)
    spec = ",".join(f"{rank}:{step}:{mode}@{n}" for n, (rank, step, mode) in enumerate(faults))
    t0 = time.perf_counter()
    r = subprocess.run(
        supervise_cmd(
            ["-n", "2", "--max-restarts", "4", "--backoff", "0.05"],
            [*train, "--checkpoint-dir", str(run), "--log", str(run / "metrics.jsonl")],
        ),
        env=job_env(DISTCNN_FAULT=spec),
        capture_output=True,
        text=True,
        timeout=300,
    )
    t_sup = time.perf_counter() - t0
    out = r.stdout + r.stderr
    assert r.returncode == 0, out

    # bitwise the uninterrupted run's parameters and momentum, and the same logged losses
    final = ckpt.file_name(total)
    a, b = ckpt.load(run / final), ckpt.load(ref / final)
    for name in b.params:
        assert np.array_equal(a.params[name], b.params[name]), name
        assert np.array_equal(a.velocity[name], b.velocity[name]), name
    assert step_records(run / "metrics.jsonl") == step_records(ref / "metrics.jsonl")

    doc = json.loads((run / "supervisor.json").read_text())
    attempts = doc["attempts"]
    assert doc["state"] == "done" and doc["restarts"] == 4 and doc["budget_used"] == 4
    assert [x["outcome"] for x in attempts] == ["crashed", "crashed", "timeout", "crashed", "done"]
    (k1r, k1, _), (_, c2, _), (h3r, h3, _), (k4r, k4, _) = faults
    # the step each attempt reached, and where the next one resumed: nothing lost beyond the
    # checkpoint interval (the save of step c2 was killed, so that attempt loses `every` steps)
    assert [x["step_reached"] for x in attempts] == [k1 - 1, c2, h3 - 1, k4 - 1, total]

    def ckpt_before(step: int) -> int | None:  # the newest checkpoint at or before a step
        return step // every * every or None

    expect_resume = [None, ckpt_before(k1 - 1), c2 - every, ckpt_before(h3 - 1)]
    expect_resume.append(ckpt_before(k4 - 1))
    assert [x["resumed_from"] for x in attempts] == expect_resume
    for prev, nxt in zip(attempts, attempts[1:], strict=False):
        assert prev["step_reached"] - (nxt["resumed_from"] or 0) <= every
    assert f"removed {run / ckpt.file_name(c2)}{ckpt.TMP_SUFFIX}, left by an interrupted" in out
    assert attempts[2]["failing_rank"] == h3r  # named by the watchdog
    here = socket.gethostname().split(".")[0]
    assert all(x["failing_host"].split(".")[0] == here for x in attempts[:4])
    assert "ranks:" in r.stdout  # the rank table (contract 5) maps the killed PID to its rank
    assert [attempts[i]["failing_rank"] for i in (0, 1, 3)] == [k1r, 0, k4r]
    events = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    events = [e for e in events if e["kind"] == "event"]
    assert [(e["attempt"], e["outcome"]) for e in events] == [
        (x["n"], x["outcome"]) for x in attempts
    ]
    status = run / "status.json"
    if status.exists():  # written by the trainer from DISTCNN_RESTARTS
        assert json.loads(status.read_text())["restarts"] == 4
    # where a restart's time goes: from the end of an attempt to the next one's first step
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    times = [x["time"] for x in steps if x["kind"] == "step"]
    gaps = [
        min(t for t in times if t >= nxt["start"]) - prev["end"]
        for prev, nxt in zip(attempts, attempts[1:], strict=False)
    ]
    print(
        f"chaos run: uninterrupted {t_ref:.1f} s, supervised {t_sup:.1f} s with 4 restarts "
        f"(one 3 s watchdog wait): {(t_sup - t_ref) / 4:.1f} s per restart; end of an attempt to "
        f"the next one's first step: {', '.join(f'{g:.1f}' for g in gaps)} s"
    )


def test_fault_lists_apply_per_rank_and_attempt(monkeypatch) -> None:
    from distcnn import faults

    monkeypatch.setenv("DISTCNN_FAULT", "1:6:kill@0, 0:12:kill-save@1,1:15:hang@2,0:3:nan@0")
    monkeypatch.delenv("DISTCNN_RESTARTS", raising=False)
    assert (faults.fault_from_env(0), faults.fault_from_env(1)) == ((3, "nan"), (6, "kill"))
    monkeypatch.setenv("DISTCNN_RESTARTS", "1")
    # kill-save is carried out by checkpoint.save, not before a step
    assert (faults.fault_from_env(0), faults.fault_from_env(1)) == (None, None)
    monkeypatch.setenv("DISTCNN_RESTARTS", "2")
    assert faults.fault_from_env(1) == (15, "hang")
    faults.during_save(12)  # not attempt 1: nothing happens
    monkeypatch.setenv("DISTCNN_FAULT", "1:6:exit")  # unqualified: every attempt
    assert faults.fault_from_env(1) == (6, "exit")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("1:6", "DISTCNN_FAULT='1:6' is malformed; use <rank>:<step>:<raise|exit|hang|nan|kill"),
        ("1:6:boom", "DISTCNN_FAULT mode 'boom' is unknown; use one of raise, exit, hang, nan"),
        ("1:6:kill@x", "DISTCNN_FAULT='1:6:kill@x' is malformed"),
        ("1:0:kill", "DISTCNN_FAULT entry '1:0:kill': rank and attempt must be >= 0, step >= 1"),
        ("1:6:kill-save", "DISTCNN_FAULT entry '1:6:kill-save': kill-save applies to rank 0"),
        (
            "1:6:kill,1:9:exit@2",
            "DISTCNN_FAULT='1:6:kill,1:9:exit@2' gives rank 1 two faults in one attempt; give one",
        ),
    ],
)
def test_bad_fault_specs_are_refused(spec: str, message: str, monkeypatch) -> None:
    from distcnn import faults

    monkeypatch.setenv("DISTCNN_FAULT", spec)
    with pytest.raises(supervise.UsageError) as e:
        faults.fault_from_env(0)
    assert str(e.value).startswith(message), str(e.value)


FAKE_SRUN = r"""#!/usr/bin/env bash
# srun [options] -N nodes -n N -w hosts CMD...: runs CMD as N ranks under mpirun
n=1
while [[ $# -gt 0 ]]; do
    case $1 in
        -n) n=$2; shift 2 ;;
        -N | -w) echo "srun $1 $2" >>"$FAKE_LOG"; shift 2 ;;
        -*) shift ;;
        *) break ;;
    esac
done
exec "$MPIRUN" -n "$n" "$@"
"""

FAKE_SCONTROL = r"""#!/usr/bin/env bash
case $1 in
    show) echo nodeA ;;
    requeue) echo "requeue $2" >>"$FAKE_LOG" ;;
esac
"""


@pytest.mark.mpi
def test_slurm_script_stops_the_supervised_job_at_the_time_limit_and_requeues(
    tiny_data: Path, tmp_path: Path
) -> None:
    """launch/slurm.sbatch with stand-ins for srun and scontrol: the time-limit warning (USR1 to
    the batch script) reaches the supervisor, the job saves and the script requeues it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    log, run = tmp_path / "fake.log", tmp_path / "run"
    env = job_env(
        PATH=f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}",
        FAKE_LOG=str(log),
        MPIRUN=mpirun(),
        CKPT_DIR=str(run),
        TMPDIR=str(tmp_path),
        SLURM_JOB_ID="77",
        SLURM_JOB_NODELIST="nodeA",
        SLURM_NTASKS="2",
        SLURM_NTASKS_PER_NODE="2(x1)",
        SLURM_JOB_NUM_NODES="1",
        SLURM_SUBMIT_DIR=str(tmp_path),
    )
    train = ["--data", str(tiny_data), "--model", TINY, "--batch-size", "10", "--epochs", "5000"]
    p = subprocess.Popen(
        ["bash", str(ROOT / "launch" / "slurm.sbatch"), *train, "--log-every", "1"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None
    seen = []
    for line in p.stdout:
        seen.append(line)
        if line.startswith("step") and int(line.split()[1].split("/")[0]) >= 3:
            break
    p.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@180 sends near the time limit
    rest, err = p.communicate(timeout=60)
    out = "".join(seen) + rest
    assert p.returncode == 0, out + err
    assert "preempted (SIGTERM on rank 0): stopped at step" in out, out + err
    assert (tmp_path / "distcnn-77.hosts").read_text() == "nodeA:2\n"
    assert log.read_text().splitlines() == ["srun -N 1", "srun -w nodeA", "requeue 77"]
    doc = json.loads((run / "supervisor.json").read_text())
    assert doc["state"] == "stopped" and len(doc["attempts"]) == 1
