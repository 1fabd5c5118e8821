"""Tests of distcnn.augment: the spec, the vectorised ops against a per-pixel loop, and the
property the trainer relies on: a sample's augmentation depends on (seed, epoch, sample index)
only, never on which batch, shard or position it is in."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SPEC, make_images, run_train

from distcnn import checkpoint as ckpt
from distcnn.augment import Augment, Op, parse, random_words
from distcnn.data import load_split, write_dataset
from distcnn.errors import UsageError
from distcnn.model import Model
from distcnn.sampler import epoch_order


def naive_augment(aug: Augment, x: np.ndarray, samples: np.ndarray, epoch: int) -> np.ndarray:
    """Pixel by pixel, one sample at a time, from the documented draws."""
    out = x.copy()
    _, c, h, w = x.shape
    for stream, op in enumerate(aug.ops):
        for b, s in enumerate(samples):
            img = out[b].copy()
            if op.kind == "shift":
                p = op.amount
                wy, wx = (int(v) for v in random_words(aug.seed, epoch, stream, [s], 2)[0])
                dy = p - ((wy >> 32) * (2 * p + 1) >> 32)  # offset oy = P - dy
                dx = p - ((wx >> 32) * (2 * p + 1) >> 32)
                assert -p <= dy <= p and -p <= dx <= p
                for ch in range(c):
                    for i in range(h):
                        for j in range(w):
                            si, sj = i - dy, j - dx
                            inside = 0 <= si < h and 0 <= sj < w
                            out[b, ch, i, j] = img[ch, si, sj] if inside else 0
            else:
                word = int(random_words(aug.seed, epoch, stream, [s], 1)[0, 0])
                if word >> 63:
                    out[b] = img[:, :, ::-1]
    return out


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
@pytest.mark.parametrize("spec", ["shift:2", "flip", "shift:1,flip", "flip,shift:3"])
def test_apply_matches_a_pixel_loop_on_non_square_multichannel_images(spec: str, dtype) -> None:
    shape = (3, 5, 7)
    aug = Augment(spec, seed=4, image_shape=shape)
    rng = np.random.default_rng(0)
    x = (
        rng.integers(1, 256, (12, *shape))
        if dtype == np.uint8
        else rng.standard_normal((12, *shape)) + 5
    ).astype(dtype)
    samples = rng.choice(1000, 12, replace=False)
    expected = naive_augment(aug, x, samples, 2)
    for _ in range(2):  # the second call reuses the scratch frame: still zero-filled
        got = x.copy()
        aug(got, samples, 2)
        np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, x)  # something moved


def test_a_sample_is_augmented_the_same_in_any_batch() -> None:
    """Splitting a batch into shards, reordering it or mixing other samples in changes nothing
    for a given sample; another epoch or seed changes the draws."""
    aug = Augment("shift:3,flip", seed=7, image_shape=(2, 9, 6))
    rng = np.random.default_rng(1)
    pool = rng.standard_normal((50, 2, 9, 6)).astype(np.float32)
    samples = np.arange(50) * 37 % 1009  # global indices of the pool's rows
    whole = aug.apply(pool.copy(), samples, epoch=5)
    perm = rng.permutation(50)
    shuffled = aug.apply(pool[perm].copy(), samples[perm], epoch=5)
    np.testing.assert_array_equal(shuffled, whole[perm])
    for lo, hi in [(0, 1), (1, 17), (17, 50), (20, 20)]:  # shards, one of them empty
        part = aug.apply(pool[lo:hi].copy(), samples[lo:hi], epoch=5)
        np.testing.assert_array_equal(part, whole[lo:hi])
    assert not np.array_equal(aug.apply(pool.copy(), samples, epoch=6), whole)
    other_seed = Augment("shift:3,flip", seed=8, image_shape=(2, 9, 6))
    assert not np.array_equal(other_seed.apply(pool.copy(), samples, epoch=5), whole)


def test_draws_cover_every_offset_evenly() -> None:
    """Over 60,000 samples each of the 5 offsets of shift:2 and both flip outcomes occur with
    frequency within 2 % of uniform, and dy, dx, flip are not correlated."""
    samples = np.arange(60_000)
    words = random_words(0, 0, 0, samples, 2)
    offsets = (words >> np.uint64(32)) * np.uint64(5) >> np.uint64(32)  # (N, 2) in 0..4
    for axis in range(2):
        counts = np.bincount(offsets[:, axis].astype(np.intp), minlength=5)
        assert counts.shape == (5,)
        np.testing.assert_allclose(counts / 60_000, 0.2, atol=0.004)
    flips = random_words(0, 0, 1, samples, 1)[:, 0] >> np.uint64(63)
    assert abs(flips.mean() - 0.5) < 0.01
    c = np.corrcoef(offsets[:, 0].astype(float), offsets[:, 1].astype(float))[0, 1]
    assert abs(c) < 0.02
    assert abs(np.corrcoef(offsets[:, 0].astype(float), flips.astype(float))[0, 1]) < 0.02


def test_shift_keeps_the_image_and_fills_the_border() -> None:
    """A shifted image is the original moved by at most P pixels: some placement of the original
    inside the fill frame equals it (checked by brute force over all offsets)."""
    p = 2
    aug = Augment(f"shift:{p}", seed=0, image_shape=(1, 6, 6))
    x = np.arange(1, 1 + 10 * 36, dtype=np.float32).reshape(10, 1, 6, 6)  # no zeros inside
    got = aug.apply(x.copy(), np.arange(10), epoch=0)
    seen = set()
    for b in range(10):
        frame = np.zeros((6 + 2 * p, 6 + 2 * p), np.float32)
        frame[p:-p, p:-p] = x[b, 0]
        hits = [
            (oy, ox)
            for oy in range(2 * p + 1)
            for ox in range(2 * p + 1)
            if np.array_equal(frame[oy : oy + 6, ox : ox + 6], got[b, 0])
        ]
        assert len(hits) == 1
        seen.add(hits[0])
    assert len(seen) > 3  # not one fixed offset


def test_parse_and_canonical_spec() -> None:
    assert parse(None) == () and parse("") == () and parse("none") == ()
    assert parse("shift:2, flip") == (Op("shift", 2), Op("flip"))
    assert Augment(" SHIFT:2,Flip ", 0, (1, 8, 8)).spec == "shift:2,flip"
    assert not Augment(None, 0, (1, 8, 8))
    x = np.ones((2, 1, 8, 8), np.float32)
    assert Augment("", 0, (1, 8, 8)).apply(x, np.arange(2), 0) is x


@pytest.mark.parametrize(
    "spec, message",
    [
        ("rotate:10", "has an unknown operation 'rotate:10'; use shift:P (P pixels, e.g. shift:2)"),
        ("shift", "has 'shift', which needs a whole number of pixels from 1 to 64, e.g. shift:2"),
        ("shift:0", "has 'shift:0', which needs a whole number of pixels from 1 to 64"),
        ("shift:1.5", "has 'shift:1.5', which needs a whole number of pixels"),
        ("flip:1", "has an unknown operation 'flip:1'"),
        ("shift:2,,flip", "has an unknown operation ''"),
    ],
)
def test_bad_specs_are_refused_with_the_fix(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse(spec)
    assert str(info.value).startswith(f"--augment {spec!r} {message}")
    assert "\n" not in str(info.value)


def test_shift_as_large_as_the_image_is_refused() -> None:
    with pytest.raises(UsageError) as info:
        Augment("shift:8", 0, (3, 8, 12))
    assert str(info.value) == (
        "--augment shift:8 is not smaller than the 8x12 images: use at most shift:7"
    )


# ---------------------------------------------------------------------------------------------
# In training: the plain math of one step, and the same augmented batches on 1, 2 and 4 ranks
# ---------------------------------------------------------------------------------------------

AUG = "shift:2,flip"
AUG_ARGS = ["--model", TINY_SPEC, "--batch-size", "11", "--seed", "5", "--checkpoint-dir", "ck",
            "--no-progress", "--augment", AUG]  # fmt: skip


@pytest.fixture(scope="module")
def aug_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100 train images of 3 classes (8x8; 11 does not divide 100: a ragged last batch)."""
    path = tmp_path_factory.mktemp("augdata") / "tiny.h5"
    write_dataset(path, {"train": make_images(100, 3, 8, 1)}, num_classes=3, attrs={})
    return path


