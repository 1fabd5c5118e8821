"""Tests of ``distcnn.model.Model``: whole-network gradients, the layer spec, sizes, training.

The whole-model gradient check is the end-to-end proof that the hand-written backward pass
calls every layer's backward in reverse order with the right buffers: it compares
``loss_and_grad`` with centred differences of the summed loss for every parameter, in float64.
"""

from __future__ import annotations

import numpy as np
import pytest
from gradcheck import numerical_grad, rel_error

from distcnn import naive
from distcnn.errors import UsageError
from distcnn.model import Model

REFERENCE_SPEC = "conv:16:3,relu,maxpool:2,conv:32:3,relu,maxpool:2,flatten,dense:128,relu,dense"

# Every layer kind, strides and explicit paddings, on a (2, 8, 8) input:
# conv same (3,8,8) -> relu -> maxpool 2 (3,4,4) -> conv pad=1 (4,4,4) -> relu
# -> avgpool 2 (4,2,2) -> flatten (16,) -> dense 5 -> relu -> dense 3
TINY_SPEC = (
    "conv:3:3,relu,maxpool:2,conv:4:3:stride=1:pad=1,relu,avgpool:2,flatten,dense:5,relu,dense"
)
TINY_INPUT = (2, 8, 8)
TINY_CLASSES = 3


def tiny_model(dtype=np.float64, seed: int = 0) -> Model:
    model = Model(TINY_SPEC, TINY_INPUT, TINY_CLASSES, dtype=dtype)
    model.init_params(seed)
    return model


def test_whole_model_gradient_check_float64():
    rng = np.random.default_rng(0)
    model = tiny_model()
    # Nonzero biases, so that no pre-activation sits exactly at a ReLU kink or max-pool tie.
    model.params[:] += 0.1 * rng.standard_normal(model.params.shape)
    x = rng.standard_normal((3, *TINY_INPUT))  # (N, C, H, W)
    labels = rng.integers(0, TINY_CLASSES, size=3)

    loss, correct = model.loss_and_grad(x, labels)
    analytic = {name: np.array(g, copy=True) for name, g in model.grad_views.items()}
    logits = np.array(model.forward(x), copy=True)
    loss_ref, _ = naive.softmax_cross_entropy_naive(logits, labels)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    assert correct == int(np.sum(np.argmax(logits, axis=1) == labels))

    def summed_loss():  # independent of loss_and_grad: fast forward + naive loss
        return naive.softmax_cross_entropy_naive(model.forward(x), labels)[0]

    assert set(analytic) == set(model.param_views)
    for name, view in model.param_views.items():
        num = numerical_grad(summed_loss, view)
        err = rel_error(analytic[name], num)
        assert err < 1e-6, f"{name}: rel error {err:.2e}"


def test_loss_and_grad_scale_and_overwrite():
    """``scale`` multiplies the gradients; a second call overwrites instead of accumulating."""
    rng = np.random.default_rng(1)
    model = tiny_model()
    x = rng.standard_normal((4, *TINY_INPUT))
    labels = rng.integers(0, TINY_CLASSES, size=4)
    loss1, _ = model.loss_and_grad(x, labels)
    g1 = model.grads.copy()
    loss2, _ = model.loss_and_grad(x, labels, scale=0.25)
    assert loss2 == pytest.approx(loss1, rel=1e-12)  # the loss itself is not scaled
    np.testing.assert_allclose(model.grads, 0.25 * g1, rtol=1e-12, atol=1e-15)
    assert np.any(g1 != 0)


