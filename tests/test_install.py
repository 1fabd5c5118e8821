"""A non-editable install (`pip install .`) finds the default dataset, which it carries as
package data; without it, the default run exits 2 with one line saying how to get it.

Building a wheel here would cost tens of seconds, so the installed layout is recreated from what
pyproject.toml declares: the package tree in a site folder with data/ as distcnn/_shipped/.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_ships_the_default_dataset_as_package_data() -> None:
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "distcnn._shipped" in setup["packages"]
    assert setup["package-dir"]["distcnn._shipped"] == "data"
    assert "mnist.h5" in setup["package-data"]["distcnn._shipped"]
    assert (ROOT / "data" / "mnist.h5").is_file()


def installed_copy(site: Path, with_data: bool) -> None:
    """distcnn as `pip install .` lays it out in site-packages (sources, no tests)."""
    shutil.copytree(
        ROOT / "distcnn", site / "distcnn", ignore=shutil.ignore_patterns("__pycache__")
    )
    if with_data:
        (site / "distcnn" / "_shipped").mkdir()
        os.symlink(ROOT / "data" / "mnist.h5", site / "distcnn" / "_shipped" / "mnist.h5")


def train_from_elsewhere(site: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    return subprocess.run(
        [sys.executable, "-m", "distcnn.train", "--dry-run", "--threads", "1"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.parametrize("with_data", [True, False])
def test_installed_package_finds_its_dataset_or_says_how_to_get_it(tmp_path, with_data) -> None:
    site, elsewhere = tmp_path / "site", tmp_path / "elsewhere"
    site.mkdir()
    elsewhere.mkdir()
    installed_copy(site, with_data)
    res = train_from_elsewhere(site, elsewhere)
    if with_data:
        assert res.returncode == 0, res.stderr
        line = next(x for x in res.stdout.splitlines() if x.startswith("data: "))
        assert line.startswith(f"data: {site / 'distcnn' / '_shipped' / 'mnist.h5'} ")
        assert "'train': 60000" in line and "'test': 10000" in line
    else:
        assert res.returncode == 2, res.stderr
        assert res.stderr.strip().splitlines() == [
            "error: the default dataset mnist.h5 is missing from this distcnn installation: "
            "reinstall from a checkout that has data/mnist.h5 (pip install .), or pass "
            "--data FILE.h5"
        ]
    assert os.listdir(elsewhere) == []  # a dry run writes nothing
