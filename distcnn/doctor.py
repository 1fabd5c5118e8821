"""`python -m distcnn.doctor [TRAIN_FLAGS]`: a preflight check, under the same launcher line as
the training it precedes (`mpirun -f hosts -n 16 python -m distcnn.doctor --data ... `).

Every rank reports what it sees; rank 0 prints one table and a verdict:
- per rank: host, PID, local rank, BLAS threads, MPI library, versions (distcnn, Python,
  NumPy, mpi4py), whether its --data is readable and its fingerprint;
- the node layout (ranks per host) and the gradient allreduce path training will take (the
  same decision the trainer makes, start-up measurement included);
- rank 0: whether --checkpoint-dir is writable (or creatable) and its free space, proved with
  a probe file removed at once (in the nearest existing parent when the directory is missing);
- the measured allreduce of 8 bytes (latency) and of the gradient (time, bandwidth);
- a scaling prediction (distcnn.scaling; `--no-scaling` skips it): alpha/beta fitted to
  allreduces of several sizes, the compute time per step measured with every rank computing at
  once, and the predicted efficiency and images/s at 8-256 ranks for per-rank batches 16/64/256,
  for the measured network and standard presets.

Exit code: 0 when the verdict is OK; 1 when a rank disagrees with rank 0 (config, model,
dataset contents, versions) or a check failed (unreadable dataset, unwritable checkpoint dir),
each reason on its own `problem:` line and the last line `verdict: ...`; 2 for bad flags. It does
not train and leaves no file behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from distcnn.errors import UsageError

SIZES = (8, 1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)  # bytes, for the alpha/beta fit
REPEATS = 15  # allreduces per size (the median is kept)


def _blas_threads() -> int | None:
    try:
        from threadpoolctl import threadpool_info

        counts = [int(p["num_threads"]) for p in threadpool_info() if p.get("user_api") == "blas"]
        return max(counts) if counts else None
    except Exception:  # threadpoolctl cannot tell: reported as unknown
        return None


def checkpoint_dir_report(path: str) -> tuple[str, str | None]:
    """(a description, a problem or None) for --checkpoint-dir, without creating anything."""
    d = Path(path)
    probe_dir = d
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return f"{path}: {probe_dir} is not a directory", f"--checkpoint-dir {path} is unusable"
    try:
        fd, probe = tempfile.mkstemp(prefix=".doctor-", suffix=".tmp", dir=probe_dir)
        os.close(fd)
        os.unlink(probe)
        writable = True
    except OSError:
        writable = False
    free = shutil.disk_usage(probe_dir).free
    where = "exists" if d.exists() else f"will be created in {probe_dir}"
    desc = f"{path} ({where}): {'writable' if writable else 'NOT writable'}, "
    desc += f"{free / 2**30:.1f} GiB free"
    problem = None if writable else f"--checkpoint-dir {path} is not writable by rank 0"
    return desc, problem


def _median_seconds(run: Any, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def measure_compute(model: Any, train: Any, batch: int, comm: Any, repeats: int = 3) -> float:
    """MPI: median seconds of one step's local work on `batch` samples (building the batch,
    forward + backward, the SGD update), every rank at once (so ranks sharing cores are measured
    as training runs them); the slowest rank's."""
    import numpy as np

    from distcnn.optim import SGD

    opt = SGD(model.params, 0.9, 0.0)
    idx = np.arange(batch) % len(train)
    xbuf = np.empty((batch, *train.image_shape), dtype=np.float32)
    labels = train.labels[idx]

    def step() -> None:
        x = train.batch(idx, out=xbuf)
        model.loss_and_grad(x, labels, scale=1.0 / batch)
        opt.step(model.grads, 1e-9, 1.0)

    step()  # warm-up
    comm.guard("doctor compute")
    med = _median_seconds(step, repeats)
    return float(max(comm.gather_objects(med, "doctor compute timing")))


def _short_mpi(lib: str) -> str:
    return lib.replace("Version:", "").replace("  ", " ").strip()


