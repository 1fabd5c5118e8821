"""Randomly corrupted files (issue #15): never a traceback, never a hang, never silently wrong.

A few hundred seeded cases corrupt a copy of a good dataset, checkpoint, .npz, IDX, CSV or PNG
file (bit flips, truncation, overwritten runs, appended junk, spliced blocks) and call every
reader of that kind in one worker process (tests/fuzz_worker.py). This side bounds each case's
time (a case that takes longer than CASE_SECONDS is a hang: the worker is killed and the case
named) and checks each outcome: a one-line UsageError naming the file, or a read whose result
equals the good file's. A handful of corrupted files also go through the command line.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

SEED = 20261204
CASES = 300
CASE_SECONDS = 40.0  # generous: a loaded machine; the HDF5 probe gives up after 10 s


def _run_worker(tmp_path: Path) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fuzz_worker.py"), str(tmp_path), str(SEED),
         str(CASES)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    results, current = [], None
    buf = ""
    deadline = time.monotonic() + 120  # building the good files and the first case
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                pytest.fail(f"fuzz case {current} did not finish in {CASE_SECONDS} s: a hang")
            ready, _, _ = select.select([proc.stdout], [], [], left)
            if not ready:
                continue
            line = proc.stdout.readline()
            if not line:
                err = proc.stderr.read()
                pytest.fail(f"the fuzz worker died at case {current}: {err[-3000:]}")
            buf = line
            rec = json.loads(buf)
            if rec.get("done"):
                break
            if rec.get("start"):
                current = rec["i"]
                deadline = time.monotonic() + CASE_SECONDS
            else:
                results.append(rec)
    finally:
        proc.kill()
        proc.wait()
    return results


def test_corrupted_files_are_refused_cleanly(tmp_path):
    results = _run_worker(tmp_path)
    assert len(results) == CASES
    crashes = [r for r in results if r["outcome"] == "crash"]
    assert not crashes, json.dumps(crashes[:3], indent=1)
    wrong = [r for r in results if r["outcome"] == "different"]
    assert not wrong, json.dumps(wrong[:3], indent=1)  # accepted, but read other content
    counts = Counter(r["outcome"] for r in results)
    kinds = {r["kind"] for r in results if r["outcome"] == "refused"}
    assert counts["refused"] > CASES // 2  # most corruptions are detected, of every kind
    assert kinds == {"dataset", "checkpoint", "npz", "idx", "csv", "png"}


def _corrupt(src: Path, dst: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    raw = bytearray(src.read_bytes())
    for at in rng.integers(len(raw) // 8, len(raw), 40):
        raw[int(at)] ^= 0xFF
    dst.write_bytes(bytes(raw))
    return dst


@pytest.mark.slow
def test_corrupted_files_through_the_command_line(tmp_path, tiny_data):
    """Whole commands on corrupted files: exit 2 (data info: 1 or 2), one line, no traceback."""
    sys.path.insert(0, str(ROOT / "tests"))
    from fuzz_worker import build

    good = build(tmp_path)
    bad = {k: _corrupt(p, tmp_path / f"bad-{p.name}", 7) for k, p in good.items()}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    runs = [
        (["distcnn.data", "info", str(bad["dataset"])], (2,)),
        (["distcnn.data", "info", str(bad["checkpoint"])], (1, 2)),
        (["distcnn.evaluate", str(bad["checkpoint"]), "--data", str(good["dataset"])], (2,)),
        (["distcnn.evaluate", str(good["checkpoint"]), "--data", str(bad["dataset"])], (2,)),
        (["distcnn.predict", str(good["checkpoint"]), str(bad["png"])], (2,)),
        (["distcnn.data", "build", "-o", str(tmp_path / "o.h5"), "--train", str(bad["csv"])],
         (2,)),
    ]  # fmt: skip
    for args, codes in runs:
        r = subprocess.run(
            [sys.executable, "-m", *args], env=env, capture_output=True, text=True, timeout=60
        )
        assert r.returncode in codes, (args, r.stderr)
        assert "Traceback" not in r.stderr, r.stderr
        if r.returncode == 2:
            line = r.stderr.strip().splitlines()[-1]
            assert line.startswith("error: ") and "bad-" in line, line
    assert not (tmp_path / "o.h5").exists()
