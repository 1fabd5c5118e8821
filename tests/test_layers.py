"""Tests of the fast layers in ``distcnn.layers``.

Three independent checks per layer, each of which fails on a wrong gradient:

* gradient checks: analytic input and parameter gradients against centred differences, float64;
* fast vs naive: forward and backward against the loop implementations in ``distcnn.naive``,
  in float32 and float64, including the output dtypes;
* the naive layers themselves against centred differences, so the reference is trusted too.

Plus the behaviours that gradient checks cannot see: max-pool ties, huge logits, workspaces
reused across batch sizes, and gradients that are overwritten rather than accumulated.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import numerical_grad, rel_error

from distcnn import naive
from distcnn.layers import (
    AvgPool2d,
    Conv2d,
    Flatten,
    GridConv2d,
    Linear,
    MaxPool2d,
    MaxPool2x2,
    ReLU,
    softmax_cross_entropy,
)

GRAD_TOL = 1e-6  # float64 analytic vs centred differences (h = 1e-6)
TOL = {
    np.float32: {"rtol": 1e-4, "atol": 1e-5},
    np.float64: {"rtol": 1e-10, "atol": 1e-10},
}
DTYPES = [np.float32, np.float64]


# --------------------------------------------------------------------------------------------
# Helpers


def _pair(v: int | tuple[int, int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else (int(v[0]), int(v[1]))


def conv_pad(padding: str | int | tuple[int, int], kernel: tuple[int, int]) -> tuple[int, int]:
    """The (ph, pw) that the fast Conv2d must use for its ``padding`` argument."""
    if padding == "same":
        return ((kernel[0] - 1) // 2, (kernel[1] - 1) // 2)
    if padding == "valid":
        return (0, 0)
    return _pair(padding)


def build(layer, rng: np.random.Generator, dtype=np.float64):
    """Allocate, fill and bind the layer's parameters; returns (params, grads) dicts.

    Gradients start as NaN, so a backward that accumulates into (instead of overwriting) the
    bound gradients, or leaves one unwritten, shows up as NaN.
    """
    params, grads = {}, {}
    for name, shape in layer.param_shapes().items():
        params[name] = rng.standard_normal(shape).astype(dtype)
        grads[name] = np.full(shape, np.nan, dtype=dtype)
    if params:
        layer.bind(params, grads)
    return params, grads


def distinct_values(shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float64):
    """Inputs with no near-ties: a random permutation of 0.1 * (0, 1, ..., n-1), centred."""
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * 0.1).reshape(shape).astype(dtype)


def away_from_zero(shape: tuple[int, ...], rng: np.random.Generator, dtype=np.float64):
    """Random signs with magnitudes >= 0.1, so the ReLU kink is never within h of an input."""
    x = rng.standard_normal(shape)
    return (np.sign(x) * (0.1 + np.abs(x))).astype(dtype)


# Layer cases: (id, factory(dtype) -> layer, naive forward(x, params), naive backward(x, params,
# dy) -> (dx, {name: grad}), input generator). Factories take dtype so the same case serves the
# gradient check (float64) and the fast-vs-naive comparison (float32 and float64).

CONV_CASES = [
    # (in_shape (C,H,W), filters, kernel, stride, padding, batch)
    ((3, 7, 7), 4, 3, 1, "same", 2),
    ((2, 8, 6), 3, 5, 2, "same", 1),
    ((2, 7, 9), 3, (3, 5), 1, "same", 2),
    ((3, 6, 7), 2, (1, 3), (2, 1), "valid", 2),
    ((2, 5, 5), 3, 1, 1, "valid", 3),
    ((2, 6, 6), 2, 3, 2, 1, 2),
    ((1, 5, 6), 2, (2, 3), 1, 2, 1),
    ((2, 7, 8), 3, 3, (1, 2), (2, 1), 2),
    ((3, 6, 6), 2, 5, 1, "valid", 1),
]

POOL_CASES = [
    # (in_shape (C,H,W), kernel, stride, batch)
    ((2, 6, 6), 2, None, 2),
    ((3, 7, 5), 3, 2, 1),  # overlapping windows, leftover row
    ((2, 5, 7), (2, 3), (1, 2), 2),  # non-square, overlapping rows
    ((1, 4, 4), 1, 1, 1),
    ((2, 7, 7), 2, None, 3),  # floor: last row and column are in no window
]

LINEAR_CASES = [
    # (in_shape, out_features, batch)
    ((7,), 4, 3),
    ((2, 3, 3), 5, 2),
    ((1,), 1, 1),
    ((12,), 6, 1),
]


def conv_case(in_shape, filters, kernel, stride, padding, batch, cls=Conv2d):
    k, s = _pair(kernel), _pair(stride)
    p = conv_pad(padding, k)

    def make(dtype):
        return cls(in_shape, filters, kernel=kernel, stride=stride, padding=padding, dtype=dtype)

    def fwd(x, prm):
        return naive.conv2d_forward_naive(x, prm["weight"], prm["bias"], s, p)

    def bwd(x, prm, dy):
        dx, dw, db = naive.conv2d_backward_naive(x, prm["weight"], s, p, dy)
        return dx, {"weight": dw, "bias": db}

    ident = f"{cls.__name__}{in_shape}-f{filters}-k{kernel}-s{stride}-p{padding}-n{batch}"
    return pytest.param(make, fwd, bwd, in_shape, batch, rng_normal, id=ident)


def rng_normal(shape, rng, dtype):
    return rng.standard_normal(shape).astype(dtype)


def pool_case(kind, in_shape, kernel, stride, batch):
    k = _pair(kernel)
    s = k if stride is None else _pair(stride)
    cls = {"max": MaxPool2d, "max2x2": MaxPool2x2, "avg": AvgPool2d}[kind]
    nfwd = naive.avgpool_forward_naive if kind == "avg" else naive.maxpool_forward_naive
    nbwd = naive.avgpool_backward_naive if kind == "avg" else naive.maxpool_backward_naive

    def make(dtype):
        return cls(in_shape, kernel=kernel, stride=stride, dtype=dtype)

    def fwd(x, prm):
        return nfwd(x, k, s)

    def bwd(x, prm, dy):
        return nbwd(x, k, s, dy), {}

    gen = rng_normal if kind == "avg" else distinct_values
    ident = f"{kind}pool{in_shape}-k{kernel}-s{stride}-n{batch}"
    return pytest.param(make, fwd, bwd, in_shape, batch, gen, id=ident)


def linear_case(in_shape, out_features, batch):
    def make(dtype):
        return Linear(in_shape, out_features, dtype=dtype)

    def fwd(x, prm):
        return naive.linear_forward_naive(x, prm["weight"], prm["bias"])

    def bwd(x, prm, dy):
        dx, dw, db = naive.linear_backward_naive(x, prm["weight"], dy)
        return dx, {"weight": dw, "bias": db}

    ident = f"linear{in_shape}-o{out_features}-n{batch}"
    return pytest.param(make, fwd, bwd, in_shape, batch, rng_normal, id=ident)


def relu_case(in_shape, batch):
    def make(dtype):
        return ReLU(in_shape, dtype=dtype)

    def fwd(x, prm):
        return naive.relu_forward_naive(x)

    def bwd(x, prm, dy):
        return naive.relu_backward_naive(x, dy), {}

    return pytest.param(
        make, fwd, bwd, in_shape, batch, away_from_zero, id=f"relu{in_shape}-n{batch}"
    )


def flatten_case(in_shape, batch):
    def make(dtype):
        return Flatten(in_shape, dtype=dtype)

    def fwd(x, prm):
        return x.reshape(x.shape[0], -1)

    def bwd(x, prm, dy):
        return dy.reshape(x.shape), {}

    return pytest.param(
        make, fwd, bwd, in_shape, batch, rng_normal, id=f"flatten{in_shape}-n{batch}"
    )


LAYER_CASES = (
    [conv_case(*c) for c in CONV_CASES]
    + [conv_case(*c, cls=GridConv2d) for c in CONV_CASES if c[3] == 1 and c[4] != 2]
    + [pool_case("max", *c) for c in POOL_CASES]
    + [pool_case("max2x2", *c) for c in POOL_CASES if c[1] == 2 and c[2] is None]
    + [pool_case("avg", *c) for c in POOL_CASES]
    + [linear_case(*c) for c in LINEAR_CASES]
    + [relu_case((3, 4, 5), 2), relu_case((6,), 1)]
    + [flatten_case((3, 4, 5), 2), flatten_case((2, 3, 1), 1)]
)
CASE_ARGS = "make, nfwd, nbwd, in_shape, batch, gen"


# --------------------------------------------------------------------------------------------
# Gradient checks (float64)


@pytest.mark.parametrize(CASE_ARGS, LAYER_CASES)
def test_fast_gradients_match_finite_differences(make, nfwd, nbwd, in_shape, batch, gen):
    rng = np.random.default_rng(0)
    layer = make(np.float64)
    params, grads = build(layer, rng)
    x = gen((batch, *in_shape), rng, np.float64)  # (N, *in_shape)
    y = layer.forward(x).copy()  # (N, *out_shape)
    assert y.shape == (batch, *layer.out_shape)
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy).copy()
    analytic = {name: g.copy() for name, g in grads.items()}

    def f():
        return layer.forward(x)

    err = rel_error(dx, numerical_grad(f, x, dy))
    assert err < GRAD_TOL, f"dx rel error {err:.2e}"
    for name in params:
        err = rel_error(analytic[name], numerical_grad(f, params[name], dy))
        assert err < GRAD_TOL, f"d{name} rel error {err:.2e}"


@pytest.mark.parametrize(CASE_ARGS, LAYER_CASES)
def test_naive_gradients_match_finite_differences(make, nfwd, nbwd, in_shape, batch, gen):
    """The reference is only useful if it is right: check it the same way."""
    rng = np.random.default_rng(1)
    params, _ = build(make(np.float64), rng)
    x = gen((batch, *in_shape), rng, np.float64)
    dy = rng.standard_normal(nfwd(x, params).shape)
    dx, dparams = nbwd(x, params, dy)

    def f():
        return nfwd(x, params)

    assert rel_error(dx, numerical_grad(f, x, dy)) < GRAD_TOL
    for name in params:
        assert rel_error(dparams[name], numerical_grad(f, params[name], dy)) < GRAD_TOL


# --------------------------------------------------------------------------------------------
# Fast vs naive (float32 and float64)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(CASE_ARGS, LAYER_CASES)
def test_fast_matches_naive(make, nfwd, nbwd, in_shape, batch, gen, dtype):
    rng = np.random.default_rng(2)
    layer = make(dtype)
    params, grads = build(layer, rng, dtype)
    for name, shape in layer.param_shapes().items():
        assert params[name].shape == tuple(shape)
    x = gen((batch, *in_shape), rng, dtype)
    y = layer.forward(x)
    y_ref = nfwd(x, params)
    assert y.dtype == dtype, f"forward returned {y.dtype} for {np.dtype(dtype)} input"
    assert y.shape == y_ref.shape == (batch, *layer.out_shape)
    assert tuple(layer.in_shape) == tuple(in_shape)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])

    dy = rng.standard_normal(y.shape).astype(dtype)
    dx = layer.backward(dy)
    dx_ref, dparams_ref = nbwd(x, params, dy)
    assert dx.dtype == dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
    for name in params:
        assert grads[name].dtype == dtype
        np.testing.assert_allclose(grads[name], dparams_ref[name], **TOL[dtype], err_msg=name)


@pytest.mark.parametrize(CASE_ARGS, LAYER_CASES)
def test_backward_overwrites_grads_and_need_dx_false(make, nfwd, nbwd, in_shape, batch, gen):
    """Two backward calls leave the same gradients (overwrite, not accumulate);
    need_dx=False returns None but still writes the parameter gradients."""
    rng = np.random.default_rng(3)
    layer = make(np.float64)
    params, grads = build(layer, rng)
    x = gen((batch, *in_shape), rng, np.float64)
    dy = rng.standard_normal((batch, *layer.out_shape))
    _, dparams_ref = nbwd(x, params, dy)
    layer.forward(x)
    layer.backward(dy)
    layer.backward(dy)
    for name in params:
        np.testing.assert_allclose(grads[name], dparams_ref[name], **TOL[np.float64])
        grads[name].fill(np.nan)
    assert layer.backward(dy, need_dx=False) is None
    for name in params:
        np.testing.assert_allclose(grads[name], dparams_ref[name], **TOL[np.float64])


# --------------------------------------------------------------------------------------------
# Workspaces reused across batch sizes


@pytest.mark.parametrize(CASE_ARGS, LAYER_CASES)
def test_workspace_reuse_across_batch_sizes(make, nfwd, nbwd, in_shape, batch, gen):
    """One layer fed batches of 8, 3, 8 gives what a fresh layer gives for each batch."""
    rng = np.random.default_rng(4)
    reused = make(np.float64)
    params, grads = build(reused, rng)
    for n in (8, 3, 8):
        x = gen((n, *in_shape), rng, np.float64)
        dy = rng.standard_normal((n, *reused.out_shape))
        fresh = make(np.float64)
        fresh_grads = {k: np.full_like(v, np.nan) for k, v in params.items()}
        if params:
            fresh.bind(params, fresh_grads)
        y_fresh = fresh.forward(x).copy()
        dx_fresh = fresh.backward(dy).copy()
        y = reused.forward(x)
        assert y.shape == (n, *reused.out_shape)
        np.testing.assert_array_equal(y, y_fresh, err_msg=f"forward, batch {n}")
        dx = reused.backward(dy)
        np.testing.assert_array_equal(dx, dx_fresh, err_msg=f"backward dx, batch {n}")
        for name in params:
            np.testing.assert_array_equal(grads[name], fresh_grads[name], err_msg=name)


# --------------------------------------------------------------------------------------------
# Convolution specifics


@pytest.mark.parametrize("kernel", [1, 3, 5, (3, 5), (1, 3)])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_same_padding_and_output_shape(kernel, stride):
    k, s = _pair(kernel), _pair(stride)
    layer = Conv2d((2, 9, 8), 3, kernel=kernel, stride=stride, padding="same")
    oh = (9 + 2 * ((k[0] - 1) // 2) - k[0]) // s[0] + 1
    ow = (8 + 2 * ((k[1] - 1) // 2) - k[1]) // s[1] + 1
    assert tuple(layer.out_shape) == (3, oh, ow)
    if s == (1, 1):
        assert tuple(layer.out_shape) == (3, 9, 8)  # "same" keeps the size at stride 1
    assert layer.param_shapes() == {"weight": (3, 2, *k), "bias": (3,)}


def test_conv_flops_count_multiply_adds():
    """2 FLOPs per multiply-add: 2*F*OH*OW*C*KH*KW, plus at most one per output for the bias."""
    layer = Conv2d((3, 8, 8), 4, kernel=3, stride=1, padding="same")
    macs = 4 * 8 * 8 * 3 * 3 * 3
    assert isinstance(layer.flops(), int | np.integer)
    assert 2 * macs <= layer.flops() <= 2 * macs + 4 * 8 * 8


# --------------------------------------------------------------------------------------------
# Max-pool ties


@pytest.mark.parametrize("cls", [MaxPool2d, MaxPool2x2])
def test_maxpool_all_equal_windows_route_to_exactly_one_input(cls):
    """Constant input: each non-overlapping window sends its whole gradient to its first element."""
    x = np.full((2, 3, 6, 6), 0.5)  # (N, C, H, W)
    layer = cls((3, 6, 6), kernel=2, dtype=np.float64)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, 0.5)
    dy = np.ones(y.shape)
    dx = layer.backward(dy)
    n_windows = y.size  # 2 * 3 * 3 * 3
    assert np.count_nonzero(dx) == n_windows
    assert dx.sum() == n_windows
    np.testing.assert_array_equal(dx[:, :, ::2, ::2], 1.0)  # top-left of each window
    np.testing.assert_array_equal(dx, naive.maxpool_backward_naive(x, (2, 2), (2, 2), dy))


@pytest.mark.parametrize("cls", [MaxPool2d, MaxPool2x2])
@pytest.mark.parametrize("dtype", DTYPES)
def test_maxpool_ties_nonoverlapping_one_input_per_window(dtype, cls):
    """Few distinct values (many ties): exactly one nonzero per window, equal to naive."""
    rng = np.random.default_rng(5)
    x = rng.integers(0, 3, size=(3, 2, 8, 9)).astype(dtype)  # (N, C, H, W); last column unused
    layer = cls((2, 8, 9), kernel=2, dtype=dtype)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, naive.maxpool_forward_naive(x, (2, 2), (2, 2)))
    dy = np.ones(y.shape, dtype=dtype)
    dx = layer.backward(dy)
    assert np.count_nonzero(dx) == y.size
    np.testing.assert_array_equal(dx, naive.maxpool_backward_naive(x, (2, 2), (2, 2), dy))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel, stride", [(3, 1), (3, 2), ((2, 3), (1, 2))])
def test_maxpool_ties_overlapping_windows_accumulate(kernel, stride, dtype):
    """Stride < kernel with ties: each window routes once, shared inputs accumulate."""
    rng = np.random.default_rng(6)
    k, s = _pair(kernel), _pair(stride)
    for x in (
        np.zeros((2, 2, 7, 7), dtype=dtype),
        rng.integers(0, 2, size=(2, 2, 7, 7)).astype(dtype),
    ):
        layer = MaxPool2d((2, 7, 7), kernel=kernel, stride=stride, dtype=dtype)
        y = layer.forward(x)
        dy = rng.integers(1, 5, size=y.shape).astype(dtype)  # positive: no cancellation
        dx = layer.backward(dy)
        dx_ref = naive.maxpool_backward_naive(x, k, s, dy)
        np.testing.assert_array_equal(dx, dx_ref)
        np.testing.assert_array_equal(dx.sum(axis=(2, 3)), dy.sum(axis=(2, 3)))


# --------------------------------------------------------------------------------------------
# Softmax cross-entropy


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_matches_naive(dtype):
    rng = np.random.default_rng(7)
    logits = (3 * rng.standard_normal((6, 5))).astype(dtype)  # (N, K)
    labels = rng.integers(0, 5, size=6)
    loss, correct, dlogits = softmax_cross_entropy(logits, labels)
    loss_ref, dlogits_ref = naive.softmax_cross_entropy_naive(logits, labels)
    tol = TOL[dtype]
    assert np.isclose(loss, loss_ref, rtol=tol["rtol"], atol=tol["atol"])
    assert correct == int(np.sum(np.argmax(logits, axis=1) == labels))
    assert dlogits.shape == logits.shape
    np.testing.assert_allclose(dlogits, dlogits_ref, **tol)
    _, _, scaled = softmax_cross_entropy(logits, labels, scale=0.25)
    np.testing.assert_allclose(scaled, 0.25 * dlogits_ref, **tol)


def test_softmax_cross_entropy_gradient_check():
    rng = np.random.default_rng(8)
    logits = rng.standard_normal((4, 7))
    labels = rng.integers(0, 7, size=4)
    _, _, dlogits = softmax_cross_entropy(logits, labels)
    dlogits = np.array(dlogits, copy=True)
    num = numerical_grad(lambda: softmax_cross_entropy(logits, labels)[0], logits)
    assert rel_error(dlogits, num) < GRAD_TOL
    num_ref = numerical_grad(lambda: naive.softmax_cross_entropy_naive(logits, labels)[0], logits)
    assert rel_error(naive.softmax_cross_entropy_naive(logits, labels)[1], num_ref) < GRAD_TOL


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_cross_entropy_huge_logits_are_stable(dtype):
    """Logits of +-1e4: no overflow, no NaN; the loss is ~0 when right and ~2e4 when wrong."""
    logits = np.array(
        [
            [1e4, -1e4, -1e4],  # right, confident: loss ~ 0
            [1e4, -1e4, -1e4],  # wrong (label 1): loss = 2e4
            [-1e4, -1e4, 1e4],  # right
            [-1e4, 1e4, -1e4],  # wrong (label 2): loss = 2e4
        ],
        dtype=dtype,
    )
    labels = np.array([0, 1, 2, 2])
    # exp(-2e4) may underflow to 0 harmlessly; overflow, inf/inf or log(0) would raise.
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        loss, correct, dlogits = softmax_cross_entropy(logits, labels)
    assert np.isfinite(loss) and np.all(np.isfinite(dlogits))
    assert loss == pytest.approx(4e4, rel=1e-6)
    assert correct == 2
    expected = np.array([[0, 0, 0], [1, -1, 0], [0, 0, 0], [0, 1, -1]], dtype=np.float64)
    np.testing.assert_allclose(dlogits, expected, atol=1e-6)
    loss_ref, dlogits_ref = naive.softmax_cross_entropy_naive(logits, labels)
    assert loss == pytest.approx(loss_ref, rel=1e-6)
    np.testing.assert_allclose(dlogits, dlogits_ref, atol=1e-6)


# --------------------------------------------------------------------------------------------
# ReLU at the kink


@pytest.mark.parametrize("dtype", DTYPES)
def test_relu_gradient_is_zero_at_zero(dtype):
    """At exactly x == 0 the (sub)gradient is taken as 0, as in PyTorch; -0.0 too."""
    x = np.array([[-1.0, -0.0, 0.0, 1e-30, 2.0, 0.0]], dtype=dtype)
    layer = ReLU((6,), dtype=dtype)
    y = layer.forward(x)
    np.testing.assert_array_equal(y, naive.relu_forward_naive(x))
    dy = np.full(x.shape, 3.0, dtype=dtype)
    dx = layer.backward(dy)
    expected = np.array([[0, 0, 0, 3.0, 3.0, 0]], dtype=dtype)  # 1e-30 > 0 in float32 too
    np.testing.assert_array_equal(dx, expected)
    np.testing.assert_array_equal(dx, naive.relu_backward_naive(x, dy))
