"""`python -m distcnn.doctor`: the preflight table and verdict on 1 and 2 ranks, a failing case
(a rank that disagrees, a checkpoint dir that cannot be written), and the scaling model's
arithmetic against hand-computed values. Across simulated hosts: tests/test_multihost.py."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY_SPEC, run_train

from distcnn import scaling


def flags(data: Path, extra: list[str] | None = None) -> list[str]:
    return ["--data", str(data), "--model", TINY_SPEC, "--checkpoint-dir", "ck", *(extra or [])]


def test_one_process(tiny_data: Path, tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "distcnn.doctor", *flags(tiny_data)]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    out = res.stdout.splitlines()
    assert out[0] == "distcnn doctor: 1 rank(s)"
    row = out[2].split()
    assert row[0] == "0" and row[2] == str(row[2]) and row[3] == "0"  # rank, host, pid, local
    assert "readable, fingerprint " in out[2]
    assert "gradient allreduce: none (1 rank)" in res.stdout
    assert "checkpoint dir (rank 0, " in res.stdout and "will be created in" in res.stdout
    assert not (tmp_path / "ck").exists()  # the doctor creates nothing
    # one process: no network to measure, the presets still predict
    assert "measured here" not in res.stdout and "10 Gb Ethernet: alpha 30.0 us" in res.stdout
    assert out[-1] == "verdict: OK - 1 rank(s) agree and can train"


@pytest.mark.mpi
def test_two_ranks_measure_and_predict(tiny_data: Path, tmp_path: Path) -> None:
    res = run_train(flags(tiny_data), ranks=2, cwd=tmp_path, module="distcnn.doctor")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    rows = [line for line in out.splitlines() if line[:2] in ("0 ", "1 ")]
    assert [r.split()[3] for r in rows] == ["0", "1"]  # local ranks on this one host
    assert "nodes: " in out and "1 node(s) x 2 rank(s)" in out
    assert "allreduce of 8 bytes: " in out and "allreduce of the gradient (713 parameters" in out
    assert "measured here (2 ranks): alpha " in out
    rec = json.loads(next(x for x in out.splitlines() if x.startswith('{"kind": "scaling"')))
    assert rec["ranks"] == 2 and rec["grad_bytes"] == 4 * (713 + 3)
    assert rec["alpha"] >= 0 and rec["beta"] >= 0
    assert set(rec["compute_seconds"]) == {"16", "64", "256"}
    assert out.splitlines()[-1] == "verdict: OK - 2 rank(s) agree and can train"


@pytest.mark.mpi
def test_a_disagreeing_rank_and_a_bad_checkpoint_dir_fail_the_verdict(
    tiny_data: Path, tmp_path: Path
) -> None:
    from conftest import mpirun

    (tmp_path / "file").write_text("not a directory")
    base = flags(tiny_data, ["--checkpoint-dir", "file/ck", "--no-scaling"])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    py = [sys.executable, "-m", "distcnn.doctor"]
    cmd = [mpirun(), "-n", "1", *py, *base, ":", "-n", "1", *py, *base, "--seed", "9"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    out = res.stdout.splitlines()
    assert "problem: rank 1 disagrees with rank 0 on --seed: 9 on rank 1, 0 on rank 0; " in (
        res.stdout
    )
    assert "problem: --checkpoint-dir file/ck is unusable" in res.stdout
    assert out[-1] == "verdict: NOT READY - 2 problem(s) above; fix them and rerun"


def test_bad_flag_exits_2(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "distcnn.doctor", "--lr", "fast"]
    res = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        "error: argument --lr: invalid float value: 'fast' (see python -m distcnn.doctor --help)"
    ] or res.stderr.strip().startswith("error: argument --lr: invalid float value: 'fast'")


# -- the cost model ------------------------------------------------------------------------


def test_allreduce_model_by_hand() -> None:
    net = scaling.Network("x", alpha=1e-5, beta=1e-9)
    # 8 ranks: 2 * log2(8) = 6 latencies, 2 * 7/8 of the bytes
    assert scaling.allreduce_seconds(net, 8, 1e6) == pytest.approx(6e-5 + 1.75e-3)
    assert scaling.allreduce_seconds(net, 5, 1e6) == pytest.approx(6e-5 + 1.6e-3)  # ceil(log2 5)
    assert scaling.allreduce_seconds(net, 1, 1e6) == 0.0
    (p,) = scaling.predict(net, {64: 0.01}, 10**6, [8])
    assert p.step_seconds == pytest.approx(0.01 + 6e-5 + 1.75e-3)
    assert p.efficiency == pytest.approx(0.01 / p.step_seconds)
    assert p.images_per_sec == pytest.approx(8 * 64 / p.step_seconds)


def test_fit_recovers_alpha_and_beta() -> None:
    net = scaling.Network("x", alpha=3e-5, beta=2e-9)
    sizes = [8, 1024, 65536, 1 << 20, 1 << 22]
    for k in (2, 4, 6):
        times = [scaling.allreduce_seconds(net, k, s) for s in sizes]
        fit = scaling.fit_alpha_beta(sizes, times, k)
        assert math.isclose(fit.alpha, 3e-5, rel_tol=1e-6)
        assert math.isclose(fit.beta, 2e-9, rel_tol=1e-6)
    with pytest.raises(ValueError):
        scaling.fit_alpha_beta(sizes, times, 1)


def test_table_shows_every_rank_count_and_batch() -> None:
    text = scaling.table(scaling.PRESETS[:1], {16: 0.001, 64: 0.004}, 4000, ranks=(8, 256))
    lines = text.splitlines()
    assert lines[0].startswith("10 Gb Ethernet: alpha 30.0 us")
    assert lines[1].split() == ["batch/rank", "8", "256"]
    assert lines[2].split()[0] == "16" and lines[3].split()[0] == "64"
    assert all("%" in x for x in lines[2:])
