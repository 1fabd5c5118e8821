"""Datasets: the HDF5 file that training reads, the readers that build it, and its CLI.

The package, one job per module:

    checks.py       validation shared by readers, writer and loader (shapes, dtypes, labels)
    split.py        the batch interface: Split (in memory), SplitView (a subset), augment hook
    modes.py        --data-mode: open_data (auto/shared/stream), rank_plan (what a rank reads)
    shared.py       one copy per node in an MPI shared-memory window
    stream.py       StreamSplit: rows read from the file on demand, prefetched by a thread
    rows.py         RowReader: stored rows by index, the fastest way the file's layout allows
    dataset.py      the dataset file on disk: layout, validation, load_split, dataset_summary
    fingerprints.py fingerprint(path): sizes, shapes, dtype, classes and a cheap content hash
    readers.py      source readers for build: IDX, CSV, .npz
    build.py        write_dataset (atomic; the on-disk layout) and channel_stats
    bench.py        layout read throughput and the data share of the step per mode
    summary.py      the text of `data info` (datasets and checkpoints)
    cli.py          `python -m distcnn.data {build,info}` (__main__.py runs it)

File layout (see docs/interface.md, "Dataset file (HDF5)"):

    /<split>/images   (N, C, H, W) uint8 (0..255) or float32
    /<split>/labels   (N,) integers in [0, num_classes)
    root attrs        num_classes (required); mean, std (optional, scalar or (C,));
                      source, license, created_by (informational)

`load_split` validates a split and returns a `Split` whose images stay as stored (compact);
`Split.batch` turns sample indices into normalised float32 inputs (B, C, H, W) without
allocating. The readers turn source files into images (N, C, H, W) and labels (N,);
`write_dataset` writes them atomically. Every bad input raises `UsageError` with a one-line
message naming the value and the fix; the CLI prints it as `error: <message>` and exits 2.
"""

from distcnn.data.build import channel_stats, write_dataset
from distcnn.data.checks import (
    IMAGE_DTYPES,
    SPLITS,
    _labels_as_int64,
)
from distcnn.data.cli import main
from distcnn.data.dataset import DEFAULT_DATASET, dataset_summary, load_split
from distcnn.data.fingerprints import describe as describe_fingerprint
from distcnn.data.fingerprints import fingerprint
from distcnn.data.modes import DATA_MODES, Data, open_data, rank_plan
from distcnn.data.readers import (
    _as_image_dtype,
    _with_channels,
    read_csv,
    read_idx,
    read_npz,
    read_source,
)
from distcnn.data.split import Split

__all__ = [
    "DATA_MODES",
    "DEFAULT_DATASET",
    "Data",
    "IMAGE_DTYPES",
    "SPLITS",
    "Split",
    "_as_image_dtype",
    "_labels_as_int64",
    "_with_channels",
    "channel_stats",
    "dataset_summary",
    "describe_fingerprint",
    "fingerprint",
    "load_split",
    "main",
    "open_data",
    "rank_plan",
    "read_csv",
    "read_idx",
    "read_npz",
    "read_source",
    "write_dataset",
]
