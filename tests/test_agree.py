"""Ranks agree before the first step (distcnn.agree), and a setup error on one rank ends the job
within seconds with that rank's own message.

Launched as MPMD jobs (`mpirun -n 1 python -m distcnn.train A : -n 1 python -m distcnn.train B`),
as when one node gets another command line, config file, dataset or install. Before this check,
another --model hung the job until the watchdog (300 s), another --seed trained silently on a
mix of two data orders, and another --lr was caught late by the replica check with a traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_SPEC, make_images, mpirun

from distcnn import agree
from distcnn.data import write_dataset

pytestmark = pytest.mark.mpi
LIMIT = 15.0  # seconds: the bound for ending the job


def args(extra: list[str] | None = None) -> list[str]:
    return [
        "--data", "tiny.h5", "--model", TINY_SPEC, "--batch-size", "11", "--max-steps", "3",
        "--seed", "3", "--checkpoint-dir", "ck", "--no-progress", *(extra or []),
    ]  # fmt: skip


def mpmd(
    sections: list[tuple[list[str], Path, dict[str, str]]], timeout: float = 60
) -> tuple[subprocess.CompletedProcess, float]:
    """One rank per section: (its train flags, its working directory, its extra env)."""
    cmd = [mpirun()]
    for i, (a, wdir, env) in enumerate(sections):
        if i:
            cmd.append(":")
        cmd += ["-n", "1", "-wdir", str(wdir)]
        for k, v in env.items():
            cmd += ["-env", k, v]
        cmd += [sys.executable, "-m", "distcnn.train", *a]
    full = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    t0 = time.monotonic()
    res = subprocess.run(cmd, env=full, capture_output=True, text=True, timeout=timeout)
    return res, time.monotonic() - t0


def lines(text: str) -> list[str]:
    return [x for x in text.splitlines() if x.strip()]


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two working directories standing for two hosts, each with its own tiny.h5: the same
    contents in `a` and `b`; `c` has other contents under the same name."""
    base = tmp_path_factory.mktemp("agree")
    dirs = []
    for name, seed in (("a", 1), ("b", 1), ("c", 5)):
        d = base / name
        d.mkdir()
        write_dataset(
            d / "tiny.h5",
            {"train": make_images(100, 3, 8, seed), "test": make_images(30, 3, 8, 2)},
            num_classes=3,
            attrs={"source": "synthetic (tests)"},
        )
        dirs.append(d)
    return tuple(dirs)  # type: ignore[return-value]


def test_same_everything_trains_and_prints_the_rank_table(hosts: tuple[Path, ...]) -> None:
    a, b, _ = hosts
    res, _ = mpmd([(args(), a, {}), (args(), b, {})])
    assert res.returncode == 0, res.stderr
    table = [x for x in res.stdout.splitlines() if x.startswith("rank ")]
    assert res.stdout.splitlines()[0] == "ranks:"
    assert [x.split()[:2] for x in table] == [["rank", "0:"], ["rank", "1:"]]
    assert all(" local_rank " in x and " pid " in x for x in table)
    assert (a / "ck").is_dir() and not (b / "ck").exists()  # rank 0 alone writes


SPEC2 = "conv:4:3,relu,flatten,dense"


@pytest.mark.parametrize(
    ("flag", "message"),
    [
        (["--model", SPEC2], f"on --model: {SPEC2!r} on rank 1, {TINY_SPEC!r} on rank 0"),
        (["--seed", "4"], "on --seed: 4 on rank 1, 3 on rank 0"),
        (["--lr", "0.2"], "on --lr: 0.2 on rank 1, 0.05 on rank 0"),
        (["--batch-size", "12"], "on --batch-size: 12 on rank 1, 11 on rank 0"),
        (["--max-steps", "4"], "on --max-steps: 4 on rank 1, 3 on rank 0"),
    ],
    ids=["model", "seed", "lr", "batch-size", "max-steps"],
)
def test_a_rank_with_another_flag_is_refused_with_one_line(
    hosts: tuple[Path, ...], flag: list[str], message: str
) -> None:
    a, b, _ = hosts
    refused = ["--checkpoint-dir", "ck-refused"]
    res, took = mpmd([(args(refused), a, {}), (args([*flag, *refused]), b, {})])
    assert res.returncode == 2, res.stderr
    assert took < LIMIT, took
    (line,) = lines(res.stderr)  # one line, no traceback, nothing from rank 1
    assert line.startswith("error: rank 1 disagrees with rank 0 ") and message in line, line
    assert line.endswith(agree.FIX)
    assert not (a / "ck-refused").exists()  # refused before any work


def test_another_dataset_under_the_same_path_is_refused(hosts: tuple[Path, ...]) -> None:
    a, _, c = hosts
    res, took = mpmd([(args(), a, {}), (args(), c, {})])
    assert res.returncode == 2
    (line,) = lines(res.stderr)
    assert line.startswith("error: rank 1 disagrees with rank 0 on the dataset: train 100x1x8x8")
    hashes = [w.rstrip(",") for w in line.split() if len(w.rstrip(",")) == 16]
    assert len(set(hashes)) == 2, line  # both fingerprints shown, and they differ
    assert took < LIMIT


