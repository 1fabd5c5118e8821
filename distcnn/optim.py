"""Optimizers on flat buffers (SGD, Adam, AdamW) and learning-rate schedules.

g is the gradient of the mean loss over the global batch (times grad_scale, for clipping).
SGD, exactly as docs/interface.md defines it:
    v = momentum * v + g + weight_decay * p
    p = p - lr * v
Adam and AdamW, exactly as torch.optim defines them (t = Adam steps done, from 1):
    adam:  g = g + weight_decay * p                     (L2, coupled)
    adamw: p = p * (1 - lr * weight_decay)              (decoupled)
    m = beta1 * m + (1 - beta1) * g                     (torch: m.lerp_(g, 1 - beta1))
    v = beta2 * v + (1 - beta2) * g * g
    p = p - (lr / (1 - beta1^t)) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
Every optimizer keeps its whole state in `state` (flat buffers laid out like params, saved in
the checkpoint under /optimizer/<name>/<param>) and `steps`; the schedule is a pure function of
the step, so resuming needs nothing else.
"""

from __future__ import annotations

import math

import numpy as np

SCHEDULES = ("constant", "cosine", "step")
OPTIMIZERS = ("sgd", "adam", "adamw")


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
        self.state = {"velocity": self.velocity}
        self.steps = 0  # updates applied (not needed by SGD; kept for the checkpoint)

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
        self.steps += 1


class Adam:
    """Adam (decoupled=False) or AdamW (decoupled=True) over one flat parameter buffer, as
    torch.optim.Adam / AdamW (amsgrad off); state exp_avg (m), exp_avg_sq (v) and steps."""

    def __init__(
        self,
        params: np.ndarray,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        decoupled: bool = False,
    ) -> None:
        self.params = params  # (P,) updated in place
        self.beta1, self.beta2 = (float(b) for b in betas)
        self.eps = float(eps)
        self.weight_decay = float(weight_decay)
        self.decoupled = decoupled
        self.exp_avg = np.zeros_like(params)  # (P,) m
        self.exp_avg_sq = np.zeros_like(params)  # (P,) v
        self.state = {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
        self.steps = 0
        self._g = np.empty_like(params)  # (P,) scratch: the gradient as used
        self._d = np.empty_like(params)  # (P,) scratch: the denominator

    def step(self, grads: np.ndarray, lr: float, grad_scale: float = 1.0) -> None:
        """One update with g = grad_scale * grads (grads is only read: it may be shared)."""
        p, m, v, g, d = self.params, self.exp_avg, self.exp_avg_sq, self._g, self._d
        dt = p.dtype
        self.steps += 1
        t = self.steps
        np.multiply(grads, np.asarray(grad_scale, dtype=dt), out=g)
        if self.weight_decay != 0.0:
            if self.decoupled:
                p *= np.asarray(1.0 - lr * self.weight_decay, dtype=dt)
            else:
                np.multiply(p, np.asarray(self.weight_decay, dtype=dt), out=d)
                g += d
        np.subtract(g, m, out=d)  # m = m + (1 - beta1) * (g - m)
        d *= np.asarray(1.0 - self.beta1, dtype=dt)
        m += d
        v *= np.asarray(self.beta2, dtype=dt)
        np.multiply(g, g, out=d)
        d *= np.asarray(1.0 - self.beta2, dtype=dt)
        v += d
        step_size = lr / (1.0 - self.beta1**t)
        np.sqrt(v, out=d)
        d *= np.asarray(1.0 / math.sqrt(1.0 - self.beta2**t), dtype=dt)
        d += np.asarray(self.eps, dtype=dt)
        np.divide(m, d, out=d)
        d *= np.asarray(step_size, dtype=dt)
        p -= d


def make_optimizer(
    name: str,
    params: np.ndarray,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> SGD | Adam:
    """The optimizer `name` (one of OPTIMIZERS) over params."""
    if name == "sgd":
        return SGD(params, momentum, weight_decay)
    if name in ("adam", "adamw"):
        return Adam(params, betas, eps, weight_decay, decoupled=name == "adamw")
    raise ValueError(f"unknown optimizer {name!r}; use one of {OPTIMIZERS}")


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