def test_forward_matches_naive_composition():
    """The model is exactly the spec's layers, in order, with its named parameters."""
    rng = np.random.default_rng(2)
    model = tiny_model(seed=3)
    p = model.param_views
    x = rng.standard_normal((2, *TINY_INPUT))
    h = naive.conv2d_forward_naive(x, p["conv1.weight"], p["conv1.bias"], (1, 1), (1, 1))
    h = naive.relu_forward_naive(h)
    h = naive.maxpool_forward_naive(h, (2, 2), (2, 2))
    h = naive.conv2d_forward_naive(h, p["conv2.weight"], p["conv2.bias"], (1, 1), (1, 1))
    h = naive.relu_forward_naive(h)
    h = naive.avgpool_forward_naive(h, (2, 2), (2, 2))
    h = naive.linear_forward_naive(h, p["fc1.weight"], p["fc1.bias"])
    h = naive.relu_forward_naive(h)
    logits_ref = naive.linear_forward_naive(h, p["fc2.weight"], p["fc2.bias"])
    logits = model.forward(x)
    assert logits.shape == (2, TINY_CLASSES) and logits.dtype == np.float64
    np.testing.assert_allclose(logits, logits_ref, rtol=1e-10, atol=1e-12)


def test_reference_model_parameter_count_and_names():
    model = Model(REFERENCE_SPEC, (1, 28, 28), 10, dtype=np.float32)
    assert model.params.size == 206_922
    assert model.grads.size == 206_922
    assert model.params.dtype == np.float32 and model.grads.dtype == np.float32
    shapes = {name: tuple(v.shape) for name, v in model.param_views.items()}
    assert shapes == {
        "conv1.weight": (16, 1, 3, 3),
        "conv1.bias": (16,),
        "conv2.weight": (32, 16, 3, 3),
        "conv2.bias": (32,),
        "fc1.weight": (128, 32 * 7 * 7),
        "fc1.bias": (128,),
        "fc2.weight": (10, 128),
        "fc2.bias": (10,),
    }
    # One flat buffer each, with views into it: one Allreduce per step.
    for name, view in model.param_views.items():
        assert np.shares_memory(view, model.params), name
        assert np.shares_memory(model.grad_views[name], model.grads), name
    assert sum(v.size for v in model.param_views.values()) == model.params.size


@pytest.mark.parametrize(
    "input_shape, fc1_in, n_params",
    [
        ((1, 8, 8), 32 * 2 * 2, 160 + 4640 + (128 * 128 + 128) + 1290),
        ((3, 32, 32), 32 * 8 * 8, (16 * 27 + 16) + 4640 + (2048 * 128 + 128) + 1290),
        ((1, 28, 28), 32 * 7 * 7, 206_922),
    ],
)
def test_sizes_follow_the_image_shape(input_shape, fc1_in, n_params):
    model = Model(REFERENCE_SPEC, input_shape, 10, dtype=np.float32)
    model.init_params(0)
    assert model.param_views["fc1.weight"].shape == (128, fc1_in)
    assert model.params.size == n_params
    x = np.random.default_rng(0).standard_normal((2, *input_shape), dtype=np.float32)
    logits = model.forward(x)
    assert logits.shape == (2, 10) and logits.dtype == np.float32
    assert np.all(np.isfinite(logits))


def test_init_params_is_he_and_seeded():
    model = Model(REFERENCE_SPEC, (1, 28, 28), 10, dtype=np.float32)
    model.init_params(7)
    first = model.params.copy()
    model.init_params(7)
    np.testing.assert_array_equal(model.params, first)
    model.init_params(8)
    assert not np.array_equal(model.params, first)
    # He: std = sqrt(2 / fan_in); fc1 has 200,704 weights, so the sample std is within ~1%.
    w = model.param_views["fc1.weight"]
    assert np.std(w) == pytest.approx(np.sqrt(2 / (32 * 7 * 7)), rel=0.1)
    w = model.param_views["conv2.weight"]
    assert np.std(w) == pytest.approx(np.sqrt(2 / (16 * 3 * 3)), rel=0.1)