def test_a_flag_refused_on_one_rank_only(hosts: tuple[Path, ...]) -> None:
    """Before distcnn.agree.early_settle, rank 1 exited 2 alone and rank 0 waited forever."""
    a, b, _ = hosts
    res, took = mpmd([(args(), a, {}), (args(["--lr", "0.1x"]), b, {})])
    assert res.returncode == 2
    (line,) = lines(res.stderr)
    assert line == (
        "error: [rank 1] argument --lr: invalid float value: '0.1x' "
        "(see python -m distcnn.train --help)"
    )
    assert took < LIMIT


# -- an error during setup on one rank only ------------------------------------------------


def test_dataset_missing_on_one_host(hosts: tuple[Path, ...], tmp_path: Path) -> None:
    a = hosts[0]
    res, took = mpmd([(args(), a, {}), (args(), tmp_path, {})])  # no tiny.h5 on "host" 1
    assert res.returncode == 2
    (line,) = lines(res.stderr)
    assert line.startswith("error: [rank 1] --data tiny.h5: no such file"), line
    assert took < LIMIT


def test_truncated_dataset_on_one_host(hosts: tuple[Path, ...], tmp_path: Path) -> None:
    a = hosts[0]
    (tmp_path / "tiny.h5").write_bytes((a / "tiny.h5").read_bytes()[:3000])
    res, took = mpmd([(args(), a, {}), (args(), tmp_path, {})])
    assert res.returncode == 2
    line = lines(res.stderr)[-1]
    assert line.startswith("error: [rank 1] ") and "tiny.h5" in line and "truncated" in line, line
    assert took < LIMIT


def test_import_error_on_one_host(hosts: tuple[Path, ...], tmp_path: Path) -> None:
    """A broken install on one node: its h5py does not import. Its own traceback is shown
    (prefixed with its rank) and the job ends, not 300 s later."""
    broken = tmp_path / "site"
    (broken / "h5py").mkdir(parents=True)
    (broken / "h5py" / "__init__.py").write_text(
        "raise ImportError('libhdf5.so.310: cannot open shared object file (simulated)')\n"
    )
    a, b, _ = hosts
    env = {"PYTHONPATH": f"{broken}{os.pathsep}{ROOT}"}
    res, took = mpmd([(args(), a, {}), (args(), b, env)])
    assert res.returncode != 0
    assert "[rank 1] ImportError: libhdf5.so.310: cannot open shared object file" in res.stderr
    assert took < LIMIT, took


def test_a_rank_stalled_in_setup_is_named_by_the_watchdog(hosts: tuple[Path, ...]) -> None:
    a, b, _ = hosts
    flags = args(["--collective-timeout", "3"])
    res, took = mpmd([(flags, a, {}), (flags, b, {"DISTCNN_FAULT": "1:setup:hang"})])
    assert res.returncode != 0
    assert "[rank 0] error: collective #" in res.stderr
    assert "longer than --collective-timeout 3; ranks that did not arrive: 1." in res.stderr
    assert took < 3 + LIMIT, took


# -- the verdict itself, on made-up facts --------------------------------------------------


def _facts(**over: object) -> dict:
    base = {
        "error": None,
        "host": "h",
        "pid": 1,
        "local_rank": 0,
        "settings": {"seed": 3, "lr": 0.05},
        "model": "dense",
        "parameters": 10,
        "dataset": {"splits": {}, "num_classes": 3, "hash": "0" * 16},
        "versions": {"distcnn": "1", "numpy": "2.1.0", "MPI library": "MPICH Version: 5.0.2"},
    }
    base.update(over)
    return base


def test_first_difference_names_rank_key_and_both_values() -> None:
    ok = _facts()
    assert agree.first_difference([ok, _facts(), _facts()]) is None
    other = _facts(versions={**ok["versions"], "numpy": "1.26.4"})
    msg = agree.first_difference([ok, _facts(), other])
    assert msg.startswith("rank 2 disagrees with rank 0 on numpy version: 1.26.4 on rank 2, ")
    assert "2.1.0 on rank 0" in msg
    mpi = _facts(versions={**ok["versions"], "MPI library": "Open MPI v5.0.5"})
    assert "on MPI library version: Open MPI v5.0.5 on rank 1" in agree.first_difference([ok, mpi])
    assert "on parameters: 11 on rank 1, 10 on rank 0" in agree.first_difference(
        [ok, _facts(parameters=11)]
    )
    # an error on a rank comes first, prefixed with that rank
    bad = _facts(error="--data x.h5: no such file")
    assert agree.first_difference([ok, other, bad]) == "[rank 2] --data x.h5: no such file"
    assert agree.first_difference([bad, bad]) == "--data x.h5: no such file"


def test_rank_table_lines_have_the_contract_form() -> None:
    every = [_facts(host="n1", pid=11, local_rank=0), _facts(host="n2", pid=22, local_rank=0)]
    assert agree.table_lines(every) == [
        "ranks:",
        "rank 0: host n1 pid 11 local_rank 0",
        "rank 1: host n2 pid 22 local_rank 0",
    ]
