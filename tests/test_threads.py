"""The default BLAS thread count: affinity, cgroup quotas (fake cgroup trees), ranks per node and
busy neighbours. Only the choice logic is tested here; no timing."""

from __future__ import annotations

from pathlib import Path

import pytest

from distcnn import threads


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_takes_the_tightest_along_the_path(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cgroup.controllers", "cpu memory\n")
    write(root / "cpu.max", "max 100000\n")
    write(root / "job" / "cpu.max", "300000 100000\n")  # 3 CPUs for the job
    write(root / "job" / "step" / "cpu.max", "150000 100000\n")  # 1.5 for this step
    write(tmp_path / "self", "0::/job/step\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(1.5)
    write(root / "job" / "step" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(3.0)
    write(root / "job" / "cpu.max", "max 100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") is None


def test_cgroup_v1_quota_and_a_namespaced_path(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "-1\n")
    write(root / "cpu,cpuacct" / "cpu.cfs_period_us", "100000\n")
    # a container sees its own cgroup path, which does not exist under its mount: read the root
    write(tmp_path / "self", "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") is None
    write(root / "cpu,cpuacct" / "cpu.cfs_quota_us", "200000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(2.0)
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(root / "cpu,cpuacct" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert threads.cgroup_cpu_limit(root, tmp_path / "self") == pytest.approx(0.5)


def test_no_cgroup_information_means_no_limit(tmp_path: Path) -> None:
    assert threads.cgroup_cpu_limit(tmp_path / "none", tmp_path / "missing") is None
    write(tmp_path / "self", "garbage\n")
    assert threads.cgroup_cpu_limit(tmp_path, tmp_path / "self") is None


def test_usable_cores_is_the_affinity_capped_by_the_quota() -> None:
    assert threads.usable_cores({0, 1, 2, 3}, quota=None, probe=False) == 4
    assert threads.usable_cores({0, 1, 2, 3}, quota=2.5, probe=False) == 2  # rounded down
    assert threads.usable_cores({0, 1, 2, 3}, quota=0.5, probe=False) == 1  # at least 1
    assert threads.usable_cores({5}, quota=8.0, probe=False) == 1


@pytest.mark.parametrize(
    ("usable", "ranks", "busy", "want"),
    [
        (2, 1, 0.0, 2),  # quiet: every usable CPU
        (2, 1, 0.3, 2),  # a little background noise does not count
        (2, 1, 0.9, 1),  # one busy neighbour on 2 cores: 1 thread
        (2, 1, 2.0, 1),  # never fewer than 1
        (8, 1, 2.6, 5),
        (2, 2, None, 1),  # under mpirun: usable // ranks on the node
        (16, 4, None, 4),
        (2, 4, None, 1),  # oversubscribed: still 1
    ],
)
def test_default_threads(usable: int, ranks: int, busy: float | None, want: int) -> None:
    n, why = threads.default_threads(usable, ranks, busy)
    assert n == want
    assert f"{usable} usable CPU(s)" in why
    assert ("kept busy by other processes" in why) == (ranks == 1 and usable > want)


def test_flag_then_environment_then_default(monkeypatch: pytest.MonkeyPatch) -> None:
    assert threads.choose(3, 1, env={"OMP_NUM_THREADS": "2"}) == (3, "--threads")
    assert threads.choose(None, 1, env={"OPENBLAS_NUM_THREADS": "2"}) == (2, "OPENBLAS_NUM_THREADS")
    monkeypatch.setattr(threads, "affinity_cpus", lambda: {0, 1, 2, 3})
    n, why = threads.choose(None, 2, env={"OMP_NUM_THREADS": ""}, probe=False)
    assert (n, why) == (2, "4 usable CPU(s) / 2 ranks on this node")
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 1.0)
    monkeypatch.setattr(threads, "busy_cpus", lambda cpus: 0.0)
    assert threads.choose(None, 1, env={}) == (1, "1 usable CPU(s)")


def test_busy_cpus_reads_proc_stat_ticks() -> None:
    stat = (
        "cpu  10 0 10 100 0 0 0 0 0 0\n"
        "cpu0 5 0 5 50 0 0 0 0 0 0\n"
        "cpu1 5 0 5 50 1 0 0 0 0 0\n"
        "intr 1 2 3\n"
    )
    ticks = threads._cpu_ticks(stat, {1, 7})
    assert ticks == {1: (10, 61)}  # busy = user + system; idle + iowait are not
    assert threads.busy_cpus({0, 1}, seconds=0.01) >= 0.0
