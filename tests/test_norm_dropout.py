"""Batch norm, dropout and global average pooling: gradient checks (float64 centred
differences), fast vs naive in train and eval mode, running statistics against PyTorch's
formulas, dropout masks that depend on the sample and not on the batch, sync-bn's sums over
"ranks" (threads here) against one batch, and whole models built with them."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from gradcheck import numerical_grad, rel_error

from distcnn import naive
from distcnn.layers import EVAL, BatchNorm, Dropout, GlobalAvgPool, Pass
from distcnn.model import Model

GRAD_TOL = 1e-6
TOL = {np.float32: {"rtol": 2e-4, "atol": 2e-5}, np.float64: {"rtol": 1e-9, "atol": 1e-10}}
SHAPES = [(3, 4, 5), (6,)]  # per channel after a conv, per feature after a dense layer


def bound_bn(shape, dtype, rng):
    layer = BatchNorm(shape, dtype)
    c = shape[0]
    params = {"weight": (1 + 0.5 * rng.standard_normal(c)).astype(dtype),
              "bias": rng.standard_normal(c).astype(dtype)}  # fmt: skip
    grads = {k: np.full(c, np.nan, dtype=dtype) for k in params}
    layer.bind(params, grads)
    layer.buf["running_mean"][...] = rng.standard_normal(c)
    layer.buf["running_var"][...] = 0.5 + rng.random(c)
    return layer, params, grads


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_gradients_match_finite_differences(shape, train):
    rng = np.random.default_rng(0)
    layer, params, grads = bound_bn(shape, np.float64, rng)
    ctx = Pass(train=train)
    x = 2 + 3 * rng.standard_normal((4, *shape))
    y = layer.forward(x, ctx).copy()
    dy = rng.standard_normal(y.shape)
    dx = layer.backward(dy.copy()).copy()
    analytic = {k: g.copy() for k, g in grads.items()}

    def f():
        return layer.forward(x, ctx)

    assert rel_error(dx, numerical_grad(f, x, dy)) < GRAD_TOL
    for k in params:
        assert rel_error(analytic[k], numerical_grad(f, params[k], dy)) < GRAD_TOL, k


@pytest.mark.parametrize("shape", SHAPES)
def test_naive_batchnorm_backward_matches_finite_differences(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, *shape))
    gamma, beta = rng.standard_normal(shape[0]), rng.standard_normal(shape[0])
    dy = rng.standard_normal(x.shape)
    dx, dgamma, dbeta = naive.batchnorm_backward_naive(x, gamma, 1e-5, dy)

    def f():
        return naive.batchnorm_forward_naive(x, gamma, beta, 1e-5)

    assert rel_error(dx, numerical_grad(f, x, dy)) < GRAD_TOL
    assert rel_error(dgamma, numerical_grad(f, gamma, dy)) < GRAD_TOL
    assert rel_error(dbeta, numerical_grad(f, beta, dy)) < GRAD_TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
def test_batchnorm_fast_matches_naive(shape, train, dtype):
    rng = np.random.default_rng(2)
    layer, params, grads = bound_bn(shape, dtype, rng)
    rm, rv = layer.buf["running_mean"].copy(), layer.buf["running_var"].copy()
    for n in (5, 2):  # workspaces reused for a smaller batch
        x = (1 + 2 * rng.standard_normal((n, *shape))).astype(dtype)
        y = layer.forward(x, Pass(train=train))
        ref = naive.batchnorm_forward_naive(
            x, params["weight"], params["bias"], 1e-5, *((None, None) if train else (rm, rv))
        )
        assert y.dtype == dtype
        np.testing.assert_allclose(y, ref, **TOL[dtype])
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = layer.backward(dy.copy())
        if train:
            dx_ref, dg_ref, db_ref = naive.batchnorm_backward_naive(x, params["weight"], 1e-5, dy)
        else:
            xhat = (x - rm.reshape(layer._bshape)) / np.sqrt(rv.reshape(layer._bshape) + 1e-5)
            axes = layer._axes
            dx_ref = dy * (params["weight"] / np.sqrt(rv + 1e-5)).reshape(layer._bshape)
            dg_ref, db_ref = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
        np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
        np.testing.assert_allclose(grads["weight"], dg_ref, **TOL[dtype])
        np.testing.assert_allclose(grads["bias"], db_ref, **TOL[dtype])


def test_running_statistics_follow_torch_momentum_convention():
    """running = 0.9 * running + 0.1 * batch, with the unbiased batch variance; counted."""
    rng = np.random.default_rng(3)
    layer, _, _ = bound_bn((2, 3, 3), np.float64, rng)
    rm, rv = layer.buf["running_mean"].copy(), layer.buf["running_var"].copy()
    x = 5 + 2 * rng.standard_normal((4, 2, 3, 3))
    layer.forward(x, Pass(train=True))
    layer.update_running_stats(layer.stats)
    vals = x.transpose(1, 0, 2, 3).reshape(2, -1)
    np.testing.assert_allclose(layer.buf["running_mean"], 0.9 * rm + 0.1 * vals.mean(1))
    np.testing.assert_allclose(layer.buf["running_var"], 0.9 * rv + 0.1 * vals.var(1, ddof=1))
    assert int(layer.buf["num_batches_tracked"]) == 1
    layer.forward(x, EVAL)  # evaluation passes leave them alone
    assert int(layer.buf["num_batches_tracked"]) == 1


@pytest.mark.parametrize("shape", SHAPES)
def test_sync_batchnorm_over_ranks_equals_one_batch(shape):
    """Two "ranks" (threads) with half the batch each and a sync that sums their vectors give
    the whole batch's output, input gradient and summed parameter gradients."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, *shape)) * 3 + 1
    dy = rng.standard_normal(x.shape)
    whole, params, grads = bound_bn(shape, np.float64, rng)
    y_ref = whole.forward(x, Pass(train=True)).copy()
    dx_ref = whole.backward(dy.copy()).copy()
    slots: list[np.ndarray | None] = [None, None]
    barrier = threading.Barrier(2)
    out: dict[int, tuple] = {}

    def rank(r: int) -> None:
        layer = BatchNorm(shape, np.float64)
        g = {k: np.zeros_like(v) for k, v in params.items()}
        layer.bind(params, g)
        layer.buf["running_mean"][...] = whole.buf["running_mean"]

        def sync(v: np.ndarray) -> np.ndarray:
            slots[r] = v.copy()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        layer.sync = sync
        part = slice(0, 4) if r == 0 else slice(4, 6)  # uneven shards
        y = layer.forward(x[part], Pass(train=True)).copy()
        dx = layer.backward(dy[part].copy()).copy()
        out[r] = (y, dx, g, layer.stats.copy())

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    np.testing.assert_allclose(np.concatenate([out[0][0], out[1][0]]), y_ref, rtol=1e-10)
    np.testing.assert_allclose(np.concatenate([out[0][1], out[1][1]]), dx_ref, rtol=1e-9,
                               atol=1e-12)  # fmt: skip
    for k in params:
        np.testing.assert_allclose(out[0][2][k] + out[1][2][k], grads[k], rtol=1e-10)
    np.testing.assert_allclose(out[0][3] + out[1][3], whole.stats, rtol=1e-10)