def test_one_augmented_step_is_the_plain_update_on_the_augmented_batch(
    aug_data: Path, tmp_path: Path
) -> None:
    """p1 = p0 - lr * (mean gradient over the global batch of augmented samples), where the
    batch is epoch 0's first 11 samples, each augmented on its stored pixels from (seed, epoch,
    its row in the file) and then scaled by 1/255."""
    lr = 0.1
    args = [*AUG_ARGS, "--data", str(aug_data), "--max-steps", "1", "--lr", str(lr),
            "--momentum", "0", "--weight-decay", "0", "--lr-schedule", "constant",
            "--warmup-epochs", "0"]  # fmt: skip
    res = run_train(args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    after = ckpt.load(tmp_path / "ck" / ckpt.file_name(1))

    split = load_split(aug_data, "train")
    rows = epoch_order(5, 0, len(split))[:11]
    pixels = split.images[rows].copy()  # (11, 1, 8, 8) uint8
    Augment(AUG, 5, split.image_shape)(pixels, rows, 0)
    assert not np.array_equal(pixels, split.images[rows])
    model = Model(TINY_SPEC, split.image_shape, 3, np.float64)
    model.init_params(5)
    before = {k: v.copy() for k, v in model.param_views.items()}
    model.loss_and_grad(pixels.astype(np.float64) / 255.0, split.labels[rows], scale=1.0 / 11)
    for name, p0 in before.items():
        expected = p0 - lr * model.grad_views[name]
        np.testing.assert_allclose(after.params[name], expected, rtol=1e-4, atol=1e-6)


@pytest.mark.mpi
def test_deterministic_augmented_training_is_bitwise_equal_on_1_2_4_ranks(
    aug_data: Path, tmp_path: Path
) -> None:
    """25 steps (three epochs, each with a ragged 1-sample batch) with shift and flip."""
    finals = {}
    for ranks in (1, 2, 4):
        cwd = tmp_path / f"n{ranks}"
        cwd.mkdir()
        args = [*AUG_ARGS, "--data", str(aug_data), "--max-steps", "25", "--deterministic"]
        res = run_train(args, ranks=ranks, cwd=cwd)
        assert res.returncode == 0, res.stderr
        finals[ranks] = ckpt.load(cwd / "ck" / ckpt.file_name(25))
    cwd = tmp_path / "plain"
    cwd.mkdir()
    args = [*AUG_ARGS[:-2], "--data", str(aug_data), "--max-steps", "25", "--deterministic"]
    assert run_train(args, cwd=cwd).returncode == 0
    plain = ckpt.load(cwd / "ck" / ckpt.file_name(25))
    one = finals[1]
    assert one.config["augment"] == AUG and one.epoch == 2
    for name in one.params:
        for ranks in (2, 4):
            assert np.array_equal(finals[ranks].params[name], one.params[name]), (ranks, name)
            assert np.array_equal(finals[ranks].velocity[name], one.velocity[name]), (ranks, name)
    assert not np.array_equal(plain.params["conv1.weight"], one.params["conv1.weight"])
