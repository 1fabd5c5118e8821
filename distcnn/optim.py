"""SGD with momentum and weight decay on flat buffers, and learning-rate schedules.

One step, exactly as docs/interface.md defines it (g is the gradient of the mean loss over the
global batch):
    v = momentum * v + g + weight_decay * p
    p = p - lr * v
The schedule is a pure function of the step, so resuming needs only the step count.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "cosine", "step")


class SGD:
    """Momentum SGD over one flat parameter buffer; `velocity` is the whole optimizer state."""

    def __init__(
        self, params: np.ndarray, momentum: float = 0.9, weight_decay: float = 0.0
    ) -> None:
        self.params = params  # (P,) updated in place
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.velocity = np.zeros_like(params)  # (P,)
        self._scratch = np.empty_like(params)  # (P,) reused every step: no temporaries

    def step(self, grads: np.ndarray, lr: float, grad_scale: float = 1.0) -> None:
        """One update with g = grad_scale * grads (grads is only read: it may be shared)."""
        v, tmp = self.velocity, self._scratch
        if grad_scale != 1.0:
            grads = np.multiply(grads, np.asarray(grad_scale, dtype=grads.dtype), out=tmp)
        if self.momentum != 0.0:
            v *= self.momentum
            v += grads
        else:
            v[...] = grads
        if self.weight_decay != 0.0:
            np.multiply(self.params, self.weight_decay, out=tmp)
            v += tmp
        np.multiply(v, np.asarray(lr, dtype=self.params.dtype), out=tmp)
        self.params -= tmp


def learning_rate(
    name: str,
    base_lr: float,
    step: int,
    total_steps: int,
    warmup_steps: int = 0,
    step_size: int = 0,
    gamma: float = 0.1,
) -> float:
    """Learning rate for optimizer step `step` (0-based) of a run of `total_steps` steps.

    constant: base_lr. cosine: base_lr * (1 + cos(pi * t)) / 2 with t = step / total_steps.
    step: base_lr * gamma ** (step // step_size), step_size defaulting to a third of the run
    (so two decays). A linear warm-up over `warmup_steps` steps
    multiplies any of them.
    """
    if name == "constant":
        lr = base_lr
    elif name == "cosine":
        t = min(step, total_steps) / max(1, total_steps)
        lr = base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    elif name == "step":
        size = step_size if step_size > 0 else max(1, -(-total_steps // 3))
        lr = base_lr * gamma ** (step // size)
    else:
        raise ValueError(f"unknown schedule {name!r}; use one of {SCHEDULES}")
    if warmup_steps > 0 and step < warmup_steps:
        lr *= (step + 1) / warmup_steps
    return lr
