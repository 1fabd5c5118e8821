"""Data-parallel training under mpirun: N ranks reach what 1 rank reaches, --deterministic is
bitwise, replicas stay identical (and a divergent one is caught), a failure on any rank ends the
whole job within seconds naming that rank, only rank 0 writes files, and bad usage exits 2 once.

The shared dataset has 100 train samples and the runs use a global batch of 11 for 25 steps:
- 11 is prime, so 2, 3 and 4 ranks all split a full batch unevenly (5/6, 3/4/4, 2/3/3/3 samples);
- 100 = 9 * 11 + 1, so every epoch ends with a ragged batch of ONE sample (steps 10 and 20): that
  batch leaves every rank but the last with an empty shard, which must still join the collective
  with a zero gradient, and the gradient must be the mean over 1 sample, not over 11;
- 25 steps cross two epoch boundaries (a new global order each epoch).
Each mpirun launch costs ~1 s (4 ranks on 2 cores), so each configuration is launched once per
module and shared by the tests that read it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import ROOT, TINY_SPEC, make_images, mpirun, run_train

from distcnn import checkpoint as ckpt
from distcnn.data import write_dataset
from distcnn.sampler import shard_bounds

BATCH, SAMPLES, STEPS = 11, 100, 25
FAULT_LIMIT = 15.0  # seconds: a failing rank must end the job within this (the bound)


def train_args(data: Path, extra: list[str] | None = None) -> list[str]:
    """Relative --checkpoint-dir and --log, so each run writes into its own cwd."""
    return [
        "--data", str(data), "--model", TINY_SPEC, "--batch-size", str(BATCH),
        "--max-steps", str(STEPS), "--seed", "3", "--checkpoint-dir", "ck",
        "--checkpoint-every", "10", "--keep", "2", "--log", "log.jsonl", "--log-every", "5",
        "--no-progress", *(extra or []),
    ]  # fmt: skip


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("mpidata") / "tiny.h5"
    write_dataset(
        path,
        {"train": make_images(SAMPLES, 3, 8, 1), "test": make_images(60, 3, 8, 2)},
        num_classes=3,
        attrs={"source": "synthetic (tests)"},
    )
    return path


# How the gradient is summed (distcnn.comm): "shm" through shared memory on one node, "nodes2"
# as if every 2 ranks were a node (shared memory within, MPI across: the hierarchical path),
# "mpi" with plain MPI_Iallreduce.
ALLREDUCE_ENV = {
    "shm": {"DISTCNN_ALLREDUCE": "shm"},
    "nodes2": {"DISTCNN_NODE_SIZE": "2", "DISTCNN_ALLREDUCE": "shm"},
    "mpi": {"DISTCNN_ALLREDUCE": "mpi"},
}


class Runs:
    """Each (ranks, mode, allreduce) launched at most once per module, in a fresh empty
    working directory."""

    def __init__(self, data: Path, base: Path) -> None:
        self.data, self.base, self.done = data, base, {}

    def get(self, ranks: int, deterministic: bool = False, allreduce: str = "shm") -> Path:
        key = (ranks, deterministic, allreduce)
        if key not in self.done:
            cwd = self.base / f"n{ranks}{'-det' if deterministic else ''}-{allreduce}"
            cwd.mkdir()
            extra = ["--deterministic"] if deterministic else []
            res = run_train(
                train_args(self.data, extra),
                ranks=ranks,
                cwd=cwd,
                timeout=90,
                env=ALLREDUCE_ENV[allreduce],
            )
            assert res.returncode == 0, res.stderr
            (cwd.parent / f"{cwd.name}.stdout").write_text(res.stdout)
            self.done[key] = cwd
        return self.done[key]


@pytest.fixture(scope="module")
def runs(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(dataset, tmp_path_factory.mktemp("mpiruns"))


def final(cwd: Path) -> ckpt.Checkpoint:
    return ckpt.load(cwd / "ck" / ckpt.file_name(STEPS))


def records(cwd: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (cwd / "log.jsonl").read_text().splitlines()]


# -- N ranks against 1 ---------------------------------------------------------------------


def test_batches_exercise_uneven_and_empty_shards() -> None:
    """The premise of the comparisons below, so a change of BATCH cannot quietly weaken them."""
    last = SAMPLES % BATCH
    assert last == 1
    for n in (2, 3, 4):
        assert BATCH % n != 0
        assert shard_bounds(last, n, 0) == (0, 0)  # rank 0 has nothing in the ragged batch


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("ranks", "allreduce"), [(2, "shm"), (3, "shm"), (4, "shm"), (4, "nodes2"), (2, "mpi")]
)
def test_n_ranks_match_one_rank(runs: Runs, ranks: int, allreduce: str) -> None:
    one, many = final(runs.get(1)), final(runs.get(ranks, allreduce=allreduce))
    banner = {
        "shm": f"gradient allreduce: shared memory ({ranks} ranks per node, DISTCNN_ALLREDUCE=shm)",
        "nodes2": "gradient allreduce: shared memory (2 ranks per node, MPI across 2 nodes, "
        "DISTCNN_ALLREDUCE=shm)",
        "mpi": "gradient allreduce: MPI_Iallreduce (DISTCNN_ALLREDUCE=mpi)",
    }[allreduce]
    cwd = runs.get(ranks, allreduce=allreduce)
    assert banner in (cwd.parent / f"{cwd.name}.stdout").read_text()
    assert many.world_size == ranks and one.world_size == 1
    assert many.step == one.step == STEPS and many.epoch == one.epoch == 2
    for name in one.params:
        np.testing.assert_allclose(many.params[name], one.params[name], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(many.velocity[name], one.velocity[name], rtol=1e-4, atol=1e-5)
    # the loss and accuracy are reduced over all ranks, not rank 0's shard
    for a, b in zip(
        records(runs.get(1)), records(runs.get(ranks, allreduce=allreduce)), strict=True
    ):
        assert (a["kind"], a["step"]) == (b["kind"], b["step"])
        if a["kind"] == "step":
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
            assert b["accuracy"] == pytest.approx(a["accuracy"], abs=1e-9)


@pytest.mark.mpi
def test_deterministic_is_bitwise_identical_on_1_2_4_ranks(runs: Runs) -> None:
    one = final(runs.get(1, deterministic=True))
    for ranks in (2, 4):
        many = final(runs.get(ranks, deterministic=True))
        for name in one.params:
            assert np.array_equal(many.params[name], one.params[name]), (ranks, name)
            assert np.array_equal(many.velocity[name], one.velocity[name]), (ranks, name)


@pytest.mark.mpi
def test_only_rank0_writes_files(runs: Runs) -> None:
    """Every rank runs with the same relative paths in the same cwd: one writer means exactly
    the expected files, and each log record exactly once (4 writers would write it 4 times)."""
    cwd = runs.get(4)
    assert sorted(p.name for p in cwd.iterdir()) == ["ck", "log.jsonl"]
    assert sorted(p.name for p in (cwd / "ck").iterdir()) == [
        ckpt.file_name(20),
        ckpt.file_name(STEPS),
        "run.json",
        "status.json",
    ]
    keys = [(r["kind"], r["step"]) for r in records(cwd)]
    assert len(keys) == len(set(keys))
    assert [s for k, s in keys if k == "step"] == [5, 10, 15, 20, 25]
    stdout = (cwd.parent / f"{cwd.name}.stdout").read_text()
    assert stdout.count("distcnn: 4 rank(s)") == 1
    assert stdout.count("threads per rank:") == 1


@pytest.mark.mpi
def test_deterministic_mode_agrees_on_a_bad_gradient(dataset: Path, tmp_path: Path) -> None:
    """A NaN from one rank (and, by the same path, a stop flag from one SIGTERM'd rank) must reach
    every rank through the step's allgather, so all ranks take the same branch. (It once was set
    after the collective: rank 1 alone stopped and its replica check met its peers' next step.)
    What the job then does with a non-finite gradient is the numerical guard's business."""
    args = train_args(dataset, ["--deterministic", "--collective-timeout", "10"])
    res = run_train(args, ranks=2, env={"DISTCNN_FAULT": "1:3:nan"}, cwd=tmp_path, timeout=60)
    assert "differ from rank 0's" not in res.stderr
    assert "did not arrive" not in res.stderr
    assert "Traceback" not in res.stderr


# -- replicas --------------------------------------------------------------------------------

DIVERGE = """
import sys
import numpy as np
from distcnn import config
from distcnn.comm import Comm
from distcnn.trainer import Trainer

data, spec, ckdir = sys.argv[1:4]
comm = Comm.world(timeout=30)
cfg, _ = config.resolve({"data": data, "model": spec, "batch_size": 9, "max_steps": 6,
                         "checkpoint_every": 2, "checkpoint_dir": ckdir, "no_progress": True})
trainer = Trainer(cfg, comm, [], None, None)
trainer.start()
assert comm.check_replicas(trainer.model.params) == [], "replicas differ after the broadcast"
if comm.rank == 2:  # one ulp of drift on one rank after each update
    update = trainer.opt.step
    def drifting(grads, lr, scale=1.0):
        update(grads, lr, scale)
        p = trainer.model.params
        p[0] = np.nextafter(p[0], np.float32(np.inf))
    trainer.opt.step = drifting
try:
    trainer.run()
    outcome = "not caught"
except RuntimeError as e:
    outcome = str(e)
with open(f"{ckdir}.rank{comm.rank}", "w") as f:  # ranks' stdout lines may interleave
    f.write(outcome)
"""


@pytest.mark.mpi
def test_replica_check_catches_a_one_ulp_divergence(dataset: Path, tmp_path: Path) -> None:
    """Training itself ends with the replica check (every run above passed it); here one rank
    drifts by one ulp and the check at the first checkpoint names it, on every rank, before
    anything is saved."""
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGE)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [mpirun(), "-n", "3", sys.executable, str(script), str(dataset), TINY_SPEC]
    res = subprocess.run(
        [*cmd, str(tmp_path / "ck")], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 0, res.stderr
    msg = "replica check at step 2: parameters on rank(s) 2 differ from rank 0's"
    caught = [(tmp_path / f"ck.rank{r}").read_text() for r in range(3)]
    assert caught == [msg] * 3
    assert not list((tmp_path / "ck").glob("*.h5"))


REDUCE = """
import os, sys, time
import numpy as np
from mpi4py import MPI
from distcnn.comm import Comm

expect_path, node_size = sys.argv[1], int(sys.argv[2])
world = MPI.COMM_WORLD
rank, size = world.Get_rank(), world.Get_size()

def expected(vals):
    # the documented order: slices summed in local-rank order on each node, then the node
    # sums added in node order (a two-member MPI sum is exact either way round)
    nodes = [vals[i : i + node_size] for i in range(0, size, node_size)]
    sums = []
    for group in nodes:
        acc = group[0].copy()
        for v in group[1:]:
            acc += v
        sums.append(acc)
    total = sums[0].copy()
    for s in sums[1:]:
        total += s
    return total

rng = np.random.default_rng(99)
for n in (1, 5, 17, 40, 1000, 206_925):
    for dtype in (np.float32, np.float64):
        comm = Comm(world, timeout=30)
        buf = comm.reduce_buffer(n, dtype)
        path = "shm" if comm._reducer is not None else "mpi"
        if expect_path == "auto":  # chosen by measurement: either, and it says which and why
            assert comm.allreduce_path.startswith(
                "shared memory (" if path == "shm" else "MPI_Iallreduce ("
            ), comm.allreduce_path
            assert "measured" in comm.allreduce_path, comm.allreduce_path
        else:
            assert path == expect_path, (path, expect_path)
        assert buf.shape == (n,) and buf.dtype == dtype and not buf.any()
        for it in range(4):
            vals = [rng.standard_normal(n).astype(dtype) for _ in range(size)]
            # uneven arrival: a rank that rushes ahead into the next round must not overwrite
            # anything another rank is still reading
            time.sleep(float(rng.random()) * 0.002 * ((rank + it) % size))
            buf[...] = vals[rank]
            want = expected(vals)
            if it % 2:  # in place
                comm.allreduce_sum(buf, "test allreduce")
                got = buf
            else:  # the shared path hands out its read-only sum and leaves buf alone
                got = comm.allreduce_sum_view(buf, "test allreduce")
                if path == "shm":
                    assert got is not buf and not got.flags.writeable
                    assert np.array_equal(buf, vals[rank])
            if path == "shm":
                assert np.array_equal(got, want), (n, dtype, it, np.abs(got - want).max())
            else:
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        other = np.full(3, rank + 1.0)  # any other buffer still goes through MPI
        comm.allreduce_sum(other)
        assert np.array_equal(other, np.full(3, size * (size + 1) / 2))
        comm.close()
print(f"ok {expect_path}", flush=True)
"""


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("ranks", "env", "path", "node_size"),
    [
        (2, {"DISTCNN_ALLREDUCE": "shm"}, "shm", 2),
        (3, {"DISTCNN_ALLREDUCE": "shm"}, "shm", 3),
        (4, {"DISTCNN_NODE_SIZE": "2", "DISTCNN_ALLREDUCE": "shm"}, "shm", 2),  # hierarchical
        (2, {}, "auto", 2),  # the default: whichever path measured faster at start-up
        (3, {"DISTCNN_NODE_SIZE": "2"}, "mpi", 2),  # nodes of 2 and 1 rank: plain MPI
        (2, {"DISTCNN_ALLREDUCE": "mpi"}, "mpi", 2),
    ],
)
def test_shared_memory_allreduce_sums_exactly(
    tmp_path: Path, ranks: int, env: dict[str, str], path: str, node_size: int
) -> None:
    """The shared-memory allreduce against sums done locally in its documented order, bitwise,
    for sizes smaller than the slices, both dtypes, and ranks arriving at different times."""
    script = tmp_path / "reduce.py"
    script.write_text(REDUCE)
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env)
    cmd = [mpirun(), "-n", str(ranks), sys.executable, str(script), path, str(node_size)]
    res = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.count(f"ok {path}") == ranks  # lines of different ranks may interleave


