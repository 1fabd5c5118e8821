"""Shared fixtures: tiny synthetic datasets and a launcher for multi-rank runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distcnn.data import write_dataset

ROOT = Path(__file__).resolve().parent.parent
TINY_SPEC = "conv:4:3,relu,maxpool:2,conv:6:3,relu,avgpool:2,flatten,dense:16,relu,dense"


def make_images(n: int, classes: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, 1, size, size) whose class is a bright quadrant/stripe: learnable fast."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 60, (n, 1, size, size)).astype(np.uint8)
    for c in range(classes):
        rows = slice((c * size) // classes, ((c + 1) * size) // classes)
        images[labels == c, 0, rows, :] += 150
    return images, labels.astype(np.int64)


@pytest.fixture
def tiny_data(tmp_path: Path) -> Path:
    """An HDF5 dataset: 3 classes of 8x8 images, 100 train (B does not divide it), 60 test."""
    path = tmp_path / "tiny.h5"
    write_dataset(
        path,
        {"train": make_images(100, 3, 8, 1), "test": make_images(60, 3, 8, 2)},
        num_classes=3,
        attrs={"source": "synthetic (tests)"},
    )
    return path


def mpirun() -> str:
    """The mpirun beside this Python (the venv's, matching mpi4py's MPI), else the one on PATH."""
    here = Path(sys.executable).parent / "mpirun"
    return str(here) if here.exists() else (shutil.which("mpirun") or "mpirun")


def run_train(
    args: list[str],
    ranks: int = 1,
    env: dict[str, str] | None = None,
    timeout: float = 120,
    cwd: Path | None = None,
    module: str = "distcnn.train",
) -> subprocess.CompletedProcess:
    """Run `python -m distcnn.train ARGS` as `ranks` MPI processes (mpirun even for 1)."""
    full_env = dict(os.environ)
    full_env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    full_env.update(env or {})
    cmd = [mpirun(), "-n", str(ranks), sys.executable, "-m", module, *args]
    return subprocess.run(
        cmd, env=full_env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """Three simulated hosts (tests/netns.py) for the whole session, always deleted at the end;
    skips, saying why, where they cannot be made (not root, no `ip`/`unshare`, no Hydra)."""
    import netns

    why = netns.unavailable()
    if why and os.environ.get("DISTCNN_REQUIRE_MULTIHOST"):  # set by .ci/run: no silent skip
        pytest.fail(f"DISTCNN_REQUIRE_MULTIHOST is set but {why}")
    if why:
        pytest.skip(why)
    netns.remove_stale()
    c = netns.Cluster(3, tmp_path_factory.mktemp("netns"))
    try:
        yield c
    finally:
        c.close()
