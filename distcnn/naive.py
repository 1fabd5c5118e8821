"""Slow, obviously correct reference layers in NCHW, written with explicit Python loops.

Only the tests use this module: every fast kernel in ``distcnn.layers`` is compared against the
function of the same name here. Each function computes in the dtype of its inputs (except the
softmax cross-entropy, which works in float64) and follows the same conventions as the fast code:

* convolution is cross-correlation, zero padding ``pad = (ph, pw)`` on both sides,
  ``OH = (H + 2*ph - KH) // sh + 1`` and likewise for ``OW``;
* pooling windows start at the top-left corner, ``OH = (H - KH) // sh + 1`` (PyTorch's floor
  mode, no padding); rows or columns that no window covers get zero gradient;
* in max pooling the gradient of each window goes to exactly one input, the first maximum in
  row-major window order; overlapping windows accumulate.

Every backward function returns the gradient of ``sum(y * dy)``, where ``y`` is the output of the
matching forward function.
"""

from __future__ import annotations

import numpy as np


def _out_size(size: int, kernel: int, stride: int, pad: int = 0) -> int:
    """Number of window positions along one axis."""
    return (size + 2 * pad - kernel) // stride + 1


# --------------------------------------------------------------------------------------------
# Convolution


def conv2d_forward_naive(
    x: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    stride: tuple[int, int],
    pad: tuple[int, int],
) -> np.ndarray:
    """Cross-correlation ``y[n,f,i,j] = b[f] + sum_{c,a,e} xpad[n,c,i*sh+a,j*sw+e] * w[f,c,a,e]``.

    x: (N, C, H, W), w: (F, C, KH, KW), b: (F,) -> y: (N, F, OH, OW), dtype of x.
    """
    N, C, H, W = x.shape
    F, C2, KH, KW = w.shape
    assert C == C2, (x.shape, w.shape)
    sh, sw = stride
    ph, pw = pad
    OH, OW = _out_size(H, KH, sh, ph), _out_size(W, KW, sw, pw)
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # (N, C, H+2ph, W+2pw)
    y = np.zeros((N, F, OH, OW), dtype=x.dtype)  # (N, F, OH, OW)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    window = xp[n, :, i * sh : i * sh + KH, j * sw : j * sw + KW]  # (C, KH, KW)
                    y[n, f, i, j] = np.sum(window * w[f]) + b[f]
    return y


