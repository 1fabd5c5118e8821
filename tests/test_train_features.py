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


def test_accumulation_equals_one_k_times_larger_batch(tiny_data: Path, tmp_path: Path) -> None:
    """--batch-size 8 --accum-steps 4 takes the steps of --batch-size 32 (allclose: the sums
    are grouped differently), including the epoch's short last step (100 = 3 x 32 + 4)."""
    spec = "conv:4:3,relu,maxpool:2,dropout:0.25,flatten,dense:8,relu,dense"  # no bn: exact math
    args = ["--model", spec, "--seed", "5", "--lr", "0.05", "--no-progress", "--data",
            str(tiny_data), "--epochs", "1"]  # fmt: skip
    train(
        [*args, "--batch-size", "8", "--accum-steps", "4", "--checkpoint-dir", str(tmp_path / "a")]
    )
    train([*args, "--batch-size", "32", "--checkpoint-dir", str(tmp_path / "b")])
    a, b = (
        ckpt.load(tmp_path / "a" / "ckpt-00000004.h5"),
        ckpt.load(tmp_path / "b" / "ckpt-00000004.h5"),
    )
    for k in a.params:
        np.testing.assert_allclose(a.params[k], b.params[k], rtol=1e-4, atol=1e-6, err_msg=k)
        np.testing.assert_allclose(a.velocity[k], b.velocity[k], rtol=1e-4, atol=1e-6, err_msg=k)


@pytest.mark.mpi
def test_accumulation_and_dropout_deterministic_bitwise_on_1_2_4_ranks(
    tiny_data: Path, tmp_path: Path
) -> None:
    args = [*BASE, "--data", str(tiny_data), "--epochs", "1", "--deterministic",
            "--batch-size", "8", "--accum-steps", "3"]  # fmt: skip
    for ranks in (1, 2, 4):
        train([*args, "--checkpoint-dir", str(tmp_path / str(ranks))], ranks)
    last = "ckpt-00000005.h5"  # 100 = 4 x 24 + 4: a short last step of one short micro-batch
    for ranks in (2, 4):
        assert_bitwise(tmp_path / "1" / last, tmp_path / str(ranks) / last)


@pytest.mark.mpi
def test_sync_bn_on_2_ranks_matches_one_rank(tiny_data: Path, tmp_path: Path) -> None:
    """With --sync-bn every rank normalises with the global batch's statistics, so 2 ranks
    follow the 1-rank run (allclose); without it each rank uses its shard's (they differ)."""
    args = [*BASE, "--data", str(tiny_data), "--max-steps", "4", "--optimizer", "sgd"]
    train([*args, "--checkpoint-dir", str(tmp_path / "one")])
    train([*args, "--sync-bn", "--checkpoint-dir", str(tmp_path / "sync")], 2)
    train([*args, "--checkpoint-dir", str(tmp_path / "local")], 2)
    one, sync, local = (state(tmp_path / d / "ckpt-00000004.h5") for d in ("one", "sync", "local"))
    for k in one:
        np.testing.assert_allclose(sync[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    assert not all(np.allclose(local[k], one[k], rtol=1e-4, atol=1e-5) for k in one)


@pytest.mark.mpi
def test_16_bit_allreduce_stays_close_to_float32(tiny_data: Path, tmp_path: Path) -> None:
    args = [*BASE, "--data", str(tiny_data), "--max-steps", "4", "--optimizer", "sgd"]
    runs = {}
    for dtype in ("float32", "float16", "bfloat16"):
        d = tmp_path / dtype
        train([*args, "--allreduce-dtype", dtype, "--checkpoint-dir", str(d)], 2)
        runs[dtype] = state(d / "ckpt-00000004.h5")
    for dtype, tol in (("float16", 2e-3), ("bfloat16", 2e-2)):
        for k in runs["float32"]:
            np.testing.assert_allclose(runs[dtype][k], runs["float32"][k], rtol=tol, atol=tol,
                                       err_msg=f"{dtype} {k}")  # fmt: skip
    assert ckpt.load(tmp_path / "float16" / "ckpt-00000004.h5").extra["allreduce_scale"] > 1


@pytest.mark.mpi
def test_resume_is_exact_with_sync_bn_accumulation_and_float16(
    tiny_data: Path, tmp_path: Path
) -> None:
    args = [*BASE, "--data", str(tiny_data), "--epochs", "2", "--sync-bn", "--batch-size", "8",
            "--accum-steps", "2", "--allreduce-dtype", "float16"]  # fmt: skip
    train([*args, "--checkpoint-dir", str(tmp_path / "whole")], 2)
    train([*args, "--checkpoint-dir", str(tmp_path / "cut"), "--max-steps", "9"], 2)
    train([*args, "--checkpoint-dir", str(tmp_path / "cut"), "--resume", "auto"], 2)
    last = "ckpt-00000014.h5"  # 7 steps per epoch (100 = 6 x 16 + 4)
    assert_bitwise(tmp_path / "whole" / last, tmp_path / "cut" / last)


@pytest.mark.mpi
def test_sync_bn_deterministic_bitwise_on_1_2_4_ranks(tiny_data: Path, tmp_path: Path) -> None:
    """The micro-shards run as lanes whose batch norms share the global batch's statistics:
    the same bits on 1, 2 and 4 ranks, and close to the plain 1-rank run (whole-batch stats;
    SGD, since Adam magnifies the rounding noise in the zero gradients of biases before a bn)."""
    args = [*BASE, "--data", str(tiny_data), "--max-steps", "3", "--optimizer", "sgd"]
    for ranks in (1, 2, 4):
        d = tmp_path / str(ranks)
        train([*args, "--sync-bn", "--deterministic", "--checkpoint-dir", str(d)], ranks)
    last = "ckpt-00000003.h5"
    for ranks in (2, 4):
        assert_bitwise(tmp_path / "1" / last, tmp_path / str(ranks) / last)
    train([*args, "--checkpoint-dir", str(tmp_path / "plain")])
    det, plain = state(tmp_path / "1" / last), state(tmp_path / "plain" / last)
    for k in det:
        np.testing.assert_allclose(det[k], plain[k], rtol=1e-4, atol=1e-5, err_msg=k)
