"""Run under mpirun by tests/test_data_modes.py: open a dataset in a --data-mode, touch every
sample of the train split, and print (rank 0) one JSON line with each rank's growth of its
proportional set size (PSS, /proc/self/smaps_rollup, kB) and the splits' size in memory (all
splits of the file; the epoch of batches is over train).

    mpirun -n 4 python -m tests.data_probe FILE.h5 shared|stream|private
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from distcnn.comm import Comm
from distcnn.data import load_split
from distcnn.data.modes import open_data, rank_plan
from distcnn.sampler import epoch_order, shard_bounds


def pss_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1])
    raise RuntimeError("no Pss line in /proc/self/smaps_rollup")


def main() -> int:
    path, mode = sys.argv[1], sys.argv[2]
    comm = Comm.world(timeout=120)
    B = 256
    shard = -(-B // comm.size)
    comm.bcast(np.zeros(1), 0, "start")
    before = pss_kb()
    if mode == "private":  # what every rank did before the data modes: its own copy
        import h5py

        with h5py.File(path, "r") as f:
            names = [n for n in ("train", "val", "test") if n in f]
        splits = [load_split(path, n) for n in names]
    else:
        data = open_data(path, comm, mode, max_rows=shard)
        splits = [s for s in (data.train, data.val, data.test) if s is not None]
    train = splits[0]
    per_sample = [int(np.prod(s.image_shape)) * s.dtype.itemsize + 8 for s in splits]
    nbytes = sum(len(s) * b for s, b in zip(splits, per_sample, strict=True))
    for s in splits:  # every rank touches every page of its (or the node's) copy
        if hasattr(s, "images"):
            int(s.images.sum(dtype=np.int64)) + int(s.labels.sum())
    comm.bcast(np.zeros(1), 0, "opened")
    opened = pss_kb() - before
    n = len(train)
    x = np.empty((shard, *train.image_shape), np.float32)
    train.prefetch(rank_plan(0, n, B, comm.size, comm.rank, 0))
    order = epoch_order(0, 0, n)
    for b in range(0, n, B):  # one epoch: every sample is touched by some rank
        batch = order[b : b + B]
        lo, hi = shard_bounds(len(batch), comm.size, comm.rank)
        train.batch(batch[lo:hi], out=x)
    comm.bcast(np.zeros(1), 0, "epoch done")
    grown = comm.gather_objects((opened, pss_kb() - before), "pss")
    if comm.rank == 0:
        rec = {"mode": mode, "ranks": comm.size, "data_kb": nbytes / 1024}
        rec["open_pss_kb"] = [g[0] for g in grown]  # holding the data (every page touched)
        rec["epoch_pss_kb"] = [g[1] for g in grown]  # and after an epoch of batches
        print(json.dumps(rec))
    return 0


if __name__ == "__main__":
    sys.exit(main())
