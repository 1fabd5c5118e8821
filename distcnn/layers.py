"""Layers with hand-derived backward passes, NCHW, on preallocated workspaces.

The layer contract (every layer, fused ones included; llm.c style, one object per layer that
owns its workspaces):

    y = layer.forward(x, ctx)       # x (N, *in_shape) -> y (N, *out_shape), same dtype
    dx = layer.backward(dy)         # overwrites the bound parameter gradients, returns dx
    layer.backward(dy, need_dx=False) -> None   # parameter gradients only (the first layer)

`ctx` (a Pass, default TRAIN) says whether this is a training or an evaluation pass and which
samples the rows are; only batch norm and dropout read it. A layer remembers what its backward
needs from the last forward call. The arrays it returns are workspaces that the next call
overwrites; `backward` may overwrite `dy` (the caller's scratch), and a layer built with
`inplace=True` (ReLU) overwrites its input. Workspaces are sized for the largest batch seen so
far and reused for every smaller one, so a training run allocates nothing per step once warm.
Parameters and their gradients are views into the model's flat buffers, handed over by `bind`.

Where a layer has a fast special case, it is its own class, chosen when the model is built
(distcnn.model.build_layers): GridConv2d (stride-1 convolution) beside Conv2d (any stride),
MaxPool2x2 (2x2, stride 2) beside MaxPool2d (any window), and ConvPool (distcnn.convpool).
The slow, obviously correct versions that the tests compare against are in `distcnn.naive`.
Derivations (for y = conv(x, w) + b, written per element):
  dL/dw[f,c,i,j] = sum_{n,oh,ow} dy[n,f,oh,ow] * xpad[n,c,oh*s+i,ow*s+j]   (one GEMM on im2col)
  dL/db[f]       = sum_{n,oh,ow} dy[n,f,oh,ow]
  dL/dx          = col2im(w^T dy): each input pixel collects the gradient of every output it fed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import as_strided

Shape = tuple[int, ...]


def _pair(v: int | tuple[int, int], what: str) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        v = (int(v), int(v))
    a, b = (int(v[0]), int(v[1]))
    if a < 1 or b < 1:
        raise ValueError(f"{what} must be >= 1, got {v}")
    return a, b


# Workspace buffers of HUGE_MIN bytes or more start on a 2 MiB boundary inside an allocation of
# at least 4 MiB, which NumPy marks for transparent huge pages (madvise): a training step then
# misses the TLB far less (batch 64, 1 thread: 9.9 -> 9.3 ms; docs/performance.md). Where THP
# is off this changes nothing.
HUGE_PAGE = 2 << 20
HUGE_MIN = 512 << 10


def zeros_aligned(size: int, dtype: np.dtype) -> np.ndarray:
    """np.zeros(size, dtype), on a huge-page boundary when it is HUGE_MIN bytes or more."""
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    if nbytes < HUGE_MIN:
        return np.zeros(size, dtype=dtype)
    raw = np.zeros(max(nbytes + HUGE_PAGE, 2 * HUGE_PAGE), np.uint8)
    off = -raw.ctypes.data % HUGE_PAGE
    return raw[off : off + nbytes].view(dtype)


class Workspace:
    """Named scratch arrays carved from flat buffers that only ever grow.

    `get(name, shape)` returns a C-contiguous view of the first prod(shape) elements of the flat
    buffer kept under `name`, so a smaller batch reuses the larger batch's memory and keeps the
    same layout in its leading images (padded borders stay zero).
    """

    def __init__(self, dtype: np.dtype) -> None:
        self.dtype = np.dtype(dtype)
        self._flat: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: Shape, dtype: np.dtype | None = None) -> np.ndarray:
        dt = self.dtype if dtype is None else np.dtype(dtype)
        size = math.prod(shape)
        buf = self._flat.get(name)
        if buf is None or buf.size < size or buf.dtype != dt:
            buf = zeros_aligned(size, dt)
            self._flat[name] = buf
        return buf[:size].reshape(shape)

    def like(self, name: str, a: np.ndarray, dtype: np.dtype | None = None) -> np.ndarray:
        """A workspace shaped like `a` with the same axis order in memory (largest stride
        first), so element-wise passes over `a` and it walk both arrays sequentially."""
        order = sorted(range(a.ndim), key=lambda i: -a.strides[i])
        buf = self.get(name, tuple(a.shape[i] for i in order), dtype)
        return buf.transpose(np.argsort(order))


@dataclass(frozen=True)
class Pass:
    """What a forward pass is for. train: batch statistics and dropout (else running
    statistics, no dropout); seed, step and ids (the global sample index of each row) decide
    the dropout masks, so a sample's mask does not depend on which rank or pass it runs in."""

    train: bool = True
    seed: int = 0
    step: int = 0
    ids: np.ndarray | None = None  # (N,) int64; None: 0 .. N-1

    def sample_ids(self, n: int) -> np.ndarray:
        return np.arange(n, dtype=np.int64) if self.ids is None else self.ids


TRAIN = Pass(train=True)
EVAL = Pass(train=False)


