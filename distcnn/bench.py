"""Throughput benchmark: distcnn against PyTorch at its best, side by side in one run.

    python -m distcnn.bench               # several minutes: 3 interleaved rounds of everything
    python -m distcnn.bench --quick       # under a minute: one round, short windows
    python -m distcnn.bench --smoke       # seconds: checks the plumbing only
    mpirun -n 2 python -m mpi4py -m distcnn.bench --mpi   # just the multi-rank measurement

What is compared (every setting in a fresh process that prints one `BENCH <json>` line; the
rounds are interleaved, reversed every other round, and the report prints medians):
- 1 process, 1 thread (`--threads`), batch 64 (`--batch`), for two models: the reference model
  on 1x28x28 and a second model on 3x32x32 (SECOND_SPEC), at two instruction sets:
  * native: no OPENBLAS_CORETYPE and no oneDNN/MKL/ATen/NumPy cap, whatever the parent
    environment says, so each library picks its own kernels for this CPU;
  * avx2: both sides capped to AVX2 (OPENBLAS_CORETYPE=Haswell and NumPy's AVX-512 dispatch
    targets disabled, against ONEDNN_MAX_CPU_ISA=AVX2, MKL_ENABLE_INSTRUCTIONS=AVX2 and
    ATEN_CPU_CAPABILITY=avx2).
  Each side reports what it actually ran: OpenBLAS's kernel (threadpoolctl `architecture`) and
  NumPy's SIMD targets; torch's ATen capability and oneDNN's ISA and convolution kernels (from
  oneDNN's verbose output of one warm-up step).
- PyTorch at its best: NCHW and channels_last (model and input) are both run and the faster
  counts; evaluation under `torch.inference_mode()` in `eval()` mode; the glibc allocator
  settings that spare it page faults (TORCH_ENV). distcnn runs without them.
- 2 ranks x 1 thread (native ISA, reference model): distcnn under `mpirun -n 2` with its default
  gradient sum, and with each sum forced (DISTCNN_ALLREDUCE=shm / mpi), against PyTorch DDP with
  2 processes (gloo, 1 thread each, both layouts).
A distcnn train step is the Trainer's: gather the batch from a uint8 Split, loss_and_grad, one
allreduce of [gradient | loss | correct | flag] through distcnn.comm, SGD with momentum and
weight decay. Each run writes its raw figures (machine, versions, ISA, load, every sample) to a
JSON file (`--json`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import re
import shutil
import socket
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
# the second model: a wider CIFAR-shaped network on 3x32x32 inputs
SECOND_SPEC = "conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,flatten,dense:256,relu,dense"
# the stronger model of the README: distcnn.model.STRONG_SPEC (not imported: NumPy must load only
# after a worker has set its threads)
STRONG_SPEC = (
    "conv:32:3,relu,maxpool:2,bn,conv:64:3,relu,maxpool:2,bn,flatten,dense:128,relu,bn,"
    "dropout:0.3,dense"
)
MODELS = {
    "ref": ("reference model", None, (1, 28, 28)),  # spec None: distcnn.model.REFERENCE_SPEC
    "second": ("second model", SECOND_SPEC, (3, 32, 32)),
    "strong": ("stronger model (bn, dropout)", STRONG_SPEC, (1, 28, 28)),
}
# every variable that selects kernels by instruction set, on either side
ISA_VARS = (
    "OPENBLAS_CORETYPE",
    "NPY_DISABLE_CPU_FEATURES",
    "NPY_ENABLE_CPU_FEATURES",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_ENABLE_INSTRUCTIONS",
    "MKL_DEBUG_CPU_TYPE",
    "ATEN_CPU_CAPABILITY",
)
TORCH_AVX2 = {
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "DNNL_MAX_CPU_ISA": "AVX2",
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "ATEN_CPU_CAPABILITY": "avx2",
}
ISAS = ("native", "avx2")


def _rank() -> int:
    for var in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "RANK"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 0


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


CPU_SECONDS: list[float] = [0.0]  # CPU time of the last _timed_steps (this process, all threads)


def _timed_steps(
    step: Any, seconds: float, min_steps: int, agree: Any = None
) -> tuple[int, float, list[float]]:
    """Run `step` until `seconds` have passed (at least min_steps). With several ranks,
    `agree(n)` returns rank 0's count on every rank, so all make the same collectives.
    Returns (steps, wall seconds, every step's milliseconds); the process's CPU seconds over
    the same steps go to CPU_SECONDS[0] (on a loaded machine they exclude the time the process
    waited for a core)."""
    t0 = time.perf_counter()
    step()
    one = time.perf_counter() - t0
    steps = max(min_steps, int(seconds / max(one, 1e-6)))
    if agree is not None:
        steps = agree(steps)
    samples = []
    c0 = time.process_time()
    t0 = time.perf_counter()
    for _ in range(steps):
        t = time.perf_counter()
        step()
        samples.append(round(1e3 * (time.perf_counter() - t), 4))
    wall = time.perf_counter() - t0
    CPU_SECONDS[0] = time.process_time() - c0
    return steps, wall, samples


def _numpy_isa() -> dict[str, Any]:
    """What NumPy and its BLAS run: OpenBLAS's kernel and NumPy's highest SIMD targets."""
    import numpy as np
    import threadpoolctl

    info = [i for i in threadpoolctl.threadpool_info() if i.get("user_api") == "blas"]
    blas = {k: info[0].get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
    simd: list[str] = []
    try:
        from numpy._core import _multiarray_umath as um  # NumPy 2
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import _multiarray_umath as um
    feats = getattr(um, "__cpu_features__", {})
    simd = [d for d in getattr(um, "__cpu_dispatch__", []) if feats.get(d)]
    return {"numpy": np.__version__, "blas": blas if info else None, "numpy_simd": simd}


def measure_distcnn(cfg: dict[str, Any]) -> dict[str, Any]:
    """Trainer-style train steps (and forward-only evaluation) of cfg's model."""
    import numpy as np

    from distcnn.comm import Comm
    from distcnn.data import Split
    from distcnn.model import REFERENCE_SPEC, Model
    from distcnn.optim import SGD
    from distcnn.sampler import shard_bounds

    comm = Comm.world(timeout=600)
    shape, per_rank = tuple(cfg["shape"]), cfg["batch"]
    global_batch = per_rank * comm.size
    rng = np.random.default_rng(1234)
    n_data = max(4 * global_batch, 1024)
    images = rng.integers(0, 256, size=(n_data, *shape), dtype=np.uint8)  # (N, C, H, W)
    labels = rng.integers(0, 10, size=n_data).astype(np.int64)
    c = shape[0]
    split = Split(images, labels, 10, np.full(c, 0.13, np.float32), np.full(c, 0.31, np.float32))
    spec = cfg.get("spec") or REFERENCE_SPEC
    model = Model(spec, shape, 10, np.float32, grad_extra=3, grad_alloc=comm.reduce_buffer)
    model.init_params(0)
    opt = SGD(model.params, 0.9, 5e-4)
    red, n_params = model.grad_buffer, model.num_params
    xbuf = np.empty((per_rank, *shape), dtype=np.float32)  # (B, C, H, W)
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
    agree = (lambda n: comm.bcast_object(n, 0, "bench step count")) if comm.size > 1 else None
    steps, wall, samples = _timed_steps(train_step, cfg["seconds"], cfg.get("min_steps", 3), agree)
    # the calibration step is outside `wall`, so scale the phase timers to the timed steps
    share = steps / (steps + 1)
    hwm_end, rss_end = _memory_mib()
    out: dict[str, Any] = {
        "train_ips": steps * per_rank / wall,
        "train_ips_cpu": steps * per_rank / max(CPU_SECONDS[0], 1e-9),
        "step_ms": 1e3 * wall / steps,
        "step_ms_samples": samples,
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
        e_steps, e_wall, _ = _timed_steps(eval_step, cfg["seconds"] / 2, 3)
        out["eval_ips"] = e_steps * per_rank / e_wall
        out["hwm_eval"] = _memory_mib()[0]
    if comm.size > 1:
        ranks = comm.gather_objects(out, "bench results")
        out = {"ranks": ranks, "rank": comm.rank, "allreduce": comm.allreduce_path}
        out["train_ips"] = sum(r["train_ips"] for r in ranks)
    if comm.rank == 0:
        from mpi4py import MPI

        out["isa"] = _numpy_isa()
        out["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    return out


def _torch_net(spec: str | None, shape: tuple[int, ...]) -> Any:
    """The torch.nn.Sequential of distcnn's export for this spec (the same network)."""
    import collections

    import numpy as np
    from torch import nn

    from distcnn.export import torch_modules
    from distcnn.model import REFERENCE_SPEC, Model

    model = Model(spec or REFERENCE_SPEC, shape, 10, np.float32)
    mods = [(name, eval(ctor, {"nn": nn})) for name, ctor in torch_modules(model)]  # noqa: S307
    return nn.Sequential(collections.OrderedDict(mods))


def measure_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same network, batch and threads in PyTorch (cfg['layout']: nchw | channels_last):
    train steps (SGD with momentum and weight decay) and inference-mode evaluation. With
    WORLD_SIZE > 1 in the environment, it is one process of a DDP job (gloo)."""
    import torch
    from torch import nn

    torch.set_num_threads(cfg["threads"])
    shape, batch = tuple(cfg["shape"]), cfg["batch"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = _rank()
    torch.manual_seed(0)
    net = _torch_net(cfg.get("spec"), shape)
    fmt = torch.channels_last if cfg["layout"] == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, *shape).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    train_net = net
    agree = None
    if world > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        dist.init_process_group("gloo", rank=rank, world_size=world)
        train_net = DistributedDataParallel(net)

        def agree(n: int) -> int:
            box = [n]
            dist.broadcast_object_list(box, src=0)
            return int(box[0])

    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(train_net(x), y).backward()
        opt.step()

    def eval_step() -> None:
        with torch.inference_mode():
            net(x).argmax(1)

    net.train()
    # one step with oneDNN's verbose output on: the driver reads the ISA and kernels from it
    with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
        train_step()
    sys.stdout.flush()
    for _ in range(cfg.get("warmup", 3)):
        train_step()
    steps, wall, samples = _timed_steps(train_step, cfg["seconds"], cfg.get("min_steps", 3), agree)
    out: dict[str, Any] = {
        "train_ips": steps * batch / wall,
        "train_ips_cpu": steps * batch / max(CPU_SECONDS[0], 1e-9),
        "step_ms": 1e3 * wall / steps,
        "step_ms_samples": samples,
        "hwm_end": _memory_mib()[0],
        "steps": steps,
    }
    if world > 1:
        import torch.distributed as dist

        every: list[Any] = [None] * world
        dist.all_gather_object(every, out)
        out = {"ranks": every, "train_ips": sum(r["train_ips"] for r in every)}
        dist.destroy_process_group()
    else:
        net.eval()
        eval_step()
        e_steps, e_wall, _ = _timed_steps(eval_step, cfg["seconds"] / 2, 3)
        out["eval_ips"] = e_steps * batch / e_wall
    out["isa"] = {
        "torch": torch.__version__,
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_enabled": bool(torch.backends.mkldnn.is_available()),
    }
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
    steps, wall, _ = _timed_steps(lambda: np.matmul(a, b, out=c), cfg["seconds"], 3)
    return {"gflops": 2 * n**3 * steps / wall / 1e9, "isa": _numpy_isa()}


def _layout(a: Any) -> str:
    return "C" if a.flags.c_contiguous else ("F" if a.flags.f_contiguous else "strided")


def _gemm_gflops(a: Any, b: Any, out: Any, reps: int = 5) -> float:
    """GFLOP/s of np.matmul(a, b, out=out) in this thread's CPU time (median of reps)."""
    import numpy as np

    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    inner = max(2, int(1e8 / flops))
    np.matmul(a, b, out=out)
    times = []
    for _ in range(reps):
        t = time.thread_time()
        for _ in range(inner):
            np.matmul(a, b, out=out)
        times.append((time.thread_time() - t) / inner)
    return flops / statistics.median(times) / 1e9


def measure_profile_distcnn(cfg: dict[str, Any]) -> dict[str, Any]:
    """Per-layer CPU times of loss_and_grad and every GEMM it makes, each GEMM then timed alone
    (same shapes and memory layouts) against the 1024^3 ceiling."""
    import numpy as np

    from distcnn.model import REFERENCE_SPEC, Model

    shape, batch = tuple(cfg["shape"]), cfg["batch"]
    model = Model(cfg.get("spec") or REFERENCE_SPEC, shape, 10, np.float32)
    model.init_params(0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    for _ in range(3):
        model.loss_and_grad(x, y, 1.0 / batch)
    seen: dict[tuple, dict[str, Any]] = {}
    real = np.matmul

    def spy(a: Any, b: Any, out: Any = None, **kw: Any) -> Any:
        key = (a.shape, _layout(a), b.shape, _layout(b), _layout(out) if out is not None else "-")
        t = time.thread_time()
        r = real(a, b, out=out, **kw)
        row = seen.setdefault(key, {"calls": 0, "seconds": 0.0, "args": (a, b, out)})
        row["calls"] += 1
        row["seconds"] += time.thread_time() - t
        return r

    steps = cfg.get("steps", 10)
    np.matmul = spy  # every GEMM goes through np.matmul(a, b, out=...)
    try:
        for _ in range(steps):
            model.loss_and_grad(x, y, 1.0 / batch)
    finally:
        np.matmul = real
    gemms = []
    for (ash, al, bsh, bl, ol), row in seen.items():
        a, b, out = row["args"]
        flops = 2 * ash[0] * ash[1] * bsh[1]
        gemms.append({
            "a": list(ash), "a_layout": al, "b": list(bsh), "b_layout": bl, "out_layout": ol,
            "calls_per_step": row["calls"] / steps, "flops": flops,
            "ms_per_step_in_model": 1e3 * row["seconds"] / steps,
            "gflops_alone": _gemm_gflops(a, b, out if out is not None else np.empty(
                (ash[0], bsh[1]), np.float32)),
        })  # fmt: skip
    perf = time.perf_counter
    time.perf_counter = time.thread_time  # the layer timers then count this thread's CPU time
    try:
        model.profile_layers(True)
        t = time.thread_time()
        for _ in range(steps):
            model.loss_and_grad(x, y, 1.0 / batch)
        step = (time.thread_time() - t) / steps
        secs = model.layer_seconds / steps
        model.profile_layers(False)
    finally:
        time.perf_counter = perf
    layers = [{"layer": layer.describe(), "forward_ms": 1e3 * float(fw),
               "backward_ms": 1e3 * float(bw)}
              for layer, (fw, bw) in zip(model.layers, secs, strict=True)]  # fmt: skip
    n = 1024
    a = rng.random((n, n), dtype=np.float32)
    return {
        "step_ms": 1e3 * step,
        "layers": layers,
        "gemms": gemms,
        "ceiling_gflops": _gemm_gflops(a, a.copy(), np.empty((n, n), np.float32), 5),
        "isa": _numpy_isa(),
    }


def measure_profile_torch(cfg: dict[str, Any]) -> dict[str, Any]:
    """torch.profiler's self CPU time per op over train steps of cfg's layout."""
    import torch
    from torch import nn
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(cfg["threads"])
    shape, batch = tuple(cfg["shape"]), cfg["batch"]
    net = _torch_net(cfg.get("spec"), shape)
    fmt = torch.channels_last if cfg["layout"] == "channels_last" else torch.contiguous_format
    net = net.to(memory_format=fmt)
    x = torch.randn(batch, *shape).to(memory_format=fmt)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss_fn(net(x), y).backward()
        opt.step()

    for _ in range(5):
        step()
    steps = cfg.get("steps", 10)
    t = time.thread_time()
    for _ in range(steps):
        step()
    step_ms = 1e3 * (time.thread_time() - t) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    ops = sorted(
        ({"op": e.key, "calls_per_step": e.count / steps,
          "self_ms_per_step": e.self_cpu_time_total / 1e3 / steps} for e in prof.key_averages()),
        key=lambda r: -r["self_ms_per_step"],
    )  # fmt: skip
    return {"step_ms": step_ms, "ops": [o for o in ops if o["self_ms_per_step"] >= 0.01]}


MEASURES = {
    "distcnn": measure_distcnn,
    "torch": measure_torch,
    "gemm": measure_gemm,
    "profile-distcnn": measure_profile_distcnn,
    "profile-torch": measure_profile_torch,
}


def worker(cfg: dict[str, Any]) -> None:
    """Entry point of one measurement process: prints `BENCH <json>` on rank 0."""
    out = MEASURES[cfg["kind"]](cfg)
    out["threads"] = cfg["threads"]
    if "threads_from" in cfg:
        out["threads_from"] = cfg["threads_from"]
    if _rank() == 0:
        print("BENCH " + json.dumps(out), flush=True)


# -- the driver --------------------------------------------------------------------------------


def _mpirun() -> str | None:
    beside = Path(sys.executable).with_name("mpirun")
    return str(beside) if beside.exists() else shutil.which("mpirun")


def _npy_avx512_targets() -> str:
    """NumPy's dispatch targets above AVX2 (disabled under the AVX2 cap)."""
    try:
        from numpy._core import _multiarray_umath as um
    except ImportError:  # pragma: no cover - NumPy 1.x
        from numpy.core import _multiarray_umath as um
    targets = getattr(um, "__cpu_dispatch__", [])
    return " ".join(t for t in targets if "512" in t or t == "X86_V4")


def isa_env(isa: str, kind: str) -> dict[str, str]:
    """The ISA variables a worker gets (all others of ISA_VARS are removed)."""
    if isa == "native":
        return {}
    if kind == "torch":
        return dict(TORCH_AVX2)
    env = {"OPENBLAS_CORETYPE": "Haswell"}
    targets = _npy_avx512_targets()
    if targets:
        env["NPY_DISABLE_CPU_FEATURES"] = targets
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _loadavg() -> list[float] | None:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


_ONEDNN_ISA = re.compile(r"onednn_verbose,(?:v1,)?info,cpu,isa:(.*)")
_ONEDNN_CONV = re.compile(r"onednn_verbose,(?:v1,)?primitive,exec,cpu,convolution,([^,]+),([^,]+)")


def _onednn_info(stdout: str) -> dict[str, Any]:
    isa, kernels = None, set()
    for line in stdout.splitlines():
        m = _ONEDNN_ISA.match(line)
        if m:
            isa = m.group(1).strip()
        m = _ONEDNN_CONV.match(line)
        if m:
            kernels.add(f"{m.group(2)}:{m.group(1)}")
    return {"onednn_isa": isa, "onednn_conv": sorted(kernels)}


def run_setting(cfg: dict[str, Any], timeout: float = 600) -> dict[str, Any]:
    """One setting in a fresh process (or cfg['ranks'] processes: mpirun for distcnn, DDP
    processes for torch); {} if it failed."""
    ranks, kind = cfg.get("ranks", 1), cfg["kind"]
    env = {k: v for k, v in os.environ.items() if k not in TORCH_ENV and k not in ISA_VARS}
    env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        if cfg["threads"] == "default":  # the worker picks them as distcnn.train would
            env.pop(var, None)
        else:
            env[var] = str(cfg["threads"])
    if kind == "torch":
        env.update(TORCH_ENV)
    env.update(isa_env(cfg.get("isa", "native"), kind))
    env.update(cfg.get("env", {}))
    cmd = [sys.executable, "-m", "distcnn.bench", "--worker", json.dumps(cfg)]
    t0, load = time.time(), _loadavg()
    try:
        if ranks > 1 and kind == "torch":
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
            env["WORLD_SIZE"] = str(ranks)
            procs = [
                subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
                for r in range(ranks)
            ]  # fmt: skip
            outs = [p.communicate(timeout=timeout) for p in procs]
            stdout, stderr = outs[0][0] + "".join(o[0] for o in outs[1:]), outs[0][1]
        else:
            if ranks > 1:
                mpirun = _mpirun()
                if mpirun is None:
                    return {}
                cmd = [mpirun, "-n", str(ranks), sys.executable, "-m", "mpi4py"] + cmd[1:]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
            stdout, stderr = proc.stdout, proc.stderr
    except subprocess.TimeoutExpired:
        print(f"  (setting {cfg} timed out)", file=sys.stderr)
        return {}
    for line in stdout.splitlines():
        if line.startswith("BENCH "):
            out = json.loads(line[6:])
            out.update(started=round(t0, 1), loadavg=load)
            if kind == "torch":
                out["isa"].update(_onednn_info(stdout))
            return out
    err = stderr.strip().splitlines()[-1:] or ["no output"]
    print(f"  (setting {cfg} failed: {err[0]})", file=sys.stderr)
    return {}


def _median(results: list[dict[str, Any]], key: str) -> float | None:
    vals = [r[key] for r in results if r and r.get(key) is not None]
    return statistics.median(vals) if vals else None


def _fmt(v: float | None, spec: str = ",.0f") -> str:
    return "n/a" if v is None else format(v, spec)


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _x(r: float | None) -> str:
    return "n/a" if r is None else f"{r:.2f}x"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distcnn.bench", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="one round, short windows (< 1 minute)")
    p.add_argument("--smoke", action="store_true", help="tiny run that only checks the plumbing")
    p.add_argument("--threads", type=int, default=1, help="BLAS threads of the 1-process runs")
    p.add_argument("--batch", type=int, default=64, help="batch (per rank) of every comparison")
    p.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 3)")
    p.add_argument("--seconds", type=float, default=None, help="timed window per setting")
    p.add_argument("--no-torch", action="store_true", help="skip PyTorch even if importable")
    p.add_argument("--table", action="store_true", help="also the batch x image-size table")
    p.add_argument("--profile", action="store_true",
                   help="instead: CPU time per layer, per GEMM and per PyTorch op")  # fmt: skip
    p.add_argument("--contention", action="store_true",
                   help="instead: 1, 2 and default threads, alone and by a spin loop")  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="raw figures (default: bench-<UTC time>.json)")
    p.add_argument("--mpi", action="store_true", help="under mpirun: measure these ranks only")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # the options as given, for the record; a --json path is kept by its file name only
    raw = list(sys.argv[1:] if argv is None else argv)
    args.argv = [Path(v).name if i and raw[i - 1] == "--json" else v for i, v in enumerate(raw)]
    args.argv = [f"--json={Path(v[7:]).name}" if v.startswith("--json=") else v for v in args.argv]

    if args.worker:
        cfg = json.loads(args.worker)
        if cfg["threads"] == "default":
            cfg["threads"], cfg["threads_from"] = threadsmod.choose(None, 1)
        threadsmod.apply(cfg["threads"])  # before NumPy loads
        worker(cfg)
        return 0
    for flag in ("threads", "batch", "repeats"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f"--{flag} {value} is not a positive count; use 1 or more")
    if args.seconds is not None and not args.seconds > 0:
        p.error(f"--seconds {args.seconds} is not a positive duration; use e.g. 1.5")
    if args.mpi:
        threadsmod.apply(args.threads)
        secs = args.seconds or (1.0 if args.quick else 2.0)
        cfg = {"kind": "distcnn", "threads": args.threads, "batch": args.batch,
               "shape": [1, 28, 28], "seconds": secs}  # fmt: skip
        out = measure_distcnn(cfg)
        if out.get("rank", 0) != 0:  # only rank 0 prints
            return 0
        if "ranks" in out:
            _print_mpi(out["ranks"], args.batch)
            print(f"  gradient sum: {out['allreduce']}")
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


def build_settings(args: argparse.Namespace, torch_ok: bool, mpi_ok: bool) -> dict[str, Any]:
    """Every setting of this run, by key."""
    quick, smoke = args.quick or args.smoke, args.smoke
    secs = args.seconds or (0.3 if smoke else (0.7 if quick else 1.5))
    t, b = args.threads, args.batch
    isas = ("native",) if smoke else ISAS
    models = ("ref",) if smoke else tuple(MODELS)
    s: dict[str, Any] = {}
    for isa in isas:
        s[f"gemm/{isa}"] = {"kind": "gemm", "threads": t, "n": 256 if smoke else 1024,
                            "seconds": secs / 3, "isa": isa}  # fmt: skip
        for m in models:
            _, spec, shape = MODELS[m]
            base = {"spec": spec, "shape": list(shape), "threads": t, "batch": b,
                    "seconds": secs, "isa": isa}  # fmt: skip
            s[f"distcnn/{m}/{isa}"] = {**base, "kind": "distcnn", "eval": True}
            if torch_ok:
                for layout in ("nchw", "channels_last"):
                    s[f"torch-{layout}/{m}/{isa}"] = {**base, "kind": "torch", "layout": layout}
    one = {"spec": None, "shape": [1, 28, 28], "threads": 1, "batch": b, "seconds": secs}
    if t != 1:
        s["distcnn/ref/native/1thread"] = {**one, "kind": "distcnn", "isa": "native"}
    if mpi_ok:
        for mode in ("auto", "shm", "mpi"):
            env = {} if mode == "auto" else {"DISTCNN_ALLREDUCE": mode}
            s[f"distcnn2/{mode}"] = {**one, "kind": "distcnn", "ranks": 2, "env": env}
    if torch_ok:
        for layout in ("nchw", "channels_last"):
            s[f"ddp2-{layout}"] = {**one, "kind": "torch", "ranks": 2, "layout": layout}
    if not quick:
        s["mem512"] = {**one, "kind": "distcnn", "batch": 512, "warmup": 2, "min_steps": 2,
                       "seconds": secs / 2}  # fmt: skip
    if args.contention:  # a separate kind of run: BLAS threads with and without a neighbour
        s = {}
        for busy in (False, True):
            for th in (1, 2, "default"):
                s[f"contention/{'busy' if busy else 'alone'}/{th}"] = {
                    "kind": "distcnn", "spec": None, "shape": [1, 28, 28], "threads": th,
                    "batch": b, "seconds": secs, "isa": "native", "busy_neighbour": busy,
                }  # fmt: skip
        return s
    if args.profile:  # a separate kind of run: profiles only
        s = {}
        for isa in isas:
            for m in models:
                _, spec, shape = MODELS[m]
                base = {"spec": spec, "shape": list(shape), "threads": 1, "batch": b, "isa": isa}
                s[f"profile-distcnn/{m}/{isa}"] = {**base, "kind": "profile-distcnn"}
                if torch_ok:
                    s[f"profile-torch/{m}/{isa}"] = {**base, "kind": "profile-torch",
                                                     "layout": "channels_last"}  # fmt: skip
        return s
    if args.table:
        for bb in TABLE_BATCHES:
            for px in TABLE_PIXELS:
                s[f"table/{bb}x{px}"] = {"kind": "distcnn", "spec": None, "shape": [1, px, px],
                                         "threads": t, "batch": bb, "warmup": 1, "min_steps": 2,
                                         "seconds": secs / 3}  # fmt: skip
    return s


def _machine() -> dict[str, Any]:
    """The CPU, the CPUs this process may use, and the cgroup quota (no paths, no host name)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            if key.strip() == "model name":
                model = val.strip()
            elif key.strip() == "flags":
                flags = set(val.split())
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "amx_tile")
    return {
        "cpu": model,
        "isa_flags": [f for f in wanted if f in flags],
        "cpus_online": os.cpu_count(),
        "cpus_usable": threadsmod.usable_cores(),
        "cpu_quota": threadsmod.cgroup_cpu_limit(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def drive(args: argparse.Namespace) -> int:
    smoke = args.smoke
    rounds = args.repeats or (1 if args.quick or smoke else 3)
    torch_ok = not args.no_torch and not smoke and importlib.util.find_spec("torch") is not None
    mpi_ok = not smoke and _mpirun() is not None
    settings = build_settings(args, torch_ok, mpi_ok)
    results: dict[str, list[dict[str, Any]]] = {k: [] for k in settings}
    started = datetime.datetime.now(datetime.timezone.utc)
    t_start = time.perf_counter()
    load_start = _loadavg()
    print(
        f"distcnn bench: {len(settings)} settings x {rounds} round(s), each in a fresh process",
        file=sys.stderr,
        flush=True,
    )
    for r in range(rounds):
        keys = list(settings) if r % 2 == 0 else list(reversed(settings))  # interleaved
        for key in keys:
            with _neighbour(settings[key].get("busy_neighbour", False)):
                results[key].append(run_setting(settings[key]))
    load_end = _loadavg()
    record = {
        "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": " ".join(["python -m distcnn.bench", *args.argv]),
        "rounds": rounds,
        "machine": _machine(),
        "parent_env": {k: os.environ[k] for k in ISA_VARS if k in os.environ},
        "loadavg_start": load_start,
        "loadavg_end": load_end,
        "settings": settings,
        "samples": results,
    }
    if args.profile:
        summary = report_profile(results, settings)
    elif args.contention:
        summary = report_contention(results, settings, record)
    else:
        summary = report(results, settings, args, rounds, torch_ok, mpi_ok, record)
    record["summary"] = summary
    record["seconds"] = round(time.perf_counter() - t_start, 1)
    out = Path(args.json or f"bench-{started.strftime('%Y%m%dT%H%M%SZ')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, out)
    print(f"\n(bench took {record['seconds']:.0f} s; raw figures in {out})")
    return 0


class _neighbour:
    """A busy process (a Python spin loop) pinned to the last usable CPU while active."""

    def __init__(self, on: bool) -> None:
        self.on, self.proc = on, None

    def __enter__(self) -> None:
        if self.on:
            cpu = max(threadsmod.affinity_cpus())
            code = f"import os\nos.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"
            self.proc = subprocess.Popen([sys.executable, "-c", code])
            time.sleep(0.3)  # let it start spinning

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def report_contention(
    res: dict[str, list[dict[str, Any]]], settings: dict[str, Any], record: dict[str, Any]
) -> dict[str, Any]:
    """1 vs 2 BLAS threads vs the default choice, alone and beside one busy process."""
    summary: dict[str, Any] = {}
    print(f"load average: {record['loadavg_start']} at the start, {record['loadavg_end']} at the "
          "end (the busy neighbour: the bench's own spin loop on the last usable CPU)")  # fmt: skip
    print(f"\n== reference model, 1 process, batch {settings[next(iter(settings))]['batch']}: "
          "train images/s ==")  # fmt: skip
    print(f"{'':28s}{'alone':>10s}{'beside a busy process':>24s}")
    for th, label in ((1, "1 thread"), (2, "2 threads"), ("default", "the default")):
        cells = ""
        for where in ("alone", "busy"):
            runs = [r for r in res[f"contention/{where}/{th}"] if r]
            v = _median(runs, "train_ips")
            chose = sorted({f"{r['threads']} ({r.get('threads_from', '')})" for r in runs})
            summary[f"{where}/{th}"] = {"images_per_s": v, "chose": chose}
            cells += f"{_fmt(v):>10s}" if where == "alone" else f"{_fmt(v):>24s}"
        print(f"{label:28s}{cells}")
        if th == "default":
            for where in ("alone", "busy"):
                print(f"  default {where}: {', '.join(summary[f'{where}/{th}']['chose'])}")
    return summary


def report_profile(
    res: dict[str, list[dict[str, Any]]], settings: dict[str, Any]
) -> dict[str, Any]:
    """Print per-layer and per-GEMM CPU times (distcnn) beside torch's per-op self CPU times."""
    summary: dict[str, Any] = {}
    for key in settings:
        if not key.startswith("profile-distcnn/"):
            continue
        _, mkey, isa = key.split("/")
        runs = [r for r in res[key] if r]
        if not runs:
            continue
        r = runs[0]
        name, _, shape = MODELS[mkey]
        ceil = statistics.median(x["ceiling_gflops"] for x in runs)
        print(f"\n== {name} ({'x'.join(map(str, shape))}), {isa} ISA, 1 thread: CPU ms per step ==")
        print(f"distcnn loss_and_grad {statistics.median(x['step_ms'] for x in runs):.2f} ms "
              f"({_isa_line(runs)})")  # fmt: skip
        for lay in r["layers"]:
            print(f"  {lay['layer']:44s} forward {lay['forward_ms']:6.3f}  "
                  f"backward {lay['backward_ms']:6.3f}")  # fmt: skip
        print(f"  GEMMs (ceiling 1024^3: {ceil:.1f} GFLOP/s):")
        for g in sorted(r["gemms"], key=lambda g: -g["ms_per_step_in_model"]):
            shape_s = f"({g['a'][0]}x{g['a'][1]} {g['a_layout']}) @ ({g['b'][0]}x{g['b'][1]} " \
                      f"{g['b_layout']}) -> {g['out_layout']}"  # fmt: skip
            inmodel = g["flops"] * g["calls_per_step"] / (g["ms_per_step_in_model"] * 1e6 or 1)
            ms = g["ms_per_step_in_model"]
            print(f"    {shape_s:42s} x{g['calls_per_step']:<4g} {ms:6.3f} ms"
                  f"  {inmodel:6.1f} GFLOP/s in the step, {g['gflops_alone']:6.1f} alone "
                  f"({100 * g['gflops_alone'] / ceil:.0f} % of the ceiling)")  # fmt: skip
        tkey = f"profile-torch/{mkey}/{isa}"
        truns = [t for t in res.get(tkey, []) if t]
        if truns:
            t = truns[0]
            print(f"PyTorch channels_last train step {t['step_ms']:.2f} CPU ms; top ops by self "
                  "time (profiler, wall-clock based):")  # fmt: skip
            for op in t["ops"][:12]:
                print(
                    f"  {op['op']:44s} x{op['calls_per_step']:<4g} {op['self_ms_per_step']:7.3f} ms"
                )
        summary[key] = {"step_ms": r["step_ms"], "ceiling_gflops": ceil}
    return summary


def _isa_line(res: list[dict[str, Any]]) -> str:
    isa = next((r["isa"] for r in res if r and r.get("isa")), None)
    if not isa:
        return "unknown"
    if "blas" in isa:
        blas = isa.get("blas") or {}
        simd = (isa.get("numpy_simd") or ["baseline"])[-1]
        return (f"{blas.get('internal_api')} {blas.get('version')} kernel "
                f"{blas.get('architecture')}; NumPy SIMD up to {simd}")  # fmt: skip
    conv = ", ".join(isa.get("onednn_conv") or []) or "none seen"
    return (f"ATen {isa.get('aten_capability')}; oneDNN isa {isa.get('onednn_isa')!r}, "
            f"conv kernels {conv}")  # fmt: skip


def report(
    res: dict[str, list[dict[str, Any]]],
    settings: dict[str, Any],
    args: argparse.Namespace,
    rounds: int,
    torch_ok: bool,
    mpi_ok: bool,
    record: dict[str, Any],
) -> dict[str, Any]:
    """Print the comparison; returns the summary figures (for the JSON record)."""
    t, b = args.threads, args.batch
    m = lambda key, name: _median(res.get(key, []), name)  # noqa: E731
    summary: dict[str, Any] = {}
    mach = record["machine"]
    print(f"distcnn bench - medians of {rounds} round(s), every setting in a fresh process, "
          "rounds interleaved")  # fmt: skip
    quota = mach["cpu_quota"] or "none"
    print(f"machine: {mach['cpu']}, flags {' '.join(mach['isa_flags'])}; "
          f"{mach['cpus_usable']} usable CPU(s), cgroup CPU limit {quota}")  # fmt: skip
    load0, load1 = record["loadavg_start"], record["loadavg_end"]
    print(f"load average: {load0} at the start, {load1} at the end")
    parent = record["parent_env"]
    print("parent environment: " + (", ".join(f"{k}={v}" for k, v in parent.items()) or
          "no ISA variables set") + " (each setting sets its own; see the ISA lines)")  # fmt: skip

    isas = sorted({s["isa"] for s in settings.values() if "isa" in s and s.get("ranks", 1) == 1},
                  key=ISAS.index)  # fmt: skip
    for mkey, (mname, _, shape) in MODELS.items():
        if f"distcnn/{mkey}/native" not in res:
            continue
        print(f"\n== {mname} ({'x'.join(map(str, shape))}), 1 process, {t} thread(s), batch {b} ==")
        head = "".join(f"{isa + ' train':>15s}{isa + ' eval':>14s}" for isa in isas)
        print(f"{'images/s':26s}{head}")
        rows = [("distcnn", "distcnn")]
        if torch_ok:
            rows += [("PyTorch NCHW", "torch-nchw")]
            rows += [("PyTorch channels_last", "torch-channels_last")]
        for label, kind in rows:
            cells = "".join(
                f"{_fmt(m(f'{kind}/{mkey}/{isa}', 'train_ips')):>15s}"
                f"{_fmt(m(f'{kind}/{mkey}/{isa}', 'eval_ips')):>14s}"
                for isa in isas
            )
            print(f"{label:26s}{cells}")
        if torch_ok:
            cells = cpu_cells = ""
            for isa in isas:
                d = m(f"distcnn/{mkey}/{isa}", "train_ips")
                de = m(f"distcnn/{mkey}/{isa}", "eval_ips")
                lay = {lay: m(f"torch-{lay}/{mkey}/{isa}", "train_ips")
                       for lay in ("nchw", "channels_last")}  # fmt: skip
                best = max(lay, key=lambda k: lay[k] or 0)
                be = max((m(f"torch-{k}/{mkey}/{isa}", "eval_ips") or 0) for k in lay) or None
                rt, re_ = _ratio(d, lay[best]), _ratio(de, be)
                dc = m(f"distcnn/{mkey}/{isa}", "train_ips_cpu")
                tc = m(f"torch-{best}/{mkey}/{isa}", "train_ips_cpu")
                summary[f"1thread/{mkey}/{isa}"] = {
                    "distcnn": d, "torch_best": lay[best], "torch_best_layout": best,
                    "ratio": rt, "eval_ratio": re_, "ratio_cpu_time": _ratio(dc, tc),
                }  # fmt: skip
                cells += f"{_x(rt):>15s}{_x(re_):>14s}"
                cpu_cells += f"{_x(_ratio(dc, tc)):>15s}{'':14s}"
            print(f"{'distcnn / best PyTorch':26s}{cells}")
            print(f"{'  the same by CPU time':26s}{cpu_cells}")
        for isa in isas:
            print(f"  {isa}: distcnn ran {_isa_line(res.get(f'distcnn/{mkey}/{isa}', []))}")
            if torch_ok:
                for lay in ("nchw", "channels_last"):
                    line = _isa_line(res.get(f"torch-{lay}/{mkey}/{isa}", []))
                    print(f"  {isa}: PyTorch {lay} ran {line}")

    print(f"\n== NumPy float32 GEMM ceiling (1024^3, {t} thread(s)) and what distcnn reaches ==")
    for isa in isas:
        gf = m(f"gemm/{isa}", "gflops")
        parts = []
        for mkey in MODELS:
            d = res.get(f"distcnn/{mkey}/{isa}")
            fpi = next((r["flops_per_image"] for r in d or [] if r.get("flops_per_image")), None)
            ips = m(f"distcnn/{mkey}/{isa}", "train_ips")
            if gf and fpi and ips:
                parts.append(f"{mkey} {100 * ips * fpi / (gf * 1e9):.1f} %")
        print(f"{isa:8s}{_fmt(gf, '.1f')} GFLOP/s ({_isa_line(res.get(f'gemm/{isa}', []))}); "
              f"distcnn train steps reach {', '.join(parts) or 'n/a'} of it")  # fmt: skip
        summary[f"gemm/{isa}"] = gf
    share = m("distcnn/ref/native", "data_share")
    print(f"data loading (Split.batch): {_fmt(share * 100 if share is not None else None, '.2f')} "
          "% of the reference step")  # fmt: skip

    print("\n== Peak memory per process (VmHWM, MiB): after warm-up -> after the timed steps ==")
    for key, label in (("distcnn/ref/native", f"batch {b}"), ("mem512", "batch 512")):
        if key not in res:
            continue
        w, e = m(key, "hwm_warm"), m(key, "hwm_end")
        steps = m(key, "steps")
        grow = "stable" if w is not None and e is not None and e - w < 1.0 else "GROWS"
        print(f"{label:10s} {_fmt(w, '.1f')} -> {_fmt(e, '.1f')} over {_fmt(steps)} steps ({grow})")

    print(f"\n== 2 ranks x 1 thread, reference model, batch {b} per rank, native ISA ==")
    one = m("distcnn/ref/native" if t == 1 else "distcnn/ref/native/1thread", "train_ips")
    if not mpi_ok:
        print("mpirun not found (or --smoke): skipped")
    else:
        print(f"{'':48s}{'images/s':>10s}{'scaling':>9s}{'comm r0/r1':>14s}")
        modes = (("auto", "distcnn, default sum"), ("shm", "distcnn, shared memory forced"),
                 ("mpi", "distcnn, MPI_Iallreduce forced"))  # fmt: skip
        for mode, label in modes:
            runs = [r for r in res[f"distcnn2/{mode}"] if r.get("ranks")]
            tot = _median(runs, "train_ips")
            comm = [statistics.median(r["ranks"][i]["comm_share"] for r in runs) if runs else None
                    for i in range(2)]  # fmt: skip
            path = next((r["allreduce"] for r in runs), "failed")
            cm = "n/a" if comm[0] is None else f"{100 * comm[0]:.1f}/{100 * comm[1]:.1f} %"
            print(f"{label:48s}{_fmt(tot):>10s}{_x(_ratio(tot, one)):>9s}{cm:>14s}")
            if mode == "auto":
                print(f"  (the default chose: {path})")
            summary[f"2ranks/{mode}"] = {"images_per_s": tot, "scaling": _ratio(tot, one),
                                         "path": path}  # fmt: skip
        if torch_ok:
            lays = ("nchw", "channels_last")
            ddp = {lay: _median(res[f"ddp2-{lay}"], "train_ips") for lay in lays}
            for lay, v in ddp.items():
                print(f"{'PyTorch DDP, 2 processes (gloo), ' + lay:48s}{_fmt(v):>10s}")
            best = max(ddp, key=lambda k: ddp[k] or 0)
            tot = summary["2ranks/auto"]["images_per_s"]
            r = _ratio(tot, ddp[best])
            print(f"distcnn 2 ranks (default sum) / best DDP ({best}): {_x(r)}")
            summary["2ranks/vs_ddp"] = {"ddp_best": ddp[best], "ddp_layout": best, "ratio": r}

    if args.table:
        print(f"\n== distcnn train images/s, {t} thread(s), by batch and image size ==")
        print(f"{'batch':>6s}" + "".join(f"{f'{px}x{px}':>10s}" for px in TABLE_PIXELS))
        for bb in TABLE_BATCHES:
            cells = "".join(f"{_fmt(m(f'table/{bb}x{px}', 'train_ips')):>10s}"
                            for px in TABLE_PIXELS)  # fmt: skip
            print(f"{bb:>6d}{cells}")

    g = lambda key, name: summary.get(key, {}).get(name)  # noqa: E731
    targets = [("1 thread, reference, native", g("1thread/ref/native", "ratio"), 1.3),
               ("1 thread, reference, AVX2 cap", g("1thread/ref/avx2", "ratio"), 1.3),
               ("1 thread, second, native", g("1thread/second/native", "ratio"), 1.3),
               ("1 thread, second, AVX2 cap", g("1thread/second/avx2", "ratio"), 1.3),
               ("2 ranks / 2-process DDP", g("2ranks/vs_ddp", "ratio"), 1.6),
               ("2-rank scaling, default sum", g("2ranks/auto", "scaling"), 1.85)]  # fmt: skip
    print("\n== Targets (median ratios of this run) ==")
    for label, v, goal in targets:
        if v is not None:
            verdict = "met" if v >= goal else "NOT met"
            print(f"{label:32s}{_x(v):>8s}  target >= {goal:.2f}x: {verdict}")
    summary["targets"] = {label: {"value": v, "target": goal} for label, v, goal in targets}
    return summary


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
