"""Ranks agree before the first step: same configuration, model, data and software everywhere.

A node that got another config file, another dataset or another install would otherwise hang
(another `--model`: gradient buffers of different sizes), train silently on a wrong mix (another
`--seed`: two data orders), or fail late. `check(comm, cfg)` gathers each rank's facts on rank
0 in one gather, compares them with rank 0's and broadcasts the verdict; any difference ends
every rank with exit code 2 and one line naming the rank, the key and both values:

    error: rank 1 disagrees with rank 0 on --seed: 4 on rank 1, 3 on rank 0; every rank must
    get the same flags, --config file, dataset and install

What is compared, in this order: the settings that change the trajectory or the sequence of
collectives (every setting but the paths, the logging and --collective-timeout), the model
spec and its parameter count, the dataset's fingerprint (contents, not the path: each host may
keep its copy elsewhere), and the versions of distcnn, Python, NumPy, mpi4py and the MPI library.

The same gather gives rank 0 the rank table (contract 5), printed at start-up and recorded in
the metrics log, so a launcher's report such as "PID 4242 RUNNING AT node2" maps to a rank:

    ranks:
    rank 0: host node1 pid 4100 local_rank 0
    rank 1: host node2 pid 4242 local_rank 0

`early_settle` is the same agreement for errors found before NumPy may be imported (the flags):
it needs mpi4py only.
"""

from __future__ import annotations

import os
import platform
import socket
import sys
import time
from typing import TYPE_CHECKING, Any

from distcnn.errors import UsageError

if TYPE_CHECKING:
    from distcnn.comm import Comm
    from distcnn.config import Config

# Settings that may differ between ranks without changing what they compute together.
MAY_DIFFER = frozenset(
    {"data", "checkpoint_dir", "log", "log_every", "no_progress", "profile", "threads",
     "collective_timeout", "resume", "eval_batch_size"}
)  # fmt: skip
FIX = "every rank must get the same flags, --config file, dataset contents and install"


def mpi_library() -> str:
    """The MPI library's own first line of version text, e.g. `MPICH Version: 5.0.2`."""
    from distcnn.mpienv import MPI

    first = MPI.Get_library_version().strip().splitlines()[0]
    return " ".join(first.split())


def versions() -> dict[str, str]:
    import mpi4py
    import numpy

    from distcnn import __version__

    return {
        "distcnn": __version__,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "mpi4py": mpi4py.__version__,
        "MPI library": mpi_library(),
    }


def model_facts(spec: str, image_shape: tuple[int, ...], num_classes: int) -> int:
    """The parameter count of `spec` on these images, without allocating the model."""
    import math

    from distcnn.model import build_layers

    layers = build_layers(spec, tuple(image_shape), num_classes)  # type: ignore[arg-type]
    return sum(math.prod(s) for layer in layers for s in layer.param_shapes().values())


def facts(cfg: Config, local_rank: int) -> dict[str, Any]:
    """This rank's side of the agreement; a fact it cannot establish is an `error` entry."""
    from distcnn import data as datamod
    from distcnn.model import REFERENCE_SPEC

    out: dict[str, Any] = {
        "error": None,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "local_rank": local_rank,
        "settings": {k: v for k, v in cfg.as_dict().items() if k not in MAY_DIFFER},
    }
    path = cfg.data or str(datamod.DEFAULT_DATASET)
    try:
        out["versions"] = versions()
        fp = datamod.fingerprint(path)
        out["dataset"] = fp
        spec = cfg.model or REFERENCE_SPEC
        out["model"] = spec
        train = fp["splits"].get("train")
        try:
            out["parameters"] = model_facts(spec, train["image_shape"], fp["num_classes"])
        except (UsageError, TypeError, ValueError, KeyError):
            # a spec that does not fit this data (or data the trainer will refuse): the same
            # on every rank that has the same spec and data, and reported by the trainer's own
            # checks with their messages
            out["parameters"] = None
    except UsageError as e:
        out["error"] = str(e)
    except Exception as e:  # an unreadable file on this host only: say so, with the reason
        out["error"] = f"cannot read the dataset {path}: {type(e).__name__}: {e}"
    return out


def _show(key: str, value: Any) -> str:
    if key == "dataset":
        from distcnn.data import describe_fingerprint

        return describe_fingerprint(value)
    if key.endswith(" version"):
        return str(value)
    return repr(value) if isinstance(value, str) else str(value)


