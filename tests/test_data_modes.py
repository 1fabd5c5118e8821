"""Tests for the dataset fingerprint and the data modes (shared memory, streaming)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from distcnn import data
from distcnn.data import Split, fingerprint, write_dataset
from distcnn.data.fingerprints import sample_rows
from distcnn.data.modes import open_data, rank_plan
from distcnn.data.rows import RowReader
from distcnn.data.stream import StreamSplit, open_stream
from distcnn.errors import UsageError
from distcnn.sampler import epoch_order, shard_bounds
from tests.conftest import ROOT, make_images, run_train


def _write(path: Path, train: tuple, test: tuple | None = None, **attrs) -> Path:
    splits = {"train": train} if test is None else {"train": train, "test": test}
    write_dataset(path, splits, num_classes=3, attrs={"source": "synthetic (tests)", **attrs})
    return path


def _rechunk(src: Path, dst: Path, chunk_rows: int | None, compression: str | None) -> Path:
    """The same contents as src with another chunking/compression (what fingerprints ignore)."""
    with h5py.File(src, "r") as f, h5py.File(dst, "w") as g:
        for k, v in f.attrs.items():
            g.attrs[k] = v
        for name in f:
            grp = g.create_group(name)
            for key in ("images", "labels"):
                arr = f[name][key][()]
                chunks = None if chunk_rows is None else (min(chunk_rows, len(arr)), *arr.shape[1:])
                grp.create_dataset(key, data=arr, chunks=chunks, compression=compression)
    return dst


def test_fingerprint_depends_on_contents_only(tmp_path):
    train, test = make_images(100, 3, 8, 1), make_images(40, 3, 8, 2)
    a = _write(tmp_path / "a.h5", train, test)
    fp = fingerprint(a)
    assert json.loads(json.dumps(fp)) == fp  # JSON-serialisable as it is
    assert fp["num_classes"] == 3
    assert fp["splits"]["train"]["n"] == 100 and fp["splits"]["test"]["n"] == 40
    assert fp["splits"]["train"]["image_shape"] == [1, 8, 8]
    assert fp["splits"]["train"]["dtype"] == "uint8"
    # Same contents under another name, chunking and compression (contiguous too): same value.
    assert fingerprint(_rechunk(a, tmp_path / "b.h5", 7, None)) == fp
    assert fingerprint(_rechunk(a, tmp_path / "c.h5", None, None)) == fp
    # Another process (as on another host) computes the same value.
    code = "import json, sys; from distcnn.data import fingerprint; "
    code += f"print(json.dumps(fingerprint({str(a)!r})))"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    )
    assert json.loads(out.stdout) == fp


def test_fingerprint_sees_sizes_labels_pixels_and_stats(tmp_path):
    (images, labels), test = make_images(100, 3, 8, 1), make_images(40, 3, 8, 2)
    fp = fingerprint(_write(tmp_path / "a.h5", (images, labels), test))
    smaller = fingerprint(_write(tmp_path / "s.h5", (images[:90], labels[:90]), test))
    assert smaller["splits"]["train"]["n"] == 90 and smaller["hash"] != fp["hash"]
    relabelled = labels.copy()
    unsampled = int(np.setdiff1d(np.arange(100), sample_rows(100))[0])
    relabelled[unsampled] = (relabelled[unsampled] + 1) % 3  # labels are hashed in full
    fp_l = fingerprint(_write(tmp_path / "l.h5", (images, relabelled), test))
    assert fp_l["splits"]["train"]["hash"] != fp["splits"]["train"]["hash"]
    assert fp_l["splits"]["test"] == fp["splits"]["test"]  # per-split hashes
    row = int(sample_rows(100)[3])
    changed = images.copy()
    changed[row, 0, 4, 4] ^= 1  # one pixel of a sampled row
    fp_p = fingerprint(_write(tmp_path / "p.h5", (changed, labels), test))
    assert fp_p["hash"] != fp["hash"]
    fp_n = fingerprint(_write(tmp_path / "n.h5", (images, labels), test, mean=0.5, std=0.25))
    assert fp_n["hash"] != fp["hash"] and fp_n["splits"] == fp["splits"]


def test_fingerprint_of_a_missing_file_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        fingerprint(tmp_path / "nope.h5")


def test_info_shows_the_fingerprint(tiny_data, capsys):
    assert data.main(["info", str(tiny_data)]) == 0
    out = capsys.readouterr().out
    assert f"hash {fingerprint(tiny_data)['hash']}" in out.splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# Reading rows: every layout gives the stored bytes
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "opts, kind",
    [
        ({}, "contiguous"),
        ({"chunks": (7, 3, 5, 4), "compression": "gzip"}, "chunks"),
        ({"chunks": (1, 3, 5, 4)}, "chunks"),
        ({"chunks": (7, 3, 5, 4), "compression": "gzip", "shuffle": True}, "hdf5"),
        ({"chunks": (7, 1, 5, 4)}, "hdf5"),  # chunks that cut images
    ],
)
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_row_reader_returns_the_stored_rows_for_every_layout(tmp_path, opts, kind, dtype):
    rng = np.random.default_rng(3)
    images = (rng.random((50, 3, 5, 4)) * 255).astype(dtype)
    path = tmp_path / "rows.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("train/images", data=images, **opts)
    reader = RowReader(path, "train", cache_chunks=2)
    assert reader.kind == kind
    out = np.full((40, 3, 5, 4), 7, dtype=dtype)
    for rows in (
        rng.integers(0, 50, 40),  # random, with repeats
        np.arange(10, 50),  # one run
        np.array([49, 0, 1, 2, 30, 31, 5]),  # runs and jumps, out of order
    ):
        got = reader.read(rows, out)
        np.testing.assert_array_equal(got, images[rows])
    reader.close()


# ---------------------------------------------------------------------------------------------
# Split kinds: in memory, a view, streamed: the same batches, bitwise
# ---------------------------------------------------------------------------------------------


def _flip_odd_rows(pixels: np.ndarray, rows: np.ndarray, epoch: int) -> None:
    """A test augmentation keyed by (file row, epoch): mirror the samples with row + epoch odd."""
    flip = (rows + epoch) % 2 == 1
    pixels[flip] = pixels[flip][..., ::-1]


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_stream_batches_equal_memory_batches_along_the_plan(tmp_path, dtype):
    """Two ranks' plans over 3 epochs, one request per step and micro-shard requests (as
    --deterministic makes): streamed batches are bitwise the in-memory ones, with no miss."""
    images, labels = make_images(101, 3, 8, 5)
    if dtype == np.float32:
        images = images.astype(np.float32) / 7.0
    path = _write(tmp_path / "s.h5", (images, labels), mean=0.25, std=0.5)
    mem = data.load_split(path, "train")
    B, size, spe = 16, 2, 7
    for rank, micro in ((0, 1), (1, 4)):
        st = open_stream(path, "train", depth=2, max_rows=B // size + 1)
        mem.augment = st.augment = _flip_odd_rows
        st.prefetch(rank_plan(9, len(mem), B, size, rank, 0, 3 * B))
        xa = np.empty((B, 1, 8, 8), np.float32)
        xb = np.empty_like(xa)
        for step in range(3, 3 * spe):
            epoch, b = divmod(step, spe)
            batch = epoch_order(9, epoch, len(mem))[b * B : (b + 1) * B]
            lo, hi = shard_bounds(len(batch), size, rank)
            for m in range(micro):
                a, z = shard_bounds(hi - lo, micro, m)
                idx = batch[lo:hi][a:z]
                want = mem.batch(idx, out=xa, epoch=epoch)
                assert st.batch(idx, out=xb, epoch=epoch).tobytes() == want.tobytes()
            np.testing.assert_array_equal(st.labels[batch], mem.labels[batch])
        assert st.misses == 0
        # A request off the plan is still answered right (read directly) and ends the prefetch.
        idx = np.array([5, 3, 99])
        assert st.batch(idx, out=xb, epoch=0).tobytes() == mem.batch(idx, out=xa).tobytes()
        assert st.misses == 1 and st._pre is None
        st.close()


def test_split_view_is_the_subset(tmp_path):
    images, labels = make_images(60, 3, 8, 6)
    path = _write(tmp_path / "v.h5", (images, labels))
    for base in (data.load_split(path, "train"), open_stream(path, "train", 2, 0)):
        rows = np.array([59, 3, 17, 4, 4])
        view = base.subset(rows)
        assert len(view) == 5 and view.image_shape == (1, 8, 8)
        np.testing.assert_array_equal(view.labels, labels[rows])
        ref = Split(images[rows], labels[rows], 3)
        idx = np.array([4, 0, 2])
        assert view.batch(idx).tobytes() == ref.batch(idx).tobytes()
        view.augment = _flip_odd_rows  # keyed by the file rows: 4 -> not flipped, 59 -> flipped
        got = view.batch(np.array([0, 3]), epoch=0)
        np.testing.assert_array_equal(got[0], ref.batch(np.array([0]))[0][..., ::-1])
        np.testing.assert_array_equal(got[1], ref.batch(np.array([3]))[0])
        with pytest.raises(IndexError):
            view.batch(np.array([5]))
        base.close()


# ---------------------------------------------------------------------------------------------
# Memory: streaming stays bounded; auto picks by the budget
# ---------------------------------------------------------------------------------------------


def _rss_kb() -> tuple[int, int]:
    """(VmRSS, VmHWM) of this process in kB."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_streaming_a_whole_epoch_keeps_memory_bounded(tmp_path):
    """A 48 MB train split streamed in full, two epochs in random order, raises the peak RSS by
    less than 12 MB (a quarter of the file); loading it instead raises it by more."""
    n, shape = 16_000, (3, 32, 32)
    path = tmp_path / "big.h5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = 10
        f.create_dataset("train/labels", data=rng.integers(0, 10, n))
        ds = f.create_dataset("train/images", shape=(n, *shape), dtype=np.uint8)
        for a in range(0, n, 2000):
            ds[a : a + 2000] = rng.integers(0, 256, (2000, *shape), dtype=np.uint8)
    file_kb = n * int(np.prod(shape)) // 1024
    B = 256
    x = np.empty((B, *shape), np.float32)
    st = open_stream(path, "train", depth=4, max_rows=B)
    st.batch(np.arange(B), out=x)  # scratch buffers exist before the measurement
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    before, _ = _rss_kb()
    st.prefetch(rank_plan(1, n, B, 1, 0, 0))
    for step in range(2 * (n // B)):
        epoch, b = divmod(step, -(-n // B))
        idx = epoch_order(1, epoch, n)[b * B : (b + 1) * B]
        st.batch(idx, out=x, epoch=epoch)
    _, peak = _rss_kb()
    st.close()
    assert st.misses == 0
    assert peak - before < file_kb // 4, (peak - before, file_kb)
    Path("/proc/self/clear_refs").write_text("5")
    before, _ = _rss_kb()
    mem = data.load_split(path, "train")
    _, peak = _rss_kb()
    assert peak - before > file_kb * 0.9  # the bound above is a real one
    del mem


def test_auto_mode_follows_the_budget(tiny_data):
    from distcnn.comm import Comm

    comm = Comm.world()
    need = sum(
        int(np.prod(s.images.shape)) + 8 * len(s)
        for s in (data.load_split(tiny_data, "train"), data.load_split(tiny_data, "test"))
    )
    d = open_data(str(tiny_data), comm, "auto", budget_mb=need / 1e6, max_rows=8)
    assert d.mode == "shared" and d.line.startswith("data: shared (auto:")
    assert isinstance(d.train, Split) and d.test is not None and d.val is None
    d.close()
    d = open_data(str(tiny_data), comm, "auto", budget_mb=(need - 1) / 1e6, max_rows=8)
    assert d.mode == "stream" and "exceeds the budget" in d.line
    assert isinstance(d.train, StreamSplit) and "layout contiguous, uncompressed" in d.line
    d.close()
    with pytest.raises(UsageError, match="--data-mode fast is unknown"):
        open_data(str(tiny_data), comm, "fast")


@pytest.mark.mpi
@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux PSS")
def test_shared_mode_holds_one_copy_per_node(tmp_path):
    """4 ranks on one node: in shared mode the ranks' PSS grows by at most 1.25x one copy of the
    split in total (every page touched by every rank); private copies cost ~4x; streaming a
    whole epoch costs a fraction of one copy."""
    n = 60_000
    rng = np.random.default_rng(0)
    path = tmp_path / "synth.h5"
    images = rng.integers(0, 256, (n, 1, 28, 28), dtype=np.uint8)
    write_dataset(path, {"train": (images, rng.integers(0, 10, n))}, 10, {})
    got = {}
    for mode in ("shared", "private", "stream"):
        r = run_train([str(path), mode], ranks=4, module="tests.data_probe")
        assert r.returncode == 0, r.stderr
        got[mode] = json.loads(r.stdout.strip().splitlines()[-1])
    one_copy = got["shared"]["data_kb"]
    assert sum(got["shared"]["open_pss_kb"]) <= 1.25 * one_copy, got["shared"]
    assert sum(got["private"]["open_pss_kb"]) >= 3.5 * one_copy, got["private"]
    assert max(got["stream"]["epoch_pss_kb"]) <= 0.25 * one_copy, got["stream"]


def test_checkpoints_carry_the_fingerprint(tiny_data, tmp_path):
    """Root attribute dataset_fingerprint (JSON) round-trips, is covered by the attrs checksum,
    and a checkpoint without it loads with None."""
    import dataclasses

    from distcnn import checkpoint as ckpt
    from tests.test_checkpoint import make_ck

    fp = fingerprint(tiny_data)
    path = ckpt.save(
        tmp_path / "ckpt-00000005.h5", dataclasses.replace(make_ck(5), dataset_fingerprint=fp)
    )
    with h5py.File(path, "r") as f:
        assert json.loads(f.attrs["dataset_fingerprint"]) == fp
    assert ckpt.load(path).dataset_fingerprint == fp
    with h5py.File(path, "r+") as f:  # tampering with it breaks the attrs checksum
        f.attrs["dataset_fingerprint"] = json.dumps({**fp, "hash": "0" * 16})
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load(path)
    old = ckpt.save(tmp_path / "ckpt-00000006.h5", make_ck(6))
    assert ckpt.load(old).dataset_fingerprint is None


def test_importing_the_data_package_does_not_start_mpi():
    """`python -m distcnn.data info` and the readers must work where MPI cannot start."""
    code = "import sys, distcnn.data; print('mpi4py.MPI' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "False", out.stderr