# -- failing ranks end the job ---------------------------------------------------------------


def fault_run(
    data: Path, cwd: Path, fault: str, timeout_s: float, module_args: list[str] | None = None
) -> tuple[subprocess.CompletedProcess, float]:
    args = train_args(data, ["--collective-timeout", str(timeout_s), "--max-steps", "50"])
    module = "distcnn.train"
    if module_args:
        module, args = module_args[0], [*module_args[1:], *args]
    t0 = time.monotonic()
    res = run_train(args, ranks=4, env={"DISTCNN_FAULT": fault}, cwd=cwd, module=module, timeout=60)
    return res, time.monotonic() - t0


@pytest.mark.mpi
@pytest.mark.parametrize(
    ("mode", "launch", "expect"),
    [
        (
            "raise",
            None,
            "[rank 2] RuntimeError: DISTCNN_FAULT: injected failure on rank 2 at step 3",
        ),
        (
            "raise",
            ["mpi4py", "-m", "distcnn.train"],
            "[rank 2] RuntimeError: DISTCNN_FAULT: injected failure on rank 2 at step 3",
        ),
        ("exit", None, "[rank 2] exited with code 3; aborting the job"),
    ],
    ids=["raise", "raise-mpi4py", "exit"],
)
def test_failing_rank_ends_the_job(
    dataset: Path, tmp_path: Path, mode: str, launch: list[str] | None, expect: str
) -> None:
    # a long watchdog timeout, so it is the failing rank's abort that ends the job
    res, took = fault_run(dataset, tmp_path, f"2:3:{mode}", 120, launch)
    assert res.returncode != 0
    assert took < FAULT_LIMIT, f"took {took:.1f} s"
    assert expect in res.stderr
    # the job died before the first step record: the log holds only the run's opening
    # record and the rank table
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert {json.loads(x)["kind"] for x in lines} <= {"run", "ranks"}


