"""A sequential CNN built from a short text spec, with all parameters in one flat buffer.

Spec: comma-separated layers, e.g. the reference model (REFERENCE_SPEC)

    conv:16:3,relu,maxpool:2,conv:32:3,relu,maxpool:2,flatten,dense:128,relu,dense

    conv:F:K[:stride=S][:pad=same|valid|P]   F filters of K x K (K may be KHxKW), default same/1
    maxpool:K[:stride=S]  avgpool:K[:stride=S]   stride defaults to K
    relu  flatten  dense:OUT   a bare `dense` has num_classes outputs (the last layer must)
    bn   batch norm per channel (after a conv) or per feature (after a dense layer)
    dropout:P   inverted dropout with drop probability P in [0, 1)
    gap  global average pooling (C, H, W) -> (C,)

Parameters live in one flat buffer `params` (and gradients in `grads`) with one named view per
tensor, named and shaped as PyTorch names them: conv1.weight (F, C, KH, KW), conv1.bias (F,),
fc1.weight (out, in), ... so the whole gradient is one allreduce and a checkpoint maps onto a
state_dict unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from distcnn.convpool import ConvPool
from distcnn.errors import UsageError
from distcnn.layers import (
    EVAL,
    TRAIN,
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool,
    GridConv2d,
    Layer,
    Linear,
    MaxPool2d,
    MaxPool2x2,
    Pass,
    ReLU,
    softmax_cross_entropy,
)

REFERENCE_SPEC = "conv:16:3,relu,maxpool:2,conv:32:3,relu,maxpool:2,flatten,dense:128,relu,dense"
# A stronger MNIST model with batch norm and dropout (README, "Model spec"); its conv blocks keep
# conv,relu,maxpool together so they run as ConvPool layers, with bn after the pool.
STRONG_SPEC = (
    "conv:32:3,relu,maxpool:2,bn,conv:64:3,relu,maxpool:2,bn,flatten,dense:128,relu,bn,"
    "dropout:0.3,dense"
)

_NAME_PREFIX = {"conv": "conv", "dense": "fc", "bn": "bn"}
# loss_and_grad passes (Model.sub_batch): at most SUB_BATCH_BYTES of activations, but at least
# PASS_PARAM_RATIO x the parameter bytes. The reference model then runs up to 84 images per pass
# at any image size; 64 per pass measured fastest at 1 thread (docs/performance.md).
SUB_BATCH_BYTES = 48 << 20
PASS_PARAM_RATIO = 64


@dataclass(frozen=True)
class LayerSpec:
    kind: str
    args: tuple[str, ...]
    opts: dict[str, str]
    text: str


def _kernel(text: str, token: str) -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) == 1:
        parts = parts * 2
    try:
        kh, kw = (int(p) for p in parts)
    except ValueError:
        raise UsageError(f"bad kernel size {text!r} in layer {token!r}: use K or KHxKW") from None
    return kh, kw


def _int(text: str, token: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"bad {what} {text!r} in layer {token!r}: use a whole number") from None


def parse_spec(spec: str) -> list[LayerSpec]:
    """Split a model spec into layer descriptions; UsageError on unknown or malformed layers."""
    out = []
    tokens = [t.strip() for t in spec.split(",") if t.strip()]
    if not tokens:
        raise UsageError(f"--model {spec!r} is empty: give layers such as {REFERENCE_SPEC!r}")
    for token in tokens:
        parts = [p.strip() for p in token.split(":")]
        kind = parts[0].lower()
        args = tuple(p for p in parts[1:] if "=" not in p)
        opts = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        known = {"conv": (2, {"stride", "pad"}), "maxpool": (1, {"stride"}),
                 "avgpool": (1, {"stride"}), "relu": (0, set()), "flatten": (0, set()),
                 "dense": (1, set()), "bn": (0, set()), "dropout": (1, set()),
                 "gap": (0, set())}  # fmt: skip
        if kind not in known:
            raise UsageError(
                f"unknown layer {token!r} in --model: use conv, relu, maxpool, avgpool, "
                f"flatten, dense, bn, dropout, gap (e.g. {REFERENCE_SPEC!r})"
            )
        max_args, allowed = known[kind]
        if len(args) > max_args or (kind in ("conv", "dropout") and len(args) != max_args):
            raise UsageError(
                f"layer {token!r} has the wrong arguments: write conv:FILTERS:K, maxpool:K, "
                "avgpool:K, dense:OUT (or a bare dense for the class layer), dropout:P"
            )
        bad = set(opts) - allowed
        if bad:
            raise UsageError(
                f"layer {token!r} has unknown option(s) {sorted(bad)}: allowed {sorted(allowed)}"
            )
        out.append(LayerSpec(kind, args, opts, token))
    return out


def _conv(ls: LayerSpec, shape: tuple[int, ...], dtype: np.dtype) -> Conv2d:
    """conv:F:K[:stride=S][:pad=P] as GridConv2d (stride 1, padding < kernel) or Conv2d."""
    if len(shape) != 3:
        raise ValueError(f"conv needs an image input, got shape {shape}")
    pad: str | int = ls.opts.get("pad", "same")
    if pad not in ("same", "valid"):
        pad = _int(str(pad), ls.text, "padding")
    filters = _int(ls.args[0], ls.text, "filter count")
    stride = _int(ls.opts.get("stride", "1"), ls.text, "stride")
    conv = Conv2d(shape, filters, _kernel(ls.args[1], ls.text), stride, pad, dtype)
    if GridConv2d.fits(conv.stride, conv.pad, conv.kernel):
        return GridConv2d(shape, filters, conv.kernel, stride, pad, dtype)
    return conv


def _pool(ls: LayerSpec, shape: tuple[int, ...], dtype: np.dtype) -> Layer:
    """maxpool / avgpool; a 2x2 stride-2 max-pool as MaxPool2x2."""
    if len(shape) != 3:
        raise ValueError(f"pooling needs an image input, got shape {shape}")
    k = _kernel(ls.args[0], ls.text) if ls.args else (2, 2)
    s = _kernel(ls.opts["stride"], ls.text) if "stride" in ls.opts else None
    if ls.kind == "avgpool":
        return AvgPool2d(shape, k, s, dtype)
    if k == (2, 2) and s in (None, (2, 2)):
        return MaxPool2x2(shape, k, s, dtype)
    return MaxPool2d(shape, k, s, dtype)


def _convpool_run(specs: list[LayerSpec], i: int, shape: tuple[int, ...]) -> tuple[int, bool]:
    """(spec layers, with relu) that one ConvPool layer runs from specs[i]: `conv:F:3, relu,
    maxpool:2` or `conv:F:3, maxpool:2[, relu]` on an even-sized image; (0, False) if none."""
    kinds = [s.kind for s in specs[i : i + 3]]
    if kinds[:1] != ["conv"] or _kernel(specs[i].args[1], specs[i].text) != (3, 3):
        return 0, False
    if kinds[1:3] == ["relu", "maxpool"]:
        run, relu, pool = 3, True, specs[i + 2]
    elif kinds[1:2] == ["maxpool"]:
        run, relu, pool = (
            (3, True, specs[i + 1]) if kinds[2:3] == ["relu"] else (2, False, specs[i + 1])
        )
    else:
        return 0, False
    if not ConvPool.fits(shape, specs[i].opts, pool.args, pool.opts):
        return 0, False
    return run, relu


def build_layers(
    spec: str, input_shape: tuple[int, int, int], num_classes: int, dtype: np.dtype = np.float32
) -> list[Layer]:
    """Instantiate the layers of `spec` for per-sample input (C, H, W); names conv1, fc1, ...

    The one place where fast paths are chosen, visibly: `conv:F:3, relu, maxpool:2` on an even
    image becomes one ConvPool layer (distcnn.convpool); other stride-1 convs are GridConv2d,
    2x2/2 max-pools MaxPool2x2; a relu right after a layer that owns its output works in place.
    Each gives the numbers of the plain layers in spec order (tests/test_fast_paths.py).
    """
    specs = parse_spec(spec)
    layers: list[Layer] = []
    shape: tuple[int, ...] = tuple(input_shape)
    counts = {"conv": 0, "dense": 0, "bn": 0}
    dropouts = 0
    i = 0
    while i < len(specs):
        ls = specs[i]
        run = 1
        try:
            if ls.kind == "conv":
                layer: Layer = _conv(ls, shape, dtype)
                fused, relu = _convpool_run(specs, i, shape)
                if fused:
                    layer = ConvPool(shape, int(ls.args[0]), relu, dtype)
                    run = fused
            elif ls.kind in ("maxpool", "avgpool"):
                layer = _pool(ls, shape, dtype)
            elif ls.kind == "relu":
                inplace = bool(layers) and layers[-1].owns_output
                layer = ReLU(shape, dtype, inplace=inplace)
            elif ls.kind == "flatten":
                layer = Flatten(shape, dtype)
            elif ls.kind == "bn":
                layer = BatchNorm(shape, dtype)
            elif ls.kind == "dropout":
                try:
                    prob = float(ls.args[0])
                except ValueError:
                    prob = -1.0
                if not 0.0 <= prob < 1.0:
                    raise UsageError(
                        f"layer {ls.text!r}: the drop probability must be a number in [0, 1); "
                        "e.g. dropout:0.25"
                    )
                dropouts += 1
                layer = Dropout(shape, prob, dropouts, dtype)
            elif ls.kind == "gap":
                layer = GlobalAvgPool(shape, dtype)
            else:
                width = _int(ls.args[0], ls.text, "width") if ls.args else num_classes
                layer = Linear(shape, width, dtype)
        except ValueError as e:
            fix = (
                "use fewer pooling layers or larger images"
                if "does not fit" in str(e)
                else f"change layer {ls.text!r}"
            )
            raise UsageError(
                f"layer {i + 1} {ls.text!r} of --model does not fit its input {shape} "
                f"(image {tuple(input_shape)}): {e}; {fix}"
            ) from None
        if ls.kind in counts:
            counts[ls.kind] += 1
            layer.name = f"{_NAME_PREFIX[ls.kind]}{counts[ls.kind]}"
        layer.spec_text = ",".join(s.text for s in specs[i : i + run])
        layers.append(layer)
        shape = layer.out_shape
        i += run
        if i == len(specs) and (ls.kind != "dense" or shape != (num_classes,)):
            raise UsageError(
                f"--model must end with a dense layer of {num_classes} outputs (the classes), "
                f"it ends with {ls.text!r} giving {shape}: append ',dense'"
            )
    return layers


class Model:
    """Sequential network + softmax cross-entropy over flat parameter and gradient buffers.

    params, grads: 1-D arrays of `num_params` elements (dtype); param_views / grad_views map
    "conv1.weight" etc. to reshaped views into them, in layer order.
    """

    def __init__(
        self,
        spec: str,
        input_shape: tuple[int, int, int],
        num_classes: int,
        dtype: np.dtype = np.float32,
        grad_extra: int = 0,
        grad_alloc: Callable[[int, np.dtype], np.ndarray] | None = None,
        params: np.ndarray | None = None,
    ) -> None:
        self.spec = spec
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.dtype = np.dtype(dtype)
        self.layers = build_layers(spec, self.input_shape, self.num_classes, self.dtype)
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in self.layers:
            for key, shape in layer.param_shapes().items():
                shapes[f"{layer.name}.{key}"] = shape
        self.param_shapes = shapes
        self.num_params = sum(math.prod(s) for s in shapes.values())
        # Batch norm: running statistics (buffers, not trained; saved in checkpoints under
        # PyTorch's names bn1.running_mean, bn1.running_var, bn1.num_batches_tracked) and the
        # batch sums of a train pass, kept at the end of the reduce buffer (after the caller's
        # grad_extra slots) so the ranks' sums ride in the gradient's collective.
        self.norms = [layer for layer in self.layers if isinstance(layer, BatchNorm)]
        self.buffers: dict[str, np.ndarray] = {
            f"{layer.name}.{key}": a for layer in self.norms for key, a in layer.buf.items()
        }
        self.num_stats = sum(layer.num_stats() for layer in self.norms)
        # params: another model's flat buffer to share (the --sync-bn --deterministic lanes)
        self.params = np.zeros(self.num_params, self.dtype) if params is None else params  # (P,)
        assert self.params.shape == (self.num_params,) and self.params.dtype == self.dtype
        # grad_buffer has `grad_extra` spare slots after the gradient, so a trainer can reduce
        # the gradient and a few scalars (loss, accuracy, flags) in a single collective.
        # grad_alloc(n, dtype), when given, supplies it zeroed (Comm.reduce_buffer: shared memory).
        n_grad = self.num_params + grad_extra + self.num_stats
        if grad_alloc is None:
            self.grad_buffer = np.zeros(n_grad, dtype=self.dtype)
        else:
            self.grad_buffer = grad_alloc(n_grad, self.dtype)
            if self.grad_buffer.shape != (n_grad,) or self.grad_buffer.dtype != self.dtype:
                got = f"{self.grad_buffer.shape} {self.grad_buffer.dtype}"
                raise ValueError(f"grad_alloc gave {got}, not ({n_grad},) {self.dtype}")
        self.grads = self.grad_buffer[: self.num_params]  # (P,)
        self.stat_offset = self.num_params + grad_extra
        self.stat_sums = self.grad_buffer[self.stat_offset :]  # (S,) bn batch sums, float64 math
        self._stat_views: list[slice] = []
        offset = self.stat_offset
        for layer in self.norms:
            self._stat_views.append(slice(offset, offset + layer.num_stats()))
            layer.stats = self.grad_buffer[offset : offset + layer.num_stats()]
            offset += layer.num_stats()
        self.param_views = self.views_of(self.params)
        self.grad_views = self.views_of(self.grads)
        for layer in self.layers:
            keys = layer.param_shapes()
            if keys:
                layer.bind(
                    {k: self.param_views[f"{layer.name}.{k}"] for k in keys},
                    {k: self.grad_views[f"{layer.name}.{k}"] for k in keys},
                )
        self._dlogits: np.ndarray | None = None
        # Wall seconds in loss_and_grad's forward (with the loss) and backward, accumulated.
        self.seconds = {"forward": 0.0, "backward": 0.0}
        # Profiling only (--profile): (L, 2) seconds per layer (spec order), forward and
        # backward; None otherwise, so the normal path pays for no per-layer clock reads.
        self.layer_seconds: np.ndarray | None = None
        # loss_and_grad runs batches bigger than this many bytes of activations in sub-batches.
        self.sub_batch_bytes = SUB_BATCH_BYTES
        self.pass_param_ratio = PASS_PARAM_RATIO
        self._grad_sum: np.ndarray | None = None

    def views_of(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """Named views into a flat buffer laid out like params (velocity, gradients, ...)."""
        views, offset = {}, 0
        for name, shape in self.param_shapes.items():
            size = math.prod(shape)
            views[name] = flat[offset : offset + size].reshape(shape)
            offset += size
        return views

    def init_params(self, seed: int) -> None:
        """He (Kaiming) normal weights, std sqrt(2 / fan_in); zero biases; batch norm weight 1,
        running mean 0, running variance 1 (as PyTorch). Decided by seed alone."""
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0,)))
        norm_weights = {f"{layer.name}.weight" for layer in self.norms}
        for name, view in self.param_views.items():
            if name.endswith(".bias"):
                view[...] = 0
            elif name in norm_weights:
                view[...] = 1
            else:
                fan_in = math.prod(view.shape[1:])
                std = math.sqrt(2.0 / fan_in)
                view[...] = rng.standard_normal(view.shape, dtype=np.float64) * std
        for layer in self.norms:
            layer.buf["running_mean"][...] = 0
            layer.buf["running_var"][...] = 1
            layer.buf["num_batches_tracked"][...] = 0

    def update_running_stats(self, sums: np.ndarray | None = None) -> None:
        """Fold the batch sums of the last train pass(es) into every batch norm's running
        statistics. sums: the stat_sums part of a reduce buffer after the ranks' sums were
        added (the whole global batch); default this model's own (one process)."""
        buf = self.grad_buffer if sums is None else sums
        base = 0 if sums is None else self.stat_offset
        for layer, sl in zip(self.norms, self._stat_views, strict=True):
            a = buf[sl.start - base : sl.stop - base]
            layer.update_running_stats(np.asarray(a, dtype=np.float64))

    def share_buffers(self, other: Model) -> None:
        """Use other's batch norm running statistics (the same arrays): a lane of `other`."""
        for mine, theirs in zip(self.norms, other.norms, strict=True):
            mine.buf = theirs.buf
        self.buffers = other.buffers

    def set_norm_sync(self, sync: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """--sync-bn: every batch norm normalises with the global batch's statistics, summing
        its float64 vectors over ranks with `sync` (None: each pass's own batch)."""
        for layer in self.norms:
            layer.sync = sync

    def forward(self, x: np.ndarray, ctx: Pass = TRAIN) -> np.ndarray:
        """x (N, C, H, W) -> logits (N, num_classes): each layer's forward, in order; the result
        is a workspace reused by the next call."""
        timed = self.layer_seconds
        for i, layer in enumerate(self.layers):
            if timed is None:
                x = layer.forward(x, ctx)
            else:
                t = time.perf_counter()
                x = layer.forward(x, ctx)
                timed[i, 0] += time.perf_counter() - t
        return x

    def backward(self, dlogits: np.ndarray) -> None:
        """Fill self.grads from dL/dlogits (N, num_classes): each layer's backward, in reverse
        (the first layer computes no input gradient)."""
        d: np.ndarray | None = dlogits
        timed = self.layer_seconds
        for i in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[i]
            if timed is None:
                d = layer.backward(d, need_dx=i > 0)
            else:
                t = time.perf_counter()
                d = layer.backward(d, need_dx=i > 0)
                timed[i, 1] += time.perf_counter() - t

    def loss_and_grad(
        self, x: np.ndarray, labels: np.ndarray, scale: float = 1.0, ctx: Pass = TRAIN
    ) -> tuple[float, int]:
        """Forward and backward on one batch. grads = scale * d(sum of CE losses)/d(params);
        batch norms write their batch sums into stat_sums. ctx: the samples' identity
        (dropout masks); a training pass.

        Returns (sum of per-sample losses, number correct). An empty batch gives zero gradients.
        """
        n = x.shape[0]
        if n == 0:
            self.grads[...] = 0
            self.stat_sums[...] = 0
            self._empty_pass_sync()
            return 0.0, 0
        step = self.sub_batch(n)
        if step >= n:
            return self._loss_and_grad(x, labels, scale, ctx)
        # Sub-batches of `step` images, gradients summed: the same gradient up to rounding, with
        # a working set that stays in cache. A function of n only, so --deterministic holds.
        acc = self._grad_sum
        if acc is None or acc.size != self.num_params:
            acc = self._grad_sum = np.empty_like(self.grads)
        loss, correct = 0.0, 0
        ids = ctx.sample_ids(n)
        for s in range(0, n, step):
            part = Pass(ctx.train, ctx.seed, ctx.step, ids[s : s + step])
            part_loss, part_correct = self._loss_and_grad(
                x[s : s + step], labels[s : s + step], scale, part
            )
            loss += part_loss
            correct += part_correct
            if s == 0:
                acc[...] = self.grads
            else:
                acc += self.grads
        self.grads[...] = acc
        return loss, correct

    def _empty_pass_sync(self) -> None:
        """--sync-bn with an empty shard: make the batch norms' sums over ranks anyway, with
        zeros, in the order a real pass makes them (forward in order, backward in reverse)."""
        synced = [layer for layer in self.norms if layer.sync is not None]
        for layer in synced:
            layer.sync(np.zeros(layer.num_stats()))
        for layer in reversed(synced):
            layer.sync(np.zeros(2 * layer.channels))

    def sub_batch(self, n: int, train: bool = True) -> int:
        """Images per forward/backward pass in loss_and_grad for a batch of n: as many as keep
        the estimated activations (`activation_bytes` per image) within `sub_batch_bytes`, split
        evenly (with at most 84 per pass, 100 images run as 2 passes of 50). A model with batch
        norm trains in one pass (its statistics are the batch's) but evaluates in passes."""
        if self.norms and train:
            return n  # batch statistics are those of the whole batch: one pass
        act = self.activation_bytes()
        # Each pass also reads the weights and writes and sums a full gradient, so a pass
        # carries at least pass_param_ratio x the parameter bytes in activations (wide dense
        # layers on big images: fewer, bigger passes).
        floor = -(-self.pass_param_ratio * self.num_params * self.dtype.itemsize // act)
        most = max(1, self.sub_batch_bytes // act, floor)
        passes = -(-n // most)
        return -(-n // passes)

    def activation_bytes(self) -> int:
        """Rough bytes one image keeps live during a training step (Layer.live_elements: each
        layer's output and its gradient, plus a convolution's im2col columns and theirs)."""
        return sum(layer.live_elements() for layer in self.layers) * self.dtype.itemsize

    def _loss_and_grad(
        self, x: np.ndarray, labels: np.ndarray, scale: float, ctx: Pass
    ) -> tuple[float, int]:
        t0 = time.perf_counter()
        logits = self.forward(x, ctx)
        if self._dlogits is None or self._dlogits.shape[0] < logits.shape[0]:
            self._dlogits = np.empty_like(logits)
        loss, correct, dlogits = softmax_cross_entropy(
            logits, labels, scale, self._dlogits[: logits.shape[0]]
        )
        t1 = time.perf_counter()
        self.backward(dlogits)
        self.seconds["forward"] += t1 - t0
        self.seconds["backward"] += time.perf_counter() - t1
        return loss, correct

    def evaluate(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int, np.ndarray]:
        """(loss sum, correct, predictions (N,)) for one batch, forward only; a big batch runs in
        the passes loss_and_grad would use."""
        n = x.shape[0]
        step = self.sub_batch(n, train=False) if n else 1
        loss, correct, pred = 0.0, 0, np.empty(n, dtype=np.int64)
        for s in range(0, n, step):
            logits = self.forward(x[s : s + step], EVAL)
            part_loss, part_correct, _ = softmax_cross_entropy(logits, labels[s : s + step])
            loss += part_loss
            correct += part_correct
            pred[s : s + step] = logits.argmax(axis=1)
        return loss, correct, pred

    def profile_layers(self, on: bool = True) -> None:
        """Start (or stop) timing every layer's forward and backward into layer_seconds."""
        self.layer_seconds = np.zeros((len(self.layers), 2)) if on else None

    def flops_per_sample(self) -> int:
        """Forward FLOPs per sample; a training step costs about three times this."""
        return sum(layer.flops() for layer in self.layers)

    def summary(self) -> list[tuple[str, str, tuple[int, ...], int, int]]:
        """Rows (name, description, output shape, parameter count, forward FLOPs per sample)."""
        rows = []
        for layer in self.layers:
            count = sum(math.prod(s) for s in layer.param_shapes().values())
            rows.append((layer.name or "", layer.describe(), layer.out_shape, count, layer.flops()))
        return rows