def main(argv: list[str] | None = None) -> int:
    try:  # mpi4py's MPI, or a one-process stand-in when no MPI library is installed
        from distcnn.mpienv import MPI
    except UsageError as e:  # several ranks launched, no MPI library: what to install
        if getattr(e, "rank", 0) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    from distcnn import agree, config

    argv = list(sys.argv[1:] if argv is None else argv)
    scaling = "--no-scaling" not in argv
    argv = [a for a in argv if a != "--no-scaling"]
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    err, flags = None, {}
    try:
        with contextlib.redirect_stdout(io.StringIO() if rank else sys.stdout):
            flags = config.parse_flags(argv)
    except UsageError as e:
        err = str(e)
    err, _ = agree.early_settle(world, err, config.DEFAULTS["collective_timeout"])
    if err:
        if rank == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    from distcnn import threads

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    n_threads, source = threads.choose(flags.get("threads"), node.Get_size())
    node.Free()
    threads.apply(n_threads)
    from distcnn.comm import Comm, run_or_abort

    timeout = flags.get("collective_timeout", 120.0)
    comm = Comm(world, timeout=timeout)
    return run_or_abort(lambda: _run(flags, comm, scaling, f"{n_threads} ({source})"), comm)


def _run(flags: dict[str, Any], comm: Any, scaling: bool, thread_choice: str) -> int:
    from distcnn import agree, config

    problems: list[str] = []
    notes: list[str] = []
    err = None
    cfg = None
    try:
        cfg, _ = config.resolve({k: v for k, v in flags.items() if k != "resume"})
    except UsageError as e:
        err = str(e)
    verdict, table = agree.check(comm, cfg, err)  # MPI: the same comparison training makes
    if verdict:
        problems.append(verdict)
    lr = agree.local_rank(comm)
    mine: dict[str, Any] = {
        "blas": _blas_threads(),
        "threads": thread_choice,
        "mpi": _short_mpi(agree.mpi_library()),
        "versions": agree.versions(),
    }
    if cfg is not None:
        f = agree.facts(cfg, lr)
        mine["dataset_ok"] = f["error"] is None
        mine["dataset"] = f.get("dataset")
        mine["dataset_error"] = f["error"]
        mine["parameters"] = f.get("parameters")
    every = comm.gather_objects(mine, "doctor facts")  # MPI
    out: list[str] = []
    if comm.rank == 0:
        out.append(f"distcnn doctor: {comm.size} rank(s)")
        out.append(
            f"{'rank':<5}{'host':<22}{'pid':>8} {'local':>5} {'blas':>4}  {'MPI library':<22}"
            f"{'versions (distcnn/python/numpy/mpi4py)':<40}dataset"
        )
        for r, (line, f) in enumerate(zip(table[1:], every, strict=False)):
            host, pid, local = line.split()[3], line.split()[5], line.split()[7]
            v = f["versions"]
            vs = f"{v['distcnn']}/{v['python']}/{v['numpy']}/{v['mpi4py']}"
            if "dataset_ok" not in f:
                ds = "not checked (bad flags)"
            elif f["dataset_ok"] and f["dataset"]:
                ds = f"readable, fingerprint {f['dataset']['hash']}"
            else:
                ds = f"UNREADABLE: {f['dataset_error']}"
            blas = f["blas"] if f["blas"] is not None else "?"
            out.append(
                f"{r:<5}{host:<22}{pid:>8} {local:>5} {blas:>4}  {f['mpi'][:21]:<22}{vs:<40}{ds}"
            )
    # MPI: the node layout and the path training's gradient allreduce takes
    hosts = comm.gather_objects(table[1 + comm.rank].split()[3] if table else "", "doctor hosts")
    params = (every[0].get("parameters") if every else None) or 0
    n = params + 3  # the trainer reduces [gradient | loss | correct | stop]
    path, grad_s, small_s = "none (1 rank)", None, None
    if comm.size > 1 and not problems:
        buf = comm.reduce_buffer(n)
        path = comm.allreduce_path
        import numpy as np

        buf[...] = 1.0
        comm.allreduce_sum_view(buf, "doctor gradient allreduce (warm-up)")
        grad_s = _median_seconds(
            lambda: comm.allreduce_sum_view(buf, "doctor gradient allreduce"), REPEATS
        )
        comm.close()
        small = np.ones(2, dtype=np.float32)
        small_s = _median_seconds(lambda: comm.allreduce_sum(small, "doctor 8-byte"), REPEATS)
        grad_s = max(comm.gather_objects(grad_s, "doctor timing"))
        small_s = max(comm.gather_objects(small_s, "doctor timing"))
    if comm.rank == 0:
        layout: dict[str, list[int]] = {}
        for r, h in enumerate(hosts):
            layout.setdefault(h, []).append(r)
        parts = [f"{h} ({_ranks(rs)})" for h, rs in layout.items()]
        sizes = sorted({len(rs) for rs in layout.values()})
        shape = f"{len(layout)} node(s) x {sizes[0]} rank(s)" if len(sizes) == 1 else "uneven"
        out.append(f"nodes: {', '.join(parts)}: {shape}")
        if len(sizes) > 1:
            notes.append("nodes hold different numbers of ranks: the gradient goes plain MPI")
        out.append(f"threads per rank: {thread_choice}")
        out.append(f"gradient allreduce: {path}")
        if cfg is not None:
            desc, problem = checkpoint_dir_report(cfg.checkpoint_dir)
            out.append(f"checkpoint dir (rank 0, {hosts[0]}): {desc}")
            if problem:
                problems.append(problem)
        if grad_s is not None and small_s is not None:
            nbytes = 4 * n
            out.append(f"allreduce of 8 bytes: {small_s * 1e3:.3f} ms (latency, median)")
            out.append(
                f"allreduce of the gradient ({params:,} parameters, {nbytes / 1e6:.2f} MB): "
                f"{grad_s * 1e3:.3f} ms, {nbytes / grad_s / 1e6:.1f} MB/s algorithmic bandwidth "
                f"({2 * (comm.size - 1) / comm.size * nbytes / grad_s / 1e6:.1f} MB/s bus)"
            )
        print("\n".join(out), flush=True)
    if scaling and cfg is not None and not problems:
        _scaling(comm, cfg)
    if comm.rank == 0:
        for note in notes:
            print(f"note: {note}")
        for p in problems:
            print(f"problem: {p}")
        if problems:
            print(f"verdict: NOT READY - {len(problems)} problem(s) above; fix them and rerun")
        else:
            print(f"verdict: OK - {comm.size} rank(s) agree and can train")
        sys.stdout.flush()
    return 1 if problems else 0