def test_overfits_one_small_batch_float32():
    """32 random images with 4 random labels: plain SGD must memorise them (100% accuracy)."""
    rng = np.random.default_rng(0)
    n, classes = 32, 4
    x = rng.standard_normal((n, 1, 12, 12), dtype=np.float32)
    labels = rng.integers(0, classes, size=n)
    model = Model(REFERENCE_SPEC, (1, 12, 12), classes, dtype=np.float32)
    model.init_params(0)
    lr = np.float32(0.05)
    first_loss = None
    for _ in range(300):
        loss, correct = model.loss_and_grad(x, labels, scale=1.0 / n)  # grads of the mean loss
        if first_loss is None:
            first_loss = loss / n
        if correct == n:
            break
        model.params -= lr * model.grads
    assert model.params.dtype == np.float32
    assert correct == n, f"only {correct}/{n} correct after training, loss {loss / n:.3f}"
    assert loss / n < first_loss


def test_model_workspaces_reused_across_batch_sizes():
    """loss_and_grad on batches of 8, 3, 8 gives what a fresh model gives for each batch."""
    rng = np.random.default_rng(4)
    reused = tiny_model(seed=5)
    for n in (8, 3, 8):
        x = rng.standard_normal((n, *TINY_INPUT))
        labels = rng.integers(0, TINY_CLASSES, size=n)
        fresh = tiny_model(seed=5)
        loss_f, correct_f = fresh.loss_and_grad(x, labels, scale=0.5)
        logits_f = np.array(fresh.forward(x), copy=True)
        loss, correct = reused.loss_and_grad(x, labels, scale=0.5)
        assert (loss, correct) == (loss_f, correct_f), f"batch {n}"
        np.testing.assert_array_equal(reused.grads, fresh.grads, err_msg=f"batch {n}")
        np.testing.assert_array_equal(reused.forward(x), logits_f, err_msg=f"batch {n}")


def test_spec_options_set_strides_and_paddings():
    """conv stride/pad options and pool strides reach the layers: shapes follow the formulas."""
    spec = "conv:4:5:stride=2:pad=valid,relu,maxpool:3:stride=1,avgpool:2:stride=1,flatten,dense"
    model = Model(spec, (1, 16, 16), 10, dtype=np.float64)
    # conv (16-5)//2+1 = 6 -> maxpool 3/1: 4 -> avgpool 2/1: 3 -> flatten 4*3*3 = 36 -> dense 10
    shapes = {name: tuple(v.shape) for name, v in model.param_views.items()}
    assert shapes == {
        "conv1.weight": (4, 1, 5, 5),
        "conv1.bias": (4,),
        "fc1.weight": (10, 36),
        "fc1.bias": (10,),
    }
    model.init_params(0)
    assert model.forward(np.zeros((1, 1, 16, 16))).shape == (1, 10)


@pytest.mark.parametrize(
    "spec",
    [
        "conv:16:3,relu",  # does not end with the class layer
        "conv:4:3,pool:2,flatten,dense",  # unknown layer
        "conv:x:3,flatten,dense",  # bad filter count
        "conv:4:3,maxpool:20,flatten,dense",  # window larger than the image
    ],
)
def test_bad_spec_is_a_usage_error(spec):
    with pytest.raises(UsageError):
        Model(spec, (1, 8, 8), 10)


def test_grad_extra_slots_are_left_alone():
    """The trainer packs loss and accuracy after the gradient in grad_buffer for one Allreduce;
    backward must write the gradient, and only the gradient."""
    rng = np.random.default_rng(6)
    model = Model(TINY_SPEC, TINY_INPUT, TINY_CLASSES, dtype=np.float64, grad_extra=3)
    model.init_params(0)
    assert model.grad_buffer.size == model.params.size + 3
    assert np.shares_memory(model.grads, model.grad_buffer)
    model.grad_buffer[-3:] = [7.0, 8.0, 9.0]
    x = rng.standard_normal((4, *TINY_INPUT))
    model.loss_and_grad(x, rng.integers(0, TINY_CLASSES, size=4))
    np.testing.assert_array_equal(model.grad_buffer[-3:], [7.0, 8.0, 9.0])
    assert np.any(model.grads != 0)
