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


@pytest.mark.parametrize("name", ["adam", "adamw"])
@pytest.mark.parametrize("wd", [0.0, 0.01])
def test_adam_and_adamw_follow_the_torch_formulas(name: str, wd: float) -> None:
    """m, v, bias corrections and the (coupled or decoupled) weight decay, against float64."""
    from distcnn.optim import make_optimizer

    rng = np.random.default_rng(3)
    p = rng.standard_normal(800).astype(np.float32)
    b1, b2, eps = 0.8, 0.99, 1e-6
    opt = make_optimizer(name, p, weight_decay=wd, betas=(b1, b2), eps=eps)
    p64, m, v = p.astype(np.float64), np.zeros(800), np.zeros(800)
    for t, lr in enumerate((0.01, 0.003, 0.02, 0.001, 0.01), start=1):
        g = rng.standard_normal(800).astype(np.float32)
        scale = 0.5 if t == 3 else 1.0
        opt.step(g, lr, scale)
        g64 = g.astype(np.float64) * scale
        if name == "adamw":
            p64 = p64 * (1 - lr * wd)
        else:
            g64 = g64 + wd * p64
        m = b1 * m + (1 - b1) * g64
        v = b2 * v + (1 - b2) * g64**2
        p64 = p64 - lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
        np.testing.assert_allclose(opt.exp_avg, m, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(opt.exp_avg_sq, v, rtol=1e-5, atol=1e-9)
        np.testing.assert_allclose(p, p64, rtol=1e-5, atol=1e-6)
    assert opt.steps == 5 and set(opt.state) == {"exp_avg", "exp_avg_sq"}


def test_adam_matches_torch_optim_when_torch_is_present() -> None:
    torch = pytest.importorskip("torch")
    from distcnn.optim import make_optimizer

    rng = np.random.default_rng(4)
    for name, cls in (("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)):
        p = rng.standard_normal(300).astype(np.float32)
        tp = torch.nn.Parameter(torch.from_numpy(p.copy()))
        ours = make_optimizer(name, p, weight_decay=0.05, betas=(0.85, 0.98), eps=1e-7)
        theirs = cls([tp], lr=0.01, betas=(0.85, 0.98), eps=1e-7, weight_decay=0.05)
        for _ in range(4):
            g = rng.standard_normal(300).astype(np.float32)
            ours.step(g, 0.01)
            tp.grad = torch.from_numpy(g.copy())
            theirs.step()
        np.testing.assert_allclose(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)
