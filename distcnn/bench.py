"""Throughput benchmark: distcnn vs PyTorch on the reference model, side by side in one run.

    python -m distcnn.bench               # a few minutes: everything below
    python -m distcnn.bench --quick       # under a minute: one round, shorter windows
    mpirun -n 2 python -m distcnn.bench --mpi   # just the multi-rank measurement, in place

Every setting runs in a fresh process (`--worker`, one JSON line back), settings are interleaved
over `--repeats` rounds and the medians are printed. A worker sets its BLAS threads before NumPy
loads (distcnn.threads). A distcnn train step is the Trainer's: gather the batch from a uint8
Split, loss_and_grad, one allreduce of [gradient | loss | correct | flag] through distcnn.comm,
SGD with momentum and weight decay. PyTorch, when importable, runs the same network, batch and
thread count in its own process with glibc allocator settings that spare it page faults
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_); distcnn workers run without them.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from distcnn import threads as threadsmod

TORCH_ENV = {"MALLOC_MMAP_THRESHOLD_": "33554432", "MALLOC_TRIM_THRESHOLD_": "4294967296"}
TABLE_BATCHES = (16, 32, 64, 128, 256, 512)
TABLE_PIXELS = (28, 56, 112)
PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


# -- measurements (run inside worker processes) ------------------------------------------------


def _memory_mib() -> tuple[float, float]:
    """(VmHWM, VmRSS) of this process in MiB: the resident high-water mark and current size."""
    fields = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                fields[key] = int(rest.split()[0]) / 1024
    except OSError:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        return peak, peak
    return fields.get("VmHWM", 0.0), fields.get("VmRSS", 0.0)


def _timed_steps(step: Any, seconds: float, min_steps: int, comm: Any = None) -> tuple[int, float]:
    """Run `step` until `seconds` have passed (at least min_steps); with a multi-rank comm the
    count is decided on rank 0 from a calibration step and broadcast, so every rank makes the
    same collectives. Returns (steps, wall seconds)."""
    t0 = time.perf_counter()
    step()
    one = time.perf_counter() - t0
    steps = max(min_steps, int(seconds / max(one, 1e-6)))
    if comm is not None and comm.size > 1:
        steps = comm.bcast_object(steps, 0, "bench step count")
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps, time.perf_counter() - t0


def measure_distcnn(cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer-style train steps (and forward-only evaluation) of the reference model."""
    import numpy as np

    from distcnn.comm import Comm
    from distcnn.data import Split
    from distcnn.model import REFERENCE_SPEC, Model
    from distcnn.optim import SGD
    from distcnn.sampler import shard_bounds

    comm = Comm.world(timeout=600)
    px, per_rank = cfg["px"], cfg["batch"]
    global_batch = per_rank * comm.size
    rng = np.random.default_rng(1234)
    n_data = max(4 * global_batch, 1024)
    images = rng.integers(0, 256, size=(n_data, 1, px, px), dtype=np.uint8)  # (N, 1, px, px)
    labels = rng.integers(0, 10, size=n_data).astype(np.int64)
    split = Split(
        images, labels, 10, np.array([0.1307], np.float32), np.array([0.3081], np.float32)
    )
    model = Model(
        REFERENCE_SPEC, (1, px, px), 10, np.float32, grad_extra=3, grad_alloc=comm.reduce_buffer
    )
    model.init_params(0)
    opt = SGD(model.params, 0.9, 5e-4)
    red, n_params = model.grad_buffer, model.num_params
    xbuf = np.empty((per_rank, 1, px, px), dtype=np.float32)  # (B, C, H, W)
    order = rng.permutation(n_data)
    lo, hi = shard_bounds(global_batch, comm.size, comm.rank)
    timers = {"data": 0.0, "comm": 0.0}
    pos = [0]

    def train_step() -> None:
        start = pos[0]
        pos[0] = (start + global_batch) % (n_data - global_batch)
        idx = order[start : start + global_batch][lo:hi]
        t = time.perf_counter()
        x = split.batch(idx, out=xbuf)
        timers["data"] += time.perf_counter() - t
        loss, correct = model.loss_and_grad(x, split.labels[idx], scale=1.0 / global_batch)
        red[n_params], red[n_params + 1], red[n_params + 2] = loss, correct, 0.0
        t = time.perf_counter()
        total = comm.allreduce_sum_view(red, "bench gradient allreduce")  # MPI: as in the Trainer
        timers["comm"] += time.perf_counter() - t
        opt.step(total[:n_params], 0.01)

    for _ in range(cfg.get("warmup", 2)):
        train_step()
    hwm_warm, rss_warm = _memory_mib()
    timers.update(data=0.0, comm=0.0)
    steps, wall = _timed_steps(train_step, cfg["seconds"], cfg.get("min_steps", 3), comm)
    # the calibration step is outside `wall`, so scale the phase timers to the timed steps
    share = steps / (steps + 1)
    hwm_end, rss_end = _memory_mib()
    out: dict[str, Any] = {
        "train_ips": steps * per_rank / wall,
        "step_ms": 1e3 * wall / steps,
        "data_share": timers["data"] * share / wall,
        "comm_share": timers["comm"] * share / wall,
        "hwm_warm": hwm_warm,
        "hwm_end": hwm_end,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "steps": steps,
        "flops_per_image": 3 * model.flops_per_sample(),
    }
    if cfg.get("eval") and comm.size == 1:

        def eval_step() -> None:
            model.evaluate(xbuf, split.labels[:per_rank])

        eval_step()
        e_steps, e_wall = _timed_steps(eval_step, cfg["seconds"] / 2, 3)
        out["eval_ips"] = e_steps * per_rank / e_wall
        out["hwm_eval"] = _memory_mib()[0]
    if comm.size > 1:
        ranks = comm.gather_objects(out, "bench results")
        out = {"ranks": ranks, "rank": comm.rank, "allreduce": comm.allreduce_path}
    if comm.rank == 0:
        import threadpoolctl

        info = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
        out["blas"] = (
            f"{info[0].get('internal_api')} {info[0].get('version')} "
            f"{info[0].get('architecture')}, {info[0].get('num_threads')} thread(s)"
            if info
            else "unknown"
        )
    return out