def first_difference(every: list[dict[str, Any]]) -> str | None:
    """The one-line verdict on rank 0's list of facts: None when every rank agrees."""
    from distcnn import config

    errors = [f.get("error") for f in every]
    for r, e in enumerate(errors):
        if e:  # unprefixed when it is rank 0's or every rank's
            return e if r == 0 or all(x == e for x in errors) else f"[rank {r}] {e}"
    ref = every[0]
    for r, f in enumerate(every[1:], start=1):
        pairs: list[tuple[str, Any, Any]] = []
        for k in sorted(set(ref["settings"]) | set(f["settings"])):
            name = config.SCHEMA[k].flag if k in config.SCHEMA else k
            pairs.append((name, f["settings"].get(k), ref["settings"].get(k)))
        for k in ("model", "parameters", "dataset"):
            pairs.append((k if k != "dataset" else "the dataset", f.get(k), ref.get(k)))
        for k in ref["versions"]:
            pairs.append((f"{k} version", f["versions"].get(k), ref["versions"].get(k)))
        for name, mine, theirs in pairs:
            if mine != theirs:
                key = name.removeprefix("the ")
                return (
                    f"rank {r} disagrees with rank 0 on {name}: {_show(key, mine)} on rank {r}, "
                    f"{_show(key, theirs)} on rank 0; {FIX}"
                )
    return None


def table_lines(every: list[dict[str, Any]]) -> list[str]:
    """Contract 5: `ranks:` then `rank <r>: host <hostname> pid <pid> local_rank <l>`."""
    return ["ranks:"] + [
        f"rank {r}: host {f['host']} pid {f['pid']} local_rank {f['local_rank']}"
        for r, f in enumerate(every)
    ]


def table_record(lines: list[str], step: int) -> dict[str, Any]:
    """The rank table as a metrics-log record: `step` is where this attempt starts (so a run
    resumed from that step or later keeps it), `lines` the table's lines after `ranks:`."""
    return {"kind": "ranks", "time": time.time(), "step": step, "lines": lines[1:]}


def local_rank(comm: Comm) -> int:
    """This rank's index among the ranks on its node (MPI's shared-memory split)."""
    if comm.size == 1:
        return 0
    from distcnn.mpienv import MPI

    comm.guard("before the node split (rank table)")  # MPI: Split_type blocks
    node = comm.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)
    lr = node.Get_rank()
    node.Free()
    return lr


def check(comm: Comm, cfg: Config | None, err: str | None = None) -> tuple[str | None, list[str]]:
    """MPI: compare every rank's facts with rank 0's; returns (the verdict, the rank table),
    the same on every rank.

    The verdict is None when all agree, else the one line naming the rank, the key and both
    values, or the error of the first rank that could not establish its facts (`err`, an error
    this rank already hit in its setup, with cfg None; or its dataset unreadable on its host).
    """
    from distcnn import faults

    faults.at_setup(comm.rank)  # DISTCNN_FAULT=<rank>:setup:<mode> (drills)
    lr = local_rank(comm)
    mine = {"error": err, "host": socket.gethostname(), "pid": os.getpid(), "local_rank": lr}
    if cfg is not None and err is None:
        mine = facts(cfg, lr)
    every = comm.gather_to_root(mine, 0, "agreement of the ranks (gather)")
    verdict: tuple[str | None, list[str]] = (None, [])
    if comm.rank == 0:
        assert every is not None
        verdict = (first_difference(every), table_lines(every))
    err, lines = comm.bcast_object(verdict, 0, "agreement of the ranks (verdict)")
    return err, lines


def early_settle(
    world: Any, err: str | None, timeout: float, share: Any = None, grace: float = 3.0
) -> tuple[str | None, Any]:
    """Comm.settle for the start of a run, before NumPy may load (mpi4py's pickled messages):
    every rank learns the first error any rank found in its flags, and rank 0's `share` (its
    --config settings). Returns (the error, rank 0's share), the same on every rank.

    A rank whose error the others do not come to settle within `grace` seconds prints it and
    aborts with exit code 2; a rank without an error waits at most `timeout` seconds for the
    others, then names the ranks that never came and aborts."""
    size, rank = world.Get_size(), world.Get_rank()
    if size == 1:
        return err, share
    tag = 12
    mine = (err, share if rank == 0 else None)
    reqs = [world.isend(mine, dest=r, tag=tag) for r in range(size) if r != rank]
    got: dict[int, tuple[str | None, Any]] = {rank: mine}
    t0 = time.monotonic()
    while len(got) < size:
        for r in range(size):
            if r not in got and world.iprobe(source=r, tag=tag):
                got[r] = world.recv(source=r, tag=tag)
        if len(got) == size:
            break
        waited = time.monotonic() - t0
        if (err is not None and waited > grace) or waited > timeout:
            missing = ", ".join(str(r) for r in range(size) if r not in got)
            msg = err or (
                f"start-up waited {waited:.0f} s for rank(s) {missing}, longer than "
                f"--collective-timeout {timeout:g}"
            )
            print(f"error: {f'[rank {rank}] ' if rank else ''}{msg}", file=sys.stderr, flush=True)
            time.sleep(0.2)  # let the launcher forward the line before the job is torn down
            world.Abort(2)
        time.sleep(0.002)
    for q in reqs:
        q.wait()
    errors = [got[r][0] for r in range(size)]
    for r, e in enumerate(errors):
        if e:
            return (e if r == 0 or all(x == e for x in errors) else f"[rank {r}] {e}"), None
    return None, got[0][1]
