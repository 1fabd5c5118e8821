"""The training command in-process: bad input is refused with exit 2 and one line; a short run
learns, writes its checkpoint, and resolves its config as documented."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import TINY_SPEC, make_images

from distcnn.data import write_dataset
from distcnn.train import main


def last_err(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert not any(line.startswith("Traceback") for line in err)
    return err[-1]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--batch-size", "0"], "error: --batch-size 0 is not a positive whole number"),
        (["--epochs", "-2"], "error: --epochs -2 is not a positive whole number"),
        (["--lr", "-1"], "error: --lr -1.0 must be a finite number > 0"),
        (["--lr", "nan"], "error: --lr nan must be a finite number > 0"),
        (["--momentum", "1.5"], "error: --momentum 1.5 must be below 1.0"),
        (["--lr-schedule", "wavy"], "error: --lr-schedule 'wavy' is unknown"),
        (["--epochs", "abc"], "error: argument --epochs: invalid int value: 'abc'"),
        (["--no-such-flag"], "error: unrecognized arguments: --no-such-flag"),
        (["--keep", "0"], "error: --keep 0 is not a positive whole number; use e.g. --keep 3"),
        (["--data", "missing.h5"], "error: --data missing.h5: no such file"),
        (["--model", "conv:8:3,relu,blur:2,dense"], "error: unknown layer 'blur:2' in --model"),
        (["--model", "conv:8:3,relu"], "error: --model must end with a dense layer of 3 outputs"),
        (
            ["--model", "conv:8:4,dense"],
            "padding 'same' needs an odd kernel, got 4x4; change layer 'conv:8:4'",
        ),
        (
            ["--model", "conv:4:3,maxpool:2,maxpool:2,maxpool:2,maxpool:2,dense"],
            "error: layer 5 'maxpool:2' of --model does not fit its input (4, 1, 1)",
        ),
        (["--val-fraction", "1.5"], "error: --val-fraction 1.5 must be below 1.0"),
        (["--clip-norm", "0"], "error: --clip-norm 0.0 would zero every step"),
    ],
)
def test_bad_flags_exit_2_with_one_line(
    flags: list[str], message: str, tiny_data: Path, tmp_path: Path, capsys
) -> None:
    args = ["--data", str(tiny_data), "--checkpoint-dir", str(tmp_path / "ck"), *flags]
    if "--data" in flags:
        args = ["--checkpoint-dir", str(tmp_path / "ck"), *flags]
    assert main(args) == 2
    line = last_err(capsys)
    assert message in line, line
    assert not (tmp_path / "ck").exists() or not any((tmp_path / "ck").iterdir())


def _bad_dataset(path: Path, images: np.ndarray, labels: np.ndarray, k: int = 3) -> Path:
    with h5py.File(path, "w") as f:
        f.attrs["num_classes"] = k
        f["train/images"] = images
        f["train/labels"] = labels
    return path


@pytest.mark.parametrize(
    ("images", "labels", "message"),
    [
        (np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, -1, 2]), "found -1 at index 2"),
        (np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 3, 2]), "found 3 at index 2"),
        (np.zeros((4, 8, 8), np.uint8), np.array([0, 1, 1, 2]), "(N, C, H, W)"),
        (np.zeros((0, 1, 8, 8), np.uint8), np.zeros(0, np.int64), "empty"),
        (np.full((4, 1, 8, 8), np.nan, np.float32), np.array([0, 1, 1, 2]), "non-finite"),
        (np.zeros((4, 1, 8, 8), np.uint8), np.array([0, 1, 1]), "4"),
    ],
)
def test_bad_dataset_exit_2(images, labels, message, tmp_path: Path, capsys) -> None:
    path = _bad_dataset(tmp_path / "bad.h5", images, labels)
    code = main(["--data", str(path), "--checkpoint-dir", str(tmp_path / "ck")])
    assert code == 2
    line = last_err(capsys)
    assert line.startswith("error: ") and str(path) in line and message in line, line


def test_spec_the_image_cannot_support(tmp_path: Path, capsys) -> None:
    path = tmp_path / "small.h5"
    write_dataset(path, {"train": make_images(20, 3, 4, 0)}, num_classes=3, attrs={})
    spec = "conv:4:3,relu,maxpool:2,maxpool:2,maxpool:2,dense"
    assert main(["--data", str(path), "--model", spec]) == 2
    line = last_err(capsys)
    assert "'maxpool:2' of --model does not fit its input (4, 1, 1)" in line, line
    assert "use fewer pooling layers or larger images" in line


def test_short_run_learns_and_writes_a_checkpoint(tiny_data: Path, tmp_path: Path, capsys) -> None:
    ck = tmp_path / "ck"
    log = tmp_path / "run.jsonl"
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--epochs", "6", "--batch-size", "16"]
    args += ["--lr", "0.1", "--checkpoint-dir", str(ck), "--log", str(log), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    test_acc = float(out.split("test: loss ")[1].split("accuracy ")[1].split()[0])
    assert test_acc >= 0.9, out
    steps = 6 * 7  # 100 samples, batch 16 -> 7 steps per epoch, the last of 4
    files = sorted(p.name for p in ck.iterdir())
    assert files == [f"ckpt-{steps:08d}.h5", "run.json", "status.json"]  # the lock is gone
    with h5py.File(ck / files[0]) as f:
        assert f.attrs["step"] == steps and f.attrs["world_size"] == 1
        assert f["model/conv1.weight"].shape == (4, 1, 3, 3)
        assert f["model/fc2.weight"].shape == (3, 16)
        assert json.loads(f.attrs["config"])["batch_size"] == 16
    records = [json.loads(line) for line in log.read_text().splitlines()]
    step_recs = [r for r in records if r["kind"] == "step"]
    for key in ("step", "epoch", "loss", "accuracy", "lr", "images_per_sec", "time"):
        assert key in step_recs[0]
    assert step_recs[-1]["step"] == steps
    assert step_recs[-1]["loss"] < step_recs[0]["loss"]


def test_toml_config_and_flag_precedence(tiny_data: Path, tmp_path: Path, capsys) -> None:
    cfg = tmp_path / "run.toml"
    cfg.write_text(f'data = "{tiny_data}"\nbatch-size = 20\nlr = 0.2\nepochs = 2\n')
    assert main(["--config", str(cfg), "--lr", "0.3", "--dry-run"]) == 0
    out = capsys.readouterr().out
    resolved = json.loads(out.splitlines()[0].removeprefix("config: "))
    assert resolved["batch_size"] == 20 and resolved["lr"] == 0.3 and resolved["epochs"] == 2
    cfg.write_text("bogus = 1\n")
    assert main(["--config", str(cfg)]) == 2
    assert "unknown setting 'bogus'" in last_err(capsys)
