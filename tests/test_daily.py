"""Day-to-day commands: evaluate, predict, export, plot, progress, metrics log, guards, config."""

from __future__ import annotations

import json
import struct
import sys
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


# -- predict ----------------------------------------------------------------------------------


def test_predict_top1_equals_evaluate_predictions(tiny_ckpt, tiny_data, capsys):
    from distcnn import evaluate, predict

    assert predict.main([str(tiny_ckpt), f"{tiny_data}:test", "--json", "--top-k", "2"]) == 0
    res = json.loads(capsys.readouterr().out)
    top1 = np.array([p["top"][0][0] for p in res["predictions"]])
    labels = np.array([p["label"] for p in res["predictions"]])
    _, hand = hand_predictions(tiny_ckpt, tiny_data)
    assert top1.tolist() == hand.tolist()
    for p in res["predictions"]:
        assert len(p["top"]) == 2 and p["top"][0][1] >= p["top"][1][1] > 0
    assert evaluate.main([str(tiny_ckpt), "--json"]) == 0
    conf = np.zeros((3, 3), dtype=int)
    np.add.at(conf, (labels, top1), 1)
    assert conf.tolist() == json.loads(capsys.readouterr().out)["confusion"]


def test_predict_npz_and_images_match_the_split(tiny_ckpt, tiny_data, tmp_path, capsys):
    from distcnn import predict

    split = datamod.load_split(tiny_data, "test")
    _, hand = hand_predictions(tiny_ckpt, tiny_data)
    npz = tmp_path / "x.npz"
    np.savez(npz, images=split.images[:5, 0])  # (N, H, W): a channel axis is added
    assert predict.main([str(tiny_ckpt), str(npz), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [p["top"][0][0] for p in res["predictions"]] == hand[:5].tolist()
    assert "label" not in res["predictions"][0]

    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, images=np.zeros((2, 1, 9, 9), np.uint8))
    assert predict.main([str(tiny_ckpt), str(wrong)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "(1, 9, 9)" in err and "(1, 8, 8)" in err and "8x8-pixel" in err

    image = pytest.importorskip("PIL.Image")
    files = []
    for i in range(3):
        files.append(str(tmp_path / f"im{i}.{'png' if i % 2 else 'pgm'}"))
        image.fromarray(split.images[i, 0]).save(files[-1])
    assert predict.main([str(tiny_ckpt), *files, "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert [p["top"][0][0] for p in res["predictions"]] == hand[:3].tolist()
    assert [p["input"] for p in res["predictions"]] == files


# -- export -----------------------------------------------------------------------------------


def test_export_round_trip(tiny_ckpt, tmp_path, capsys):
    from distcnn import export

    out = tmp_path / "model.npz"
    assert export.main([str(tiny_ckpt), "-o", str(out)]) == 0
    ck = ckpt.load(tiny_ckpt)
    with np.load(out) as z:
        assert list(z.files) == list(ck.params)  # names and order as in the checkpoint
        for name, a in ck.params.items():
            assert z[name].dtype == np.float32
            np.testing.assert_array_equal(z[name], a)
    assert export.main([str(tiny_ckpt), "-o", str(tmp_path / "model.txt")]) == 2
    assert export.main([str(tmp_path / "nope.h5")]) == 2


def test_export_loads_into_torch_with_equal_logits(tiny_ckpt, tiny_data, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from distcnn import export, restore

    out = tmp_path / "model.npz"
    assert export.main([str(tiny_ckpt), "-o", str(out), "--torch"]) == 0
    code = capsys.readouterr().out.split("\n", 1)[1]
    scope: dict = {}
    exec(code, scope)  # the printed snippet builds `net` and loads the npz
    model, _ = restore.load_model(tiny_ckpt)
    x = datamod.load_split(tiny_data, "test").batch(np.arange(16))
    with torch.no_grad():
        theirs = scope["net"](torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(theirs, model.forward(x), rtol=1e-4, atol=1e-5)


# -- plot -------------------------------------------------------------------------------------


def png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def test_plot_writes_png_of_the_requested_size(tiny_data, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from distcnn import plot

    log = tmp_path / "run.jsonl"
    code, _, _ = train_in_process(
        tiny_data, tmp_path, ["--epochs", "3", "--val-fraction", "0.2", "--log", str(log)], capsys
    )
    assert code == 0
    out = tmp_path / "curves.png"
    assert plot.main([str(log), "-o", str(out), "--size", "640x480"]) == 0
    assert png_size(out) == (640, 480)

    from distcnn import evaluate

    conf = tmp_path / "confusion.png"
    assert evaluate.main([str(tmp_path / "ck" / "ckpt-00000009.h5"), "--plot", str(conf)]) == 0
    assert "confusion matrix" in capsys.readouterr().out
    assert png_size(conf)[0] > 100


def test_plot_without_matplotlib_says_how_to_install(tmp_path, monkeypatch, capsys):
    from distcnn import plot

    log = tmp_path / "run.jsonl"
    log.write_text(json.dumps({"kind": "step", "step": 1, "epoch": 0, "loss": 1.0}) + "\n")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    assert plot.main([str(log), "-o", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: plotting needs matplotlib, which is not installed: "
                   "pip install 'distcnn[plot]'"]  # fmt: skip


# -- training: progress, metrics log, guards, profile, dry run, config -------------------------


def train_in_process(
    data: Path, tmp_path: Path, extra: list[str], capsys, ck: str = "ck"
) -> tuple[int, str, str]:
    from distcnn import train

    args = ["--data", str(data), "--model", TINY_SPEC, "--batch-size", "32", "--lr", "0.1"]
    args += ["--checkpoint-dir", str(tmp_path / ck), *extra]
    code = train.main(args)
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def test_epoch_summary_lines_and_plain_progress(tiny_data, tmp_path, capsys):
    extra = ["--epochs", "2", "--val-fraction", "0.2", "--log-every", "2"]
    code, out, _ = train_in_process(tiny_data, tmp_path, extra, capsys)
    assert code == 0
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert len(epochs) == 2  # 80 train images, batch 32: 3 steps per epoch
    for line in epochs:
        for part in ("train loss ", " acc ", "val loss ", " img/s", "elapsed ", "eta "):
            assert part in line, line
    assert epochs[1].startswith("epoch 2/2  step 6/6  ") and "eta 0:00:00" in epochs[1]
    steps = [line for line in out.splitlines() if line.startswith("step ")]
    assert [s.split()[1] for s in steps] == ["2/6", "4/6", "6/6"]  # not a TTY: plain lines

    code, out, _ = train_in_process(tiny_data, tmp_path, [*extra, "--no-progress"], capsys, "c2")
    assert code == 0 and not any(line.startswith("step ") for line in out.splitlines())
    assert sum(line.startswith("epoch ") for line in out.splitlines()) == 2


def test_progress_bar_on_a_terminal(monkeypatch, capsys):
    pytest.importorskip("tqdm")
    import io

    from distcnn.progress import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    err = Tty()
    monkeypatch.setattr(sys, "stderr", err)
    p = Progress(on=True, total_steps=4, start_step=0, enabled=True)
    rec = {"loss": 0.5, "accuracy": 0.75, "epoch": 1.0, "lr": 0.1, "images_per_sec": 10.0}
    for s in range(1, 5):
        p.update(s, rec if s % 2 == 0 else None)
    p.line("epoch 1/1  summary")
    p.close()
    assert "4/4" in err.getvalue() and "loss=0.5000" in err.getvalue()
    assert "epoch 1/1  summary" in capsys.readouterr().out
    quiet = Progress(on=True, total_steps=4, start_step=0, enabled=False)
    assert quiet.bar is None


def test_metrics_log_records_and_resume_appends_without_duplicates(tiny_data, tmp_path, capsys):
    log = tmp_path / "run.jsonl"
    common = ["--epochs", "3", "--log-every", "2", "--log", str(log), "--val-fraction", "0.2"]
    common += ["--checkpoint-every", "3", "--keep", "5"]
    assert train_in_process(tiny_data, tmp_path, common, capsys)[0] == 0
    first = log.read_text().splitlines()
    recs = [json.loads(line) for line in first]
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [2, 4, 6, 8, 9]  # every 2 and the last (9 steps)
    for r in steps:
        assert {"kind", "time", "step", "epoch", "loss", "accuracy", "lr", "images_per_sec"} <= set(
            r
        )
        assert set(r["phase_seconds"]) == {
            "data", "forward", "backward", "comm", "optimizer", "checkpoint"
        }  # fmt: skip
        assert r["phase_seconds"]["forward"] > 0 and r["phase_seconds"]["backward"] > 0
    epochs = [r for r in recs if r["kind"] == "epoch"]
    assert [r["step"] for r in epochs] == [3, 6, 9]
    assert all({"loss", "accuracy", "val_loss", "val_accuracy", "eta"} <= set(r) for r in epochs)
    best = max(epochs, key=lambda r: r["val_accuracy"])  # the first of equal maxima
    assert ckpt.load(tmp_path / "ck" / "best.h5").step == best["step"]

    resume = ["--resume", str(tmp_path / "ck" / "ckpt-00000003.h5")]
    assert train_in_process(tiny_data, tmp_path, [*common, *resume], capsys)[0] == 0
    second = log.read_text().splitlines()
    recs2 = [json.loads(line) for line in second]
    kept = [line for line in first if json.loads(line)["step"] <= 3]
    assert second[: len(kept)] == kept  # records up to the resumed step, untouched
    assert [r["step"] for r in recs2 if r["kind"] == "step"] == [2, 4, 6, 8, 9]
    assert [r["step"] for r in recs2 if r["kind"] == "epoch"] == [3, 6, 9]
    assert [r["kind"] for r in recs2].count("test") == 1
    for a, b in zip(steps[2:], [r for r in recs2 if r["kind"] == "step"][2:], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)  # the same steps, replayed


def test_too_many_non_finite_steps_stop_with_exit_1(tiny_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DISTCNN_FAULT", "0:3:nan")
    code, _, err = train_in_process(
        tiny_data, tmp_path, ["--epochs", "2", "--max-bad-steps", "1"], capsys
    )
    assert code == 1
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: non-finite loss or gradient at step 3 (1 in a row")
    assert not list((tmp_path / "ck").glob("ckpt-*.h5"))  # nothing saved after the bad step


@pytest.mark.mpi
def test_nan_on_one_rank_skips_the_step_on_every_rank(tiny_data, tmp_path, capsys):
    def run(ranks: int, ck: Path) -> None:
        args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--batch-size", "32"]
        args += ["--epochs", "2", "--deterministic", "--checkpoint-dir", str(ck)]
        args += ["--checkpoint-every", "1", "--keep", "10", "--log-every", "1", "--no-progress"]
        fault = f"{ranks - 1}:5:nan"  # the last rank's gradient turns NaN at step 5
        r = run_train(args, ranks=ranks, env={"DISTCNN_FAULT": fault}, timeout=90)
        assert r.returncode == 0, r.stderr  # includes the replica check at every checkpoint
        assert "warning: step 5: non-finite loss or gradient on some rank" in r.stderr

    run(2, tmp_path / "two")
    at = {s: ckpt.load(tmp_path / "two" / ckpt.file_name(s)) for s in (4, 5, 6)}
    for name in at[4].params:  # the skipped step changed neither parameters nor momentum
        np.testing.assert_array_equal(at[5].params[name], at[4].params[name])
        np.testing.assert_array_equal(at[5].velocity[name], at[4].velocity[name])
    assert any(not np.array_equal(at[6].params[k], at[5].params[k]) for k in at[5].params)
    assert at[5].step == 5  # the step counter still advanced

    run(1, tmp_path / "one")  # same fault on 1 rank: bitwise the same run
    a, b = (ckpt.load(d / ckpt.file_name(8)) for d in (tmp_path / "one", tmp_path / "two"))
    for name in a.params:
        np.testing.assert_array_equal(a.params[name], b.params[name])


@pytest.mark.mpi
def test_clip_norm_is_the_same_on_one_and_two_ranks(tiny_data, tmp_path, capsys):
    base = ["--epochs", "1", "--deterministic", "--no-progress"]
    assert train_in_process(tiny_data, tmp_path, [*base, "--clip-norm", "0.05"], capsys)[0] == 0
    assert train_in_process(tiny_data, tmp_path, base, capsys, ck="noclip")[0] == 0
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--batch-size", "32", "--lr", "0.1"]
    args += [*base, "--clip-norm", "0.05", "--checkpoint-dir", str(tmp_path / "two")]
    r = run_train(args, ranks=2, timeout=90)
    assert r.returncode == 0, r.stderr
    one, two, noclip = (
        ckpt.load(tmp_path / d / ckpt.file_name(4)) for d in ("ck", "two", "noclip")
    )
    for name in one.params:
        np.testing.assert_array_equal(one.params[name], two.params[name])
    assert any(not np.array_equal(one.params[k], noclip.params[k]) for k in one.params)


def test_profile_table(tiny_data, tmp_path, capsys):
    code, out, _ = train_in_process(tiny_data, tmp_path, ["--epochs", "1", "--profile"], capsys)
    assert code == 0
    table = out.split("profile (rank 0): 4 steps")[1]
    for row in ("data", "forward", "backward", "comm", "optimizer", "checkpoint", "step total"):
        assert f"\n  {row} " in table, row
    for layer in (" 1 conv1", " 2 conv2", " 6 fc1", " 8 fc2"):  # conv1+relu+maxpool: 1 ConvPool
        assert table.count(layer) == 2, layer  # forward and backward
    total = next(line for line in table.splitlines() if "step total" in line)
    assert total.endswith("100.0%")
    phases = [line for line in table.splitlines() if line.startswith("  ") and line[2] != " "]
    shares = [float(line.split()[-1].rstrip("%")) for line in phases if "%" in line]
    assert sum(shares[:-1]) == pytest.approx(100.0, abs=0.5)  # the phases add up to the step


def test_model_per_layer_timers_only_when_profiling(tiny_data):
    split = datamod.load_split(tiny_data, "test")
    model = Model(TINY_SPEC, split.image_shape, split.num_classes)
    model.init_params(0)
    x, y = split.batch(np.arange(8)), split.labels[:8]
    assert model.layer_seconds is None
    plain = model.forward(x).copy()
    model.loss_and_grad(x, y)
    grads = model.grads.copy()
    assert model.seconds["forward"] > 0 and model.seconds["backward"] > 0
    model.profile_layers()
    np.testing.assert_array_equal(model.forward(x), plain)
    model.loss_and_grad(x, y)
    np.testing.assert_array_equal(model.grads, grads)
    assert model.layer_seconds.shape == (len(model.layers), 2)
    assert (model.layer_seconds[:, 0] > 0).all() and (model.layer_seconds[:, 1] > 0).all()


def test_dry_run_prints_config_and_model_table(capsys):
    from distcnn import train

    assert train.main(["--dry-run"]) == 0  # the shipped MNIST default and the reference model
    out = capsys.readouterr().out.splitlines()
    cfg = json.loads(out[0].removeprefix("config: "))
    assert cfg["batch_size"] == 64 and cfg["dry_run"] is True
    rows = {line.split()[0]: line for line in out if line.split()}
    # hand-computed: params and forward MFLOP per 28x28 image (2 per multiply-add)
    # conv1 and conv2 are ConvPool layers (conv 3x3 + relu + maxpool 2): pooled output shapes
    assert "(16, 14, 14)" in rows["conv1"] and " 160 " in rows["conv1"]
    assert "+ relu + maxpool" in rows["conv1"]
    assert f"{2 * 16 * 28 * 28 * 9 / 1e6:.3f}" in rows["conv1"]
    assert "(32, 7, 7)" in rows["conv2"] and " 4,640 " in rows["conv2"]
    assert "(128,)" in rows["fc1"] and " 200,832 " in rows["fc1"]
    assert "(10,)" in rows["fc2"] and " 1,290 " in rows["fc2"]
    assert " 206,922 " in rows["total"]


def test_config_precedence_checkpoint_toml_flags(tiny_data, tmp_path, capsys):
    from distcnn import config, train

    stored = {"data": str(tiny_data), "model": TINY_SPEC, "lr": 0.07, "momentum": 0.5,
              "epochs": 5, "batch_size": 20}  # fmt: skip
    toml = tmp_path / "run.toml"
    toml.write_text("lr = 0.2\nepochs = 4\nlog-every = 7\n")
    cfg, warnings = config.resolve({"config": str(toml), "epochs": 3}, stored)
    assert cfg.weight_decay == config.DEFAULTS["weight_decay"]  # default
    assert cfg.momentum == 0.5 and cfg.batch_size == 20  # checkpoint over defaults
    assert cfg.lr == 0.2 and cfg.log_every == 7  # TOML over the checkpoint
    assert cfg.epochs == 3  # flag over TOML
    assert any(w.startswith("--lr 0.2 overrides 0.07") for w in warnings)

    ck = make_checkpoint(tmp_path / "ckpt-00000007.h5", tiny_data)
    ck_cfg = ckpt.load(ck).config
    assert train.main(["--resume", str(ck), "--config", str(toml), "--dry-run", "--lr", "0.3"]) == 0
    resolved = json.loads(capsys.readouterr().out.splitlines()[0].removeprefix("config: "))
    assert resolved["model"] == ck_cfg["model"] and resolved["seed"] == ck_cfg["seed"]
    assert resolved["epochs"] == 4 and resolved["lr"] == 0.3

    toml.write_text("learning_rate = 0.1\n")
    assert train.main(["--config", str(toml), "--dry-run"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --config ") and "unknown setting 'learning_rate'" in last
