"""Measurements of the data side: random-read throughput per on-disk layout, and the data share
of a training step per --data-mode.

    python -m distcnn.data.bench layouts FILE.h5 [--rounds 5] [--seconds 1]
    python -m distcnn.data.bench share FILE.h5 [--steps 60] [--batch-size 128]

`layouts` copies the train images of FILE into several layouts (in a temporary directory) and
reads batches of 64 random samples from each, interleaved round by round so that the machine's
load hits every layout alike; it prints the median rows/s per layout, the file size, and the time
to read the whole split once (what --data-mode shared does at start-up).

`share` runs training steps of the reference model on one process in each mode and prints the
fraction of the step spent getting the batch (the gather, copy, normalisation and any wait for
the prefetch thread), medians of interleaved rounds. distcnn.bench calls `data_share`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distcnn.data.rows import RowReader

# name -> h5py create_dataset options for (N, C, H, W) images; row_bytes -> chunk rows
LAYOUTS: dict[str, Any] = {
    "sample (contiguous, uncompressed)": lambda rb: {},
    "compact (~1 MiB chunks, gzip-9)": lambda rb: {
        "chunks": max(1, (1 << 20) // rb),
        "compression": "gzip",
        "compression_opts": 9,
    },
    "1 image per chunk, gzip-4": lambda rb: {
        "chunks": 1,
        "compression": "gzip",
        "compression_opts": 4,
    },
    "~64 KiB chunks, gzip-4": lambda rb: {
        "chunks": max(1, (1 << 16) // rb),
        "compression": "gzip",
        "compression_opts": 4,
    },
}


def _write_layout(path: Path, images: np.ndarray, opts: dict) -> None:
    opts = dict(opts)
    if "chunks" in opts:
        opts["chunks"] = (min(opts["chunks"], len(images)), *images.shape[1:])
    with h5py.File(path, "w") as f:
        f.create_dataset("train/images", data=images, **opts)


def _random_read_rate(reader: Any, n: int, seconds: float, rng: np.random.Generator) -> float:
    """Rows per second reading batches of 64 random rows with `reader(rows, out)`."""
    out = np.empty((64, *reader.row_shape), dtype=reader.dtype)
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        reader.read(rng.integers(0, n, 64), out)
        done += 64
    return done / (time.perf_counter() - t0)


class _H5pyFancy:
    """The generic path for comparison: h5py's selection read of the sorted distinct rows."""

    def __init__(self, path: Path) -> None:
        self.file = h5py.File(path, "r")
        self.ds = self.file["train/images"]
        self.row_shape, self.dtype = self.ds.shape[1:], self.ds.dtype

    def read(self, rows: np.ndarray, out: np.ndarray) -> None:
        distinct, where = np.unique(rows, return_inverse=True)
        np.take(self.ds[distinct], where.reshape(-1), axis=0, out=out[: len(rows)])

    def close(self) -> None:
        self.file.close()


def layout_bench(src: str, rounds: int = 5, seconds: float = 1.0) -> list[dict[str, Any]]:
    """Median random-read rows/s per layout of src's train images (see the module docstring)."""
    with h5py.File(src, "r") as f:
        images = f["train/images"][()]
    n = len(images)
    rb = images[0].nbytes
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="distcnn-layouts-") as tmp:
        paths = {}
        for i, (name, opts) in enumerate(LAYOUTS.items()):
            paths[name] = Path(tmp) / f"layout{i}.h5"
            t = time.perf_counter()
            _write_layout(paths[name], images, opts(rb))
            results[name] = {
                "layout": name,
                "file_mb": paths[name].stat().st_size / 1e6,
                "write_s": time.perf_counter() - t,
                "rates": [],
                "whole_s": [],
            }
        fancy = "sample layout read by h5py selection (no preadv)"
        results[fancy] = {"layout": fancy, "file_mb": results[next(iter(LAYOUTS))]["file_mb"]}
        results[fancy].update(rates=[], whole_s=[], write_s=0.0)
        for _ in range(rounds):
            for name, path in paths.items():
                reader = RowReader(path, "train")
                results[name]["rates"].append(_random_read_rate(reader, n, seconds, rng))
                reader.close()
                t = time.perf_counter()
                with h5py.File(path, "r") as f:
                    f["train/images"].read_direct(np.empty_like(images))
                results[name]["whole_s"].append(time.perf_counter() - t)
            h = _H5pyFancy(paths[next(iter(LAYOUTS))])
            results[fancy]["rates"].append(_random_read_rate(h, n, seconds, rng))
            h.close()
    rows = []
    for r in results.values():
        r["rows_per_s"] = statistics.median(r["rates"])
        r["whole_split_s"] = statistics.median(r["whole_s"]) if r["whole_s"] else None
        rows.append(r)
    return rows