@pytest.mark.mpi
def test_hung_rank_is_named_by_the_watchdog(dataset: Path, tmp_path: Path) -> None:
    res, took = fault_run(dataset, tmp_path, "2:3:hang", 5)
    assert res.returncode != 0
    assert 5 < took < 5 + FAULT_LIMIT, f"took {took:.1f} s"
    stall = re.compile(
        r"\[rank [013]\] error: collective #\d+ \(gradient allreduce, step 3\) waited \d+\.\d s, "
        r"longer than --collective-timeout 5; ranks that did not arrive: 2\. Aborting the job\."
    )
    # searched, not matched per line: when several waiting ranks report at once, the launcher
    # may join their lines (Hydra joined two ranks' stdout lines in the replica test once)
    assert stall.search(res.stderr), res.stderr


def rank_pid(marker: str, rank: int) -> int | None:
    """pid of the process whose command line contains marker and whose MPI rank is `rank`."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if marker.encode() not in (proc / "cmdline").read_bytes():
                continue
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PMI_RANK={rank}".encode() in env or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env:
            return int(proc.name)
    return None


@pytest.mark.mpi
def test_kill_9_of_a_rank_ends_the_job(dataset: Path, tmp_path: Path) -> None:
    """Rank 2 hangs at step 3 (so the job could not end by itself; the watchdog is set far
    off); SIGKILL it and the launcher must tear the job down."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DISTCNN_FAULT="2:3:hang")
    args = train_args(dataset, ["--collective-timeout", "120", "--log-every", "1"])
    cmd = [mpirun(), "-n", "4", sys.executable, "-m", "distcnn.train", *args]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + 60
        log = tmp_path / "log.jsonl"
        while not (log.exists() and '"step": 2,' in log.read_text()):
            assert proc.poll() is None and time.monotonic() < deadline, "run did not get going"
            time.sleep(0.05)
        pid = rank_pid(str(dataset), 2)
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = proc.communicate(timeout=FAULT_LIMIT + 30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0, err
    assert took < FAULT_LIMIT, f"took {took:.1f} s"


# -- usage errors and threads ----------------------------------------------------------------


@pytest.mark.mpi
def test_batch_smaller_than_ranks_exits_2_with_one_message(dataset: Path, tmp_path: Path) -> None:
    args = train_args(dataset)
    args[args.index("--batch-size") + 1] = "1"
    res = run_train(args, ranks=2, cwd=tmp_path, timeout=60)
    assert res.returncode == 2
    err = res.stderr.strip().splitlines()
    assert err[-1] == "error: --batch-size 1 is smaller than the 2 ranks; use at least 2"
    assert sum("error" in line for line in err) == 1
    assert "Traceback" not in res.stderr
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]  # (an empty ck/ may be made)