class Layer:
    """Base class: shapes, parameter binding and workspaces; subclasses do the maths."""

    kind = "layer"
    # True when forward's output is this layer's own workspace that its backward never reads,
    # so a following ReLU may rectify it in place.
    owns_output = True

    def __init__(self, in_shape: Shape, dtype: np.dtype = np.float32) -> None:
        self.in_shape: Shape = tuple(int(d) for d in in_shape)
        self.out_shape: Shape = self.in_shape
        self.dtype = np.dtype(dtype)
        self.ws = Workspace(self.dtype)
        self.name: str | None = None
        self.spec_text = self.kind  # the --model spec item(s) this layer runs
        self.p: dict[str, np.ndarray] = {}
        self.g: dict[str, np.ndarray] = {}

    def param_shapes(self) -> dict[str, Shape]:
        return {}

    def bind(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        for key, shape in self.param_shapes().items():
            assert params[key].shape == shape and grads[key].shape == shape, key
        self.p, self.g = params, grads

    def flops(self) -> int:
        """Forward floating-point operations per sample (a multiply-add counts as two)."""
        return 0

    def live_elements(self) -> int:
        """Elements per sample this layer keeps live in a training step: its output and the
        gradient of it (layers with more scratch, such as im2col columns, add theirs)."""
        return 2 * math.prod(self.out_shape)

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        raise NotImplementedError

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        raise NotImplementedError

    def describe(self) -> str:
        return self.kind


class Conv2d(Layer):
    """2-D convolution (cross-correlation, as in PyTorch) by im2col and one GEMM per product.

    weight (F, C, KH, KW), bias (F,). Padding is zero padding: "same" = (k-1)//2 on each side
    (odd kernels only), "valid" = 0, or an int / (ph, pw) pair.
    Output size: OH = (H + 2*ph - KH) // sh + 1, likewise OW.

    Any stride and padding: the input is zero-padded, unfolded into columns (C*KH*KW, N*OH*OW)
    by one strided copy, multiplied by the weights in one GEMM, and col2im adds the column
    gradient back one kernel offset at a time. Stride-1 convolutions use GridConv2d instead.
    """

    kind = "conv"

    def __init__(
        self,
        in_shape: Shape,
        filters: int,
        kernel: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(in_shape, dtype)
        if len(self.in_shape) != 3:
            raise ValueError(f"conv needs (C, H, W) inputs, got {self.in_shape}")
        self.kernel = _pair(kernel, "conv kernel")
        self.stride = _pair(stride, "conv stride")
        kh, kw = self.kernel
        if padding == "same":
            if kh % 2 == 0 or kw % 2 == 0:
                raise ValueError(f"padding 'same' needs an odd kernel, got {kh}x{kw}")
            self.pad = ((kh - 1) // 2, (kw - 1) // 2)
        elif padding == "valid":
            self.pad = (0, 0)
        else:
            ph, pw = (padding, padding) if isinstance(padding, (int, np.integer)) else padding
            if int(ph) < 0 or int(pw) < 0:
                raise ValueError(f"conv padding must be >= 0, got {padding}")
            self.pad = (int(ph), int(pw))
        self.filters = int(filters)
        if self.filters < 1:
            raise ValueError(f"conv filters must be >= 1, got {filters}")
        c, h, w = self.in_shape
        oh = (h + 2 * self.pad[0] - kh) // self.stride[0] + 1
        ow = (w + 2 * self.pad[1] - kw) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"conv {kh}x{kw} with padding {self.pad} does not fit a {h}x{w} input")
        self.out_shape = (self.filters, oh, ow)

    def param_shapes(self) -> dict[str, Shape]:
        c = self.in_shape[0]
        return {"weight": (self.filters, c, *self.kernel), "bias": (self.filters,)}

    def flops(self) -> int:
        c = self.in_shape[0]
        f, oh, ow = self.out_shape
        return 2 * f * oh * ow * c * self.kernel[0] * self.kernel[1]

    def live_elements(self) -> int:
        """Output and its gradient, plus the im2col columns and their gradient."""
        f = self.filters
        cols = math.prod(self.param_shapes()["weight"][1:]) * math.prod(self.out_shape) // f
        return super().live_elements() + 2 * cols

    def describe(self) -> str:
        kh, kw = self.kernel
        return f"conv {kh}x{kw}/{self.stride[0]} pad {self.pad[0]}"

    def _padded(self, x: np.ndarray) -> np.ndarray:
        """x (N, C, H, W) -> xpad (N, C, H+2ph, W+2pw); the border stays zero across calls."""
        ph, pw = self.pad
        if ph == 0 and pw == 0:
            return x
        n, c, h, w = x.shape
        xp = self.ws.get("xpad", (n, c, h + 2 * ph, w + 2 * pw))
        xp[:, :, ph : ph + h, pw : pw + w] = x
        return xp

    def _windows(self, xp: np.ndarray) -> np.ndarray:
        """Strided view (C, KH, KW, N, OH, OW) of xpad; [c,i,j,n,a,b] = xp[n,c,a*sh+i,b*sw+j]."""
        n, c = xp.shape[:2]
        _, oh, ow = self.out_shape
        kh, kw = self.kernel
        sn, sc, sh_, sw_ = xp.strides
        return as_strided(
            xp,
            shape=(c, kh, kw, n, oh, ow),
            strides=(sc, sh_, sw_, sn, sh_ * self.stride[0], sw_ * self.stride[1]),
            writeable=False,
        )

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, kh, kw = self.in_shape[0], *self.kernel
        f, oh, ow = self.out_shape
        xp = self._padded(x)
        cols = self.ws.get("cols", (c * kh * kw, n * oh * ow))  # (C*KH*KW, N*OH*OW)
        cols.reshape(c, kh, kw, n, oh, ow)[...] = self._windows(xp)
        w2 = self.p["weight"].reshape(f, c * kh * kw)  # (F, C*KH*KW)
        out2 = self.ws.get("out2", (f, n * oh * ow))  # (F, N*OH*OW)
        np.matmul(w2, cols, out=out2)
        out2 += self.p["bias"][:, None]
        y = self.ws.get("y", (n, f, oh, ow))
        y[...] = out2.reshape(f, n, oh, ow).transpose(1, 0, 2, 3)
        self._cols = cols
        self._n = n
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        n = self._n
        c, h, w = self.in_shape
        kh, kw = self.kernel
        sh, sw = self.stride
        ph, pw = self.pad
        f, oh, ow = self.out_shape
        dy2 = self.ws.get("dy2", (f, n * oh * ow))  # (F, N*OH*OW)
        dy2.reshape(f, n, oh, ow)[...] = dy.transpose(1, 0, 2, 3)
        np.matmul(dy2, self._cols.T, out=self.g["weight"].reshape(f, c * kh * kw))
        np.sum(dy2, axis=1, out=self.g["bias"])
        if not need_dx:
            return None
        dcols = self.ws.get("dcols", (c * kh * kw, n * oh * ow))  # (C*KH*KW, N*OH*OW)
        np.matmul(self.p["weight"].reshape(f, c * kh * kw).T, dy2, out=dcols)
        dc6 = dcols.reshape(c, kh, kw, n, oh, ow)
        dxp = self.ws.get("dxpad", (n, c, h + 2 * ph, w + 2 * pw))
        dxp[...] = 0
        for i in range(kh):  # col2im: one strided add per kernel offset
            for j in range(kw):
                dst = dxp[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]
                dst += dc6[:, i, j].transpose(1, 0, 2, 3)
        if ph == 0 and pw == 0:
            return dxp
        return dxp[:, :, ph : ph + h, pw : pw + w]


class GridConv2d(Conv2d):
    """A stride-1 convolution with padding below the kernel size (every "same" or "valid" conv)
    on a zero-bordered grid; the same numbers as Conv2d.

    The input lives channel-major in a grid with one row of Wg = W + pw values per image row
    (pw zeros shared as the right border of one row and the left border of the next) and
    Hg = H + ph rows per image (ph zero rows shared by neighbouring images), flattened to
    xg (C, N*Hg*Wg + slack). Output position q = (n*Hg + a)*Wg + b then reads input q + i*Wg + j
    for kernel offset (i, j), so every im2col row is one contiguous slice of xg, col2im is
    KH*KW contiguous adds, and the GEMM output (F, N*Hg*Wg) is already channel-major: the
    returned y is a strided (N, F, OH, OW) view of it (positions with a >= OH or b >= OW are
    computed and ignored). The bias rides in the GEMM as a row of ones.
    """

    @staticmethod
    def fits(stride: tuple[int, int], pad: tuple[int, int], kernel: tuple[int, int]) -> bool:
        return stride == (1, 1) and pad[0] < kernel[0] and pad[1] < kernel[1]

    def __init__(
        self,
        in_shape: Shape,
        filters: int,
        kernel: int | tuple[int, int] = 3,
        stride: int | tuple[int, int] = 1,
        padding: str | int | tuple[int, int] = "same",
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(in_shape, filters, kernel, stride, padding, dtype)
        if not self.fits(self.stride, self.pad, self.kernel):
            raise ValueError(
                f"GridConv2d needs stride 1 and padding < kernel, got {self.describe()}"
            )
        self._grid_n = -1  # batch size the grid buffers are laid out for

    def _grid_dims(self) -> tuple[int, int, int]:
        """(Hg, Wg, slack): grid rows per image, values per grid row, tail after N*Hg*Wg."""
        _, h, w = self.in_shape
        kh, kw = self.kernel
        wg = w + self.pad[1]
        return h + self.pad[0], wg, (kh - 1) * wg + kw - 1

    def _layout(self, n: int) -> None:
        """Lay the grid buffers out for batch n; borders and ignored positions become zero."""
        if n == self._grid_n:
            return
        c, f = self.in_shape[0], self.filters
        hg, wg, slack = self._grid_dims()
        k = c * self.kernel[0] * self.kernel[1]
        size = n * hg * wg
        self.ws.get("xg", (c, size + slack))[...] = 0  # (C, N*Hg*Wg + slack)
        self.ws.get("dyg", (f, size))[...] = 0  # (F, N*Hg*Wg)
        self.ws.get("cols", (k + 1, size))[k] = 1  # (C*KH*KW + 1, N*Hg*Wg), last row: bias
        self._grid_n = n

    def _interior(self, flat: np.ndarray, n: int) -> np.ndarray:
        """(N, C, H, W) view of the image pixels inside a (C, N*Hg*Wg + ...) input grid."""
        hg, wg, _ = self._grid_dims()
        ph, pw = self.pad
        _, h, w = self.in_shape
        g = flat[:, : n * hg * wg].reshape(flat.shape[0], n, hg, wg)
        return g[:, :, ph : ph + h, pw : pw + w].transpose(1, 0, 2, 3)

    def _outputs(self, flat: np.ndarray, n: int) -> np.ndarray:
        """(N, F, OH, OW) view of the computed positions of a (F, N*Hg*Wg) output grid."""
        hg, wg, _ = self._grid_dims()
        _, oh, ow = self.out_shape
        return flat.reshape(flat.shape[0], n, hg, wg)[:, :, :oh, :ow].transpose(1, 0, 2, 3)

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, kh, kw = self.in_shape[0], *self.kernel
        f = self.filters
        hg, wg, slack = self._grid_dims()
        k, size = c * kh * kw, n * hg * wg
        self._layout(n)
        xg = self.ws.get("xg", (c, size + slack))  # (C, N*Hg*Wg + slack)
        self._interior(xg, n)[...] = x
        cols = self.ws.get("cols", (k + 1, size))  # (C*KH*KW + 1, N*Hg*Wg); last row ones
        c4 = cols[:k].reshape(c, kh, kw, size)
        for i in range(kh):
            for j in range(kw):
                off = i * wg + j
                c4[:, i, j] = xg[:, off : off + size]
        wb = self.ws.get("wb", (f, k + 1))  # (F, C*KH*KW + 1): [weight | bias]
        wb[:, :k] = self.p["weight"].reshape(f, k)
        wb[:, k] = self.p["bias"]
        out = self.ws.get("out", (f, size))  # (F, N*Hg*Wg)
        np.matmul(wb, cols, out=out)
        return self._outputs(out, n)

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        n = self._grid_n
        c, kh, kw = self.in_shape[0], *self.kernel
        f = self.filters
        hg, wg, slack = self._grid_dims()
        k, size = c * kh * kw, n * hg * wg
        dyg = self.ws.get("dyg", (f, size))  # (F, N*Hg*Wg), zero where no output is computed
        self._outputs(dyg, n)[...] = dy
        cols = self.ws.get("cols", (k + 1, size))
        gwb = self.ws.get("gwb", (k + 1, f))  # (C*KH*KW + 1, F): [dL/dweight^T ; dL/dbias]
        np.matmul(cols, dyg.T, out=gwb)  # this orientation packs faster than dyg @ cols.T
        self.g["weight"].reshape(f, k)[...] = gwb[:k].T
        self.g["bias"][...] = gwb[k]
        if not need_dx:
            return None
        dcols = self.ws.get("dcols", (k, size))  # (C*KH*KW, N*Hg*Wg)
        np.matmul(self.p["weight"].reshape(f, k).T, dyg, out=dcols)
        d4 = dcols.reshape(c, kh, kw, size)
        dxg = self.ws.get("dxg", (c, size + slack))  # (C, N*Hg*Wg + slack)
        dxg[:, :size] = d4[:, 0, 0]  # col2im: offset (0, 0) assigns, the others add
        dxg[:, size:] = 0
        for i in range(kh):
            for j in range(kw):
                if i or j:
                    off = i * wg + j
                    dxg[:, off : off + size] += d4[:, i, j]
        return self._interior(dxg, n)


class ReLU(Layer):
    """y = max(x, 0); dx = dy where x > 0, else 0 (also at x == 0, as in PyTorch).

    inplace (chosen by build_layers when the producer's output is its own workspace that its
    backward never reads): forward overwrites x and backward overwrites dy. The mask is
    recomputed from y in backward: y > 0 exactly where x > 0.
    """

    kind = "relu"

    def __init__(
        self, in_shape: Shape, dtype: np.dtype = np.float32, inplace: bool = False
    ) -> None:
        super().__init__(in_shape, dtype)
        self.inplace = inplace
        self.owns_output = not inplace
        self._y: np.ndarray | None = None

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        y = x if self.inplace else self.ws.like("y", x)
        np.maximum(x, 0, out=y)
        self._y = y
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        mask = self.ws.like("mask", dy, np.bool_)
        np.greater(self._y, 0, out=mask)
        dx = dy if self.inplace else self.ws.like("dx", dy)
        np.multiply(dy, mask, out=dx)
        return dx


class _Pool2d(Layer):
    """Shared geometry of the pooling layers: windows of (KH, KW) every (SH, SW), no padding,
    output floor((H - KH) / SH) + 1 as in PyTorch (rows that fit no window get no gradient).
    """

    def __init__(
        self,
        in_shape: Shape,
        kernel: int | tuple[int, int] = 2,
        stride: int | tuple[int, int] | None = None,
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(in_shape, dtype)
        if len(self.in_shape) != 3:
            raise ValueError(f"{self.kind} needs (C, H, W) inputs, got {self.in_shape}")
        self.kernel = _pair(kernel, f"{self.kind} kernel")
        self.stride = self.kernel if stride is None else _pair(stride, f"{self.kind} stride")
        c, h, w = self.in_shape
        oh = (h - self.kernel[0]) // self.stride[0] + 1
        ow = (w - self.kernel[1]) // self.stride[1] + 1
        if oh < 1 or ow < 1:
            raise ValueError(f"{self.kind} {self.kernel} does not fit a {h}x{w} input")
        self.out_shape = (c, oh, ow)

    def describe(self) -> str:
        return f"{self.kind} {self.kernel[0]}x{self.kernel[1]}/{self.stride[0]}"

    def _offset_view(self, a: np.ndarray, i: int, j: int) -> np.ndarray:
        """(N, C, OH, OW) view of a (N, C, H, W) at window offset (i, j)."""
        _, oh, ow = self.out_shape
        sh, sw = self.stride
        return a[:, :, i : i + sh * (oh - 1) + 1 : sh, j : j + sw * (ow - 1) + 1 : sw]


class MaxPool2d(_Pool2d):
    """y = max over each window; the gradient goes to exactly one input per window, the first
    maximum in row-major window order (so ties never double-count). Any window and stride:
    one comparison pass per window offset, keeping a compact argmax. 2x2 windows with stride 2
    use MaxPool2x2 instead.
    """

    kind = "maxpool"

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, oh, ow = self.out_shape
        kh, kw = self.kernel
        y = self.ws.get("y", (n, c, oh, ow))
        arg = self.ws.get("arg", (n, c, oh, ow), np.uint8 if kh * kw < 256 else np.int32)
        better = self.ws.get("better", (n, c, oh, ow), np.bool_)
        y[...] = self._offset_view(x, 0, 0)
        arg[...] = 0
        for k in range(1, kh * kw):  # strict > keeps the first maximum on ties
            v = self._offset_view(x, *divmod(k, kw))
            np.greater(v, y, out=better)
            np.copyto(y, v, where=better)
            np.copyto(arg, k, where=better)
        self._arg = arg
        self._xshape = x.shape
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        kh, kw = self.kernel
        dx = self.ws.get("dx", self._xshape)
        hit = self.ws.get("hit", dy.shape, np.bool_)
        overlap = self.stride[0] < kh or self.stride[1] < kw
        tiled = (not overlap) and self._tiles_exactly()
        if not tiled:
            dx[...] = 0
        for k in range(kh * kw):
            dst = self._offset_view(dx, *divmod(k, kw))
            np.equal(self._arg, k, out=hit)
            if overlap:
                dst += np.where(hit, dy, 0)
            else:
                np.multiply(dy, hit, out=dst)
        return dx

    def _tiles_exactly(self) -> bool:
        """True when the windows cover every input pixel exactly once."""
        c, h, w = self.in_shape
        _, oh, ow = self.out_shape
        return self.stride == self.kernel and oh * self.kernel[0] == h and ow * self.kernel[1] == w


class MaxPool2x2(MaxPool2d):
    """2x2 max-pool with stride 2, pairwise; the same numbers as MaxPool2d.

    h = the larger of each horizontal pair (the right one only if strictly larger), then y =
    the larger of each vertical pair of h (the lower only if strictly larger) - which is
    exactly the first maximum in row-major order - keeping the two choices as boolean masks for
    backward. Its buffers are channel-major (C, N, ...) like the convolution grids.
    """

    def __init__(
        self,
        in_shape: Shape,
        kernel: int | tuple[int, int] = 2,
        stride: int | tuple[int, int] | None = None,
        dtype: np.dtype = np.float32,
    ) -> None:
        super().__init__(in_shape, kernel, stride, dtype)
        if self.kernel != (2, 2) or self.stride != (2, 2):
            raise ValueError(f"MaxPool2x2 needs a 2x2 window with stride 2, got {self.describe()}")

    def _cm(self, name: str, shape: Shape, dtype: np.dtype | None = None) -> np.ndarray:
        """Channel-major workspace (C, N, ...) seen as (N, C, ...)."""
        n, c = shape[:2]
        return self.ws.get(name, (c, n, *shape[2:]), dtype).swapaxes(0, 1)

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, oh, ow = self.out_shape
        xe = x[:, :, : 2 * oh, : 2 * ow]  # rows/columns in no window are ignored
        left, right = xe[..., 0::2], xe[..., 1::2]  # (N, C, 2*OH, OW)
        h = self._cm("h", (n, c, 2 * oh, ow))
        right_wins = self._cm("right", (n, c, 2 * oh, ow), np.bool_)
        np.greater(right, left, out=right_wins)
        np.maximum(left, right, out=h)
        top, bottom = h[:, :, 0::2], h[:, :, 1::2]  # (N, C, OH, OW)
        y = self._cm("y", (n, c, oh, ow))
        low_wins = self._cm("low", (n, c, oh, ow), np.bool_)
        np.greater(bottom, top, out=low_wins)
        np.maximum(top, bottom, out=y)
        self._xshape = x.shape
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        n = self._xshape[0]
        c, oh, ow = self.out_shape
        right_wins = self._cm("right", (n, c, 2 * oh, ow), np.bool_)
        low_wins = self._cm("low", (n, c, oh, ow), np.bool_)
        other = self._cm("other", (n, c, 2 * oh, ow), np.bool_)  # scratch for the negations
        dh = self._cm("dh", (n, c, 2 * oh, ow))  # dL/dh
        high_wins = np.logical_not(low_wins, out=other[:, :, :oh])
        np.multiply(dy, low_wins, out=dh[:, :, 1::2])
        np.multiply(dy, high_wins, out=dh[:, :, 0::2])
        dx = self._cm("dx", self._xshape)
        dxe = dx[:, :, : 2 * oh, : 2 * ow]
        left_wins = np.logical_not(right_wins, out=other)
        np.multiply(dh, right_wins, out=dxe[..., 1::2])
        np.multiply(dh, left_wins, out=dxe[..., 0::2])
        if dx.shape[2] > 2 * oh:
            dx[:, :, 2 * oh :] = 0
        if dx.shape[3] > 2 * ow:
            dx[:, :, :, 2 * ow :] = 0
        return dx


class AvgPool2d(_Pool2d):
    """y = mean over each window; every input in a window gets dy / (KH*KW)."""

    kind = "avgpool"

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n = x.shape[0]
        c, oh, ow = self.out_shape
        kh, kw = self.kernel
        y = self.ws.get("y", (n, c, oh, ow))
        y[...] = self._offset_view(x, 0, 0)
        for k in range(1, kh * kw):
            y += self._offset_view(x, *divmod(k, kw))
        y *= 1.0 / (kh * kw)
        self._xshape = x.shape
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        kh, kw = self.kernel
        dx = self.ws.get("dx", self._xshape)
        share = self.ws.get("share", dy.shape)
        np.multiply(dy, 1.0 / (kh * kw), out=share)
        dx[...] = 0
        for k in range(kh * kw):
            self._offset_view(dx, *divmod(k, kw))[...] += share
        return dx


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W) in C, H, W order, as torch.flatten does; a view both ways."""

    kind = "flatten"
    owns_output = False

    def __init__(self, in_shape: Shape, dtype: np.dtype = np.float32) -> None:
        super().__init__(in_shape, dtype)
        self.out_shape = (math.prod(self.in_shape),)

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        if x.flags.c_contiguous:
            return x.reshape(x.shape[0], -1)
        y = self.ws.get("y", (x.shape[0], math.prod(x.shape[1:])))  # (N, C*H*W)
        y.reshape(x.shape)[...] = x  # a channel-major input, gathered into C, H, W order
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        return dy.reshape(dy.shape[0], *self.in_shape) if need_dx else None


class Linear(Layer):
    """y = x @ W^T + b with W (out, in) as in PyTorch; inputs of any shape are flattened first.

    dW = dy^T @ x, db = sum_n dy, dx = dy @ W.
    """

    kind = "dense"

    def __init__(self, in_shape: Shape, out_features: int, dtype: np.dtype = np.float32) -> None:
        super().__init__(in_shape, dtype)
        self.in_features = math.prod(self.in_shape)
        self.out_features = int(out_features)
        if self.out_features < 1:
            raise ValueError(f"dense width must be >= 1, got {out_features}")
        self.out_shape = (self.out_features,)

    def param_shapes(self) -> dict[str, Shape]:
        return {"weight": (self.out_features, self.in_features), "bias": (self.out_features,)}

    def flops(self) -> int:
        return 2 * self.in_features * self.out_features

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        x2 = x.reshape(x.shape[0], self.in_features)  # (N, in)
        y = self.ws.get("y", (x.shape[0], self.out_features))  # (N, out)
        np.matmul(x2, self.p["weight"].T, out=y)
        y += self.p["bias"]
        self._x = x2
        self._xshape = x.shape
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        np.matmul(dy.T, self._x, out=self.g["weight"])
        np.sum(dy, axis=0, out=self.g["bias"])
        if not need_dx:
            return None
        dx = self.ws.get("dx", (dy.shape[0], self.in_features))
        np.matmul(dy, self.p["weight"], out=dx)
        return dx.reshape(self._xshape)


class BatchNorm(Layer):
    """Batch normalisation (Ioffe & Szegedy 2015) per channel of (N, C, H, W) inputs (after a
    conv) or per feature of (N, D) inputs (after a dense layer), as torch.nn.BatchNorm2d / 1d.

    weight (C,) = gamma, bias (C,) = beta are parameters; running_mean (C,), running_var (C,)
    and num_batches_tracked () are buffers (Model.buffers), updated by Model.update_running_stats
    and saved in checkpoints. With M = the values per channel in the batch (N*H*W):

      train:  mu = sum x / M,  var = sum (x - mu)^2 / M (biased),  xhat = (x - mu) / sqrt(var+eps)
              y = gamma * xhat + beta
              dgamma = sum dy * xhat,  dbeta = sum dy
              dx = gamma / sqrt(var + eps) / M * (M * dy - dbeta - xhat * dgamma)
      eval:   xhat = (x - running_mean) / sqrt(running_var + eps), y = gamma * xhat + beta,
              dx = gamma / sqrt(running_var + eps) * dy (the statistics are constants)

    The batch sums are taken in float64, shifted by the running mean (the same on every rank):
    s = [M, sum (x - r), sum (x - r)^2], so mu = r + s1/M, var = s2/M - (s1/M)^2. A train pass
    writes s into `stats` (a view into the model's reduce buffer), where the ranks' sums are
    added with the gradient; the running statistics are then updated from the whole global
    batch with PyTorch's convention (momentum 0.1, unbiased variance var * M / (M - 1)).

    `sync` (None: each pass normalises with its own batch, like DDP without SyncBatchNorm): a
    function that sums float64 vectors over all ranks (--sync-bn). It is called twice per
    train pass, once in forward with s (so mu and var are the global batch's) and once in
    backward with [dbeta, dgamma] local sums (dx needs the global ones); the parameter
    gradients stay the local sums, which the gradient allreduce adds like every other.
    """

    kind = "bn"
    eps = 1e-5
    momentum = 0.1

    def __init__(self, in_shape: Shape, dtype: np.dtype = np.float32) -> None:
        super().__init__(in_shape, dtype)
        if len(self.in_shape) not in (1, 3):
            raise ValueError(f"bn needs (C, H, W) or (D,) inputs, got {self.in_shape}")
        self.channels = self.in_shape[0]
        self.per_sample = math.prod(self.in_shape[1:])  # values per channel and sample
        self._axes = (0, 2, 3) if len(self.in_shape) == 3 else (0,)
        self._bshape = (1, self.channels, 1, 1) if len(self.in_shape) == 3 else (1, self.channels)
        self.sync: Callable[[np.ndarray], np.ndarray] | None = None
        self.buf: dict[str, np.ndarray] = {
            "running_mean": np.zeros(self.channels, self.dtype),
            "running_var": np.ones(self.channels, self.dtype),
            "num_batches_tracked": np.zeros((), np.int64),
        }
        self.stats = np.zeros(self.num_stats(), np.float64)  # rebound by the Model

    def param_shapes(self) -> dict[str, Shape]:
        return {"weight": (self.channels,), "bias": (self.channels,)}

    def buffer_shapes(self) -> dict[str, tuple[Shape, np.dtype]]:
        c = self.channels
        return {"running_mean": ((c,), self.dtype), "running_var": ((c,), self.dtype),
                "num_batches_tracked": ((), np.dtype(np.int64))}  # fmt: skip

    def num_stats(self) -> int:
        return 1 + 2 * self.channels

    def flops(self) -> int:
        return 4 * math.prod(self.in_shape)

    def live_elements(self) -> int:
        return 2 * super().live_elements()  # y and xhat, and their gradients

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        c, b = self.channels, self._bshape
        xhat = self.ws.like("xhat", x)
        y = self.ws.like("y", x)
        r = self.buf["running_mean"].reshape(b)
        self._train = ctx.train
        if ctx.train:
            m = x.shape[0] * self.per_sample
            np.subtract(x, r, out=xhat)  # x - r
            sq = self.ws.like("sq", x)
            np.multiply(xhat, xhat, out=sq)
            s = np.empty(1 + 2 * c)
            s[0] = m
            s[1 : 1 + c] = np.sum(xhat, axis=self._axes, dtype=np.float64)
            s[1 + c :] = np.sum(sq, axis=self._axes, dtype=np.float64)
            self.stats[...] = s
            if self.sync is not None:
                s = self.sync(s)  # MPI: the global batch's sums (--sync-bn)
            m_all = s[0]
            shift = s[1 : 1 + c] / m_all  # mu - r
            var = np.maximum(s[1 + c :] / m_all - shift * shift, 0.0)
            inv = 1.0 / np.sqrt(var + self.eps)
            self._m = m_all
            xhat -= shift.astype(self.dtype).reshape(b)
        else:
            inv = 1.0 / np.sqrt(self.buf["running_var"].astype(np.float64) + self.eps)
            np.subtract(x, r, out=xhat)
        self._inv = inv.astype(self.dtype)
        xhat *= self._inv.reshape(b)
        np.multiply(xhat, self.p["weight"].reshape(b), out=y)
        y += self.p["bias"].reshape(b)
        self._xhat = xhat
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        c, b = self.channels, self._bshape
        xhat = self._xhat
        tmp = self.ws.like("sq", dy)
        np.multiply(dy, xhat, out=tmp)
        local = np.empty(2 * c)
        local[:c] = np.sum(dy, axis=self._axes, dtype=np.float64)
        local[c:] = np.sum(tmp, axis=self._axes, dtype=np.float64)
        self.g["bias"][...] = local[:c]
        self.g["weight"][...] = local[c:]
        tot = local
        if self._train and self.sync is not None:
            tot = self.sync(local)  # MPI: --sync-bn (also when no dx is needed: every rank)
        if not need_dx:
            return None
        dx = self.ws.like("dx", dy)
        scale = (self.p["weight"] * self._inv).reshape(b)  # gamma / sqrt(var + eps)
        if not self._train:
            np.multiply(dy, scale, out=dx)
            return dx
        m = self._m
        # dx = scale * (dy - dbeta / M - xhat * dgamma / M)
        np.multiply(xhat, (tot[c:] / m).astype(self.dtype).reshape(b), out=dx)
        np.subtract(dy, dx, out=dx)
        dx -= (tot[:c] / m).astype(self.dtype).reshape(b)
        dx *= scale
        return dx

    def update_running_stats(self, s: np.ndarray) -> None:
        """Fold batch sums s = [M, sum (x - r), sum (x - r)^2] (over the whole global batch)
        into the running statistics, as torch does: running = (1 - m) * running + m * batch,
        with the unbiased batch variance."""
        c = self.channels
        m_all = float(s[0])
        if m_all <= 0:
            return
        r = self.buf["running_mean"].astype(np.float64)
        shift = s[1 : 1 + c] / m_all
        var = np.maximum(s[1 + c :] / m_all - shift * shift, 0.0)
        unbiased = var * m_all / max(m_all - 1.0, 1.0)
        mom = self.momentum
        self.buf["running_mean"][...] = (1 - mom) * r + mom * (r + shift)
        self.buf["running_var"][...] = (1 - mom) * self.buf["running_var"] + mom * unbiased
        self.buf["num_batches_tracked"][...] += 1


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea, Flood 2014) on uint64 arrays, in place: a
    bijection whose outputs look independent and uniform for consecutive inputs."""
    z ^= z >> np.uint64(30)
    z *= np.uint64(0xBF58476D1CE4E5B9)
    z ^= z >> np.uint64(27)
    z *= np.uint64(0x94D049BB133111EB)
    z ^= z >> np.uint64(31)
    return z


class Dropout(Layer):
    """Inverted dropout: in training y = x * keep / (1 - p), keep ~ Bernoulli(1 - p) per
    element; in evaluation (and for p = 0) y = x. dx = dy * keep / (1 - p).

    The mask is a pure function of (seed, step, layer, global sample index, element): with
    key = mix(mix(mix(seed) + step) + layer), mix = splitmix64, element j of sample i (D
    elements per sample) keeps when the 24-bit value mix(key + i*D + j) >> 40 is at least
    round(p * 2^24). So a sample gets the same mask on 1 or N ranks, in any pass or
    micro-batch, and a resumed run draws the masks an uninterrupted one does.
    """

    kind = "dropout"
    owns_output = False  # evaluation and p = 0 pass x through

    def __init__(self, in_shape: Shape, p: float, index: int, dtype: np.dtype = np.float32) -> None:
        super().__init__(in_shape, dtype)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout probability must be in [0, 1), got {p}")
        self.prob = float(p)
        self.index = int(index)  # which dropout layer of the model: its own masks
        self.features = math.prod(self.in_shape)
        self._scale: np.ndarray | None = None

    def describe(self) -> str:
        return f"dropout p={self.prob:g}"

    def flops(self) -> int:
        return self.features

    def keep_mask(self, ctx: Pass, n: int) -> np.ndarray:
        """(N, D) bool: which elements the pass keeps."""
        key = np.zeros(1, np.uint64)
        for v in (ctx.seed, ctx.step, self.index):  # key = mix(mix(mix(seed) + step) + layer)
            key += np.uint64(v % 2**64)
            _splitmix64(key)
        ids = ctx.sample_ids(n).astype(np.uint64)
        d = self.features
        z = self.ws.get("z", (n, d), np.uint64)
        np.multiply(ids[:, None], np.uint64(d), out=z)
        z += np.arange(d, dtype=np.uint64)
        z += key[0]
        _splitmix64(z)
        z >>= np.uint64(40)
        keep = self.ws.get("keep", (n, d), np.bool_)
        np.greater_equal(z, np.uint64(round(self.prob * (1 << 24))), out=keep)
        return keep

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        if not ctx.train or self.prob == 0.0:
            self._scale = None
            return x
        n = x.shape[0]
        scale = self.ws.get("scale", (n, *self.in_shape))  # keep / (1 - p)
        np.multiply(self.keep_mask(ctx, n).reshape(scale.shape), 1.0 / (1.0 - self.prob),
                    out=scale)  # fmt: skip
        y = self.ws.get("y", scale.shape)
        np.multiply(x, scale, out=y)
        self._scale = scale
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        if self._scale is None:
            return dy
        dx = self.ws.get("dx", self._scale.shape)
        np.multiply(dy, self._scale, out=dx)
        return dx


class GlobalAvgPool(Layer):
    """(N, C, H, W) -> (N, C), the mean over each channel's H*W values (nn.AdaptiveAvgPool2d(1)
    then flatten); dx = dy / (H*W) at every position."""

    kind = "gap"

    def __init__(self, in_shape: Shape, dtype: np.dtype = np.float32) -> None:
        super().__init__(in_shape, dtype)
        if len(self.in_shape) != 3:
            raise ValueError(f"gap needs (C, H, W) inputs, got {self.in_shape}")
        self.out_shape = (self.in_shape[0],)

    def flops(self) -> int:
        return math.prod(self.in_shape)

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        n, c = x.shape[0], self.in_shape[0]
        y = self.ws.get("y", (n, c))
        np.sum(x, axis=(2, 3), out=y)
        y *= 1.0 / (self.in_shape[1] * self.in_shape[2])
        self._n = n
        return y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        dx = self.ws.get("dx", (self._n, *self.in_shape))
        dx[...] = (dy * (1.0 / (self.in_shape[1] * self.in_shape[2])))[:, :, None, None]
        return dx


def softmax_cross_entropy(
    logits: np.ndarray,
    labels: np.ndarray,
    scale: float = 1.0,
    dlogits: np.ndarray | None = None,
) -> tuple[float, int, np.ndarray]:
    """Summed softmax cross-entropy of logits (N, K) against integer labels (N,).

    Stable for any finite logits: z = logits - max(logits) and log-sum-exp on z, so exp never
    overflows. loss_i = log(sum_k exp(z_ik)) - z_i,label_i.
    Returns (sum_i loss_i, number of argmax == label, dlogits) with
    dlogits = scale * (softmax(logits) - onehot(labels)), the gradient of scale * sum_i loss_i.
    """
    n = logits.shape[0]
    if dlogits is None:
        dlogits = np.empty_like(logits)
    if n == 0:
        return 0.0, 0, dlogits
    rows = np.arange(n)
    np.subtract(logits, logits.max(axis=1, keepdims=True), out=dlogits)  # z, max entry is 0
    z_label = dlogits[rows, labels].astype(np.float64)
    np.exp(dlogits, out=dlogits)
    sums = dlogits.sum(axis=1, keepdims=True)
    loss = float(np.sum(np.log(sums[:, 0].astype(np.float64)) - z_label))
    correct = int(np.count_nonzero(logits.argmax(axis=1) == labels))
    dlogits /= sums
    dlogits[rows, labels] -= 1.0
    if scale != 1.0:
        dlogits *= scale
    return loss, correct, dlogits
