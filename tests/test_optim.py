"""SGD against the update docs/interface.md defines, and the learning-rate schedules against their
formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distcnn.optim import SGD, learning_rate


@pytest.mark.parametrize(("momentum", "wd"), [(0.9, 5e-4), (0.0, 5e-4), (0.9, 0.0), (0.0, 0.0)])
def test_sgd_follows_the_defined_update(momentum: float, wd: float) -> None:
    """v = momentum * v + g + wd * p; p = p - lr * v, over several steps, against float64."""
    rng = np.random.default_rng(0)
    p = rng.standard_normal(1000).astype(np.float32)
    opt = SGD(p, momentum, wd)
    p64, v64 = p.astype(np.float64), np.zeros(1000)
    for lr in (0.1, 0.05, 0.01, 0.2):
        g = rng.standard_normal(1000).astype(np.float32)
        opt.step(g, lr)
        v64 = momentum * v64 + g + wd * p64
        p64 = p64 - lr * v64
        np.testing.assert_allclose(opt.velocity, v64, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(p, p64, rtol=1e-5, atol=1e-6)


def test_grad_scale_equals_a_prescaled_gradient_and_leaves_the_gradient_alone() -> None:
    """The trainer clips by passing a scale, because on the shared-memory path the summed
    gradient is a read-only array every rank of the node reads."""
    rng = np.random.default_rng(1)
    start = rng.standard_normal(500).astype(np.float32)
    a, b = start.copy(), start.copy()
    opt_a, opt_b = SGD(a, 0.9, 5e-4), SGD(b, 0.9, 5e-4)
    for _ in range(3):
        g = rng.standard_normal(500).astype(np.float32)
        scale = 0.37
        shared = g.copy()
        shared.flags.writeable = False  # writing into it would raise
        opt_a.step(shared, 0.05, scale)
        opt_b.step(g * np.float32(scale), 0.05)
        assert np.array_equal(shared, g)
        assert np.array_equal(a, b) and np.array_equal(opt_a.velocity, opt_b.velocity)


def test_learning_rate_schedules() -> None:
    base, total = 0.1, 100
    assert learning_rate("constant", base, 57, total) == base
    assert learning_rate("cosine", base, 0, total) == pytest.approx(base)
    assert learning_rate("cosine", base, 50, total) == pytest.approx(base / 2)
    assert learning_rate("cosine", base, 25, total) == pytest.approx(
        base * 0.5 * (1 + math.cos(math.pi / 4))
    )
    assert learning_rate("cosine", base, total, total) == pytest.approx(0.0, abs=1e-12)
    assert learning_rate("cosine", base, total + 10, total) == pytest.approx(0.0, abs=1e-12)
    # step: by default two decays, at a third and two thirds of the run
    assert [learning_rate("step", base, s, 90) for s in (0, 29, 30, 59, 60, 89)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
    )
    assert learning_rate("step", base, 25, total, step_size=10, gamma=0.5) == pytest.approx(0.025)
    # warm-up: linear from lr/warmup to lr over the first `warmup` steps, then the schedule
    assert [learning_rate("constant", base, s, total, warmup_steps=4) for s in range(5)] == (
        pytest.approx([0.025, 0.05, 0.075, 0.1, 0.1])
    )
    assert learning_rate("cosine", base, 1, total, warmup_steps=4) == pytest.approx(
        0.5 * base * 0.5 * (1 + math.cos(math.pi * 0.01))
    )
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        learning_rate("linear", base, 0, total)
