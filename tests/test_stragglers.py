"""Stragglers: a rank slowed on purpose (DISTCNN_SLOW) is named with its host, its time and the
median, from the times the ranks share in the step's own collective; the math of the verdict
against hand-made numbers."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
from conftest import TINY_SPEC, run_train

from distcnn.stragglers import StragglerWatch, describe


def test_the_verdict_needs_a_margin_an_absolute_excess_and_two_windows() -> None:
    w = StragglerWatch(rank=0, size=4, every=10, margin=0.5)
    w.hosts = ["a", "b", "c", "d"]
    for _ in range(10):
        w.add(0.004)
    assert w.slot_value(9) == 0.0 and w.slot_value(10) == pytest.approx(0.004)
    slow = np.array([0.010, 0.010, 0.010, 0.030])  # rank 3: 3x the median
    assert w.window(7, slow) == []  # not the end of a window: nothing decided
    assert w.window(10, slow) == []  # one window is not persistent
    (rec,) = w.window(20, slow)
    assert (rec["rank"], rec["host"], rec["windows"], rec["first_step"]) == (3, "d", 2, 1)
    assert rec["seconds"] == 0.030 and rec["median"] == 0.010
    assert describe(rec) == (
        "rank 3 (host d) is slower than the others: 30.0 ms of compute per step against the "
        "median 10.0 ms (+200 %), steps 1 to 20"
    )
    assert w.window(30, np.array([0.010, 0.010, 0.010, 0.014])) == []  # within the margin
    assert w.window(40, slow) == []  # the streak started again
    tiny = np.array([1e-4, 1e-4, 1e-4, 9e-4])  # 9x, but 0.8 ms: noise
    assert w.window(50, tiny) == [] and w.window(60, tiny) == []


@pytest.mark.mpi
@pytest.mark.parametrize("det", [False, True], ids=["allreduce", "deterministic"])
def test_a_slowed_rank_is_named(det, tiny_data, tmp_path) -> None:
    d = tmp_path / "run"
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--batch-size", "16", "--no-progress"]
    args += ["--max-steps", "24", "--straggler-every", "6", "--checkpoint-dir", str(d)]
    r = run_train(args + (["--deterministic"] if det else []), ranks=2,
                  env={"DISTCNN_SLOW": "1:0.03"})  # fmt: skip
    assert r.returncode == 0, r.stderr
    warnings = [x for x in r.stderr.splitlines() if "slower than the others" in x]
    assert len(warnings) == 1, r.stderr  # once per episode
    host = socket.gethostname()
    assert warnings[0].startswith(f"warning: rank 1 (host {host}) is slower than the others: ")
    assert warnings[0].endswith("steps 1 to 12")
    recs = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    found = [x for x in recs if x["kind"] == "straggler"]
    assert [x["step"] for x in found] == [12, 18, 24] and {x["rank"] for x in found} == {1}
    for x in found:
        assert x["host"] == host and x["seconds"] > 0.03 > x["median"] > 0
