"""The typed configuration: one schema for flags, TOML and checkpoint configs; every bad value,
from any source, ends with exit 2 and one line before any work; the thread count from TOML or a
checkpoint really reaches BLAS."""

from __future__ import annotations

import dataclasses
import json
import os
import threading
from pathlib import Path

import pytest
from conftest import TINY_SPEC
from threadpoolctl import threadpool_info

from distcnn import checkpoint as ckpt
from distcnn import config
from distcnn.train import main


def last_err(capsys: pytest.CaptureFixture) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "nothing on stderr"
    assert not any(line.startswith("Traceback") for line in err), err
    return err[-1]


def main_within(args: list[str], seconds: float = 10.0) -> int:
    """main(args) in a thread: a hang fails the test instead of stalling the suite."""
    result: list[int] = []
    t = threading.Thread(target=lambda: result.append(main(args)), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"main({args}) did not return within {seconds} s"
    return result[0]


def test_the_schema_derives_flags_toml_keys_and_defaults() -> None:
    help_text = config.build_parser().format_help()
    fields = dataclasses.fields(config.Config)
    assert len(fields) == len(config.SCHEMA) >= 27
    for f in fields:
        row = config.SCHEMA[f.name]
        assert row.flag in help_text, row.flag
        assert getattr(config.Config(), f.name) == row.default == config.DEFAULTS[f.name]
    assert config.SCHEMA["max_steps"].type is int and config.SCHEMA["max_steps"].optional
    assert config.SCHEMA["lr"].type is float and not config.SCHEMA["lr"].optional
    assert "checkpoint_dir" in config.NON_TRAJECTORY and "lr" not in config.NON_TRAJECTORY
    assert config.NOT_INHERITED == {"max_steps", "resume", "dry_run"}
    flags = config.parse_flags(["--batch-size", "7", "--deterministic", "--clip-norm", "2"])
    assert flags == {"batch_size": 7, "deterministic": True, "clip_norm": 2.0}
    cfg, _ = config.resolve(flags)
    assert (cfg.batch_size, cfg.deterministic, cfg.clip_norm, cfg.epochs) == (7, True, 2.0, 12)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.batch_size = 8  # type: ignore[misc]


def test_toml_values_take_the_schema_types(tmp_path: Path) -> None:
    toml = tmp_path / "ok.toml"
    toml.write_text('lr = 1\nweight_decay = 0\ndeterministic = true\nlr-schedule = "step"\n')
    cfg, _ = config.resolve({"config": str(toml)})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.weight_decay == 0.0
    assert cfg.deterministic is True and cfg.lr_schedule == "step"


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('deterministic = "no"', "deterministic = \"no\" must be true or false, not str 'no'"),
        ("weight-decay = true", "weight-decay = true must be a number, not bool True"),
        ("log = 1", "log = 1 must be a string, not int 1"),
        ("data = 5", "data = 5 must be a string, not int 5"),
        ("epochs = 2.5", "epochs = 2.5 must be a whole number, not float 2.5"),
        ("batch_size = [1]", "batch_size = [...] (an array) must be a whole number"),
        ("seed = -1", "seed = -1 must be a whole number >= 0"),
        ("lr-schedule = 'wavy'", 'lr-schedule = "wavy" is unknown; use one of constant, cosine'),
        ("momentum = 1.0", "momentum = 1.0 must be below 1.0"),
        ("dry-run = true", "unknown setting 'dry-run'; use the flag names of --help"),
        ("[train]\nlr = 1", "unknown setting 'train'"),
    ],
)
def test_toml_values_are_type_and_range_checked(
    toml: str, message: str, tmp_path: Path, capsys
) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(toml + "\n")
    ck = tmp_path / "ck"
    assert main(["--config", str(path), "--checkpoint-dir", str(ck)]) == 2
    line = last_err(capsys)
    assert line.startswith(f"error: --config {path}: ") and message in line, line
    assert not ck.exists()