def measure_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same network, batch and threads in PyTorch: train steps (SGD) and evaluation."""
    import torch
    from torch import nn

    torch.set_num_threads(cfg["threads"])
    px, batch = cfg["px"], cfg["batch"]
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * (px // 4) ** 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )  # fmt: skip
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()
    x = torch.randn(batch, 1, px, px)
    y = torch.randint(0, 10, (batch,))

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad():
            net(x).argmax(1)

    for _ in range(cfg.get("warmup", 2)):
        train_step()
    steps, wall = _timed_steps(train_step, cfg["seconds"], cfg.get("min_steps", 3))
    out = {"train_ips": steps * batch / wall, "hwm_end": _memory_mib()[0]}
    eval_step()
    e_steps, e_wall = _timed_steps(eval_step, cfg["seconds"] / 2, 3)
    out["eval_ips"] = e_steps * batch / e_wall
    out["torch"] = torch.__version__
    return out


def measure_gemm(cfg: dict[str, Any]) -> dict[str, Any]:
    """NumPy float32 GEMM GFLOP/s at n x n x n: the machine's ceiling for this thread count."""
    import numpy as np

    n = cfg["n"]
    rng = np.random.default_rng(0)
    a = rng.random((n, n), dtype=np.float32)
    b = rng.random((n, n), dtype=np.float32)
    c = np.empty((n, n), dtype=np.float32)
    np.matmul(a, b, out=c)
    steps, wall = _timed_steps(lambda: np.matmul(a, b, out=c), cfg["seconds"], 3)
    return {"gflops": 2 * n**3 * steps / wall / 1e9}


MEASURES = {"distcnn": measure_distcnn, "torch": measure_torch, "gemm": measure_gemm}


