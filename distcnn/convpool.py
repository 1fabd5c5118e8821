"""ConvPool: a 3x3 "same" convolution, a 2x2 max-pool and optionally a relu, as one layer on
polyphase grids.

build_layers (distcnn.model) maps the spec's `conv:F:3, relu, maxpool:2` (or `conv:F:3,
maxpool:2[, relu]`) to one ConvPool layer when the image height and width are even (the
reference model's two blocks). It has the conv's parameters (conv1.weight, conv1.bias) and gives
the numbers that Conv2d, ReLU and MaxPool2d give in spec order: max-pool and relu commute exactly
(the relu is applied to the 4x smaller pooled tensor, and a window whose maximum is <= 0 passes
no gradient either way).

Why: a 2x2 pool over an ordinary layout needs stride-2 passes, which NumPy runs several times
slower per element than contiguous ones. Here the conv output is computed directly split into
its four phases, p[pr, pc][a, b] = conv[2a + pr, 2b + pc]. The pool is then three contiguous
maxima over four (F, P) planes, and its backward is six contiguous multiplies. The stride-2
passes move to the conv input, which is 16x (conv1) or 2x (conv2) smaller than the conv output.

Layout (P = N * H/2 * W/2, phases without borders, so no GEMM column is wasted):
* input phase grids xp (4, C, E + P + E), E = W/2 + 1: input pixel (n, 2u + sr, 2v + sc) sits
  in phase sr*2 + sc at E + (n*H/2 + u)*W/2 + v; the E-wide ends only catch shifted reads.
* output phases o (F, 4, P): conv output (n, 2a + pr, 2b + pc) at [:, pr*2 + pc, (n*H/2 + a)*W/2
  + b]; or pixel-major (4, P, F) when the GEMM's inner dimension is long (`pixel_major`, conv2),
  which OpenBLAS writes faster. The pool's planes and the block's output follow that order.
Output phase (pr, pc) at kernel offset (i, j) reads input row 2a + pr + i - 1 = 2(a + du) + sr
with di = pr + i - 1, sr = di mod 2, du = di // 2 in {-1, 0, 1}, and likewise column dv, sc:
the slice of input phase (sr, sc) shifted by du*W/2 + dv, so im2col is 36 contiguous copies and
col2im 36 contiguous adds. A shifted slice wraps at image edges (row a + du or column b + dv
outside the image reads a neighbour instead of the zero padding), so four assignments zero those
im2col entries (all taps with du = -1 at row 0, du = 1 at the last row, likewise columns), and
the same entries of the column gradient before col2im.
Ties in the pool go to the first maximum in row-major window order, as in MaxPool2d.
"""

from __future__ import annotations

import math

import numpy as np

from distcnn.layers import TRAIN, Layer, Pass, Shape

# GEMMs with a short inner dimension (conv1: 9 or 27 taps + bias) gain from column blocks only
# where OpenBLAS has small-matrix kernels: its AVX-512 (SkylakeX-family) cores take GEMMs with
# M*N*K <= 100^3 without packing them, 2-3x faster for these shapes (conv1 of the reference model
# at batch 64: 0.24 instead of 0.6 ms forward, 0.22-0.24 instead of 0.8 ms weight gradient; the
# second bench model's conv1: 3.2 instead of 4.6 ms, 2.3 instead of 4.1 ms). Its AVX2 (Haswell)
# kernels have no such path, and blocks only add calls there, so those run one GEMM. Longer inner
# dimensions (conv2: 145) gain nothing (docs/performance.md).
SHORT_K = 32
SMALL_GEMM_MNK = 100**3
_SMALL_KERNEL_CORES = ("skylakex", "cooperlake", "sapphirerapids")
_small_kernels: list[bool] = []  # cached: does this process's OpenBLAS have them?


def blas_small_kernels() -> bool:
    """True when NumPy's BLAS is an OpenBLAS core with small-matrix GEMM kernels."""
    if not _small_kernels:
        try:
            from threadpoolctl import threadpool_info

            arch = [
                str(i.get("architecture") or "").lower()
                for i in threadpool_info()
                if i.get("internal_api") == "openblas"
            ]
            _small_kernels.append(bool(arch) and arch[0] in _SMALL_KERNEL_CORES)
        except Exception:  # pragma: no cover - threadpoolctl cannot inspect this BLAS
            _small_kernels.append(False)
    return _small_kernels[0]