def test_config_files_that_are_not_small_text_files(tmp_path: Path, capsys) -> None:
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    binary = tmp_path / "latin1.toml"
    binary.write_bytes(b'model = "caf\xe9"\n')
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (config.TOML_MAX_BYTES + 1))
    cases = [
        (tmp_path, f"--config {tmp_path} is a directory; give the path of a TOML file"),
        (fifo, f"--config {fifo} is not a regular file (a FIFO, socket or device)"),
        ("/dev/zero", "--config /dev/zero is not a regular file (a FIFO, socket or device)"),
        (binary, f"--config {binary} is not UTF-8 text (byte 0xe9 at offset 12); save it as"),
        (big, f"--config {big} is larger than 1048576 bytes, too large for a config file"),
        (tmp_path / "no.toml", f"--config {tmp_path / 'no.toml'}: no such file"),
    ]
    for path, message in cases:
        assert main_within(["--config", str(path)]) == 2, path
        line = last_err(capsys)
        assert line == f"error: {message}" or line.startswith(f"error: {message}"), line


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_config_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "secret.toml"
    path.write_text("lr = 0.1\n")
    path.chmod(0)
    assert main(["--config", str(path)]) == 2
    assert last_err(capsys) == (
        f"error: --config {path} cannot be read (Permission denied); fix its permissions or "
        "give another file"
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--seed", str(2**64)], f"--seed {2**64} must be at most {2**64 - 1}"),
        (["--warmup-epochs", "1e308"], "--warmup-epochs 1e+308 must be at most 1000000.0"),
        (["--warmup-epochs", "inf"], "--warmup-epochs inf must be a finite number >= 0"),
        (["--weight-decay", "-1"], "--weight-decay -1.0 must be a finite number >= 0.0"),
        (["--collective-timeout", "0"], "--collective-timeout 0.0 must be a finite number > 0"),
        (["--threads", "0"], "--threads 0 is not a positive whole number"),
        (["--epochs", str(10**7)], f"--epochs {10**7} must be at most 1000000"),
    ],
)
def test_ranges(flags: list[str], message: str, tiny_data: Path, tmp_path: Path, capsys) -> None:
    ck = tmp_path / "ck"
    assert main(["--data", str(tiny_data), "--checkpoint-dir", str(ck), *flags]) == 2
    line = last_err(capsys)
    assert line.startswith(f"error: {message}"), line
    assert not ck.exists()


def test_the_largest_seed_trains_and_saves(tiny_data: Path, tmp_path: Path, capsys) -> None:
    seed = 2**64 - 1
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--max-steps", "2"]
    assert (
        main([*args, "--seed", str(seed), "--checkpoint-dir", str(tmp_path), "--no-progress"]) == 0
    )
    ck = ckpt.load(tmp_path / ckpt.file_name(2))
    assert ck.seed == seed and ck.config["seed"] == seed


def _blas_threads() -> int:
    counts = {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}
    assert len(counts) == 1, threadpool_info()
    return counts.pop()


def test_threads_from_toml_and_from_a_checkpoint_reach_blas(
    tiny_data: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")  # restored afterwards; threads.apply rewrites them
    before = _blas_threads()
    try:
        toml = tmp_path / "t.toml"
        toml.write_text("threads = 2\n")
        assert main(["--config", str(toml), "--data", str(tiny_data), "--dry-run"]) == 0
        assert "threads per rank: 2 (from --config)" in capsys.readouterr().out
        assert _blas_threads() == 2

        # a checkpoint written with --threads 2 resumes with 2 threads, flags and TOML silent
        ck = tmp_path / "ck"
        args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--checkpoint-dir", str(ck)]
        assert main([*args, "--threads", "2", "--max-steps", "1", "--no-progress"]) == 0
        assert main(["--threads", "1", "--data", str(tiny_data), "--dry-run"]) == 0
        assert _blas_threads() == 1
        capsys.readouterr()
        assert main(["--resume", str(ck / ckpt.file_name(1)), "--dry-run"]) == 0
        assert "threads per rank: 2 (from the checkpoint's config)" in capsys.readouterr().out
        assert _blas_threads() == 2
    finally:
        from threadpoolctl import threadpool_limits

        threadpool_limits(before)


def test_a_checkpoint_config_of_the_wrong_type_is_refused(
    tiny_data: Path, tmp_path: Path, capsys
) -> None:
    ck_dir = tmp_path / "ck"
    args = ["--data", str(tiny_data), "--model", TINY_SPEC, "--checkpoint-dir", str(ck_dir)]
    assert main([*args, "--max-steps", "1", "--no-progress"]) == 0
    path = ck_dir / ckpt.file_name(1)
    ck = ckpt.load(path)
    ck.config["momentum"] = "high"
    ckpt.save(path, ck)  # a well-formed checkpoint (checksums match) holding a bad config
    before = path.read_bytes()
    assert main(["--resume", str(path)]) == 2
    assert last_err(capsys) == (
        f"error: checkpoint {path}: its config has momentum 'high', which must be a number, not "
        "str 'high'; give --momentum to override it or resume from another checkpoint"
    )
    assert path.read_bytes() == before
    # resolved configs are stored whole and read back the same
    assert json.loads(json.dumps(config.Config().as_dict())) == config.DEFAULTS
    assert main(["--resume", str(path), "--momentum", "0.5", "--dry-run"]) == 0
