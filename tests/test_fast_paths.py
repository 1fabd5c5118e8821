"""Fast paths of distcnn.layers and the Model's execution plan against the naive references.

The grid convolution (stride 1), the pairwise 2x2 max-pool, in-place ReLU, relu/max-pool
reordering and pools writing into convolution grids must give the naive numbers, including
max-pool ties (first maximum in row-major window order), odd sizes and changing batch sizes.
No timing here: speed lives in `python -m distcnn.bench`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from distcnn import naive
from distcnn.fused import ConvPool, fits
from distcnn.layers import Conv2d, MaxPool2d, ReLU
from distcnn.model import REFERENCE_SPEC, Model

TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-10}}


def bound_conv(in_shape, filters, kernel, padding, dtype, rng):
    layer = Conv2d(in_shape, filters, kernel=kernel, stride=1, padding=padding, dtype=dtype)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in layer.param_shapes().items()}
    grads = {k: np.full(s, np.nan, dtype=dtype) for k, s in layer.param_shapes().items()}
    layer.bind(params, grads)
    return layer, params, grads


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "in_shape, filters, kernel, padding",
    [((1, 28, 28), 4, 3, "same"), ((3, 5, 7), 2, (3, 5), "same"), ((2, 6, 5), 3, 3, "valid"),
     ((2, 4, 4), 2, 1, "same"), ((2, 7, 6), 2, (2, 3), (1, 2))],
)  # fmt: skip
def test_grid_conv_matches_naive_across_batch_sizes(in_shape, filters, kernel, padding, dtype):
    rng = np.random.default_rng(0)
    layer, params, grads = bound_conv(in_shape, filters, kernel, padding, dtype, rng)
    assert layer.grid
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    pad = {"same": ((kh - 1) // 2, (kw - 1) // 2), "valid": (0, 0)}.get(padding, padding)
    for n in (5, 2, 5):  # a smaller batch reuses the buffers laid out for the larger one
        x = rng.standard_normal((n, *in_shape)).astype(dtype)
        y = layer.forward(x)
        assert y.dtype == dtype and y.shape == (n, *layer.out_shape)
        np.testing.assert_allclose(
            y, naive.conv2d_forward_naive(x, params["weight"], params["bias"], (1, 1), pad),
            **TOL[dtype],
        )  # fmt: skip
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = layer.backward(dy)
        dx_ref, dw_ref, db_ref = naive.conv2d_backward_naive(x, params["weight"], (1, 1), pad, dy)
        np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
        np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[dtype])
        np.testing.assert_allclose(grads["bias"], db_ref, **TOL[dtype])


def test_grid_conv_reads_its_input_buffer_without_copy():
    """A producer writing into input_buffer() gives the same result as passing x."""
    rng = np.random.default_rng(1)
    layer, params, _ = bound_conv((2, 6, 6), 3, 3, "same", np.float64, rng)
    x = rng.standard_normal((4, 2, 6, 6))
    buf = layer.input_buffer(4)
    buf[...] = x
    y = np.array(layer.forward(buf))
    ref = naive.conv2d_forward_naive(x, params["weight"], params["bias"], (1, 1), (1, 1))
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (2, 3, 7, 9), (1, 1, 2, 2), (2, 2, 5, 3)])
def test_pairwise_maxpool_matches_naive_with_ties(shape, dtype):
    rng = np.random.default_rng(2)
    layer = MaxPool2d(shape[1:], kernel=2, dtype=dtype)
    assert layer.pairwise
    for x in (
        rng.integers(0, 3, size=shape).astype(dtype),  # many ties
        rng.standard_normal(shape).astype(dtype),
        np.zeros(shape, dtype=dtype),
    ):
        y = layer.forward(x)
        np.testing.assert_array_equal(y, naive.maxpool_forward_naive(x, (2, 2), (2, 2)))
        dy = rng.integers(1, 5, size=y.shape).astype(dtype)
        dx = layer.backward(dy)
        np.testing.assert_array_equal(dx, naive.maxpool_backward_naive(x, (2, 2), (2, 2), dy))
        assert np.count_nonzero(dx) == y.size  # one input per window


def test_pairwise_maxpool_writes_into_given_buffers():
    rng = np.random.default_rng(3)
    x = rng.integers(0, 3, size=(2, 3, 6, 6)).astype(np.float64)
    layer = MaxPool2d((3, 6, 6), kernel=2, dtype=np.float64)
    out = np.full((2, 3, 3, 3), np.nan)
    assert layer.forward(x, out=out) is out
    np.testing.assert_array_equal(out, naive.maxpool_forward_naive(x, (2, 2), (2, 2)))
    dy = rng.standard_normal(out.shape)
    dx_out = np.full(x.shape, np.nan)
    assert layer.backward(dy, out=dx_out) is dx_out
    np.testing.assert_array_equal(dx_out, naive.maxpool_backward_naive(x, (2, 2), (2, 2), dy))


def test_inplace_relu_overwrites_and_matches_naive():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 4, 4))
    x_ref = x.copy()
    layer = ReLU((2, 4, 4), dtype=np.float64)
    layer.inplace = True
    y = layer.forward(x)
    assert y is x
    np.testing.assert_array_equal(y, naive.relu_forward_naive(x_ref))
    dy = rng.standard_normal(x.shape)
    dy_ref = dy.copy()
    dx = layer.backward(dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, naive.relu_backward_naive(x_ref, dy_ref))


@pytest.mark.parametrize(
    "spec",
    ["conv:4:3,relu,maxpool:2,conv:6:3,relu,maxpool:2,flatten,dense:8,relu,dense",
     "conv:3:3,relu,maxpool:3:stride=2,conv:4:3:stride=2,relu,dense",
     "relu,maxpool:2,conv:3:3,relu,conv:2:1,maxpool:2,dense"],
)  # fmt: skip
def test_model_plan_matches_the_layers_in_spec_order(spec):
    """The reordered, in-place, buffer-sharing plan gives what running each layer in spec order
    on fresh copies gives (forward and every gradient), with ties in the pools (zero input)."""
    rng = np.random.default_rng(5)
    model = Model(spec, (1, 12, 12), 5, np.float64)
    model.init_params(0)
    for n in (4, 2):
        x = rng.standard_normal((n, 1, 12, 12))
        x[0] = 0  # whole windows of equal values
        labels = rng.integers(0, 5, size=n)
        model.loss_and_grad(x, labels)
        grads = model.grads.copy()
        logits = np.array(model.forward(x))
        h, cache = x, []
        for layer in model.layers:  # spec order, through the naive references
            cache.append(h)
            h = _naive_forward(layer, model, h)
        np.testing.assert_allclose(logits, h, rtol=1e-10, atol=1e-10)
        _, d = naive.softmax_cross_entropy_naive(h, labels)
        ref = {}
        for layer, inp in zip(reversed(model.layers), reversed(cache), strict=True):
            d = _naive_backward(layer, model, inp, d, ref)
        for name, view in model.views_of(grads).items():
            np.testing.assert_allclose(view, ref[name], rtol=1e-8, atol=1e-10, err_msg=name)


def _naive_forward(layer, model, x):
    p = model.param_views
    if layer.kind == "conv":
        w, b = p[f"{layer.name}.weight"], p[f"{layer.name}.bias"]
        return naive.conv2d_forward_naive(x, w, b, layer.stride, layer.pad)
    if layer.kind == "relu":
        return naive.relu_forward_naive(x)
    if layer.kind == "maxpool":
        return naive.maxpool_forward_naive(x, layer.kernel, layer.stride)
    if layer.kind == "flatten":
        return x.reshape(x.shape[0], -1)
    return naive.linear_forward_naive(x, p[f"{layer.name}.weight"], p[f"{layer.name}.bias"])


def _naive_backward(layer, model, x, dy, ref):
    p = model.param_views
    if layer.kind == "conv":
        w = p[f"{layer.name}.weight"]
        dx, ref[f"{layer.name}.weight"], ref[f"{layer.name}.bias"] = (
            naive.conv2d_backward_naive(x, w, layer.stride, layer.pad, dy)
        )  # fmt: skip
        return dx
    if layer.kind == "relu":
        return naive.relu_backward_naive(x, dy)
    if layer.kind == "maxpool":
        return naive.maxpool_backward_naive(x, layer.kernel, layer.stride, dy)
    if layer.kind == "flatten":
        return dy.reshape(x.shape)
    w = p[f"{layer.name}.weight"]
    dx, ref[f"{layer.name}.weight"], ref[f"{layer.name}.bias"] = naive.linear_backward_naive(
        x, w, dy
    )
    return dx


def test_bench_smoke_prints_every_section(tmp_path):
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "distcnn.bench", "--smoke", "--json", str(out)],
        capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    for header in (
        "== reference model (1x28x28), 1 process",
        "native: distcnn ran openblas",
        "== NumPy float32 GEMM ceiling",
        "data loading (Split.batch)",
        "== Peak memory per process",
        "== 2 ranks x 1 thread",
        "raw figures in",
    ):
        assert header in proc.stdout, header
    assert "distcnn  " in proc.stdout
    record = json.loads(out.read_text())
    assert record["machine"]["cpus_usable"] >= 1 and record["loadavg_start"] is not None
    run = record["samples"]["distcnn/ref/native"][0]
    assert run["train_ips"] > 0 and len(run["step_ms_samples"]) == run["steps"]
    assert run["isa"]["blas"]["architecture"]
    assert [p.name for p in tmp_path.iterdir()] == ["bench.json"]  # nothing else written


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("in_shape", [(1, 28, 28), (3, 6, 4), (2, 2, 2), (5, 4, 6)])
def test_convpool_block_matches_naive(in_shape, relu, dtype):
    """conv 3x3 same -> 2x2 max-pool [-> relu] on polyphase grids gives the naive numbers,
    forward and every gradient, with pool ties (integer inputs and weights), for batch sizes
    that grow and shrink (1, 7, 3) so the grids are re-laid out."""
    rng = np.random.default_rng(6)
    conv, params, grads = bound_conv(in_shape, 3, 3, "same", dtype, rng)
    pool = MaxPool2d(conv.out_shape, kernel=2, dtype=dtype)
    assert fits(conv, pool)
    block = ConvPool(conv, pool, relu)
    assert block.pixel_major == (in_shape[0] >= 4)  # (4P, F) output phases: long GEMMs only
    for n in (1, 7, 3):
        for ties in (True, False):
            if ties:
                x = rng.integers(-1, 2, size=(n, *in_shape)).astype(dtype)
                params["weight"][...] = rng.integers(-1, 2, size=params["weight"].shape)
            else:
                x = rng.standard_normal((n, *in_shape)).astype(dtype)
                params["weight"][...] = rng.standard_normal(params["weight"].shape)
            params["bias"][...] = rng.integers(-1, 2, size=params["bias"].shape)
            y = block.forward(x)
            c_ref = naive.conv2d_forward_naive(x, params["weight"], params["bias"], (1, 1), (1, 1))
            p_ref = naive.maxpool_forward_naive(c_ref, (2, 2), (2, 2))
            ref = naive.relu_forward_naive(p_ref) if relu else p_ref
            np.testing.assert_allclose(y, ref, **TOL[dtype])
            dy = rng.integers(1, 5, size=y.shape).astype(dtype)
            dx = block.backward(dy)
            dp = naive.relu_backward_naive(p_ref, dy) if relu else dy
            dc = naive.maxpool_backward_naive(c_ref, (2, 2), (2, 2), dp)
            dx_ref, dw_ref, db_ref = naive.conv2d_backward_naive(
                x, params["weight"], (1, 1), (1, 1), dc
            )
            np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
            np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[dtype])
            np.testing.assert_allclose(grads["bias"], db_ref, **TOL[dtype])
            assert block.backward(dy, need_dx=False) is None
            np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[dtype])


def test_model_uses_convpool_blocks_for_the_reference_model():
    model = Model(REFERENCE_SPEC, (1, 28, 28), 10)
    assert sorted(model._blocks) == [0, 3]  # conv1 and conv2 (plan: conv, pool, relu, ...)
    assert all(block.relu for block in model._blocks.values())


@pytest.mark.parametrize("n", [1, 7, 64, 130])
def test_sub_batches_give_the_whole_batch_gradient(n):
    """loss_and_grad in sub-batches (ragged last one included) sums to the one-pass gradient,
    loss and accuracy; the split depends on n only."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 1, 12, 12)).astype(np.float32)
    x[x < 0.5] = 0  # pool ties, as on MNIST backgrounds
    labels = rng.integers(0, 10, size=n)
    whole = Model(REFERENCE_SPEC, (1, 12, 12), 10)
    split = Model(REFERENCE_SPEC, (1, 12, 12), 10)
    whole.init_params(3)
    split.init_params(3)
    whole.sub_batch_bytes = 1 << 40
    split.sub_batch_bytes = 9 * split.activation_bytes()  # passes of at most 9 images
    split.pass_param_ratio = 0
    assert whole.sub_batch(n) == n
    assert Model(REFERENCE_SPEC, (1, 28, 28), 10).sub_batch(128) == 64
    assert split.sub_batch(n) == min(n, -(-n // -(-n // 9)))
    loss_w, correct_w = whole.loss_and_grad(x, labels, scale=1.0 / n)
    loss_s, correct_s = split.loss_and_grad(x, labels, scale=1.0 / n)
    assert correct_s == correct_w
    np.testing.assert_allclose(loss_s, loss_w, rtol=1e-5)
    np.testing.assert_allclose(split.grads, whole.grads, rtol=1e-4, atol=1e-6)
    again = split.grads.copy()
    split.loss_and_grad(x, labels, scale=1.0 / n)
    np.testing.assert_array_equal(split.grads, again)  # bitwise repeatable


def test_evaluate_in_passes_matches_one_pass():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((23, 1, 12, 12)).astype(np.float32)
    labels = rng.integers(0, 10, size=23)
    model = Model(REFERENCE_SPEC, (1, 12, 12), 10)
    model.init_params(4)
    loss_1, correct_1, pred_1 = model.evaluate(x, labels)
    model.sub_batch_bytes, model.pass_param_ratio = 5 * model.activation_bytes(), 0
    assert model.sub_batch(23) == 5  # passes of 5, 5, 5, 5, 3
    loss_p, correct_p, pred_p = model.evaluate(x, labels)
    np.testing.assert_allclose(loss_p, loss_1, rtol=1e-6)
    assert correct_p == correct_1
    np.testing.assert_array_equal(pred_p, pred_1)