def data_share(
    path: str,
    mode: str,
    steps: int = 60,
    batch_size: int = 128,
    model_spec: str | None = None,
) -> dict[str, float]:
    """Seconds per step getting the batch vs the whole step, one process, in `mode`.

    The step is the trainer's own sequence on one rank: batch (this mode's split), forward and
    backward (loss_and_grad), SGD update. Returns {"data_s", "step_s", "share"}.
    """
    from distcnn.comm import Comm
    from distcnn.data.modes import open_data, rank_plan
    from distcnn.model import REFERENCE_SPEC, Model
    from distcnn.optim import SGD
    from distcnn.sampler import epoch_order, steps_per_epoch

    comm = Comm.world()
    data = open_data(path, comm, mode, max_rows=batch_size)
    train = data.train
    model = Model(model_spec or REFERENCE_SPEC, train.image_shape, train.num_classes, np.float32)
    model.init_params(0)
    opt = SGD(model.params, 0.9, 0.0)
    n = len(train)
    spe = steps_per_epoch(n, batch_size)
    train.prefetch(rank_plan(0, n, batch_size, 1, 0, 0))
    x = np.empty((batch_size, *train.image_shape), dtype=np.float32)
    t_data = t_all = 0.0
    order, epoch = None, -1
    for step in range(steps):
        e, b = divmod(step, spe)
        if e != epoch:
            epoch, order = e, epoch_order(0, e, n)
        idx = order[b * batch_size : (b + 1) * batch_size]
        t0 = time.perf_counter()
        xb = train.batch(idx, out=x, epoch=e)
        t1 = time.perf_counter()
        model.loss_and_grad(xb, train.labels[idx], scale=1.0 / len(idx))
        opt.step(model.grads, 0.01, 1.0)
        t2 = time.perf_counter()
        if step >= 5:  # warm-up: first touches, the prefetch ring filling
            t_data += t1 - t0
            t_all += t2 - t0
    data.close()
    measured = max(1, steps - 5)
    return {"data_s": t_data / measured, "step_s": t_all / measured, "share": t_data / t_all}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distcnn.data.bench", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    lay = sub.add_parser("layouts", help="random-read throughput per layout")
    lay.add_argument("file")
    lay.add_argument("--rounds", type=int, default=5)
    lay.add_argument("--seconds", type=float, default=1.0)
    sh = sub.add_parser("share", help="data share of the step per mode")
    sh.add_argument("file")
    sh.add_argument("--steps", type=int, default=60)
    sh.add_argument("--batch-size", type=int, default=128)
    sh.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    print(f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cpus")
    if args.cmd == "layouts":
        rows = layout_bench(args.file, args.rounds, args.seconds)
        base = rows[0]["rows_per_s"]
        print(f"{'layout':<52}{'MB':>8}{'rows/s':>11}{'vs sample':>10}{'whole s':>9}")
        for r in rows:
            whole = f"{r['whole_split_s']:.3f}" if r["whole_split_s"] is not None else "-"
            print(
                f"{r['layout']:<52}{r['file_mb']:>8.1f}{r['rows_per_s']:>11.0f}"
                f"{r['rows_per_s'] / base:>10.3f}{whole:>9}"
            )
            print(f"  raw rows/s per round: {[round(x) for x in r['rates']]}")
        return 0
    shares: dict[str, list[dict[str, float]]] = {"shared": [], "stream": []}
    for _ in range(args.rounds):
        for mode in shares:
            shares[mode].append(data_share(args.file, mode, args.steps, args.batch_size))
    print(f"{'mode':<8}{'data ms':>9}{'step ms':>9}{'share':>8}   (medians of {args.rounds})")
    for mode, rs in shares.items():
        d = statistics.median(r["data_s"] for r in rs) * 1e3
        s = statistics.median(r["step_s"] for r in rs) * 1e3
        sh = statistics.median(r["share"] for r in rs)
        print(f"{mode:<8}{d:>9.2f}{s:>9.2f}{sh:>8.1%}")
        print(f"  raw shares: {[round(r['share'], 4) for r in rs]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
