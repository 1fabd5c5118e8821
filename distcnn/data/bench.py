"""Measurements of the data side: random-read throughput per on-disk layout, and the data share
of a training step per --data-mode.

    python -m distcnn.data.bench layouts FILE.h5 [--rounds 5] [--seconds 1]
    python -m distcnn.data.bench share FILE.h5 [--steps 60] [--batch-size 128]
    python -m distcnn.data.bench stream-demo DIR [--gb 2.2] [--ranks 2] [--steps 200]

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


def share_report(steps: int = 60, rounds: int = 1, timeout: float = 900) -> list[str]:
    """Lines for distcnn.bench: the data share of the step per --data-mode on the shipped
    dataset's train split (copied to a temporary file in the sample layout), measured by
    `python -m distcnn.data.bench share` in a fresh process."""
    import subprocess

    from distcnn.data import DEFAULT_DATASET, write_dataset

    if not DEFAULT_DATASET.exists():
        return [f"data share per mode: skipped ({DEFAULT_DATASET.name} is not built)"]
    with h5py.File(DEFAULT_DATASET, "r") as f:
        train = (f["train/images"][()], f["train/labels"][()])
        k = int(f.attrs["num_classes"])
        stats = {a: f.attrs[a] for a in ("mean", "std") if a in f.attrs}
    with tempfile.TemporaryDirectory(prefix="distcnn-share-") as tmp:
        path = Path(tmp) / "train.h5"
        write_dataset(path, {"train": train}, k, stats)
        cmd = [sys.executable, "-m", "distcnn.data.bench", "share", str(path)]
        cmd += ["--steps", str(steps), "--rounds", str(rounds)]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return ["data share per mode: timed out"]
    if out.returncode != 0:
        return [f"data share per mode: failed ({out.stderr.strip().splitlines()[-1:]})"]
    head = f"data share of the step per --data-mode ({len(train[1])} train images, 1 process):"
    return [head] + ["  " + line for line in out.stdout.strip().splitlines()]


DEMO_SPEC = "conv:8:3,relu,maxpool:2,conv:16:3,relu,maxpool:2,flatten,dense:32,relu,dense"


def make_big_dataset(path: Path, gb: float, block: int = 20_000) -> int:
    """A synthetic 10-class dataset of 3x32x32 uint8 images, `gb` GB of train images (a class
    brightens one band of rows, so it is learnable), written block by block in the sample
    layout; 2,000 test images. Returns the number of train images."""
    from distcnn.data import write_dataset

    shape = (3, 32, 32)
    n = int(gb * 1e9) // int(np.prod(shape))
    rng = np.random.default_rng(0)

    def block_of(k: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, 10, k)
        images = rng.integers(0, 90, (k, *shape), dtype=np.uint8)
        for c in range(10):
            images[labels == c, :, 3 * c : 3 * c + 3, :] += 150
        return images, labels

    write_dataset(path, {"train": block_of(1), "test": block_of(2000)}, 10, {"source": "synthetic"})
    with h5py.File(path, "r+") as f:  # grow train to n rows in place (contiguous, uncompressed)
        del f["train"]
        g = f.create_group("train")
        images = g.create_dataset("images", shape=(n, *shape), dtype=np.uint8)
        labels = g.create_dataset("labels", shape=(n,), dtype=np.int64)
        for a in range(0, n, block):
            im, lab = block_of(min(block, n - a))
            images[a : a + len(im)] = im
            labels[a : a + len(im)] = lab
    return n


def _peak_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def train_with_peak_rss(argv: list[str]) -> int:
    """Run distcnn.train in this process, then print this rank's peak RSS (VmHWM) as one line
    `peak_rss_mb <rank> <MB>` on stdout (every rank prints its own)."""
    from mpi4py import MPI

    from distcnn import train

    code = train.main(argv)
    print(f"peak_rss_mb {MPI.COMM_WORLD.Get_rank()} {_peak_rss_mb():.1f}", flush=True)
    return code


def stream_demo(directory: str, gb: float, ranks: int, steps: int) -> int:
    """Train on a dataset at least 4x larger than a rank may use, streaming it, and check the
    peak RSS of every rank against a quarter of the train images' size."""
    import json
    import subprocess

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / "big.h5"
    if not path.exists():
        t = time.perf_counter()
        n = make_big_dataset(path, gb)
        print(f"wrote {path}: {n} train images 3x32x32 in {time.perf_counter() - t:.0f} s")
    with h5py.File(path, "r") as f:
        n = f["train/images"].shape[0]
        image_mb = f["train/images"].nbytes / 1e6
    limit_mb = image_mb / 4
    run = d / "run"
    log = d / "metrics.jsonl"
    log.unlink(missing_ok=True)
    mpirun = Path(sys.executable).parent / "mpirun"
    cmd = [str(mpirun if mpirun.exists() else "mpirun"), "-n", str(ranks), sys.executable]
    cmd += ["-m", "distcnn.data.bench", "train-rss", "--data", str(path), "--model", DEMO_SPEC]
    cmd += ["--data-budget", f"{limit_mb:.0f}", "--batch-size", "128", "--max-steps", str(steps)]
    cmd += ["--checkpoint-dir", str(run), "--log", str(log), "--no-progress", "--lr", "0.02"]
    cmd += ["--eval-batch-size", "500"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("$ " + " ".join(cmd))
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    sys.stdout.write(out.stdout)
    sys.stderr.write(out.stderr[-2000:])
    peaks = {}
    for line in out.stdout.splitlines():
        if line.startswith("peak_rss_mb "):
            _, r, mb = line.split()
            peaks[int(r)] = float(mb)
    recs = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    phases = [r["phase_seconds"] for r in recs if r.get("kind") == "step" and r["step"] > 20]
    share = None
    if phases:
        data_s = sum(p["data"] for p in phases)
        share = data_s / sum(sum(p.values()) for p in phases)
    print(
        f"train images {n} ({image_mb:.0f} MB), {ranks} rank(s), {steps} steps in {wall:.0f} s; "
        f"allowed per rank: {limit_mb:.0f} MB (a quarter of the images); peak RSS per rank: "
        + ", ".join(f"rank {r} {mb:.0f} MB" for r, mb in sorted(peaks.items()))
        + (f"; data share of the step (rank 0, after step 20): {share:.1%}" if share else "")
    )
    ok = out.returncode == 0 and len(peaks) == ranks and max(peaks.values()) < limit_mb
    print("OK: every rank stayed under the limit" if ok else "FAILED")
    return 0 if ok else 1


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
    demo = sub.add_parser("stream-demo", help="train streaming a dataset 4x a rank's memory")
    demo.add_argument("dir", help="where the synthetic file and the run go")
    demo.add_argument("--gb", type=float, default=2.2, help="GB of train images")
    demo.add_argument("--ranks", type=int, default=2)
    demo.add_argument("--steps", type=int, default=200)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train-rss"]:  # internal: one rank of stream-demo
        return train_with_peak_rss(argv[1:])
    args = p.parse_args(argv)
    if args.cmd == "stream-demo":
        return stream_demo(args.dir, args.gb, args.ranks, args.steps)
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
