"""The fast-path layers that build_layers chooses, against the naive references.

GridConv2d (stride 1), MaxPool2x2, in-place ReLU and the fused ConvPool layer must give the
naive numbers, including max-pool ties (first maximum in row-major window order), odd sizes and
changing batch sizes; a whole model built with them must give what the plain layers give in
spec order. No timing here: speed lives in `python -m distcnn.bench`.
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
from distcnn.convpool import ConvPool
from distcnn.layers import Conv2d, GridConv2d, MaxPool2d, MaxPool2x2, ReLU
from distcnn.model import REFERENCE_SPEC, Model, parse_spec

TOL = {np.float32: {"rtol": 1e-4, "atol": 1e-5}, np.float64: {"rtol": 1e-10, "atol": 1e-10}}


def bound_conv(in_shape, filters, kernel, padding, dtype, rng, cls=GridConv2d):
    layer = cls(in_shape, filters, kernel=kernel, stride=1, padding=padding, dtype=dtype)
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


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 2, 8, 8), (2, 3, 7, 9), (1, 1, 2, 2), (2, 2, 5, 3)])
def test_pairwise_maxpool_matches_naive_with_ties(shape, dtype):
    rng = np.random.default_rng(2)
    layer = MaxPool2x2(shape[1:], kernel=2, dtype=dtype)
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


def test_inplace_relu_overwrites_and_matches_naive():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 4, 4))
    x_ref = x.copy()
    layer = ReLU((2, 4, 4), dtype=np.float64, inplace=True)
    y = layer.forward(x)
    assert y is x
    np.testing.assert_array_equal(y, naive.relu_forward_naive(x_ref))
    dy = rng.standard_normal(x.shape)
    dy_ref = dy.copy()
    dx = layer.backward(dy)
    assert dx is dy
    np.testing.assert_array_equal(dx, naive.relu_backward_naive(x_ref, dy_ref))


@pytest.mark.parametrize(
    "spec, classes",
    [("conv:4:3,relu,maxpool:2,conv:6:3,relu,maxpool:2,flatten,dense:8,relu,dense",
      ["ConvPool", "ConvPool", "Flatten", "Linear", "ReLU", "Linear"]),
     ("conv:3:3,relu,maxpool:3:stride=2,conv:4:3:stride=2,relu,dense",
      ["GridConv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "Linear"]),
     ("relu,maxpool:2,conv:3:3,relu,conv:2:1,maxpool:2,dense",
      ["ReLU", "MaxPool2x2", "GridConv2d", "ReLU", "GridConv2d", "MaxPool2x2", "Linear"]),
     ("conv:4:3,maxpool:2,relu,conv:3:3,maxpool:2,dense",
      ["ConvPool", "ConvPool", "Linear"])],
)  # fmt: skip
def test_model_layers_match_the_plain_layers_in_spec_order(spec, classes):
    """The layers build_layers chooses (fused, grid, pairwise, in place) give what the naive
    layers in spec order give (forward and every gradient), with ties in the pools."""
    rng = np.random.default_rng(5)
    model = Model(spec, (1, 12, 12), 5, np.float64)
    assert [type(layer).__name__ for layer in model.layers] == classes
    plain = _plain_layers(spec, (1, 12, 12), 5)
    model.init_params(0)
    for n in (4, 2):
        x = rng.standard_normal((n, 1, 12, 12))
        x[0] = 0  # whole windows of equal values
        labels = rng.integers(0, 5, size=n)
        model.loss_and_grad(x, labels)
        grads = model.grads.copy()
        logits = np.array(model.forward(x))
        h, cache = x, []
        for layer in plain:  # spec order, through the naive references
            cache.append(h)
            h = _naive_forward(layer, model, h)
        np.testing.assert_allclose(logits, h, rtol=1e-10, atol=1e-10)
        _, d = naive.softmax_cross_entropy_naive(h, labels)
        ref = {}
        for layer, inp in zip(reversed(plain), reversed(cache), strict=True):
            d = _naive_backward(layer, model, inp, d, ref)
        for name, view in model.views_of(grads).items():
            np.testing.assert_allclose(view, ref[name], rtol=1e-8, atol=1e-10, err_msg=name)


def _plain_layers(spec, input_shape, classes):
    """The spec's layers one by one (kind, name, kernel, stride, pad), as the naive code needs."""
    from types import SimpleNamespace

    shape, out, counts = input_shape, [], {"conv": 0, "dense": 0}
    for ls in parse_spec(spec):
        kind = ls.kind
        item = SimpleNamespace(kind=kind, name=None)
        if kind in counts:
            counts[kind] += 1
            item.name = f"{'conv' if kind == 'conv' else 'fc'}{counts[kind]}"
        if kind == "conv":
            ref = Conv2d(shape, int(ls.args[0]), int(ls.args[1]), int(ls.opts.get("stride", 1)),
                         ls.opts.get("pad", "same"))  # fmt: skip
            item.stride, item.pad, shape = ref.stride, ref.pad, ref.out_shape
        elif kind == "maxpool":
            ref = MaxPool2d(shape, int(ls.args[0]), int(ls.opts["stride"]) if ls.opts else None)
            item.kernel, item.stride, shape = ref.kernel, ref.stride, ref.out_shape
        elif kind == "flatten":
            shape = (int(np.prod(shape)),)
        out.append(item)
    return out


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
    block = ConvPool(in_shape, 3, relu, dtype)
    params = {k: rng.standard_normal(s).astype(dtype) for k, s in block.param_shapes().items()}
    grads = {k: np.full(s, np.nan, dtype=dtype) for k, s in block.param_shapes().items()}
    block.bind(params, grads)
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
            dx = block.backward(dy.copy())  # backward may use dy as scratch
            dp = naive.relu_backward_naive(p_ref, dy) if relu else dy
            dc = naive.maxpool_backward_naive(c_ref, (2, 2), (2, 2), dp)
            dx_ref, dw_ref, db_ref = naive.conv2d_backward_naive(
                x, params["weight"], (1, 1), (1, 1), dc
            )
            np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
            np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[dtype])
            np.testing.assert_allclose(grads["bias"], db_ref, **TOL[dtype])
            assert block.backward(dy.copy(), need_dx=False) is None
            np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[dtype])


