"""Day-to-day commands: evaluate, predict, export, plot, progress, metrics log, guards, config."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_SPEC, make_images, run_train

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn.data import write_dataset
from distcnn.model import Model


def make_checkpoint(path: Path, data: Path, seed: int = 3, step: int = 7) -> Path:
    """A checkpoint of TINY_SPEC with seeded random weights, recording `data` in its config."""
    split = datamod.load_split(data, "train")
    model = Model(TINY_SPEC, split.image_shape, split.num_classes)
    model.init_params(seed)
    ck = ckpt.Checkpoint(
        params={k: v.copy() for k, v in model.param_views.items()},
        velocity={k: np.zeros_like(v) for k, v in model.param_views.items()},
        step=step,
        epoch=0,
        offset=0,
        world_size=1,
        seed=seed,
        best_val=-1.0,
        num_classes=split.num_classes,
        input_shape=split.image_shape,
        model=TINY_SPEC,
        config={"data": str(data), "model": TINY_SPEC, "seed": seed},
    )
    ckpt.save(path, ck)
    return path


@pytest.fixture
def tiny_ckpt(tmp_path: Path, tiny_data: Path) -> Path:
    return make_checkpoint(tmp_path / "ckpt-00000007.h5", tiny_data)


def hand_predictions(ckpt_path: Path, data: Path, split: str = "test") -> tuple[np.ndarray, ...]:
    """Labels and argmax predictions by calling Model.forward directly, one image at a time."""
    ck = ckpt.load(ckpt_path)
    s = datamod.load_split(data, split)
    model = Model(ck.model, s.image_shape, s.num_classes)
    for name, view in model.param_views.items():
        view[...] = ck.params[name]
    preds = np.array([model.forward(s.batch(np.array([i])))[0].argmax() for i in range(len(s))])
    return s.labels, preds


# -- evaluate ---------------------------------------------------------------------------------


def test_evaluate_confusion_matches_hand_computed(tiny_ckpt, tiny_data, capsys):
    from distcnn import evaluate

    labels, preds = hand_predictions(tiny_ckpt, tiny_data)
    expected = np.zeros((3, 3), dtype=int)
    for t, p in zip(labels, preds, strict=True):
        expected[t, p] += 1
    assert len(set(preds.tolist())) > 1, "the seeded model should predict more than one class"

    assert evaluate.main([str(tiny_ckpt), "--json", "--batch-size", "7"]) == 0
    out = capsys.readouterr().out
    res = json.loads(out)  # the whole of stdout is one JSON object
    assert res["confusion"] == expected.tolist()
    assert res["samples"] == 60
    assert res["accuracy"] == pytest.approx(np.trace(expected) / 60)
    for c in range(3):
        assert res["per_class"][c] == pytest.approx(expected[c, c] / expected[c].sum())
    assert res["data"] == str(tiny_data)  # --data defaulted to the checkpoint's dataset
    assert res["step"] == 7

    assert evaluate.main([str(tiny_ckpt), "--data", str(tiny_data)]) == 0
    text = capsys.readouterr().out
    assert "per-class accuracy" in text
    assert "confusion matrix" in text
    rows = text.split("confusion matrix")[1].splitlines()[2:5]
    assert [[int(v) for v in r.split()[1:]] for r in rows] == expected.tolist()


def test_evaluate_bad_input_exits_2(tmp_path, tiny_ckpt, capsys):
    from distcnn import evaluate

    assert evaluate.main([str(tmp_path / "missing.h5")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: checkpoint ") and "missing.h5" in err[-1]
    assert evaluate.main([str(tiny_ckpt), "--split", "nosuch"]) == 2
    assert "nosuch" in capsys.readouterr().err
    other = tmp_path / "other.h5"
    pair = make_images(10, 3, 16, 5)
    write_dataset(other, {"train": pair, "test": pair}, num_classes=3, attrs={})
    assert evaluate.main([str(tiny_ckpt), "--data", str(other)]) == 2
    assert "(1, 16, 16)" in capsys.readouterr().err


@pytest.mark.slow
def test_evaluate_json_subprocess_stdout_is_one_object(tiny_ckpt):
    r = run_train([str(tiny_ckpt), "--json"], module="distcnn.evaluate", timeout=60)
    assert r.returncode == 0, r.stderr
    obj = json.loads(r.stdout)  # raises if anything else is on stdout
    assert {"accuracy", "loss", "samples", "per_class", "confusion"} <= set(obj)
    r = run_train(["nope.h5"], module="distcnn.evaluate", timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines()[-1].startswith("error: checkpoint nope.h5")
    assert "Traceback" not in r.stderr


@pytest.mark.mpi
def test_evaluate_two_ranks_equals_one(tiny_ckpt, capsys):
    from distcnn import evaluate

    assert evaluate.main([str(tiny_ckpt), "--json"]) == 0
    one = json.loads(capsys.readouterr().out)
    r = run_train([str(tiny_ckpt), "--json"], ranks=2, module="distcnn.evaluate", timeout=60)
    assert r.returncode == 0, r.stderr
    two = json.loads(r.stdout)
    assert two["confusion"] == one["confusion"]
    assert two["loss"] == pytest.approx(one["loss"], rel=1e-6)
