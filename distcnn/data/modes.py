"""--data-mode: how the ranks hold the dataset's splits, decided once at start-up.

    shared   one copy per node in MPI shared memory (distcnn.data.shared); on 1 rank, or a node
             with one rank, simply this process's own copy
    stream   every rank reads only its own samples from the file, prefetched (distcnn.data.stream)
    auto     shared when all the splits fit the memory budget, else stream

The budget (--data-budget MB) defaults to half the memory available on the tightest node
(MemAvailable of /proc/meminfo, the smallest over the ranks). The decision is the same on every
rank (it is made from the same agreed numbers) and is told in one start-up line.

Whatever the mode, the trainer gets the same interface (distcnn.data.split) and bitwise the same
batches.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from distcnn.data.dataset import _file_splits, _open_h5, load_split, split_info
from distcnn.data.rows import layout_of
from distcnn.data.shared import agree, load_shared, node_comm
from distcnn.data.split import Batches
from distcnn.data.stream import StreamSplit, open_stream
from distcnn.errors import UsageError
from distcnn.sampler import epoch_order, shard_bounds

DATA_MODES = ("auto", "shared", "stream")
SPLIT_NAMES = ("train", "val", "test")


def available_bytes() -> int | None:
    """MemAvailable of this node (bytes), or None where /proc/meminfo has no such line."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class Data:
    """The splits of a run, as the chosen mode holds them."""

    mode: str  # "shared" or "stream"
    train: Batches
    val: Batches | None
    test: Batches | None
    line: str  # the start-up line saying which mode and why

    def close(self) -> None:
        """Stop prefetch threads and close files. Not collective: a shared-memory window is
        left to MPI_Finalize, so a rank that ends early never waits here for the others."""
        for s in (self.train, self.val, self.test):
            if isinstance(s, StreamSplit):
                s.close()


def _mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def choose_mode(mode: str, need: int, budget: int | None) -> tuple[str, str]:
    """(shared|stream, why) for `need` bytes of splits under `budget` bytes (None: unknown)."""
    if mode == "shared":
        return "shared", "--data-mode shared"
    if mode == "stream":
        return "stream", "--data-mode stream"
    if budget is None or need <= budget:
        limit = "no memory figure on this system" if budget is None else f"budget {_mb(budget)}"
        return "shared", f"auto: {_mb(need)} of splits fits ({limit})"
    return "stream", f"auto: {_mb(need)} of splits exceeds the budget {_mb(budget)}"


def open_data(
    path: str,
    comm: Any,
    mode: str = "auto",
    budget_mb: float | None = None,
    max_rows: int = 0,
    depth: int = 4,
) -> Data:
    """MPI: open the train split and the file's val and test splits in `mode` (collective).

    max_rows: the most samples this rank asks for in one step (its shard of a global batch),
    which sizes the stream mode's prefetch buffers; depth: steps read ahead. Raises UsageError
    on every rank together.
    """
    if mode not in DATA_MODES:
        raise UsageError(f"--data-mode {mode} is unknown; use one of {', '.join(DATA_MODES)}")
    names, err, need = [], None, 0
    try:
        info = split_info(path, "train")
        with _open_h5(path) as f:
            present = _file_splits(f)
            names = ["train"] + [n for n in ("val", "test") if n in present]
            layout = layout_of(f["train"]["images"])
        infos = [info] + [split_info(path, n) for n in names[1:]]
        need = sum(i.nbytes for i in infos)
    except UsageError as e:
        err = str(e)
    agree(comm, err, "open the dataset")  # MPI: every rank opened it, or all stop here
    budget = None if budget_mb is None else int(budget_mb * 1e6)
    if budget is None:
        avail = comm.gather_objects(available_bytes(), "memory budget")  # MPI
        known = [a for a in avail if a is not None]
        budget = min(known) // 2 if known else None
    chosen, why = choose_mode(mode, need, budget)
    splits: dict[str, Batches] = {}
    if chosen == "shared":
        if comm.size == 1:
            splits = {n: load_split(path, n) for n in names}
            line = f"data: shared ({why}): this process's own copy, {_mb(need)}"
        else:
            node = node_comm(comm)  # MPI: blocking, right after the agreement above
            try:
                for n in names:
                    splits[n] = load_shared(path, n, comm, node)  # MPI
            finally:
                local = node.Get_size()
                node.Free()
            line = f"data: shared ({why}): one copy per node of {local} rank(s), {_mb(need)}"
    else:
        try:
            for n in names:
                splits[n] = open_stream(path, n, depth, max_rows if n == "train" else 0)
            err = None
        except UsageError as e:
            err = str(e)
        agree(comm, err, "open the splits for streaming")  # MPI
        kind = splits["train"].kind  # type: ignore[attr-defined]
        line = (
            f"data: stream ({why}): each rank reads its own samples, {depth} steps ahead; "
            f"file layout {layout['layout']}"
            + (f", {'+'.join(layout['filters'])}" if layout["filters"] else ", uncompressed")
        )
        if kind != "contiguous":
            line += (
                " (slow for random reads: rebuild with python -m distcnn.data build for the "
                "contiguous layout)"
            )
    return Data(chosen, splits["train"], splits.get("val"), splits.get("test"), line)


def rank_plan(
    seed: int, n: int, batch_size: int, size: int, rank: int, epoch: int = 0, offset: int = 0
) -> Iterator[np.ndarray]:
    """This rank's shard of every coming global batch, from `offset` samples into `epoch` on
    (endless over epochs): what the training loop asks a split for, step by step, so that a
    stream split can read it ahead. Mirrors the loop: global batch = order[offset:offset + B],
    the rank's part = shard_bounds of it; an epoch ends when its order is used up."""
    while True:
        order = epoch_order(seed, epoch, n)
        while offset < n:
            batch = order[offset : offset + batch_size]
            lo, hi = shard_bounds(len(batch), size, rank)
            yield batch[lo:hi]
            offset += len(batch)
        epoch, offset = epoch + 1, 0