def test_dropout_mask_depends_on_sample_not_batch():
    layer = Dropout((3, 4, 4), 0.3, 1, np.float64)
    x = np.ones((6, 3, 4, 4))
    ids = np.array([10, 11, 12, 13, 14, 15])
    y_all = layer.forward(x, Pass(True, seed=7, step=3, ids=ids)).copy()
    y_two = layer.forward(x[:2], Pass(True, seed=7, step=3, ids=ids[[4, 1]])).copy()
    np.testing.assert_array_equal(y_two, y_all[[4, 1]])  # the same rows, any batch or order
    other_step = layer.forward(x, Pass(True, seed=7, step=4, ids=ids))
    assert not np.array_equal(other_step, y_all)
    other_seed = Dropout((3, 4, 4), 0.3, 2, np.float64).forward(x, Pass(True, 7, 3, ids))
    assert not np.array_equal(other_seed, y_all)  # another dropout layer, other masks
    kept = y_all != 0
    assert abs(kept.mean() - 0.7) < 0.06
    np.testing.assert_allclose(y_all[kept], 1 / 0.7)
    np.testing.assert_array_equal(layer.forward(x, EVAL), x)  # evaluation: identity
    p0 = Dropout((3, 4, 4), 0.0, 1, np.float64)
    np.testing.assert_array_equal(p0.forward(x, Pass(True, 1, 1, ids)), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dropout_fast_matches_naive_and_gradient(dtype):
    rng = np.random.default_rng(5)
    layer = Dropout((7,), 0.4, 1, dtype)
    ctx = Pass(True, seed=1, step=2, ids=np.arange(5) * 3)
    x = rng.standard_normal((5, 7)).astype(dtype)
    y = layer.forward(x, ctx)
    keep = layer.keep_mask(ctx, 5).reshape(x.shape).copy()
    np.testing.assert_allclose(y, naive.dropout_forward_naive(x, keep, 0.4), **TOL[dtype])
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx = layer.backward(dy)
    np.testing.assert_allclose(dx, naive.dropout_forward_naive(dy, keep, 0.4), **TOL[dtype])
    if dtype == np.float64:
        x64 = x.astype(np.float64)
        num = numerical_grad(lambda: layer.forward(x64, ctx), x64, dy)
        assert rel_error(dx, num) < GRAD_TOL


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gap_matches_naive_and_gradient(dtype):
    rng = np.random.default_rng(6)
    layer = GlobalAvgPool((3, 5, 4), dtype)
    for n in (4, 2):
        x = rng.standard_normal((n, 3, 5, 4)).astype(dtype)
        y = layer.forward(x)
        np.testing.assert_allclose(y, naive.gap_forward_naive(x), **TOL[dtype])
        dy = rng.standard_normal(y.shape).astype(dtype)
        dx = layer.backward(dy)
        np.testing.assert_allclose(dx, naive.gap_backward_naive(x, dy), **TOL[dtype])
    x = rng.standard_normal((2, 3, 5, 4))
    layer64 = GlobalAvgPool((3, 5, 4), np.float64)
    dy = rng.standard_normal((2, 3))
    layer64.forward(x)
    dx = layer64.backward(dy).copy()
    assert rel_error(dx, numerical_grad(lambda: layer64.forward(x), x, dy)) < GRAD_TOL
    num = numerical_grad(lambda: naive.gap_forward_naive(x), x, dy)
    assert rel_error(naive.gap_backward_naive(x, dy), num) < GRAD_TOL


NEW_SPEC = "conv:4:3,bn,relu,conv:5:3,bn,relu,maxpool:2,dropout:0.3,gap,dense:6,bn,relu,dense"


@pytest.mark.parametrize("train", [True, False])
def test_whole_model_with_bn_dropout_gap_gradient_check(train):
    rng = np.random.default_rng(7)
    model = Model(NEW_SPEC, (2, 6, 6), 3, np.float64)
    model.init_params(0)
    model.params[:] += 0.1 * rng.standard_normal(model.params.shape)
    for layer in model.norms:
        layer.buf["running_mean"][...] = 0.1 * rng.standard_normal(layer.channels)
        layer.buf["running_var"][...] = 0.5 + rng.random(layer.channels)
    x = rng.standard_normal((5, 2, 6, 6))
    labels = rng.integers(0, 3, size=5)
    ctx = Pass(train, seed=3, step=1, ids=np.arange(5) + 20)
    model.loss_and_grad(x, labels, ctx=ctx)
    analytic = model.grads.copy()

    def loss():
        return naive.softmax_cross_entropy_naive(model.forward(x, ctx), labels)[0]

    for name, view in model.param_views.items():
        num = numerical_grad(loss, view)
        mine = model.views_of(analytic)[name]
        if train and name in ("conv1.bias", "conv2.bias", "fc1.bias"):
            # a bias right before a train-mode bn cancels in the batch mean: gradient 0
            assert np.abs(mine).max() < 1e-9 and np.abs(num).max() < 1e-7, name
            continue
        err = rel_error(mine, num)
        assert err < 1e-6, f"{name}: {err:.2e}"


def test_model_names_buffers_and_init():
    model = Model(NEW_SPEC, (2, 6, 6), 3)
    model.init_params(1)
    assert [n for n in model.param_views if n.startswith("bn")] == [
        "bn1.weight", "bn1.bias", "bn2.weight", "bn2.bias", "bn3.weight", "bn3.bias"]  # fmt: skip
    assert list(model.buffers) == [
        f"bn{i}.{k}" for i in (1, 2, 3)
        for k in ("running_mean", "running_var", "num_batches_tracked")]  # fmt: skip
    np.testing.assert_array_equal(model.param_views["bn2.weight"], 1)
    np.testing.assert_array_equal(model.buffers["bn3.running_var"], 1)
    assert model.sub_batch(1000) == 1000  # batch statistics: one pass
    assert model.sub_batch(100000, train=False) < 100000  # evaluation: passes


@pytest.mark.parametrize("spec", ["dropout,dense", "dropout:1.0,dense", "dropout:x,dense",
                                  "gap,dense", "bn:3,dense"])  # fmt: skip
def test_bad_new_layer_specs_are_refused(spec):
    from distcnn.errors import UsageError

    with pytest.raises(UsageError):
        Model("flatten," + spec if spec.startswith("gap") else spec, (1, 4, 4), 2)


def test_bench_tracks_the_documented_stronger_model():
    from distcnn import bench
    from distcnn.model import STRONG_SPEC

    assert bench.MODELS["strong"][1] == STRONG_SPEC
    assert [type(layer).__name__ for layer in Model(STRONG_SPEC, (1, 28, 28), 10).layers][:3] == [
        "ConvPool", "BatchNorm", "ConvPool"]  # fmt: skip
