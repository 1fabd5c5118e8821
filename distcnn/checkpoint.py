"""HDF5 checkpoints: atomic, checksummed, complete enough to continue a run exactly.

Layout (docs/interface.md):
    /model/<name>               float32 parameters, PyTorch names and shapes (conv1.weight, ...)
    /optimizer/velocity/<name>  SGD momentum buffers, same names and shapes (empty for Adam)
    /optimizer/<state>/<name>   other optimizer state: exp_avg, exp_avg_sq (Adam, AdamW)
    /buffers/<name>             batch norm running statistics under PyTorch's names
                                (bn1.running_mean, bn1.running_var, bn1.num_batches_tracked)
    root attrs                  format_version, magic, step, epoch, offset (samples of this
                                epoch's global order already used), world_size, model, config
                                (JSON), num_classes, input_shape, seed, best_val, data_order,
                                run_id (the run that wrote it), attrs_sha256
    every dataset               attr sha256 of its bytes, verified on every load

Only rank 0 calls the writing functions; the trainer broadcasts their outcome. A save writes
`ckpt-<step>.h5.tmp` in the same directory, flushes and fsyncs it, renames it over the final
name and fsyncs the directory, so a crash at any moment leaves the previous checkpoint whole.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distcnn import faults
from distcnn.errors import UsageError

FORMAT_VERSION = 1
MAGIC = "distcnn-checkpoint"
NAME_RE = re.compile(r"^ckpt-(\d{8,})\.h5$")
TMP_SUFFIX = ".tmp"
DATA_ORDER = "numpy PCG64 permutation from SeedSequence(seed, spawn_key=(1, epoch))"
_META_KEYS = ("step", "epoch", "offset", "world_size", "seed", "best_val", "num_classes")


class CheckpointError(UsageError):
    """A checkpoint that cannot be used: unreadable, corrupt, or not for this model."""


@dataclass
class Checkpoint:
    """Everything a checkpoint holds, in memory."""

    params: dict[str, np.ndarray]
    velocity: dict[str, np.ndarray]
    step: int
    epoch: int
    offset: int
    world_size: int
    seed: int
    best_val: float
    num_classes: int
    input_shape: tuple[int, int, int]
    model: str
    config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. the trainer's log window
    run_id: str = ""  # the run that wrote it ("" in checkpoints older than run ids)
    # what inference needs without the dataset: pixel scaling, mean/std (see inference_info)
    inference: dict[str, Any] = field(default_factory=dict)
    # optimizer state besides the velocity, by state name (Adam: exp_avg, exp_avg_sq)
    optimizer_state: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)  # batch norm statistics
    format_version: int = FORMAT_VERSION  # as read from the file
    # distcnn.data.fingerprint of the dataset trained on (root attr dataset_fingerprint, JSON);
    # None: not recorded (older checkpoints)
    dataset_fingerprint: dict[str, Any] | None = None


def file_name(step: int) -> str:
    return f"ckpt-{step:08d}.h5"


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).view(np.uint8)).hexdigest()


def _attrs_digest(attrs: dict[str, Any]) -> str:
    canon = json.dumps(
        {k: attrs[k] for k in sorted(attrs) if k != "attrs_sha256"}, sort_keys=True, default=str
    )
    return hashlib.sha256(canon.encode()).hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _os_error(e: BaseException) -> OSError | None:
    """The OSError behind e, if any: h5py reports a failed write (disk full, file too large) as
    a SystemError or RuntimeError whose context is the OSError that says what happened."""
    seen = 0
    while e is not None and seen < 10:
        if isinstance(e, OSError):
            return e
        e = e.__cause__ or e.__context__
        seen += 1
    return None


def save(path: str | os.PathLike, ck: Checkpoint) -> Path:
    """Write ck to path atomically and durably; raises OSError on failure (ValueError for
    non-finite values), leaving no .h5 and no temporary file behind."""
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "magic": MAGIC,
        "step": int(ck.step),
        "epoch": int(ck.epoch),
        "offset": int(ck.offset),
        "world_size": int(ck.world_size),
        "seed": int(ck.seed),
        "best_val": float(ck.best_val),
        "num_classes": int(ck.num_classes),
        "input_shape": json.dumps(list(ck.input_shape)),
        "model": ck.model,
        "config": json.dumps(ck.config, sort_keys=True),
        "data_order": DATA_ORDER,
        "extra": json.dumps(ck.extra, sort_keys=True),
        "run_id": str(ck.run_id),
        "inference": json.dumps(ck.inference, sort_keys=True),
    }
    if ck.dataset_fingerprint is not None:
        attrs["dataset_fingerprint"] = json.dumps(ck.dataset_fingerprint, sort_keys=True)
    attrs["attrs_sha256"] = _attrs_digest(attrs)
    try:
        with open(tmp, "wb") as raw:
            with h5py.File(raw, "w") as f:
                groups = [("model", ck.params), ("optimizer/velocity", ck.velocity)]
                groups += [(f"optimizer/{k}", v) for k, v in ck.optimizer_state.items()]
                if ck.buffers:
                    groups.append(("buffers", ck.buffers))
                for group, arrays in groups:
                    g = f.create_group(group, track_order=True)  # layer order, as torch
                    for name, a in arrays.items():
                        a = np.asarray(a, dtype=np.int64 if a.dtype.kind in "iu" else np.float32)
                        if not np.all(np.isfinite(a)):
                            raise ValueError(f"refusing to save non-finite values in {name}")
                        d = g.create_dataset(name, data=a)
                        d.attrs["sha256"] = _sha(a)
                for k, v in attrs.items():
                    f.attrs[k] = v
            raw.flush()
            os.fsync(raw.fileno())
        faults.during_save(ck.step)  # DISTCNN_FAULT=0:<step>:kill-save dies here (drills)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException as e:
        try:
            tmp.unlink()
        except OSError:
            pass
        cause = _os_error(e)
        if cause is not None and not cause.filename:  # say which file could not be written
            raise OSError(cause.errno, f"{cause.strerror} (writing {tmp})") from e
        raise
    return path


def _attr(f: h5py.File, key: str, path: Path) -> Any:
    if key not in f.attrs:
        raise CheckpointError(
            f"checkpoint {path} lacks the root attribute {key!r}: it is damaged or not a "
            "distcnn checkpoint; resume from another one"
        )
    v = f.attrs[key]
    return v.decode() if isinstance(v, bytes) else v


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint (format, attributes digest, every dataset's sha256, finite
    parameters). The file goes through distcnn.safefile: special files, data outside the file
    and sizes beyond the machine's memory are refused before anything is read."""
    from distcnn import safefile

    path = Path(path)
    fix = "use another checkpoint"
    what = "checkpoint"
    try:
        with safefile.open_h5(path, what, fix) as f, safefile.h5_errors(path, what, fix):
            version = int(_attr(f, "format_version", path))
            if version > FORMAT_VERSION:
                raise CheckpointError(
                    f"checkpoint {path} has format_version {version}, newer than this distcnn "
                    f"reads ({FORMAT_VERSION}); upgrade distcnn"
                )
            if _attr(f, "magic", path) != MAGIC:
                raise CheckpointError(f"{path} is not a distcnn checkpoint (no magic)")
            raw = {k: safefile.read_attr(f, k, path, what, fix) for k in f.attrs}
            attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}
            attrs = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in attrs.items()}
            for key in (*_META_KEYS, "model", "config", "input_shape"):
                _attr(f, key, path)
            if attrs.get("attrs_sha256") != _attrs_digest(attrs):
                raise CheckpointError(
                    f"checkpoint {path}: root attributes fail their checksum (damaged); "
                    "resume from another checkpoint"
                )
            arrays: dict[str, dict[str, np.ndarray]] = {}
            total = 0
            optional = [f"optimizer/{k}" for k in f.get("optimizer", {}) if k != "velocity"]
            optional += ["buffers"] if "buffers" in f else []
            for group in ("model", "optimizer/velocity", *optional):
                if not isinstance(f.get(group), h5py.Group):
                    raise CheckpointError(f"checkpoint {path} lacks the group /{group}")
                arrays[group] = {}
                for name, d in f[group].items():
                    if not isinstance(d, h5py.Dataset):
                        raise CheckpointError(
                            f"checkpoint {path}: /{group}/{name} is not a dataset (damaged); "
                            "use another checkpoint"
                        )
                    total += safefile.check_dataset(d, path, what, fix)
                    safefile.require_bytes(total, f"checkpoint {path} (all tensors)", fix)
                    a = safefile.read_dataset(d, path, what, fix)
                    if d.attrs.get("sha256") != _sha(a):
                        raise CheckpointError(
                            f"checkpoint {path}: /{group}/{name} fails its sha256 checksum "
                            "(damaged); resume from another checkpoint"
                        )
                    # (integers: a batch norm layer's num_batches_tracked)
                    if a.dtype.kind not in "fiu" or (
                        a.dtype.kind == "f" and not np.isfinite(a).all()
                    ):
                        bad = "non-numeric" if a.dtype.kind not in "fiu" else "NaN or inf"
                        raise CheckpointError(
                            f"checkpoint {path}: /{group}/{name} holds {bad} values (its "
                            "checksum matches, so it was written that way: the run had "
                            "diverged); use an earlier checkpoint"
                        )
                    arrays[group][name] = a
    except CheckpointError:
        raise
    except UsageError as e:
        raise CheckpointError(str(e)) from None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError) as e:
        raise CheckpointError(
            f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); it is truncated or "
            "not HDF5: resume from another checkpoint"
        ) from None
    try:
        ck = Checkpoint(
            format_version=version,
            params=arrays["model"],
            velocity=arrays["optimizer/velocity"],
            step=int(attrs["step"]),
            epoch=int(attrs["epoch"]),
            offset=int(attrs["offset"]),
            world_size=int(attrs["world_size"]),
            seed=int(attrs["seed"]),
            best_val=float(attrs["best_val"]),
            num_classes=int(attrs["num_classes"]),
            input_shape=tuple(int(d) for d in json.loads(attrs["input_shape"])),
            model=str(attrs["model"]),
            config=json.loads(attrs["config"]),
            extra=json.loads(attrs.get("extra", "{}")),
            run_id=str(attrs.get("run_id", "")),
            optimizer_state={
                k.removeprefix("optimizer/"): v
                for k, v in arrays.items()
                if k.startswith("optimizer/") and k != "optimizer/velocity"
            },  # fmt: skip
            buffers=arrays.get("buffers", {}),
            inference=json.loads(attrs.get("inference", "{}")),
            dataset_fingerprint=(
                json.loads(attrs["dataset_fingerprint"]) if "dataset_fingerprint" in attrs else None
            ),
        )
    except (ValueError, TypeError) as e:  # consistent checksum, nonsense values
        raise CheckpointError(
            f"checkpoint {path} has a malformed root attribute ({e}); use another checkpoint"
        ) from None
    if len(ck.input_shape) != 3 or not isinstance(ck.config, dict):
        raise CheckpointError(
            f"checkpoint {path} has input_shape {ck.input_shape} or a config that is not an "
            "object; use another checkpoint"
        )
    return ck