def test_column_blocks_only_with_small_matrix_kernels():
    from distcnn.convpool import SMALL_GEMM_MNK, column_blocks

    assert column_blocks(10, 16, 50_000, 4, small=False) == [(0, 50_000)]
    assert column_blocks(145, 32, 50_000, 4, small=True) == [(0, 50_000)]  # long inner dim
    blocks = column_blocks(10, 16, 50_000, 4, small=True)
    assert blocks[0][0] == 0 and blocks[-1][1] == 50_000 and len(blocks) > 1
    assert all(a == b for (_, a), (b, _) in zip(blocks, blocks[1:], strict=False))  # contiguous
    assert all((b - a) * 10 * 16 <= SMALL_GEMM_MNK and (b - a) % 16 == 0 for a, b in blocks[:-1])


@pytest.mark.parametrize("small", [False, True])
def test_convpool_matches_naive_with_and_without_column_blocks(small, monkeypatch):
    """conv1-shaped block (short inner dimension) over enough images for several column blocks:
    the same numbers as naive whether or not the BLAS takes the blocked path."""
    from distcnn import convpool

    monkeypatch.setattr(convpool, "_small_kernels", [small])
    rng = np.random.default_rng(8)
    block = ConvPool((1, 28, 28), 16, True, np.float64)
    params = {k: rng.standard_normal(s) for k, s in block.param_shapes().items()}
    grads = {k: np.full(s, np.nan) for k, s in block.param_shapes().items()}
    block.bind(params, grads)
    x = rng.standard_normal((12, 1, 28, 28))  # 4P = 9,408 columns: 2 blocks of <= 6,240
    assert len(convpool.column_blocks(10, 16, 12 * 784, 8)) == (2 if small else 1)
    y = block.forward(x)
    c_ref = naive.conv2d_forward_naive(x, params["weight"], params["bias"], (1, 1), (1, 1))
    p_ref = naive.maxpool_forward_naive(c_ref, (2, 2), (2, 2))
    np.testing.assert_allclose(y, naive.relu_forward_naive(p_ref), **TOL[np.float64])
    dy = rng.standard_normal(y.shape)
    block.backward(dy.copy(), need_dx=False)
    dc = naive.maxpool_backward_naive(c_ref, (2, 2), (2, 2), naive.relu_backward_naive(p_ref, dy))
    _, dw_ref, db_ref = naive.conv2d_backward_naive(x, params["weight"], (1, 1), (1, 1), dc)
    np.testing.assert_allclose(grads["weight"], dw_ref, **TOL[np.float64])
    np.testing.assert_allclose(grads["bias"], db_ref, **TOL[np.float64])


def test_reference_model_layers_are_convpool_blocks():
    model = Model(REFERENCE_SPEC, (1, 28, 28), 10)
    kinds = [(type(layer).__name__, layer.name) for layer in model.layers]
    assert kinds == [("ConvPool", "conv1"), ("ConvPool", "conv2"), ("Flatten", None),
                     ("Linear", "fc1"), ("ReLU", None), ("Linear", "fc2")]  # fmt: skip
    assert model.layers[0].relu and model.layers[1].relu and model.layers[4].inplace
    odd = Model(REFERENCE_SPEC, (1, 27, 27), 10)  # odd image: no ConvPool
    assert [type(layer).__name__ for layer in odd.layers][:3] == [
        "GridConv2d",
        "ReLU",
        "MaxPool2x2",
    ]


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
