"""distcnn.checkpoint on its own (no MPI): round trip, atomic writes under SIGKILL, every
refusal with its message, auto-selection of the newest valid file, and the info summary."""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn.checkpoint import Checkpoint, CheckpointError

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {"conv1.weight": (4, 1, 3, 3), "conv1.bias": (4,), "fc1.weight": (3, 16), "fc1.bias": (3,)}


def make_ck(step: int = 5, scale: int = 1, seed: int = 0) -> Checkpoint:
    """A checkpoint whose arrays have SHAPES times `scale` rows (scale > 1: a big file)."""
    rng = np.random.default_rng(seed + step)
    shapes = {k: (v[0] * scale, *v[1:]) for k, v in SHAPES.items()}
    return Checkpoint(
        params={k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()},
        velocity={k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()},
        step=step,
        epoch=1,
        offset=32,
        world_size=2,
        seed=0,
        best_val=0.5,
        num_classes=3,
        input_shape=(1, 8, 8),
        model="conv:4:3,relu,flatten,dense",
        config={"batch_size": 16, "lr": 0.05},
        extra={"log_window": [1.25, 0.5, 2]},
    )


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same(a: Checkpoint, b: Checkpoint) -> None:
    for group in ("params", "velocity"):
        x, y = getattr(a, group), getattr(b, group)
        assert list(x) == list(y)
        for k in x:
            assert x[k].dtype == np.float32 and np.array_equal(x[k], y[k]), (group, k)
    for f in ("step", "epoch", "offset", "world_size", "seed", "best_val", "num_classes"):
        assert getattr(a, f) == getattr(b, f), f
    assert tuple(a.input_shape) == tuple(b.input_shape)
    assert (a.model, a.config, a.extra) == (b.model, b.config, b.extra)


def test_round_trip_and_layout(tmp_path):
    ck = make_ck()
    path = ckpt.save(tmp_path / ckpt.file_name(5), ck)
    assert path.name == "ckpt-00000005.h5" and os.listdir(tmp_path) == [path.name]
    back = ckpt.load(path)
    assert_same(ck, back)
    assert back.format_version == ckpt.FORMAT_VERSION
    with h5py.File(path) as f:
        assert f["model/conv1.weight"].shape == (4, 1, 3, 3)
        assert f["optimizer/velocity/fc1.weight"].shape == (3, 16)
        for key in ("format_version", "step", "epoch", "world_size", "model", "config"):
            assert key in f.attrs


def test_failed_save_leaves_nothing_and_keeps_the_previous_file(tmp_path):
    good = ckpt.save(tmp_path / ckpt.file_name(5), make_ck(5))
    before = file_digest(good)
    bad = make_ck(10)
    bad.velocity["fc1.bias"][1] = np.nan
    with pytest.raises(ValueError, match="non-finite values in fc1.bias"):
        ckpt.save(tmp_path / ckpt.file_name(10), bad)
    assert os.listdir(tmp_path) == [good.name] and file_digest(good) == before
    # a directory below a regular file (root ignores permissions, this it cannot ignore)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError):
        ckpt.save(blocker / "sub" / ckpt.file_name(10), make_ck(10))


