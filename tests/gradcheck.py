"""Numerical gradients by centred differences, and the relative error used to compare them.

Use in float64 only: with ``h = 1e-6`` the truncation error is O(h^2) ~ 1e-12 and the rounding
error is O(eps * |f| / h) ~ 1e-10 relative, so analytic and numerical gradients of a correct
layer agree to ~1e-8 or better, far below the 1e-6 the tests demand, while a wrong gradient is
off by O(1).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def numerical_grad(
    f: Callable[[], np.ndarray | float],
    x: np.ndarray,
    dy: np.ndarray | float = 1.0,
    h: float = 1e-6,
) -> np.ndarray:
    """Centred-difference gradient of ``sum(f() * dy)`` with respect to every element of ``x``.

    f: a function of no arguments that reads ``x`` (by reference) and returns an array (or a
    scalar); x: the array to perturb, any shape, modified in place one element at a time and
    restored exactly; dy: the upstream gradient, broadcastable to ``f()``'s shape (1.0 for a
    scalar loss). Returns grad with x's shape, float64:

        grad[i] = (sum(f(x + h e_i) * dy) - sum(f(x - h e_i) * dy)) / (2 h)

    ``f()`` may return a workspace that the next call overwrites, so each result is reduced to a
    scalar before ``f`` is called again.
    """
    grad = np.zeros(x.shape, dtype=np.float64)  # same shape as x
    for idx in np.ndindex(x.shape):
        old = x[idx]
        x[idx] = old + h
        plus = float(np.sum(np.asarray(f(), dtype=np.float64) * dy))
        x[idx] = old - h
        minus = float(np.sum(np.asarray(f(), dtype=np.float64) * dy))
        x[idx] = old
        grad[idx] = (plus - minus) / (2.0 * h)
    return grad


def rel_error(a: np.ndarray, b: np.ndarray) -> float:
    """Largest absolute difference divided by the largest magnitude: a scale-free error.

    ``max|a - b| / max(1e-12, max(|a| + |b|))``. Unlike CS231n's element-wise
    ``|a - b| / (|a| + |b|)``, a gradient element that is ~0 in both (e.g. behind a ReLU, or
    round-off in a finite difference) cannot blow the error up; the floor 1e-12 makes two
    all-zero arrays compare as equal (error 0).
    """
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    if a.size == 0:
        return 0.0
    return float(np.max(np.abs(a - b)) / max(1e-12, float(np.max(np.abs(a) + np.abs(b)))))