def column_blocks(
    k: int, f: int, m: int, itemsize: int, small: bool | None = None
) -> list[tuple[int, int]]:
    """Column ranges [a, b) for a GEMM of (f, k) @ (k, m): one block unless k <= SHORT_K and the
    BLAS has small-matrix kernels (`small`, default: blas_small_kernels()); then blocks of
    f * k * cols <= SMALL_GEMM_MNK, in multiples of 16 columns."""
    if small is None:
        small = blas_small_kernels()
    if k > SHORT_K or not small:
        return [(0, m)]
    step = max(16, SMALL_GEMM_MNK // (f * k) // 16 * 16)
    return [(a, min(m, a + step)) for a in range(0, m, step)]


class ConvPool(Layer):
    """conv (3x3, stride 1, pad 1) -> 2x2/2 max-pool [-> relu] on polyphase grids.

    weight (F, C, 3, 3), bias (F,) as Conv2d. forward(x (N, C, H, W)) -> (N, F, H/2, W/2), a
    view of a workspace; backward(dy) -> dx (N, C, H, W), overwriting the conv's gradients (and
    dy, where it can be used as scratch).
    """

    kind = "convpool"

    @staticmethod
    def fits(in_shape: Shape, conv_opts: dict[str, str], pool_args: tuple[str, ...],
             pool_opts: dict[str, str]) -> bool:  # fmt: skip
        """True for a 3x3 same conv (stride 1) on an even-sized image then a 2x2/2 max-pool."""
        return (
            len(in_shape) == 3
            and in_shape[1] % 2 == 0
            and in_shape[2] % 2 == 0
            and conv_opts.get("stride", "1") == "1"
            and conv_opts.get("pad", "same") in ("same", "1")
            and pool_args in ((), ("2",), ("2x2",))
            and pool_opts.get("stride", "2") in ("2", "2x2")
        )

    def __init__(
        self, in_shape: Shape, filters: int, relu: bool, dtype: np.dtype = np.float32
    ) -> None:
        super().__init__(in_shape, dtype)
        c, h, w = self.in_shape
        if h % 2 or w % 2:
            raise ValueError(f"ConvPool needs an even image size, got {h}x{w}")
        self.filters = int(filters)
        if self.filters < 1:
            raise ValueError(f"conv filters must be >= 1, got {filters}")
        self.kernel, self.stride, self.pad = (3, 3), (1, 1), (1, 1)
        self.relu = relu
        self.out_shape = (self.filters, h // 2, w // 2)
        self._n = -1
        self._tap_list = self._taps()
        # col2im order: for each input phase an unshifted tap first, which assigns the phase's
        # interior instead of adding to it, so dxp needs no zero fill (its ends only ever
        # receive zeros: the wrapped entries).
        by_shift = sorted(self._tap_list, key=lambda tap: tap[4] != 0)
        seen: set[int] = set()
        self._col2im_taps = []
        for q, i, j, s, shift in by_shift:
            self._col2im_taps.append((q, i, j, s, shift, s not in seen))
            seen.add(s)
        assert all(shift == 0 for *_, shift, first in self._col2im_taps if first)
        self._views: dict[tuple, np.ndarray] = {}  # _get's views for the current batch size
        self._cols_valid = False  # cols hold the last forward's columns (not their gradient)
        # Long inner dimension (one GEMM): the output phases are laid out pixel-major, (4P, F),
        # which OpenBLAS writes 1.3x faster than (F, 4P) (conv2 at batch 64: 1.15 vs 1.5 ms);
        # the pool runs on (P, F) planes and the block's output is NHWC memory.
        self.pixel_major = 9 * c + 1 > SHORT_K

    def param_shapes(self) -> dict[str, Shape]:
        return {"weight": (self.filters, self.in_shape[0], 3, 3), "bias": (self.filters,)}

    def flops(self) -> int:
        _, h, w = self.in_shape
        return 2 * self.filters * h * w * self.in_shape[0] * 9

    def live_elements(self) -> int:
        """What conv, relu and pool keep live in spec order: the conv output (and relu's, when
        there is one), the im2col columns, the pooled output, each with its gradient."""
        c, h, w = self.in_shape
        conv_out = self.filters * h * w
        return 2 * (conv_out * (2 if self.relu else 1) + 9 * c * h * w + math.prod(self.out_shape))

    def describe(self) -> str:
        return "conv 3x3/1 pad 1" + (" + relu" if self.relu else "") + " + maxpool 2x2/2"

    def _dims(self, n: int) -> tuple[int, int, int, int]:
        """(H/2, W/2, P, E)."""
        _, h, w = self.in_shape
        return h // 2, w // 2, n * (h // 2) * (w // 2), w // 2 + 1

    def _layout(self, n: int) -> None:
        """Zero the ends of the phase grids and set the bias row for batch n."""
        if n == self._n:
            return
        c = self.in_shape[0]
        _, _, p, e = self._dims(n)
        self.ws.get("xp", (4, c, p + 2 * e))[...] = 0
        self.ws.get("dxp", (4, c, p + 2 * e))[...] = 0
        self.ws.get("cols", (9 * c + 1, 4 * p))[9 * c] = 1  # last row: ones, for the bias
        self._n = n
        self._views.clear()

    def _get(self, name: str, shape: tuple[int, ...], dtype: type | None = None) -> np.ndarray:
        """self.ws.get, with the view kept until the batch size changes (saves ~0.2 ms a step
        in Python overhead)."""
        key = (name, shape, dtype)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = self.ws.get(name, shape, dtype)
        return view

    def _taps(self) -> list[tuple[int, int, int, int, int]]:
        """(output phase, i, j, input phase, shift) for every output phase and kernel offset."""
        _, w2, _, _ = self._dims(1)
        taps = []
        for pr in range(2):
            for pc in range(2):
                for i in range(3):
                    for j in range(3):
                        du, sr = divmod(pr + i - 1, 2)
                        dv, sc = divmod(pc + j - 1, 2)
                        taps.append((pr * 2 + pc, i, j, sr * 2 + sc, du * w2 + dv))
        return taps

    def _zero_wrapped(self, cols: np.ndarray, n: int) -> None:
        """Zero the entries of cols (9C[+1], 4P) whose shifted read wrapped past an image edge."""
        c = self.in_shape[0]
        h2, w2, _, _ = self._dims(n)
        g = cols[: 9 * c].reshape(c, 3, 3, 4, n, h2, w2)  # [c, i, j, phase, n, a, b]
        g[:, 0, :, 0:2, :, 0, :] = 0  # pr = 0, i = 0: du = -1 at row 0
        g[:, 2, :, 2:4, :, h2 - 1, :] = 0  # pr = 1, i = 2: du = 1 at the last row
        g[:, :, 0, 0::2, :, :, 0] = 0  # pc = 0, j = 0: dv = -1 at column 0
        g[:, :, 2, 1::2, :, :, w2 - 1] = 0  # pc = 1, j = 2: dv = 1 at the last column

    def _im2col(self, n: int) -> np.ndarray:
        """The columns (9C + 1, 4P) of the phase grids xp, last row ones."""
        c = self.in_shape[0]
        k = 9 * c
        _, _, p, e = self._dims(n)
        xp = self._get("xp", (4, c, p + 2 * e))
        cols = self._get("cols", (k + 1, 4 * p))
        c5 = cols[:k].reshape(c, 3, 3, 4, p)
        for q, i, j, s, shift in self._tap_list:
            c5[:, i, j, q] = xp[s, :, e + shift : e + shift + p]
        self._zero_wrapped(cols, n)
        self._cols_valid = True
        return cols

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, h, w = self.in_shape
        f, k = self.filters, 9 * c
        h2, w2, p, e = self._dims(n)
        self._layout(n)
        xp = self._get("xp", (4, c, p + 2 * e))
        xt = x.transpose(1, 0, 2, 3)  # (C, N, H, W)
        for s in range(4):  # deinterleave the input into its four phases
            sr, sc = divmod(s, 2)
            xp[s, :, e : e + p].reshape(c, n, h2, w2)[...] = xt[:, :, sr::2, sc::2]
        cols = self._im2col(n)
        wb = self._get("wb", (f, k + 1))  # [weight | bias]
        wb[:, :k] = self.p["weight"].reshape(f, k)
        wb[:, k] = self.p["bias"]
        plane = (p, f) if self.pixel_major else (f, p)
        o = self._get("o", (4 * p, f) if self.pixel_major else (f, 4 * p))
        if self.pixel_major:  # one GEMM, written as (4P, F)
            np.matmul(wb, cols, out=o.T)
        else:
            for lo, hi in column_blocks(k + 1, f, 4 * p, o.itemsize):
                np.matmul(wb, cols[:, lo:hi], out=o[:, lo:hi])
        o0, o1, o2, o3 = self._phases(o, f, p)
        right_top = self._get("rt", plane, np.bool_)
        right_bottom = self._get("rb", plane, np.bool_)
        low = self._get("low", plane, np.bool_)
        top = self._get("top", plane)
        y = self._get("y", plane)
        np.greater(o1, o0, out=right_top)  # strict: the first maximum wins ties
        np.maximum(o0, o1, out=top)
        np.greater(o3, o2, out=right_bottom)
        np.maximum(o2, o3, out=y)  # bottom pair, for now
        np.greater(y, top, out=low)
        np.maximum(top, y, out=y)
        if self.relu:
            np.maximum(y, 0, out=y)
        if self.pixel_major:
            return y.reshape(n, h2, w2, f).transpose(0, 3, 1, 2)
        return y.reshape(f, n, h2, w2).transpose(1, 0, 2, 3)

    def _phases(self, o: np.ndarray, f: int, p: int) -> list[np.ndarray]:
        """The four output-phase planes of o, each (P, F) or (F, P) like the pool's planes."""
        if self.pixel_major:
            o4 = o.reshape(4, p, f)
            return [o4[q] for q in range(4)]
        o4 = o.reshape(f, 4, p)
        return [o4[:, q] for q in range(4)]

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        n = self._n
        c, h, w = self.in_shape
        f, k = self.filters, 9 * c
        h2, w2, p, e = self._dims(n)
        pm = self.pixel_major
        plane = (p, f) if pm else (f, p)
        order = (0, 2, 3, 1) if pm else (1, 0, 2, 3)  # dy (N, F, H/2, W/2) -> the plane's order
        d = dy.transpose(order).reshape(plane)  # dL/dy: a view when dy allows
        if not (d.flags.writeable and np.shares_memory(d, dy)):
            d = self._get("d", plane)
            d.reshape(dy.transpose(order).shape)[...] = dy.transpose(order)
        if self.relu:
            mask = self._get("mask", plane, np.bool_)
            np.greater(self._get("y", plane), 0, out=mask)
            np.multiply(d, mask, out=d)
        # Route d to the chosen input of each window: x * mask, and x - x * mask for the other
        # side (exact for finite x), into the four output phases.
        # dL/d(output phases), in the forward output's buffer (no longer needed)
        dyg = self._get("o", (4 * p, f) if pm else (f, 4 * p))
        g0, g1, g2, g3 = self._phases(dyg, f, p)
        low = self._get("low", plane, np.bool_)
        bottom = self._get("top", plane)  # forward's scratch, reused
        np.multiply(d, low, out=bottom)
        np.subtract(d, bottom, out=d)  # d is now the top pair's share
        np.multiply(bottom, self._get("rb", plane, np.bool_), out=g3)
        np.subtract(bottom, g3, out=g2)
        np.multiply(d, self._get("rt", plane, np.bool_), out=g1)
        np.subtract(d, g1, out=g0)
        dyg2 = dyg.T if pm else dyg  # (F, 4P)
        # The column gradient overwrites the columns (less memory traffic), so a second
        # backward after one forward rebuilds them.
        cols = self._get("cols", (k + 1, 4 * p)) if self._cols_valid else self._im2col(n)
        gwb = self._get("gwb", (k + 1, f))  # [dL/dweight^T ; dL/dbias]
        part = self._get("gwb_part", (k + 1, f))
        for idx, (lo, hi) in enumerate(column_blocks(k + 1, f, 4 * p, gwb.itemsize)):
            np.matmul(cols[:, lo:hi], dyg2[:, lo:hi].T, out=part if idx else gwb)
            if idx:
                gwb += part
        self.g["weight"].reshape(f, k)[...] = gwb[:k].T
        self.g["bias"][...] = gwb[k]
        if not need_dx:
            return None
        dcols = cols[:k]  # the columns are spent: their buffer takes their gradient
        self._cols_valid = False
        np.matmul(self.p["weight"].reshape(f, k).T, dyg2, out=dcols)
        self._zero_wrapped(dcols, n)
        d5 = dcols.reshape(c, 3, 3, 4, p)
        dxp = self._get("dxp", (4, c, p + 2 * e))
        for q, i, j, s, shift, first in self._col2im_taps:
            if first:  # shift == 0
                dxp[s, :, e : e + p] = d5[:, i, j, q]
            else:
                dxp[s, :, e + shift : e + shift + p] += d5[:, i, j, q]
        dx = self._get("dx", (c, n, h, w))
        for s in range(4):  # interleave the phases back
            sr, sc = divmod(s, 2)
            dx[:, :, sr::2, sc::2] = dxp[s, :, e : e + p].reshape(c, n, h2, w2)
        return dx.transpose(1, 0, 2, 3)