def conv2d_backward_naive(
    x: np.ndarray,
    w: np.ndarray,
    stride: tuple[int, int],
    pad: tuple[int, int],
    dy: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(conv2d_forward_naive(x, w, b, stride, pad) * dy)``.

    x: (N, C, H, W), w: (F, C, KH, KW), dy: (N, F, OH, OW)
    -> dx: (N, C, H, W), dw: (F, C, KH, KW), db: (F,).

    Each output element scatters ``dy * w`` back onto the input window it read, and adds
    ``dy * window`` to the filter it used; padding positions are cropped away at the end.
    """
    N, C, H, W = x.shape
    F, _, KH, KW = w.shape
    sh, sw = stride
    ph, pw = pad
    _, _, OH, OW = dy.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))  # (N, C, H+2ph, W+2pw)
    dxp = np.zeros_like(xp)  # (N, C, H+2ph, W+2pw)
    dw = np.zeros_like(w)  # (F, C, KH, KW)
    db = np.zeros(F, dtype=w.dtype)  # (F,)
    for n in range(N):
        for f in range(F):
            for i in range(OH):
                for j in range(OW):
                    g = dy[n, f, i, j]
                    rows = slice(i * sh, i * sh + KH)
                    cols = slice(j * sw, j * sw + KW)
                    dxp[n, :, rows, cols] += g * w[f]
                    dw[f] += g * xp[n, :, rows, cols]
                    db[f] += g
    dx = dxp[:, :, ph : ph + H, pw : pw + W]  # (N, C, H, W)
    return dx.copy(), dw, db


# --------------------------------------------------------------------------------------------
# ReLU


def relu_forward_naive(x: np.ndarray) -> np.ndarray:
    """``y = max(x, 0)`` element by element. x: any shape -> y: same shape and dtype."""
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = x[idx] if x[idx] > 0 else 0
    return y


def relu_backward_naive(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """``dx = dy where x > 0 else 0`` (the gradient at exactly 0 is taken as 0).

    x, dy: same shape -> dx: same shape, dtype of dy.
    """
    dx = np.zeros_like(dy)
    for idx in np.ndindex(x.shape):
        if x[idx] > 0:
            dx[idx] = dy[idx]
    return dx


# --------------------------------------------------------------------------------------------
# Pooling


def _first_argmax(window: np.ndarray) -> tuple[int, int]:
    """(row, col) of the first maximum of a 2-D window in row-major order, found by hand."""
    best = (0, 0)
    for a in range(window.shape[0]):
        for e in range(window.shape[1]):
            if window[a, e] > window[best]:  # strict: a later equal value never wins
                best = (a, e)
    return best


def maxpool_forward_naive(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]
) -> np.ndarray:
    """Max over each (KH, KW) window. x: (N, C, H, W) -> y: (N, C, OH, OW), dtype of x."""
    N, C, H, W = x.shape
    KH, KW = kernel
    sh, sw = stride
    OH, OW = _out_size(H, KH, sh), _out_size(W, KW, sw)
    y = np.zeros((N, C, OH, OW), dtype=x.dtype)  # (N, C, OH, OW)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    window = x[n, c, i * sh : i * sh + KH, j * sw : j * sw + KW]  # (KH, KW)
                    y[n, c, i, j] = window[_first_argmax(window)]
    return y


def maxpool_backward_naive(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], dy: np.ndarray
) -> np.ndarray:
    """Route each ``dy[n,c,i,j]`` to the first maximum of its window; overlaps accumulate.

    x: (N, C, H, W), dy: (N, C, OH, OW) -> dx: (N, C, H, W), dtype of dy.
    """
    N, C, H, W = x.shape
    KH, KW = kernel
    sh, sw = stride
    _, _, OH, OW = dy.shape
    dx = np.zeros(x.shape, dtype=dy.dtype)  # (N, C, H, W)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    window = x[n, c, i * sh : i * sh + KH, j * sw : j * sw + KW]  # (KH, KW)
                    a, e = _first_argmax(window)
                    dx[n, c, i * sh + a, j * sw + e] += dy[n, c, i, j]
    return dx


def avgpool_forward_naive(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int]
) -> np.ndarray:
    """Mean over each (KH, KW) window. x: (N, C, H, W) -> y: (N, C, OH, OW), dtype of x."""
    N, C, H, W = x.shape
    KH, KW = kernel
    sh, sw = stride
    OH, OW = _out_size(H, KH, sh), _out_size(W, KW, sw)
    y = np.zeros((N, C, OH, OW), dtype=x.dtype)  # (N, C, OH, OW)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    window = x[n, c, i * sh : i * sh + KH, j * sw : j * sw + KW]  # (KH, KW)
                    y[n, c, i, j] = np.sum(window) / (KH * KW)
    return y


def avgpool_backward_naive(
    x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int], dy: np.ndarray
) -> np.ndarray:
    """Spread each ``dy[n,c,i,j] / (KH*KW)`` evenly over its window; overlaps accumulate.

    x: (N, C, H, W), dy: (N, C, OH, OW) -> dx: (N, C, H, W), dtype of dy.
    """
    KH, KW = kernel
    sh, sw = stride
    N, C, OH, OW = dy.shape
    dx = np.zeros(x.shape, dtype=dy.dtype)  # (N, C, H, W)
    for n in range(N):
        for c in range(C):
            for i in range(OH):
                for j in range(OW):
                    share = dy[n, c, i, j] / (KH * KW)
                    dx[n, c, i * sh : i * sh + KH, j * sw : j * sw + KW] += share
    return dx


# --------------------------------------------------------------------------------------------
# Fully connected


def linear_forward_naive(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``y[n,o] = b[o] + sum_k x[n,k] * w[o,k]``.

    x: (N, D) or (N, C, H, W) (flattened in C, H, W order), w: (OUT, D), b: (OUT,)
    -> y: (N, OUT), dtype of x.
    """
    xf = x.reshape(x.shape[0], -1)  # (N, D)
    N, D = xf.shape
    OUT = w.shape[0]
    y = np.zeros((N, OUT), dtype=x.dtype)  # (N, OUT)
    for n in range(N):
        for o in range(OUT):
            acc = b[o]
            for k in range(D):
                acc = acc + xf[n, k] * w[o, k]
            y[n, o] = acc
    return y


def linear_backward_naive(
    x: np.ndarray, w: np.ndarray, dy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(linear_forward_naive(x, w, b) * dy)``.

    x: (N, D) or (N, C, H, W), w: (OUT, D), dy: (N, OUT)
    -> dx: shape of x, dw: (OUT, D), db: (OUT,).
    """
    xf = x.reshape(x.shape[0], -1)  # (N, D)
    N, D = xf.shape
    OUT = w.shape[0]
    dxf = np.zeros((N, D), dtype=dy.dtype)  # (N, D)
    dw = np.zeros_like(w)  # (OUT, D)
    db = np.zeros(OUT, dtype=w.dtype)  # (OUT,)
    for n in range(N):
        for o in range(OUT):
            g = dy[n, o]
            dxf[n] += g * w[o]
            dw[o] += g * xf[n]
            db[o] += g
    return dxf.reshape(x.shape), dw, db


# --------------------------------------------------------------------------------------------
# Batch normalisation, dropout, global average pooling


def batchnorm_forward_naive(
    x: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    eps: float,
    mean: np.ndarray | None = None,
    var: np.ndarray | None = None,
) -> np.ndarray:
    """``y = gamma * (x - mu) / sqrt(var + eps) + beta`` per channel c (axis 1).

    x: (N, C, H, W) or (N, C). Training (mean, var None): mu and the biased var are those of
    the batch's N*H*W values of each channel, summed in loops; evaluation: the given (C,)
    running mean and variance. -> y: shape and dtype of x.
    """
    x4 = x.reshape(x.shape[0], x.shape[1], -1)  # (N, C, L)
    N, C, L = x4.shape
    y = np.zeros_like(x4)
    for c in range(C):
        if mean is None:
            total = 0.0
            for n in range(N):
                for i in range(L):
                    total += float(x4[n, c, i])
            mu = total / (N * L)
            sq = 0.0
            for n in range(N):
                for i in range(L):
                    sq += (float(x4[n, c, i]) - mu) ** 2
            v = sq / (N * L)
        else:
            mu, v = float(mean[c]), float(var[c])
        for n in range(N):
            for i in range(L):
                y[n, c, i] = gamma[c] * (x4[n, c, i] - mu) / np.sqrt(v + eps) + beta[c]
    return y.reshape(x.shape)


def batchnorm_backward_naive(
    x: np.ndarray, gamma: np.ndarray, eps: float, dy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of ``sum(batchnorm_forward_naive(x, gamma, beta, eps) * dy)`` in training mode,
    by the chain rule through mu and var written out per element:

        dxhat_i = dy_i * gamma
        dvar    = sum_i dxhat_i * (x_i - mu) * (-1/2) * (var + eps)^(-3/2)
        dmu     = sum_i -dxhat_i / sqrt(var + eps)  (+ dvar * sum_i -2 (x_i - mu) / M, which is 0)
        dx_i    = dxhat_i / sqrt(var + eps) + dvar * 2 (x_i - mu) / M + dmu / M

    x, dy: (N, C, H, W) or (N, C) -> dx (shape of x), dgamma (C,), dbeta (C,).
    """
    x4 = x.reshape(x.shape[0], x.shape[1], -1).astype(np.float64)
    d4 = dy.reshape(x4.shape).astype(np.float64)
    N, C, L = x4.shape
    M = N * L
    dx = np.zeros_like(x4)
    dgamma = np.zeros(C)
    dbeta = np.zeros(C)
    for c in range(C):
        vals = x4[:, c, :]
        mu = vals.sum() / M
        var = ((vals - mu) ** 2).sum() / M
        inv = 1.0 / np.sqrt(var + eps)
        dvar = 0.0
        dmu = 0.0
        for n in range(N):
            for i in range(L):
                dxhat = d4[n, c, i] * gamma[c]
                dvar += dxhat * (vals[n, i] - mu) * -0.5 * inv**3
                dmu += -dxhat * inv
                dgamma[c] += d4[n, c, i] * (vals[n, i] - mu) * inv
                dbeta[c] += d4[n, c, i]
        for n in range(N):
            for i in range(L):
                dxhat = d4[n, c, i] * gamma[c]
                dx[n, c, i] = dxhat * inv + dvar * 2 * (vals[n, i] - mu) / M + dmu / M
    dt = dy.dtype
    return dx.reshape(x.shape).astype(dt), dgamma.astype(dt), dbeta.astype(dt)


def dropout_forward_naive(x: np.ndarray, keep: np.ndarray, p: float) -> np.ndarray:
    """``y = x * keep / (1 - p)`` element by element; keep: bool, x's shape."""
    y = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        y[idx] = x[idx] / (1.0 - p) if keep[idx] else 0
    return y


def gap_forward_naive(x: np.ndarray) -> np.ndarray:
    """Mean over each channel's H*W values. x: (N, C, H, W) -> y: (N, C), dtype of x."""
    N, C, H, W = x.shape
    y = np.zeros((N, C), dtype=x.dtype)
    for n in range(N):
        for c in range(C):
            y[n, c] = sum(float(x[n, c, i, j]) for i in range(H) for j in range(W)) / (H * W)
    return y


def gap_backward_naive(x: np.ndarray, dy: np.ndarray) -> np.ndarray:
    """Each of a channel's H*W inputs gets dy / (H*W). -> dx: (N, C, H, W), dtype of dy."""
    N, C, H, W = x.shape
    dx = np.zeros(x.shape, dtype=dy.dtype)
    for n in range(N):
        for c in range(C):
            for i in range(H):
                for j in range(W):
                    dx[n, c, i, j] = dy[n, c] / (H * W)
    return dx


# --------------------------------------------------------------------------------------------
# Loss


def softmax_cross_entropy_naive(logits: np.ndarray, labels: np.ndarray) -> tuple[float, np.ndarray]:
    """Summed cross-entropy of softmax(logits) against integer labels, in float64.

    logits: (N, K), labels: (N,) ints in [0, K) -> (loss_sum, dlogits (N, K) float64), where
    ``loss_sum = sum_n (logsumexp(logits[n]) - logits[n, labels[n]])`` and
    ``dlogits = softmax(logits) - onehot(labels)`` is the gradient of that sum. The row maximum is
    subtracted before exponentiating, so logits of any magnitude neither overflow nor give NaN.
    """
    z = np.asarray(logits, dtype=np.float64)
    N, K = z.shape
    loss_sum = 0.0
    dlogits = np.zeros((N, K), dtype=np.float64)  # (N, K)
    for n in range(N):
        m = max(z[n, k] for k in range(K))
        exps = [np.exp(z[n, k] - m) for k in range(K)]  # each in (0, 1]; the max gives 1
        total = sum(exps)
        label = int(labels[n])
        loss_sum += float(m + np.log(total) - z[n, label])
        for k in range(K):
            dlogits[n, k] = exps[k] / total - (1.0 if k == label else 0.0)
    return loss_sum, dlogits