@pytest.mark.mpi
def test_threads_default_to_cores_over_ranks_and_flag_overrides(dataset: Path) -> None:
    no_env = {v: "" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    from distcnn.threads import usable_cores

    usable = usable_cores()
    expect = max(1, usable // 2)
    res = run_train(["--dry-run", "--data", str(dataset)], ranks=2, env=no_env, timeout=60)
    assert res.returncode == 0, res.stderr
    why = f"{usable} usable CPU(s) / 2 ranks on this node"
    assert f"threads per rank: {expect} (from {why})" in res.stdout
    res = run_train(["--dry-run", "--data", str(dataset), "--threads", "3"], ranks=2, env=no_env)
    assert res.returncode == 0, res.stderr
    assert "threads per rank: 3 (from --threads)" in res.stdout


# -- the local launcher ----------------------------------------------------------------------


@pytest.mark.mpi
def test_local_launcher_runs_n_ranks_with_cores_over_n_threads(
    dataset: Path, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    env.update(PYTHON=sys.executable, MPIRUN=mpirun())
    args = ["--data", str(dataset), "--model", TINY_SPEC, "--batch-size", "8", "--max-steps", "3"]
    res = subprocess.run(
        [str(ROOT / "launch" / "local.sh"), "2", *args, "--checkpoint-dir", "ck"],
        env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    threads = max(1, len(os.sched_getaffinity(0)) // 2)
    assert f"threads per rank: {threads} (from OMP_NUM_THREADS)" in res.stdout
    assert "distcnn: 2 rank(s)" in res.stdout
    assert (tmp_path / "ck" / ckpt.file_name(3)).exists()


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (["x"], {}, "local.sh: error: N 'x' is not a positive whole number"),
        (["2"], {"MPIRUN": "/nonexistent/mpirun"}, "local.sh: error: MPIRUN=/nonexistent/mpirun"),
    ],
)
def test_local_launcher_refuses_bad_input(argv: list[str], env: dict, message: str) -> None:
    res = subprocess.run(
        [str(ROOT / "launch" / "local.sh"), *argv],
        env=dict(os.environ, **env), capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert res.returncode == 2
    assert res.stderr.startswith(message)


# -- rank != 0 is silent (in-process, a fake communicator) ---------------------------------


class FakeRank1:
    """Rank 1 of 2, with rank 0's answers to the broadcasts save() makes."""

    rank, size, timeout = 1, 2, None
    allreduce_path = "MPI_Iallreduce"

    def reduce_buffer(self, n: int, dtype: Any) -> np.ndarray:
        return np.zeros(n, dtype=dtype)

    def bcast_object(self, obj: Any, root: int = 0, what: str = "") -> Any:
        return obj  # on rank 1 the outcome travels from rank 0; here: "" (success)

    def gather_objects(self, obj: Any, what: str = "") -> list[Any]:
        return [obj] * self.size  # the data setup's agreements: every rank as this one


def test_console_and_save_are_silent_off_rank_0(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from distcnn import config
    from distcnn.trainer import Console, Trainer

    log = tmp_path / "log.jsonl"
    cfg, _ = config.resolve(
        {"data": str(dataset), "model": TINY_SPEC, "checkpoint_dir": str(tmp_path / "ck")}
        | {"data_mode": "stream"}  # no shared-memory window without a real communicator
    )
    trainer = Trainer(cfg, FakeRank1(), ["a warning"], None, None)
    trainer.save()
    trainer.save(best=True)
    con = Console(FakeRank1(), str(log), None)
    con.print("hello")
    con.warn("careful")
    con.record({"kind": "step", "step": 1})
    assert not (tmp_path / "ck").exists() and not log.exists()
    out = capsys.readouterr()
    assert out.out == out.err == ""
