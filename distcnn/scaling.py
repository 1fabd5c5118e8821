"""How far data-parallel training scales: a cost model fitted to measurements.

One training step on N ranks with a per-rank batch b is, in distcnn, compute then one blocking
allreduce of the gradient (no overlap):

    t_step(N, b) = t_compute(b) + t_allreduce(N, n)        n = 4 * (P + 3) bytes
    t_allreduce(N, n) = 2 * ceil(log2 N) * alpha + 2 * (N - 1) / N * n * beta

The allreduce term is the classic latency-bandwidth (alpha-beta) cost of a reduce-scatter
followed by an allgather (recursive halving/doubling or a ring, which move the same bytes):
alpha is the per-message latency, beta the seconds per byte of the slowest link. Efficiency is
t_compute / t_step (the fraction of the step spent computing) and the throughput
N * b / t_step images per second.

`fit_alpha_beta` turns measured allreduce times at several sizes on k ranks into alpha and beta
(a least-squares line through t(n) = A + B n, read back through the formula above);
`PRESETS` are textbook figures for common interconnects (assumptions, not measurements).

Known to be wrong where (docs/mpi.md has the comparison with measured runs):
- it ignores stragglers: the step waits for the slowest of N ranks, and the spread of compute
  times grows with N (noise, thermal limits, a busy neighbour);
- it assumes a full-bisection network and one rank per host; ranks sharing a host share its
  link (the hierarchical path reduces that) and oversubscribed switches add contention;
- MPI picks other algorithms for small messages (recursive doubling: log2 N steps carrying all
  n bytes) and switches protocols (eager/rendezvous) with size, so beta is not one number;
- the compute time is measured on this machine, at this load, with this many ranks sharing
  its cores: a cluster's node computes at its own speed;
- data loading, evaluation and checkpoint saves are left out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Network:
    name: str
    alpha: float  # seconds per message (latency)
    beta: float  # seconds per byte (1 / bandwidth)


# Textbook figures (MPI over TCP for Ethernet, RDMA for InfiniBand): assumptions for planning.
PRESETS = (
    Network("10 Gb Ethernet", 30e-6, 1 / 1.1e9),
    Network("25 Gb Ethernet", 20e-6, 1 / 2.8e9),
    Network("100 Gb Ethernet", 10e-6, 1 / 11e9),
    Network("InfiniBand HDR 200 Gb", 2e-6, 1 / 23e9),
)
RANKS = (8, 16, 32, 64, 128, 256)
BATCHES = (16, 64, 256)


def _latency_steps(n_ranks: int) -> int:
    return 2 * math.ceil(math.log2(n_ranks)) if n_ranks > 1 else 0


def allreduce_seconds(net: Network, n_ranks: int, nbytes: float) -> float:
    """The model's time of one allreduce of `nbytes` over `n_ranks`."""
    if n_ranks <= 1:
        return 0.0
    return _latency_steps(n_ranks) * net.alpha + 2 * (n_ranks - 1) / n_ranks * nbytes * net.beta


def fit_alpha_beta(
    sizes: Sequence[float], seconds: Sequence[float], n_ranks: int, name: str = "measured"
) -> Network:
    """alpha and beta from allreduce times measured at several byte sizes on n_ranks >= 2."""
    if n_ranks < 2:
        raise ValueError("alpha and beta need at least 2 ranks")
    x, y = np.asarray(sizes, dtype=np.float64), np.asarray(seconds, dtype=np.float64)
    slope, intercept = np.polyfit(x, y, 1)
    alpha = max(float(intercept), 0.0) / _latency_steps(n_ranks)
    beta = max(float(slope), 0.0) / (2 * (n_ranks - 1) / n_ranks)
    return Network(name, alpha, beta)


@dataclass(frozen=True)
class Prediction:
    network: str
    ranks: int
    batch: int
    step_seconds: float
    efficiency: float
    images_per_sec: float


def predict(
    net: Network, compute_seconds: dict[int, float], grad_bytes: int, ranks: Sequence[int]
) -> list[Prediction]:
    """Step time, efficiency and images/s for every (ranks, per-rank batch) given the compute
    time per step at each per-rank batch."""
    out = []
    for b, tc in sorted(compute_seconds.items()):
        for n in ranks:
            step = tc + allreduce_seconds(net, n, grad_bytes)
            out.append(Prediction(net.name, n, b, step, tc / step, n * b / step))
    return out


def table(
    nets: Sequence[Network],
    compute_seconds: dict[int, float],
    grad_bytes: int,
    ranks: Sequence[int] = RANKS,
) -> str:
    """The prediction as text: per network, rows of per-rank batch, columns of rank counts,
    cells `efficiency% images/s`."""
    lines = []
    head = "".join(f"{n:>16}" for n in ranks)
    for net in nets:
        lines.append(
            f"{net.name}: alpha {net.alpha * 1e6:.1f} us, "
            f"beta {net.beta * 1e9:.3f} ns/B ({1 / net.beta / 1e9 if net.beta else math.inf:.2f} "
            f"GB/s); efficiency and images/s per N ranks"
        )
        lines.append(f"  {'batch/rank':<12}{head}")
        preds = predict(net, compute_seconds, grad_bytes, ranks)
        for b in sorted(compute_seconds):
            row = [p for p in preds if p.batch == b]
            cells = "".join(
                f"{f'{100 * p.efficiency:.0f}% {p.images_per_sec:,.0f}':>16}" for p in row
            )
            lines.append(f"  {b:<12}{cells}")
    return "\n".join(lines)