def _ranks(rs: list[int]) -> str:
    if len(rs) > 1 and rs == list(range(rs[0], rs[-1] + 1)):
        return f"ranks {rs[0]}-{rs[-1]}"
    return "rank " + ",".join(map(str, rs)) if len(rs) == 1 else "ranks " + ",".join(map(str, rs))


def _scaling(comm: Any, cfg: Any) -> None:
    """MPI: the alpha/beta fit, the compute time per step, and the predicted scaling."""
    import numpy as np

    from distcnn import data as datamod
    from distcnn import scaling
    from distcnn.model import REFERENCE_SPEC, Model

    train = datamod.load_split(cfg.data or str(datamod.DEFAULT_DATASET), "train")
    model = Model(cfg.model or REFERENCE_SPEC, train.image_shape, train.num_classes)
    model.init_params(0)
    compute = {b: measure_compute(model, train, b, comm) for b in scaling.BATCHES}
    grad_bytes = 4 * (model.num_params + 3)
    nets = list(scaling.PRESETS)
    fit = None
    times: list[float] = []
    if comm.size > 1:
        for s in SIZES:
            buf = np.ones(s // 4 if s >= 4 else 1, dtype=np.float32)
            comm.allreduce_sum(buf, "doctor fit (warm-up)")
            t = _median_seconds(lambda b=buf: comm.allreduce_sum(b, "doctor fit"), REPEATS)
            times.append(max(comm.gather_objects(t, "doctor fit timing")))
        fit = scaling.fit_alpha_beta(SIZES, times, comm.size, f"measured here ({comm.size} ranks)")
        nets.insert(0, fit)
    if comm.rank != 0:
        return
    print("scaling prediction (distcnn.scaling; docs/mpi.md says how close it is)")
    if times:
        print(
            "  allreduce measured: "
            + ", ".join(f"{_bytes(s)} {t * 1e3:.3f} ms" for s, t in zip(SIZES, times, strict=True))
        )
    print(
        "  compute per step (every rank at once): "
        + ", ".join(f"batch {b}: {t * 1e3:.2f} ms" for b, t in compute.items())
        + " (batch, forward + backward, SGD update)"
    )
    if fit is not None and comm.size > 1:
        here = scaling.predict(fit, compute, grad_bytes, [comm.size])
        print(
            f"  predicted here, {comm.size} ranks: "
            + ", ".join(f"batch {p.batch}: {p.images_per_sec:,.0f} img/s" for p in here)
        )
    print(scaling.table(nets, compute, grad_bytes))
    print(
        json.dumps(
            {
                "kind": "scaling",
                "ranks": comm.size,
                "grad_bytes": grad_bytes,
                "compute_seconds": compute,
                "allreduce_seconds": dict(zip(SIZES, times, strict=False)),
                "alpha": fit.alpha if fit else None,
                "beta": fit.beta if fit else None,
            }
        )
    )


def _bytes(n: int) -> str:
    for unit, k in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n // k} {unit}"
    return f"{n} B"


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
