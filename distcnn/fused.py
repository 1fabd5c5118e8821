"""A 3x3 "same" convolution followed by a 2x2 max-pool (and optionally relu), on polyphase grids.

The Model replaces conv -> maxpool:2 [-> relu] by one ConvPool block when the conv is 3x3, stride
1, padding 1 and the image height and width are even (the reference model's two blocks). It uses
the Conv2d's and MaxPool2d's parameters and gradients, and gives the same numbers they do.

Why: a 2x2 pool over an ordinary layout needs stride-2 passes, which NumPy runs several times
slower per element than contiguous ones. Here the conv output is computed directly split into
its four phases, p[pr, pc][a, b] = conv[2a + pr, 2b + pc]. The pool is then three contiguous
maxima over four (F, P) planes, and its backward is six contiguous multiplies. The stride-2
passes move to the conv input, which is 16x (conv1) or 2x (conv2) smaller than the conv output.

Layout (P = N * Hp * Wp, Hp = H/2 + 1, Wp = W/2 + 1):
* input phase grids xp (4, C, P + slack): input pixel (n, 2u + sr, 2v + sc) sits in phase
  sr*2 + sc at (n*Hp + u + 1)*Wp + v + 1. Row 0 and column 0 of every image block are zero, a
  border shared with the previous image or row.
* output phases o (F, 4, P): conv output (n, 2a + pr, 2b + pc) at [:, pr*2 + pc, (n*Hp + a)*Wp + b].
  Row a = H/2 and column b = W/2 are computed and ignored.
Output phase (pr, pc) at kernel offset (i, j) reads input row 2a + pr + i - 1 = 2(a + du) + sr
with di = pr + i - 1, sr = di mod 2, du = di // 2 in {-1, 0, 1}. That is the contiguous slice of
input phase (sr, sc) at offset (du + 1)*Wp + dv + 1, so im2col is 36 contiguous copies and
col2im 36 contiguous adds.
Ties in the pool go to the first maximum in row-major window order, as in MaxPool2d.
"""

from __future__ import annotations

import time

import numpy as np

from distcnn.layers import Conv2d, MaxPool2d, Workspace


def fits(conv: Conv2d, pool: MaxPool2d) -> bool:
    """True when conv -> pool can run as a ConvPool block."""
    _, h, w = conv.in_shape
    return (
        conv.kernel == (3, 3)
        and conv.stride == (1, 1)
        and conv.pad == (1, 1)
        and h % 2 == 0
        and w % 2 == 0
        and pool.pairwise
    )


