"""Simulated hosts on one Linux machine, for multi-host MPI tests.

Each "host" is a network namespace whose `eth0` is one end of a veth pair; the other ends sit on
a bridge in a hub namespace, where mpiexec itself runs. Every process Hydra starts on a host
also gets its own hostname (a UTS namespace), its own System V IPC namespace and a private tmpfs
on /dev/shm, so MPI sees separate nodes and moves data between them over the veths (with a
shared IPC namespace, UCX would pass it through shared memory and the network path would go
untested). A PID namespace is deliberately not used: it breaks UCX's shared-memory transport
between the ranks of one host.

Hydra reaches the hosts through a generated launcher that stands in for ssh
(`mpiexec -launcher ssh -launcher-exec <it> -localhost <hub address> -hosts ...`): called like
ssh (`[options] HOST COMMAND...`), it runs COMMAND with `sh -c` inside that host's namespaces.

All addresses are private ones chosen per session on the bridge, inside namespaces this module
creates and deletes: no traffic leaves them (the hub has no route anywhere else). Names carry
the creating process's PID, so namespaces left by a test session that died are recognised and
removed by the next one.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "dcnt"  # every namespace this harness makes is named dcnt<pid>-...
SHM_SIZE = "256m"

LAUNCHER = """#!/bin/sh
# Stands in for ssh when Hydra starts its proxy on a simulated host (written by tests/netns.py).
while [ $# -gt 0 ]; do
  case "$1" in
    -o|-p|-l|-i|-F|-E) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
host=$1
shift
case "$host" in
{cases}
  *) echo "netns launcher: unknown host $host" >&2; exit 255 ;;
esac
setup='hostname "$1" && mount -t tmpfs -o size={shm},mode=1777 shm /dev/shm && shift'
exec ip netns exec "$ns" unshare --uts --ipc --mount --propagation private \\
  sh -c "$setup"' && exec sh -c "$*"' netns-launcher "$name" "$@"
"""


def _sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=check, timeout=30)


def unavailable() -> str | None:
    """Why simulated hosts cannot be made here (None when they can)."""
    if sys.platform != "linux":
        return "simulated hosts need Linux network namespaces"
    if os.geteuid() != 0:
        return "simulated hosts need root (network namespaces, bridges, mounts)"
    for tool in ("ip", "unshare", "mount"):
        if shutil.which(tool) is None:
            return f"simulated hosts need the `{tool}` command"
    mpiexec = Path(sys.executable).parent / "mpiexec.hydra"
    if not mpiexec.exists():
        hydra = shutil.which("mpiexec.hydra")
        if hydra is None:
            return "simulated hosts need MPICH's Hydra launcher (mpiexec.hydra)"
    probe = f"{PREFIX}{os.getpid()}-probe"
    res = _sh("ip", "netns", "add", probe, check=False)
    if res.returncode != 0:
        return f"cannot create a network namespace: {res.stderr.strip()}"
    _sh("ip", "netns", "del", probe, check=False)
    return None


def hydra() -> str:
    here = Path(sys.executable).parent / "mpiexec.hydra"
    return str(here) if here.exists() else str(shutil.which("mpiexec.hydra"))


def remove_stale() -> list[str]:
    """Delete namespaces left by test sessions whose process is gone; returns their names."""
    gone = []
    listing = _sh("ip", "netns", "list", check=False).stdout.split()
    for name in listing:
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not Path(f"/proc/{pid}").exists():
            _sh("ip", "netns", "del", name, check=False)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class Host:
    name: str  # its hostname (what MPI and the rank table see)
    netns: str
    address: str


class Cluster:
    """`n` simulated hosts on a bridge; `close()` (always) deletes every namespace made."""

    made = 0  # clusters made by this process, for unique names

    def __init__(self, n: int, workdir: Path) -> None:
        Cluster.made += 1
        self.tag = f"{PREFIX}{os.getpid()}-{Cluster.made}"
        rnd = random.Random(os.getpid() ^ int(time.time()))
        # a private /24 chosen per session; it exists only on the bridge made here
        self.net = f"10.{rnd.randrange(200, 250)}.{rnd.randrange(1, 255)}"
        self.hub = f"{self.tag}-hub"
        self.hub_address = f"{self.net}.254"
        self.hosts = [
            Host(f"{self.tag}-node{i + 1}", f"{self.tag}-h{i + 1}", f"{self.net}.{i + 1}")
            for i in range(n)
        ]
        self.launcher = workdir / f"netns-ssh-{Cluster.made}"
        self._made: list[str] = []
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        ip = "ip"
        _sh(ip, "netns", "add", self.hub)
        self._made.append(self.hub)
        _sh(ip, "-n", self.hub, "link", "set", "lo", "up")
        _sh(ip, "-n", self.hub, "link", "add", "br0", "type", "bridge")
        _sh(ip, "-n", self.hub, "addr", "add", f"{self.hub_address}/24", "dev", "br0")
        _sh(ip, "-n", self.hub, "link", "set", "br0", "up")
        for i, h in enumerate(self.hosts):
            _sh(ip, "netns", "add", h.netns)
            self._made.append(h.netns)
            _sh(ip, "-n", h.netns, "link", "set", "lo", "up")
            port = f"p{i + 1}"
            _sh(ip, "link", "add", port, "netns", self.hub, "type", "veth",
                "peer", "name", "eth0", "netns", h.netns)  # fmt: skip
            _sh(ip, "-n", self.hub, "link", "set", port, "master", "br0", "up")
            _sh(ip, "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", "eth0")
            _sh(ip, "-n", h.netns, "link", "set", "eth0", "up")
        cases = "\n".join(f"  {h.address}) ns={h.netns}; name={h.name} ;;" for h in self.hosts)
        self.launcher.write_text(LAUNCHER.format(cases=cases, shm=SHM_SIZE))
        self.launcher.chmod(0o755)

    # -- launching ----------------------------------------------------------------------------

    def mpiexec(self, layout: Sequence[int], *extra: str) -> list[str]:
        """The command prefix that starts layout[i] ranks on host i (then the program)."""
        hosts = ",".join(f"{h.address}:{k}" for h, k in zip(self.hosts, layout, strict=False))
        return [
            "ip", "netns", "exec", self.hub, hydra(),
            "-launcher", "ssh", "-launcher-exec", str(self.launcher),
            "-localhost", self.hub_address, "-hosts", hosts, "-n", str(sum(layout)), *extra,
        ]  # fmt: skip

    def bytes_moved(self) -> dict[str, tuple[int, int]]:
        """(received, sent) bytes on each host's eth0 so far."""
        out = {}
        for h in self.hosts:
            res = _sh("ip", "-n", h.netns, "-j", "-s", "link", "show", "eth0")
            stats = json.loads(res.stdout)[0]["stats64"]
            out[h.name] = (int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"]))
        return out

    def pids(self, host: Host) -> list[int]:
        res = _sh("ip", "netns", "pids", host.netns, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_leftovers(self) -> list[int]:
        """SIGKILL processes still running in this cluster's host namespaces (all of them were
        started by this session's launches); returns their PIDs."""
        killed = []
        for h in self.hosts:
            if h.netns not in self._made:
                continue
            for pid in self.pids(h):
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                except ProcessLookupError:
                    pass
        return killed

    def close(self) -> None:
        if self._made:
            self.kill_leftovers()
        for name in reversed(self._made):
            _sh("ip", "netns", "del", name, check=False)
        self._made.clear()