def worker(cfg: dict[str, Any]) -> None:
    """Entry point of one measurement process: prints `BENCH <json>` on rank 0."""
    out = MEASURES[cfg["kind"]](cfg)
    rank = int(os.environ.get("PMI_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "0")))
    if rank == 0:
        print("BENCH " + json.dumps(out), flush=True)


# -- the driver --------------------------------------------------------------------------------


def _mpirun() -> str | None:
    beside = Path(sys.executable).with_name("mpirun")
    return str(beside) if beside.exists() else shutil.which("mpirun")


def run_setting(cfg: dict[str, Any], ranks: int = 1, timeout: float = 600) -> dict[str, Any]:
    """One setting in a fresh process (or `ranks` processes under mpirun); {} if it failed."""
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV}
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(cfg["threads"])
    if cfg["kind"] == "torch":
        env.update(TORCH_ENV)
    env.update(cfg.get("env", {}))
    cmd = [sys.executable, "-m", "distcnn.bench", "--worker", json.dumps(cfg)]
    if ranks > 1:
        mpirun = _mpirun()
        if mpirun is None:
            return {}
        cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpi4py"] + cmd[1:]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    err = proc.stderr.strip().splitlines()[-1:] or ["no output"]
    print(f"  (setting {cfg} failed: {err[0]})", file=sys.stderr)
    return {}


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in results if r and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distcnn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, short windows (< 1 minute)")
    p.add_argument("--smoke", action="store_true", help="tiny run that only checks the plumbing")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads of the main comparison")
    p.add_argument("--batch", type=int, default=64, help="batch (per rank) of the main comparison")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--mpi", action="store_true", help="under mpirun: measure these ranks only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        cfg = json.loads(args.worker)
        threadsmod.apply(cfg["threads"])  # before NumPy loads
        worker(cfg)
        return 0
    for flag in ("threads", "batch", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} {value} is not a positive count; use 1 or more")
    if args.mpi:
        threadsmod.apply(args.threads)
        cfg = {"kind": "distcnn", "threads": args.threads, "batch": args.batch, "px": 28,
               "seconds": 1.0 if args.quick else 2.0}  # fmt: skip
        out = measure_distcnn(cfg)
        if out.get("rank", 0) != 0:  # only rank 0 prints
            return 0
        if "ranks" in out:
            _print_mpi(out["ranks"], args.batch)
        elif out:
            print(f"1 rank: {out['train_ips']:,.0f} images/s, comm {100 * out['comm_share']:.1f} %")
        return 0
    return drive(args)


def _print_mpi(ranks: list[dict[str, Any]], batch: int) -> None:
    total = sum(r["train_ips"] for r in ranks)
    print(f"{len(ranks)} ranks x batch {batch}: {total:,.0f} images/s in all")
    for i, r in enumerate(ranks):
        print(
            f"  rank {i}: {r['train_ips']:,.0f} images/s, step {r['step_ms']:.2f} ms, "
            f"communication {100 * r['comm_share']:.1f} % of the step, "
            f"peak RSS {r['hwm_end']:.0f} MiB"
        )


def drive(args: argparse.Namespace) -> int:
    quick, smoke = args.quick or args.smoke, args.smoke
    rounds = args.repeats or (1 if quick else 3)
    secs = 0.3 if smoke else (0.8 if quick else 1.5)
    t_main, b_main = args.threads, args.batch
    torch_ok = not args.no_torch and not smoke and importlib.util.find_spec("torch") is not None
    mpi_ok = not smoke and _mpirun() is not None
    base = {"px": 28, "seconds": secs}
    settings: dict[str, tuple[dict[str, Any], int]] = {
        "main": ({**base, "kind": "distcnn", "threads": t_main, "batch": b_main, "eval": True}, 1),
        "gemm": ({"kind": "gemm", "threads": t_main, "n": 256 if smoke else 1024,
                  "seconds": secs / 2}, 1),
        "mem512": ({**base, "kind": "distcnn", "threads": 1, "batch": 512, "warmup": 2,
                    "min_steps": 2, "seconds": secs / 2}, 1),
    }  # fmt: skip
    if t_main != 1:
        settings["one"] = ({**base, "kind": "distcnn", "threads": 1, "batch": b_main}, 1)
    if torch_ok:
        settings["torch"] = ({**base, "kind": "torch", "threads": t_main, "batch": b_main}, 1)
    if mpi_ok:
        settings["mpi2"] = ({**base, "kind": "distcnn", "threads": 1, "batch": b_main}, 2)
        settings["mpi2plain"] = (
            {**base, "kind": "distcnn", "threads": 1, "batch": b_main,
             "env": {"DISTCNN_ALLREDUCE": "mpi"}},
            2,
        )  # fmt: skip
        settings["gemm2"] = ({"kind": "gemm", "threads": 2, "n": 1024, "seconds": secs / 2}, 1)
        if torch_ok:
            settings["torch2"] = (
                {**base, "kind": "torch", "threads": 2, "batch": 2 * b_main},
                1,
            )
    batches = (16,) if smoke else TABLE_BATCHES
    pixels = (28,) if smoke else TABLE_PIXELS
    for b in batches:
        for px in pixels:
            settings[f"t{b}x{px}"] = (
                {"kind": "distcnn", "threads": t_main, "batch": b, "px": px, "warmup": 1,
                 "min_steps": 1 if quick else 2, "seconds": secs / 3},
                1,
            )  # fmt: skip
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    t_start = time.perf_counter()
    print(
        f"distcnn bench: {len(settings)} settings x {rounds} round(s), each in a fresh process",
        file=sys.stderr,
        flush=True,
    )
    for r in range(rounds):
        keys = list(settings) if r % 2 == 0 else list(reversed(settings))  # interleaved
        for key in keys:
            cfg, ranks = settings[key]
            results[key].append(run_setting(cfg, ranks))
    report(results, args, rounds, torch_ok, mpi_ok, batches, pixels)
    print(f"\n(bench took {time.perf_counter() - t_start:.0f} s)")
    return 0


def report(
    res: dict[str, list[dict[str, Any]]],
    args: argparse.Namespace,
    rounds: int,
    torch_ok: bool,
    mpi_ok: bool,
    batches: tuple[int, ...],
    pixels: tuple[int, ...],
) -> None:
    t, b = args.threads, args.batch
    main_runs = res["main"]
    m = lambda key, name: _median(res.get(key, []), name)  # noqa: E731
    blas = next((r["blas"] for r in main_runs if r.get("blas")), "unknown")
    fpi = next((r["flops_per_image"] for r in main_runs if r.get("flops_per_image")), None)
    print(f"distcnn bench - reference model, 28x28x1, float32; medians of {rounds} round(s),")
    print("every setting in a fresh process, rounds interleaved")
    print(f"BLAS: {blas}; OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}")
    if fpi:
        print(f"train step FLOPs per image: {fpi / 1e6:.2f} M (3 x Model.flops_per_sample())")

    print(f"\n== Train step, 1 process, {t} thread(s), batch {b} ==")
    ips, tips = m("main", "train_ips"), m("torch", "train_ips")
    gf = m("gemm", "gflops")
    ceil = gf * 1e9 / fpi if gf and fpi else None
    print(f"{'':24s}{'images/s':>12s}{'eval images/s':>15s}")
    print(f"{'distcnn':24s}{_fmt(ips):>12s}{_fmt(m('main', 'eval_ips')):>15s}")
    if torch_ok:
        print(
            f"{'PyTorch (allocator env)':24s}{_fmt(tips):>12s}{_fmt(m('torch', 'eval_ips')):>15s}"
        )
        print(f"{'distcnn / PyTorch':24s}{_ratio(ips, tips):>12s}")
    else:
        print("PyTorch: not importable (or --no-torch/--smoke): comparison skipped")
    reach = 100 * ips / ceil if ips and ceil else None
    print(f"NumPy float32 GEMM ceiling ({t} thread(s)): {_fmt(gf, '.1f')} GFLOP/s = "
          f"{_fmt(ceil)} images/s; distcnn reaches {_fmt(reach, '.1f')} %")  # fmt: skip
    share = m("main", "data_share")
    print(f"data loading (Split.batch): {_fmt(share * 100 if share is not None else None, '.2f')} "
          "% of the step")  # fmt: skip

    print("\n== Peak memory per process (VmHWM, MiB): after warm-up -> after the timed steps ==")
    for key, label in (("main", f"batch {b}"), ("mem512", "batch 512")):
        w, e = m(key, "hwm_warm"), m(key, "hwm_end")
        rw, re_ = m(key, "rss_warm"), m(key, "rss_end")
        steps = m(key, "steps")
        grow = "stable" if w is not None and e is not None and e - w < 1.0 else "GROWS"
        print(f"{label:10s} {_fmt(w, '.1f')} -> {_fmt(e, '.1f')} over {_fmt(steps)} steps "
              f"({grow}); RSS {_fmt(rw, '.1f')} -> {_fmt(re_, '.1f')}")  # fmt: skip

    print(f"\n== 2 ranks x 1 thread (mpirun -n 2), batch {b} per rank ==")
    one_key = "main" if t == 1 else "one"
    one = m(one_key, "train_ips")
    if not mpi_ok:
        print("mpirun not found (or --smoke): skipped")
    else:
        runs = [r["ranks"] for r in res["mpi2"] if r.get("ranks")]
        if not runs:
            print("the 2-rank run failed")
        else:
            total = statistics.median(sum(x["train_ips"] for x in rr) for rr in runs)
            per = [statistics.median(rr[i]["train_ips"] for rr in runs) for i in range(2)]
            comm = [statistics.median(rr[i]["comm_share"] for rr in runs) for i in range(2)]
            hwm = [statistics.median(rr[i]["hwm_end"] for rr in runs) for i in range(2)]
            gf2 = m("gemm2", "gflops")
            print(f"1 rank x 1 thread:  {_fmt(one)} images/s")
            print(f"2 ranks x 1 thread: {_fmt(total)} images/s in all (rank 0 {_fmt(per[0])}, "
                  f"rank 1 {_fmt(per[1])}); scaling {_ratio(total, one)}")  # fmt: skip
            print(f"communication: rank 0 {100 * comm[0]:.1f} %, rank 1 {100 * comm[1]:.1f} % of "
                  f"the step; peak RSS per rank {hwm[0]:.0f} / {hwm[1]:.0f} MiB")  # fmt: skip
            path = next((r["allreduce"] for r in res["mpi2"] if r.get("allreduce")), "unknown")
            print(f"gradient allreduce: {path}")
            plain = [r["ranks"] for r in res.get("mpi2plain", []) if r.get("ranks")]
            if plain:
                tot_p = statistics.median(sum(x["train_ips"] for x in rr) for rr in plain)
                com_p = [statistics.median(rr[i]["comm_share"] for rr in plain) for i in range(2)]
                print(f"  the same with MPI_Iallreduce (DISTCNN_ALLREDUCE=mpi): {_fmt(tot_p)} "
                      f"images/s, scaling {_ratio(tot_p, one)}, communication rank 0 "
                      f"{100 * com_p[0]:.1f} %, rank 1 {100 * com_p[1]:.1f} %")  # fmt: skip
            if gf2 and fpi:
                c2 = gf2 * 1e9 / fpi
                print(f"GEMM ceiling, 2 threads: {gf2:.1f} GFLOP/s = {c2:,.0f} images/s; "
                      f"2 ranks reach {100 * total / c2:.1f} %")  # fmt: skip
            if torch_ok:
                t2 = m("torch2", "train_ips")
                print(f"PyTorch 2 threads, batch {2 * b}: {_fmt(t2)} images/s; "
                      f"distcnn 2 ranks / PyTorch {_ratio(total, t2)}")  # fmt: skip

    print(f"\n== distcnn train images/s, {t} thread(s), by batch and image size ==")
    print(f"{'batch':>6s}" + "".join(f"{f'{px}x{px}':>10s}" for px in pixels))
    for bb in batches:
        cells = "".join(f"{_fmt(m(f't{bb}x{px}', 'train_ips')):>10s}" for px in pixels)
        print(f"{bb:>6d}{cells}")


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