def test_file_too_large_is_an_oserror_and_leaves_no_temporary(tmp_path):
    """RLIMIT_FSIZE in a child process: h5py reports the failed write as a SystemError; save
    must turn it into an OSError that says why, and remove its temporary file."""
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); sys.path.insert(0, sys.argv[1] + '/tests')\n"
        "from test_checkpoint import make_ck\n"
        "from distcnn import checkpoint as ckpt\n"
        "try:\n"
        "    ckpt.save(sys.argv[2], make_ck(7, scale=64))\n"
        "except OSError as e:\n"
        "    print('OSError', e.errno, e)\n"
    )
    target = tmp_path / ckpt.file_name(7)

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    out = subprocess.run(
        [sys.executable, "-c", code, str(ROOT), str(target)],
        preexec_fn=limit,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("OSError 27 [Errno 27] File too large (writing "), out.stdout
    assert os.listdir(tmp_path) == []


def _flip_byte_in_dataset(path: Path, dataset: str) -> None:
    with h5py.File(path) as f:
        offset = f[dataset].id.get_offset()  # contiguous storage: the data's file offset
    with open(path, "r+b") as f:
        f.seek(offset + 3)
        b = f.read(1)
        f.seek(offset + 3)
        f.write(bytes([b[0] ^ 0x10]))


def _damage(path: Path, how: str) -> str:
    """Damage a checkpoint in place; returns the message load must give."""
    if how == "truncated":
        size = path.stat().st_size
        with open(path, "r+b") as f:
            f.truncate(size // 2)
        return "is truncated (shorter than its HDF5 metadata says)"
    if how == "flipped byte":
        _flip_byte_in_dataset(path, "optimizer/velocity/conv1.weight")
        return "/optimizer/velocity/conv1.weight fails its sha256 checksum (damaged)"
    if how == "missing attribute":
        with h5py.File(path, "r+") as f:
            del f.attrs["offset"]
        return "lacks the root attribute 'offset'"
    if how == "edited attribute":
        with h5py.File(path, "r+") as f:
            f.attrs["step"] = 6
        return "root attributes fail their checksum (damaged)"
    if how == "newer format":
        with h5py.File(path, "r+") as f:
            f.attrs["format_version"] = ckpt.FORMAT_VERSION + 1
        return f"has format_version {ckpt.FORMAT_VERSION + 1}, newer than this distcnn reads"
    raise AssertionError(how)


DAMAGE = ["truncated", "flipped byte", "missing attribute", "edited attribute", "newer format"]


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_file_is_refused_and_auto_skips_it(tmp_path, how):
    older = ckpt.save(tmp_path / ckpt.file_name(5), make_ck(5))
    newer = ckpt.save(tmp_path / ckpt.file_name(10), make_ck(10))
    message = _damage(newer, how)
    with pytest.raises(CheckpointError) as e:
        ckpt.load(newer)
    assert str(newer) in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)
    path, notes = ckpt.newest_valid(tmp_path)
    assert path == older
    assert len(notes) == 1 and notes[0].startswith(
        "--resume auto: skipped 1 newer checkpoint that does not verify (ckpt-00000010.h5: "
    )
    assert message in notes[0]


def test_check_fits_lists_every_mismatch():
    ck = make_ck()
    ckpt.check_fits(ck, SHAPES, 3, "c.h5", (1, 8, 8))  # fits: no exception
    other = {**SHAPES, "conv1.weight": (8, 1, 3, 3), "fc1.weight": (4, 16), "fc1.bias": (4,)}
    del other["conv1.bias"]
    other["fc2.weight"] = (3, 4)
    with pytest.raises(CheckpointError) as e:
        ckpt.check_fits(ck, other, 4, "c.h5", (1, 28, 28))
    msg = str(e.value)
    assert msg.startswith("checkpoint c.h5 does not fit this model: num_classes: expected 4")
    for part in (
        "num_classes: expected 4, found 3",
        "input_shape: expected (1, 28, 28), found (1, 8, 8)",
        "model/conv1.weight: expected (8, 1, 3, 3), found (4, 1, 3, 3)",
        "velocity/conv1.weight: expected (8, 1, 3, 3), found (4, 1, 3, 3)",
        "model/fc1.weight: expected (4, 16), found (3, 16)",
        "model/fc1.bias: expected (4,), found (3,)",
        "model/fc2.weight: expected (3, 4), missing",
        "model/conv1.bias: not in this model, found (4,)",
    ):
        assert part in msg, part
    assert msg.endswith("use the --model and dataset it was trained with")


def test_listing_pruning_and_stale_temporaries(tmp_path):
    for s in (3, 12, 7):
        ckpt.save(tmp_path / ckpt.file_name(s), make_ck(s))
    ckpt.save(tmp_path / "best.h5", make_ck(7))
    (tmp_path / "ckpt-00000013.h5.tmp").write_bytes(b"partial")
    (tmp_path / "best.h5.tmp").write_bytes(b"partial")
    (tmp_path / "notes.txt").write_text("kept")
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [12, 7, 3]
    removed = ckpt.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == ["best.h5.tmp", "ckpt-00000013.h5.tmp"]
    ckpt.prune(tmp_path, 2, "")  # files written before run ids carry the run id ""
    assert sorted(os.listdir(tmp_path)) == [
        "best.h5",
        "ckpt-00000007.h5",
        "ckpt-00000012.h5",
        "notes.txt",
    ]
    assert ckpt.newest_valid(tmp_path / "nothing-here") == (None, [])


def _writer(directory: Path, ck: Checkpoint) -> None:
    """Child process body: save a big checkpoint over and over until it is killed."""
    try:
        while True:
            ckpt.save(directory / ckpt.file_name(9), ck)
            ck.step += 1  # the next file (and its temporary) has another name
            ckpt.save(directory / ckpt.file_name(ck.step), ck)
            ck.step = 9
    finally:
        os._exit(0)


def test_sigkill_during_writes_never_leaves_a_partial_checkpoint(tmp_path):
    """Kill a writer with SIGKILL at many points of its saves: the previous checkpoint always
    loads and verifies, every *.h5 present verifies (no partial .h5 ever appears), leftovers
    end in .h5.tmp and the next start removes them."""
    previous = ckpt.save(tmp_path / ckpt.file_name(5), make_ck(5))
    digest = file_digest(previous)
    big = make_ck(9, scale=2000)  # ~1.5 MB: a save takes several milliseconds
    delays = np.linspace(0.0, 0.08, 16)  # seconds after the fork, spread over several saves
    outcomes = set()
    for d in delays:
        pid = os.fork()
        if pid == 0:
            _writer(tmp_path, big)
        time.sleep(d)
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        names = sorted(os.listdir(tmp_path))
        for name in names:
            assert name.endswith(".h5") or name.endswith(".h5.tmp"), name
        assert file_digest(previous) == digest
        assert ckpt.load(previous).step == 5
        for _, p in ckpt.list_checkpoints(tmp_path):
            ckpt.load(p)  # every final name is a whole, verified file
        newest, notes = ckpt.newest_valid(tmp_path)
        assert notes == [] and newest is not None
        leftovers = ckpt.remove_stale_temporaries(tmp_path)
        outcomes.add((len(names), bool(leftovers)))
        assert not any(n.endswith(".tmp") for n in os.listdir(tmp_path))
    # the spread of delays really hit saves in flight (a leftover temporary) at least once
    assert any(tmp for _, tmp in outcomes), outcomes


def test_summarize_and_data_info(tmp_path, capsys):
    path = ckpt.save(tmp_path / ckpt.file_name(5), make_ck(5))
    text = ckpt.summarize(path)
    assert "checksum status: ok" in text
    assert "step 5, epoch 1 (+32 samples), written by 2 rank(s)" in text
    assert "conv1.weight" in text and '"batch_size": 16' in text
    assert datamod.main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "checksum status: ok" in out and "written by 2 rank(s)" in out
    _flip_byte_in_dataset(path, "model/fc1.weight")
    assert datamod.main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert "checksum status: FAILED" in out and "/model/fc1.weight fails its sha256" in out
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    assert datamod.main(["info", str(path)]) == 1
    out = capsys.readouterr().out
    assert "checksum status: FAILED" in out and "is truncated" in out
