"""Training with batch norm, dropout and Adam end to end: exact resume (bitwise against an
uninterrupted run), the same bits on 1, 2 and 4 ranks with --deterministic, and the checkpoint
holding the optimizer state and the running statistics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, mpirun

from distcnn import checkpoint as ckpt

SPEC = "conv:4:3,bn,relu,maxpool:2,dropout:0.25,conv:6:3,bn,relu,gap,dense:8,bn,relu,dense"
BASE = ["--model", SPEC, "--batch-size", "16", "--seed", "5", "--lr", "0.01", "--no-progress",
        "--optimizer", "adam", "--weight-decay", "0.01", "--warmup-epochs", "0"]  # fmt: skip


def train(args: list[str], ranks: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = [mpirun(), "-n", str(ranks)] if ranks > 1 else []
    r = subprocess.run(
        [*launcher, sys.executable, "-m", "distcnn.train", *args],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def state(path: Path) -> dict[str, np.ndarray]:
    ck = ckpt.load(path)
    out = {f"p/{k}": v for k, v in ck.params.items()}
    out.update({f"b/{k}": v for k, v in ck.buffers.items()})
    for group, arrays in ck.optimizer_state.items():
        out.update({f"{group}/{k}": v for k, v in arrays.items()})
    out["steps"] = np.array(ck.extra["optimizer_steps"])
    return out


def assert_bitwise(a: Path, b: Path) -> None:
    x, y = state(a), state(b)
    assert list(x) == list(y)
    for k in x:
        assert np.array_equal(x[k], y[k]), k


def test_resume_is_exact_with_bn_dropout_adam(tiny_data: Path, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [*BASE, "--data", str(tiny_data), "--epochs", "2"]
    train([*args, "--checkpoint-dir", str(whole)])
    train([*args, "--checkpoint-dir", str(cut), "--max-steps", "5"])  # mid-epoch (7 per epoch)
    train([*args, "--checkpoint-dir", str(cut), "--resume", "auto"])
    assert_bitwise(whole / "ckpt-00000014.h5", cut / "ckpt-00000014.h5")
    s = state(whole / "ckpt-00000014.h5")
    assert int(s["b/bn1.num_batches_tracked"]) == 14 and int(s["steps"]) == 14
    assert set(ckpt.load(whole / "ckpt-00000014.h5").optimizer_state) == {"exp_avg", "exp_avg_sq"}
    assert not np.allclose(s["b/bn2.running_var"], 1.0)  # the statistics were tracked


@pytest.mark.mpi
def test_deterministic_bn_dropout_adam_bitwise_on_1_2_4_ranks(
    tiny_data: Path, tmp_path: Path
) -> None:
    args = [*BASE, "--data", str(tiny_data), "--max-steps", "4", "--deterministic"]
    for ranks in (1, 2, 4):
        train([*args, "--checkpoint-dir", str(tmp_path / str(ranks))], ranks)
    for ranks in (2, 4):
        assert_bitwise(
            tmp_path / "1" / "ckpt-00000004.h5", tmp_path / str(ranks) / "ckpt-00000004.h5"
        )
