"""The global sample order and how each global batch is cut between ranks.

The order of an epoch is a pure function of (seed, epoch): the same permutation whatever the
number of ranks, so 1 rank and N ranks see the same global batches, and a run resumed on another
number of ranks continues the same sequence. Global batch b of an epoch is
order[b*B : (b+1)*B]; the last one is smaller when B does not divide N (no sample is dropped or
repeated). Rank r of p takes the contiguous slice [r*n//p, (r+1)*n//p) of a batch of n samples,
which may be empty: that rank still joins the step's collective with a zero gradient.
"""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """Permutation (num_samples,) of sample indices for this epoch; independent of rank count."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, epoch)))
    return rng.permutation(num_samples)


def shard_bounds(n: int, parts: int, index: int) -> tuple[int, int]:
    """[start, stop) of part `index` of n items cut into `parts` contiguous near-equal parts."""
    return index * n // parts, (index + 1) * n // parts


def steps_per_epoch(num_samples: int, batch_size: int) -> int:
    return -(-num_samples // batch_size)