def check_fits(
    ck: Checkpoint,
    shapes: dict[str, tuple[int, ...]],
    num_classes: int,
    path: str,
    input_shape: tuple[int, ...] | None = None,
    buffers: dict[str, np.ndarray] | None = None,
    optimizer_state: tuple[str, ...] = ("velocity",),
) -> None:
    """Raise CheckpointError listing every mismatch between ck and the model's parameters (and
    batch norm buffers, and the optimizer state groups the run needs)."""
    problems = []
    if ck.num_classes != num_classes:
        problems.append(f"num_classes: expected {num_classes}, found {ck.num_classes}")
    if input_shape is not None and tuple(ck.input_shape) != tuple(input_shape):
        problems.append(
            f"input_shape: expected {tuple(input_shape)}, found {tuple(ck.input_shape)}"
        )
    states = {"velocity": ck.velocity, **ck.optimizer_state}
    needed = [("model", ck.params)] + [(k, states.get(k, {})) for k in optimizer_state]
    for name, shape in shapes.items():
        for group, arrays in needed:
            if name not in arrays:
                problems.append(f"{group}/{name}: expected {shape}, missing")
            elif tuple(arrays[name].shape) != tuple(shape):
                problems.append(
                    f"{group}/{name}: expected {tuple(shape)}, found {tuple(arrays[name].shape)}"
                )
    for name in ck.params:
        if name not in shapes:
            problems.append(f"model/{name}: not in this model, found {ck.params[name].shape}")
    for name, a in (buffers or {}).items():
        if name not in ck.buffers:
            problems.append(f"buffers/{name}: expected {a.shape}, missing")
        elif ck.buffers[name].shape != a.shape:
            problems.append(f"buffers/{name}: expected {a.shape}, found {ck.buffers[name].shape}")
    if problems:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model: "
            + "; ".join(problems)
            + "; use the --model and dataset it was trained with"
        )


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of ckpt-*.h5 files in directory, newest first."""
    d = Path(directory)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = NAME_RE.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def looks_like_hdf5(path: str | os.PathLike) -> bool:
    """A regular file that starts with the HDF5 signature (what h5py writes): a cheap first
    test that cannot block (FIFOs and devices are not opened)."""
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with open(path, "rb") as f:
            return f.read(8) == HDF5_SIGNATURE
    except OSError:
        return False


def run_id_of(path: str | os.PathLike) -> str | None:
    """The run_id root attribute of a checkpoint, read without verifying anything ("" for a
    checkpoint older than run ids); None when the file is not a regular HDF5 file."""
    if not looks_like_hdf5(path):
        return None
    try:
        with h5py.File(path, "r") as f:
            v = f.attrs.get("run_id", "")
    except (OSError, ValueError, RuntimeError, KeyError, TypeError):
        return None
    return v.decode() if isinstance(v, bytes) else str(v)


def of_run(directory: str | os.PathLike, run_id: str) -> list[tuple[int, Path]]:
    """(step, path) of the ckpt-*.h5 files in directory written by run_id, newest first."""
    return [(s, p) for s, p in list_checkpoints(directory) if run_id_of(p) == run_id]


SKIPS_SHOWN = 3  # reasons named in the one line that sums up the files --resume auto skipped


def summarize_skips(skipped: list[str], limit: int = SKIPS_SHOWN) -> str:
    """One short phrase for many skipped files: the first `limit` reasons, then a count."""
    head = "; ".join(skipped[:limit])
    more = len(skipped) - limit
    return head + (f"; and {more} more" if more > 0 else "")


def newest_valid(
    directory: str | os.PathLike, run_id: str | None = None
) -> tuple[Path | None, list[str]]:
    """The newest checkpoint that loads and verifies (of run_id when given: others' files are
    passed over), and the notes: one line that summarises the newer ones skipped."""
    damaged: list[str] = []
    others = 0
    found = None
    for _, p in list_checkpoints(directory):
        rid = run_id_of(p)
        if run_id is not None and rid is not None and rid != run_id:
            others += 1
            continue
        if rid is None and len(damaged) >= SKIPS_SHOWN:
            # not even HDF5: only the reasons shown need the full (slower, guarded) load
            damaged.append(f"{p.name}: not an HDF5 file")
            continue
        try:
            load(p)
        except CheckpointError as e:
            damaged.append(f"{p.name}: {e}")
            continue
        found = p
        break
    notes = []
    if damaged:
        n = len(damaged)
        notes.append(
            f"--resume auto: skipped {n} newer checkpoint{'s' if n > 1 else ''} that "
            f"{'do' if n > 1 else 'does'} not verify ({summarize_skips(damaged)})"
        )
    if others:
        notes.append(
            f"--resume auto: passed over {others} checkpoint{'s' if others > 1 else ''} of "
            f"other runs in {directory} (this run is {run_id})"
        )
    return found, notes


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Delete leftover ckpt-*.h5.tmp / best.h5.tmp files from a crashed save (the caller holds
    the directory's lock, so no live save owns them)."""
    d = Path(directory)
    removed = []
    if d.is_dir():
        for p in d.glob("*.h5" + TMP_SUFFIX):
            if not (NAME_RE.match(p.name[: -len(TMP_SUFFIX)]) or p.name == "best.h5.tmp"):
                continue
            try:
                p.unlink()
                removed.append(p)
            except OSError:
                pass
    return removed


