"""Run under mpirun by tests/test_data_modes.py: open a dataset in a --data-mode, touch every
sample of the train split, and print (rank 0) one JSON line with each rank's growth of its
proportional set size (PSS, /proc/self/smaps_rollup, kB) and the split's size in memory.

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
    if mode == "private":
        train = load_split(path, "train")
        nbytes = train.images.nbytes + train.labels.nbytes
    else:
        data = open_data(path, comm, mode, max_rows=shard)
        train = data.train
        nbytes = len(train) * (int(np.prod(train.image_shape)) * train.dtype.itemsize + 8)
    if hasattr(train, "images"):  # every rank touches every page of its (or the node's) copy
        int(train.images.sum(dtype=np.int64)) + int(train.labels.sum())
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
