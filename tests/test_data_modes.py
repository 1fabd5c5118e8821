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
from distcnn.data import fingerprint, write_dataset
from distcnn.data.fingerprints import sample_rows
from distcnn.errors import UsageError
from tests.conftest import ROOT, make_images


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
