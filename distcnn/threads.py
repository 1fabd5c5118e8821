"""BLAS threads per rank, decided before NumPy starts its thread pool.

Precedence: `--threads`, then OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS from the
environment, then a default from the CPUs this process may actually use:
- usable CPUs = the CPUs in this process's affinity mask (taskset, Slurm's binding, mpirun's
  --bind-to), capped by the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` /
  `cpu.cfs_period_us`, the tightest along the cgroup's path; a container's `--cpus`), rounded
  down, at least 1;
- with several ranks on the node: usable CPUs // ranks on the node, at least 1, so `mpirun -n 4`
  on 2 cores runs 1 thread per rank instead of 4 ranks x 2 threads fighting;
- one rank on the node: it also measures, for 0.1 s at start-up (/proc/stat), how many of those
  CPUs other processes keep busy, and leaves them alone: one busy neighbour on a 2-core machine
  means 1 thread. OpenBLAS splits every GEMM evenly between its threads, so one thread that
  shares its core with a busy process holds up the whole GEMM (docs/performance.md has the
  figures: quiet, 2 threads are faster; with a busy neighbour, 2 threads collapse).
OpenBLAS and MKL read these variables once, when NumPy is first imported; after that the count
can only be changed through threadpoolctl.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
BUSY_PROBE_SECONDS = 0.1
# a CPU counts as taken when others keep it busy at least this much of the probe
BUSY_THRESHOLD = 0.5


def affinity_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_cpu_limit(
    root: str | os.PathLike = "/sys/fs/cgroup", self_cgroup: str | os.PathLike = "/proc/self/cgroup"
) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when unlimited.

    cgroup v2: `cpu.max` ("max 100000" or "<quota> <period>") in the process's cgroup and every
    ancestor up to `root`; v1: `cpu.cfs_quota_us` / `cpu.cfs_period_us` of the cpu controller
    (quota -1 is unlimited). The tightest limit along the path wins. A cgroup path that does not
    exist under `root` (a container sees its own cgroup as the root) is read as the root.
    """
    text = _read(Path(self_cgroup))
    if text is None:
        return None
    root = Path(root)
    limits: list[float] = []
    for line in text.splitlines():
        parts = line.strip().split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, rel = parts
        ctrl = controllers.split(",")
        if controllers == "":  # v2 unified hierarchy
            base = root if (root / "cgroup.controllers").exists() else root / "unified"
            limits += _walk(base, rel, _v2_limit)
        elif "cpu" in ctrl:  # v1 cpu controller, mounted as cpu, cpu,cpuacct or cpuacct,cpu
            for name in (controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu"):
                if (root / name).is_dir():
                    limits += _walk(root / name, rel, _v1_limit)
                    break
    return min(limits) if limits else None


def _walk(base: Path, rel: str, read: object) -> list[float]:
    """Limits read by `read(dir)` in base/rel and each of its ancestors up to base."""
    if not base.is_dir():
        return []
    rel_parts = [p for p in rel.strip("/").split("/") if p]
    here = base.joinpath(*rel_parts)
    if not here.is_dir():  # a namespaced view: our cgroup is the mount's root
        here = base
    out = []
    while True:
        value = read(here)  # type: ignore[operator]
        if value is not None:
            out.append(value)
        if here == base or base not in here.parents:
            break
        here = here.parent
    return out


def _v2_limit(d: Path) -> float | None:
    text = _read(d / "cpu.max")
    if not text:
        return None
    fields = text.split()
    if len(fields) < 1 or fields[0] == "max":
        return None
    try:
        quota = float(fields[0])
        period = float(fields[1]) if len(fields) > 1 else 100000.0
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(d: Path) -> float | None:
    q, p = _read(d / "cpu.cfs_quota_us"), _read(d / "cpu.cfs_period_us")
    try:
        quota, period = float((q or "-1").strip()), float((p or "0").strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cores(
    cpus: set[int] | None = None, quota: float | None = None, probe: bool = True
) -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (at least 1)."""
    n = len(cpus if cpus is not None else affinity_cpus())
    limit = quota if quota is not None or not probe else cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.floor(limit + 1e-9)))
    return max(1, n)


def _cpu_ticks(stat: str, cpus: set[int]) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU in `cpus` from the text of /proc/stat."""
    out = {}
    for line in stat.splitlines():
        name, *vals = line.split()
        if not name.startswith("cpu") or name == "cpu":
            continue
        try:
            cpu = int(name[3:])
            nums = [int(v) for v in vals]
        except ValueError:
            continue
        if cpu in cpus and len(nums) >= 4:
            idle = nums[3] + (nums[4] if len(nums) > 4 else 0)  # idle + iowait
            total = sum(nums[:8])  # guest time is already in user/nice
            out[cpu] = (total - idle, total)
    return out


def _own_ticks(stat: str) -> int:
    """utime + stime of this process (all its threads) in jiffies, from /proc/self/stat."""
    fields = stat.rsplit(")", 1)[-1].split()
    return int(fields[11]) + int(fields[12])


def busy_cpus(cpus: set[int], seconds: float = BUSY_PROBE_SECONDS) -> float:
    """How many of `cpus` other processes kept busy during a short sleep (0 if unreadable)."""
    try:
        s0, o0 = Path("/proc/stat").read_text(), Path("/proc/self/stat").read_text()
        time.sleep(seconds)
        s1, o1 = Path("/proc/stat").read_text(), Path("/proc/self/stat").read_text()
    except OSError:
        return 0.0
    a, b = _cpu_ticks(s0, cpus), _cpu_ticks(s1, cpus)
    busy = sum(b[c][0] - a[c][0] for c in b if c in a)
    total = sum(b[c][1] - a[c][1] for c in b if c in a)
    if total <= 0 or not b:
        return 0.0
    busy -= _own_ticks(o1) - _own_ticks(o0)
    return max(0.0, len(b) * busy / total)


def default_threads(usable: int, ranks_on_node: int, busy: float | None) -> tuple[int, str]:
    """The default and its reason, from the usable CPUs, the ranks sharing them and (one rank
    only) the CPUs found busy with other processes."""
    ranks = max(1, ranks_on_node)
    if ranks > 1:
        return max(1, usable // ranks), f"{usable} usable CPU(s) / {ranks} ranks on this node"
    taken = 0 if busy is None else math.floor(busy + (1 - BUSY_THRESHOLD))
    threads = max(1, usable - taken)
    why = f"{usable} usable CPU(s)"
    if taken:
        why += f", {busy:.1f} kept busy by other processes at start-up"
    return threads, why


def choose(
    flag: int | None,
    ranks_on_node: int,
    env: Mapping[str, str] | None = None,
    probe: bool = True,
) -> tuple[int, str]:
    """(threads, where the number came from). probe=False skips the cgroup and load probes."""
    if flag is not None:
        return flag, "--threads"
    env = os.environ if env is None else env
    for var in _VARS:
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value), var
    cpus = affinity_cpus()
    usable = usable_cores(cpus, probe=probe)
    busy = busy_cpus(cpus) if probe and ranks_on_node <= 1 and usable > 1 else None
    return default_threads(usable, ranks_on_node, busy)


def apply(threads: int) -> None:
    """Set the thread count for BLAS: environment before NumPy loads, threadpoolctl after."""
    for var in _VARS:
        os.environ[var] = str(threads)
    if "numpy" in sys.modules:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
