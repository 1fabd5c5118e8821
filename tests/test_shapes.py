"""Images of any shape, end to end: multi-channel, non-square (C x H x W) images through the
model's shape inference and fused conv+pool blocks (gradients against finite differences), the
converter (NHWC .npz), training, evaluate and predict; and the documented 3x32x32 spec on 1 and
2 ranks reaching the same parameters. Tested through the public API only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import run_train
from gradcheck import numerical_grad, rel_error

from distcnn import checkpoint as ckpt
from distcnn import evaluate, naive, predict
from distcnn.data import load_split
from distcnn.data import main as data_main
from distcnn.model import REFERENCE_SPEC, Model

# docs/data.md: the spec for CIFAR-10-like 3x32x32 inputs
CIFAR_SPEC = (
    "conv:32:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,conv:64:3,relu,maxpool:2,"
    "flatten,dense:256,relu,dense"
)
# Small enough for finite differences; both conv+pool pairs run as fused blocks on (2, 8, 12).
SMALL_SPEC = "conv:3:3,relu,maxpool:2,conv:4:3,relu,maxpool:2,flatten,dense:5,relu,dense"


def colour_images(
    n: int, shape: tuple[int, int, int], classes: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """uint8 (n, C, H, W): class k brightens channel k % C in the k-th band of columns."""
    rng = np.random.default_rng(seed)
    c, h, w = shape
    labels = rng.integers(0, classes, n)
    images = rng.integers(0, 80, (n, c, h, w)).astype(np.uint8)
    for k in range(classes):
        cols = slice(k * w // classes, (k + 1) * w // classes)
        images[labels == k, k % c, :, cols] += 160
    return images, labels.astype(np.int64)


def test_gradients_of_a_non_square_colour_model_match_finite_differences() -> None:
    model = Model(SMALL_SPEC, (2, 8, 12), 3, dtype=np.float64)
    model.init_params(1)
    # (2, 8, 12) -> conv+pool (3, 4, 6) -> conv+pool (4, 2, 3) -> 24 features
    assert model.param_views["fc1.weight"].shape == (5, 4 * 2 * 3)
    rng = np.random.default_rng(0)
    model.params[:] += 0.1 * rng.standard_normal(model.params.shape)
    x = rng.standard_normal((3, 2, 8, 12))
    labels = np.array([0, 2, 1])
    model.loss_and_grad(x, labels)
    analytic = {k: g.copy() for k, g in model.grad_views.items()}

    def loss() -> float:
        return naive.softmax_cross_entropy_naive(model.forward(x), labels)[0]

    for name, view in model.param_views.items():
        err = rel_error(analytic[name], numerical_grad(loss, view))
        assert err < 1e-6, f"{name}: rel error {err:.2e}"


@pytest.mark.parametrize("shape", [(3, 12, 20), (3, 14, 22), (4, 16, 24)])
def test_reference_model_on_colour_and_non_square_images_matches_naive_layers(shape) -> None:
    """(3, 14, 22) makes conv2's input 7x11, odd: the plain path; the others are fused."""
    model = Model(REFERENCE_SPEC, shape, 10, dtype=np.float64)
    model.init_params(2)
    p = model.param_views
    x = np.random.default_rng(3).standard_normal((2, *shape))
    h = naive.conv2d_forward_naive(x, p["conv1.weight"], p["conv1.bias"], (1, 1), (1, 1))
    h = naive.maxpool_forward_naive(naive.relu_forward_naive(h), (2, 2), (2, 2))
    h = naive.conv2d_forward_naive(h, p["conv2.weight"], p["conv2.bias"], (1, 1), (1, 1))
    h = naive.maxpool_forward_naive(naive.relu_forward_naive(h), (2, 2), (2, 2))
    h = naive.relu_forward_naive(naive.linear_forward_naive(h, p["fc1.weight"], p["fc1.bias"]))
    expected = naive.linear_forward_naive(h, p["fc2.weight"], p["fc2.bias"])
    assert p["fc1.weight"].shape == (128, 32 * (shape[1] // 4) * (shape[2] // 4))
    np.testing.assert_allclose(model.forward(x), expected, rtol=1e-10, atol=1e-12)


def test_nhwc_npz_to_training_evaluate_and_predict(tmp_path: Path, capsys) -> None:
    """A Keras-style (N, H, W, C) colour dataset of 12x20 images: build, train, evaluate,
    predict; the model learns it and the checkpoint's input shape is (3, 12, 20)."""
    x, y = colour_images(96, (3, 12, 20), 3, 0)
    xt, yt = colour_images(30, (3, 12, 20), 3, 1)
    np.savez(tmp_path / "train.npz", images=x.transpose(0, 2, 3, 1), labels=y)
    np.savez(tmp_path / "test.npz", images=xt.transpose(0, 2, 3, 1), labels=yt)
    data = tmp_path / "colour.h5"
    argv = ["build", "-o", data, "--train", tmp_path / "train.npz", "--test", tmp_path / "test.npz"]
    assert data_main([str(a) for a in argv] + ["--normalize"]) == 0
    assert "read as NHWC" in capsys.readouterr().out
    np.testing.assert_array_equal(load_split(data, "train").images, x)
    res = run_train(
        ["--data", str(data), "--batch-size", "16", "--epochs", "6", "--lr", "0.05",
         "--checkpoint-dir", "ck", "--no-progress"],
        cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    last = ckpt.load(tmp_path / "ck" / ckpt.file_name(36))
    assert tuple(last.input_shape) == (3, 12, 20)
    assert evaluate.main([str(tmp_path / "ck" / ckpt.file_name(36)), "--json"]) == 0
    m = json.loads(capsys.readouterr().out)
    assert m["samples"] == 30 and m["accuracy"] >= 0.9
    assert predict.main([str(tmp_path / "ck" / ckpt.file_name(36)), f"{data}:test", "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)["predictions"]
    top1 = np.array([p["top"][0][0] for p in preds])
    assert len(preds) == 30 and np.mean(top1 == yt) == pytest.approx(m["accuracy"])


@pytest.mark.mpi
def test_cifar_spec_trains_the_same_on_one_and_two_ranks(tmp_path: Path) -> None:
    from distcnn.data import write_dataset

    data = tmp_path / "c.h5"
    write_dataset(
        data,
        {
            "train": colour_images(40, (3, 32, 32), 4, 2),
            "test": colour_images(20, (3, 32, 32), 4, 3),
        },
        num_classes=4,
        attrs={},
    )
    args = ["--data", str(data), "--model", CIFAR_SPEC, "--batch-size", "10", "--max-steps", "6",
            "--lr", "0.02", "--checkpoint-dir", "ck", "--log", "log.jsonl", "--log-every", "1",
            "--no-progress"]  # fmt: skip
    finals = []
    for ranks in (1, 2):
        cwd = tmp_path / f"n{ranks}"
        cwd.mkdir()
        res = run_train(args, ranks=ranks, cwd=cwd)
        assert res.returncode == 0, res.stderr
        finals.append(ckpt.load(cwd / "ck" / ckpt.file_name(6)))
        losses = [
            r["loss"]
            for r in map(json.loads, (cwd / "log.jsonl").read_text().splitlines())
            if r["kind"] == "step"
        ]
        assert losses[-1] < losses[0]
    one, two = finals
    assert tuple(one.input_shape) == (3, 32, 32) and two.world_size == 2
    for name, value in one.params.items():
        np.testing.assert_allclose(two.params[name], value, rtol=1e-4, atol=1e-6, err_msg=name)