class ConvPool:
    """conv (3x3, stride 1, pad 1) -> 2x2/2 max-pool [-> relu] on polyphase grids.

    forward(x (N, C, H, W)) -> (N, F, H/2, W/2), a view of a workspace;
    backward(dy, need_dx) -> dx (N, C, H, W) or None, overwriting the conv's gradients.
    `pool_seconds` holds the seconds the last forward and backward spent in the pool and relu.
    """

    def __init__(self, conv: Conv2d, pool: MaxPool2d, relu: bool) -> None:
        assert fits(conv, pool)
        self.conv, self.pool, self.relu = conv, pool, relu
        self.ws = Workspace(conv.dtype)
        self._n = -1
        self.pool_seconds = [0.0, 0.0]

    def _dims(self, n: int) -> tuple[int, int, int, int]:
        """(Hp, Wp, P, slack)."""
        _, h, w = self.conv.in_shape
        hp, wp = h // 2 + 1, w // 2 + 1
        return hp, wp, n * hp * wp, 2 * wp + 2

    def _layout(self, n: int) -> None:
        """Zero the borders and ignored positions for batch n (they then stay zero)."""
        if n == self._n:
            return
        c, f = self.conv.in_shape[0], self.conv.filters
        _, _, p, slack = self._dims(n)
        self.ws.get("xp", (4, c, p + slack))[...] = 0
        self.ws.get("d", (f, p))[...] = 0
        self.ws.get("cols", (9 * c + 1, 4 * p))[9 * c] = 1  # last row: ones, for the bias
        self._n = n

    def _taps(self) -> list[tuple[int, int, int, int, int]]:
        """(output phase, i, j, input phase, offset) for every output phase and kernel offset."""
        _, wp, _, _ = self._dims(1)
        taps = []
        for pr in range(2):
            for pc in range(2):
                for i in range(3):
                    for j in range(3):
                        du, sr = divmod(pr + i - 1, 2)
                        dv, sc = divmod(pc + j - 1, 2)
                        taps.append((pr * 2 + pc, i, j, sr * 2 + sc, (du + 1) * wp + dv + 1))
        return taps

    def forward(self, x: np.ndarray) -> np.ndarray:
        conv = self.conv
        n = x.shape[0]
        c, h, w = conv.in_shape
        f, k = conv.filters, 9 * c
        hp, wp, p, slack = self._dims(n)
        self._layout(n)
        xp = self.ws.get("xp", (4, c, p + slack))
        xt = x.transpose(1, 0, 2, 3)  # (C, N, H, W)
        for s in range(4):  # deinterleave the input into its four phase grids
            sr, sc = divmod(s, 2)
            xp[s, :, :p].reshape(c, n, hp, wp)[:, :, 1:, 1:] = xt[:, :, sr::2, sc::2]
        cols = self.ws.get("cols", (k + 1, 4 * p))  # (9C + 1, 4P), last row ones
        c5 = cols[:k].reshape(c, 3, 3, 4, p)
        for q, i, j, s, off in self._taps():
            c5[:, i, j, q] = xp[s, :, off : off + p]
        wb = self.ws.get("wb", (f, k + 1))  # [weight | bias]
        wb[:, :k] = conv.p["weight"].reshape(f, k)
        wb[:, k] = conv.p["bias"]
        o = self.ws.get("o", (f, 4 * p))  # (F, 4P): the four output phases
        np.matmul(wb, cols, out=o)
        t = time.perf_counter()
        o3 = o.reshape(f, 4, p)
        right_top = self.ws.get("rt", (f, p), np.bool_)
        right_bottom = self.ws.get("rb", (f, p), np.bool_)
        low = self.ws.get("low", (f, p), np.bool_)
        top = self.ws.get("top", (f, p))
        y = self.ws.get("y", (f, p))
        np.greater(o3[:, 1], o3[:, 0], out=right_top)  # strict: the first maximum wins ties
        np.maximum(o3[:, 0], o3[:, 1], out=top)
        np.greater(o3[:, 3], o3[:, 2], out=right_bottom)
        np.maximum(o3[:, 2], o3[:, 3], out=y)  # bottom pair, for now
        np.greater(y, top, out=low)
        np.maximum(top, y, out=y)
        if self.relu:
            np.maximum(y, 0, out=y)
        self.pool_seconds[0] = time.perf_counter() - t
        return y.reshape(f, n, hp, wp)[:, :, : h // 2, : w // 2].transpose(1, 0, 2, 3)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        conv = self.conv
        n = self._n
        c, h, w = conv.in_shape
        f, k = conv.filters, 9 * c
        hp, wp, p, slack = self._dims(n)
        t = time.perf_counter()
        d = self.ws.get("d", (f, p))  # dL/dy on the phase grid, zero at ignored positions
        d.reshape(f, n, hp, wp)[:, :, : h // 2, : w // 2] = dy.transpose(1, 0, 2, 3)
        if self.relu:
            mask = self.ws.get("mask", (f, p), np.bool_)
            np.greater(self.ws.get("y", (f, p)), 0, out=mask)
            np.multiply(d, mask, out=d)
        low = self.ws.get("low", (f, p), np.bool_)
        not_mask = self.ws.get("not", (f, p), np.bool_)
        half = self.ws.get("top", (f, p))  # forward's scratch, reused
        dyg = self.ws.get("dyg", (f, 4 * p)).reshape(f, 4, p)  # dL/d(output phases)
        for wins, rows in ((low, (2, 3)), (None, (0, 1))):
            if wins is None:  # the top pair gets d where the bottom pair did not win
                wins = np.logical_not(low, out=not_mask)
                right = self.ws.get("rt", (f, p), np.bool_)
            else:
                right = self.ws.get("rb", (f, p), np.bool_)
            np.multiply(d, wins, out=half)
            np.multiply(half, right, out=dyg[:, rows[1]])
            np.multiply(half, np.logical_not(right, out=not_mask), out=dyg[:, rows[0]])
        self.pool_seconds[1] = time.perf_counter() - t
        dyg2 = dyg.reshape(f, 4 * p)
        cols = self.ws.get("cols", (k + 1, 4 * p))
        gwb = self.ws.get("gwb", (k + 1, f))  # [dL/dweight^T ; dL/dbias]
        np.matmul(cols, dyg2.T, out=gwb)
        conv.g["weight"].reshape(f, k)[...] = gwb[:k].T
        conv.g["bias"][...] = gwb[k]
        if not need_dx:
            return None
        dcols = self.ws.get("dcols", (k, 4 * p))
        np.matmul(conv.p["weight"].reshape(f, k).T, dyg2, out=dcols)
        d5 = dcols.reshape(c, 3, 3, 4, p)
        dxp = self.ws.get("dxp", (4, c, p + slack))
        dxp[...] = 0
        for q, i, j, s, off in self._taps():  # col2im
            dxp[s, :, off : off + p] += d5[:, i, j, q]
        dx = self.ws.get("dx", (c, n, h, w))
        for s in range(4):  # interleave the phases back
            sr, sc = divmod(s, 2)
            dx[:, :, sr::2, sc::2] = dxp[s, :, :p].reshape(c, n, hp, wp)[:, :, 1:, 1:]
        return dx.transpose(1, 0, 2, 3)