def prune(directory: str | os.PathLike, keep: int, run_id: str) -> None:
    """Keep the newest `keep` ckpt-*.h5 files of run_id; other runs' files and best.h5 are
    never touched."""
    for _, p in of_run(directory, run_id)[keep:]:
        try:
            p.unlink()
        except OSError:
            pass


SUMMARY_FAILED = "checksum status: FAILED"


def summarize(path: str | os.PathLike) -> str:
    """Human-readable summary of a checkpoint, with its checksum status (a file that does not
    load and verify shows SUMMARY_FAILED and the reason)."""
    path = Path(path)
    try:
        ck = load(path)
        status = "ok (every dataset and the attributes verify)"
    except CheckpointError as e:
        return f"checkpoint {path}\n  {SUMMARY_FAILED}: {e}"
    lines = [
        f"checkpoint {path}",
        f"  format_version {ck.format_version}, checksum status: {status}",
        f"  step {ck.step}, epoch {ck.epoch} (+{ck.offset} samples), written by {ck.world_size} "
        f"rank(s), seed {ck.seed}, best val accuracy {ck.best_val:.4f}",
        f"  run {ck.run_id or '(none recorded)'}",
        f"  model {ck.model}  input {tuple(ck.input_shape)}  classes {ck.num_classes}",
        "  parameters:",
    ]
    total = 0
    for name, a in ck.params.items():
        lines.append(f"    {name:<16} {tuple(a.shape)}")
        total += a.size
    lines.append(f"    total {total:,}")
    lines.append("  config: " + json.dumps(ck.config, sort_keys=True))
    return "\n".join(lines)
