"""--data-mode shared: the ranks of a node hold ONE copy of a split, in MPI shared memory.

Local rank 0 of each node allocates an MPI-3 shared-memory window as large as the split (images
as stored, then the labels as int64) and reads the file into it; the other ranks of the node
allocate nothing and map rank 0's segment. Every rank then gets a `Split` whose images and
labels are read-only views of the window, so batches are made by the same code as in memory.
Each node reads the file once (nodes do not share memory).

Every step that involves other ranks is collective over the whole job and under the watchdog:
the ranks first agree that each could open the split (a missing file on one host ends every rank
with exit 2 and one message, instead of a hang), then the node's blocking window allocation runs
(every rank has arrived, so it cannot wait for a missing one), then the reading rank's outcome
(the label range, non-finite pixels, a short read) is agreed the same way before anyone uses the
memory. DISTCNN_NODE_SIZE=k groups blocks of k consecutive ranks as nodes, as comm.py does.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import numpy as np

from distcnn.data.dataset import SplitInfo, read_split_into, split_info
from distcnn.data.split import Split
from distcnn.errors import UsageError

if TYPE_CHECKING:  # importing mpi4py starts MPI: only when a shared split is made
    from mpi4py import MPI


def agree(comm: Any, err: str | None, what: str) -> None:
    """MPI: every rank learns the first error any rank hit, and raises it (UsageError)."""
    errors = comm.gather_objects(err, what)  # MPI: under the watchdog
    for r, e in enumerate(errors):
        if e:
            raise UsageError(e if r == 0 or all(x == e for x in errors if x) else f"[rank {r}] {e}")


def node_comm(comm: Any) -> MPI.Comm:
    """MPI: the communicator of the ranks that share this rank's node (collective, blocking; call
    it right after a watchdog-covered collective so every rank has arrived)."""
    from mpi4py import MPI

    fake = os.environ.get("DISTCNN_NODE_SIZE", "")
    if fake.isdigit() and int(fake) > 0:
        return comm.mpi.Split(comm.rank // int(fake), comm.rank)
    return comm.mpi.Split_type(MPI.COMM_TYPE_SHARED, key=comm.rank)


class SharedWindow:
    """One node-wide shared-memory window holding a split; `close` frees it (collective)."""

    def __init__(self, node: MPI.Comm, nbytes: int) -> None:
        from mpi4py import MPI

        self.node = node
        self.local = node.Get_rank()
        mine = nbytes if self.local == 0 else 0
        self.win = MPI.Win.Allocate_shared(mine, 1, comm=node)  # MPI: blocking, node-wide
        mem, _ = self.win.Shared_query(0)
        self.memory = np.frombuffer(mem, dtype=np.uint8, count=nbytes)  # (nbytes,)
        self.win.Lock_all(MPI.MODE_NOCHECK)  # a passive epoch, so Win.Sync orders the memory
        self.open = True

    def close(self) -> None:
        if self.open:
            self.open = False
            self.memory = None  # type: ignore[assignment]
            self.win.Unlock_all()
            self.win.Free()


def _views(memory: np.ndarray, info: SplitInfo) -> tuple[np.ndarray, np.ndarray]:
    """The (N, C, H, W) images and (N,) int64 labels laid out in a window's bytes."""
    image_bytes = info.n * int(np.prod(info.image_shape)) * info.dtype.itemsize
    start = -(-image_bytes // 8) * 8  # labels 8-byte aligned
    images = memory[:image_bytes].view(info.dtype).reshape(info.n, *info.image_shape)
    labels = memory[start : start + 8 * info.n].view(np.int64)
    return images, labels


def window_bytes(info: SplitInfo) -> int:
    image_bytes = info.n * int(np.prod(info.image_shape)) * info.dtype.itemsize
    return -(-image_bytes // 8) * 8 + 8 * info.n


def load_shared(path: str | os.PathLike, split: str, comm: Any, node: MPI.Comm) -> Split:
    """MPI: the split in one shared window per node (collective over comm; see the module).

    Raises UsageError on every rank when any rank cannot open the split or the reading rank
    finds bad data, so all end together.
    """
    from mpi4py import MPI

    info, err = None, None
    try:
        info = split_info(path, split)
    except UsageError as e:
        err = str(e)
    agree(comm, err, f"open /{split}")  # MPI: everyone arrived, and every rank could open it
    assert info is not None
    window = None
    try:
        window = SharedWindow(node, window_bytes(info))
    except MPI.Exception as e:  # e.g. /dev/shm too small
        reason = str(e).strip().splitlines()[-1].strip(" :")
        err = (
            f"cannot allocate {window_bytes(info) / 1e6:.1f} MB of shared memory for /{split} of "
            f"{path} ({reason}): free /dev/shm or use --data-mode stream"
        )
    agree(comm, err, f"shared window for /{split}")  # MPI
    assert window is not None
    images, labels = _views(window.memory, info)
    if window.local == 0:
        try:
            read_split_into(info, images, labels)
        except UsageError as e:
            err = str(e)
        except OSError as e:
            err = f"reading /{split} of {path} failed ({e}): check the file"
        window.win.Sync()
    try:
        agree(comm, err, f"read /{split}")  # MPI: the node's copy is complete (or all fail)
    except UsageError:
        window.close()
        raise
    window.win.Sync()
    images.flags.writeable = False  # every rank of the node reads the same bytes
    labels.flags.writeable = False
    return Split(images, labels, info.num_classes, info.mean, info.std, owner=window)
