"""Training configuration: one typed schema, from which the flags, the TOML reader and the check
of a checkpoint's stored config are all derived.

The schema is the dataclass `Config` itself: every field is one setting, declared with
`setting(...)` (default, help, range or choices, whether it changes the trajectory). Its type
comes from the annotation (`int`, `float`, `str`, `bool`, `X | None`). To add a setting, add a
field: `--help`, the TOML keys, the type and range checks and the resume rules follow.

Standard library only, so `distcnn.train` can read the thread count (flags and TOML) and set the
BLAS thread count before NumPy is imported. Precedence, lowest first: built-in defaults, the
config stored in the checkpoint being resumed, `--config FILE.toml`, flags on the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import stat
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from distcnn import augment_spec
from distcnn.errors import ArgumentParser, UsageError

SCHEDULES = ("constant", "cosine", "step")
DATA_MODES = ("auto", "shared", "stream")  # distcnn.data.modes
OPTIMIZERS = ("sgd", "adam", "adamw")  # distcnn.optim.OPTIMIZERS (no NumPy import here)
ALLREDUCE_DTYPES = ("float32", "bfloat16", "float16")
TOML_MAX_BYTES = 1 << 20  # a config file is a few lines; more is not a config file


@dataclass(frozen=True)
class Setting:
    """How one field of Config is given, checked and inherited."""

    help: str
    metavar: str | None = None
    min: float | None = None  # inclusive lower bound
    max: float | None = None  # inclusive upper bound
    above: float | None = None  # exclusive lower bound
    below: float | None = None  # exclusive upper bound
    choices: tuple[str, ...] | None = None
    trajectory: bool = True  # changes the sequence of parameters a run produces
    inherit: bool = True  # a resumed run takes it from the checkpoint's config
    in_toml: bool = True  # may be set in a --config file
    example: str | None = None  # a good value, for the fix in an error message
    check: Callable[[Any], str | None] | None = None  # extra rule: a problem phrase or None


def setting(default: Any, help: str, **kw: Any) -> Any:
    """A Config field with its schema entry."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **kw)})


def _augment_rule(v: str) -> str | None:
    return augment_spec.problem(v)


def parse_betas(text: str) -> tuple[float, float]:
    """'B1,B2' -> (B1, B2); ValueError unless two numbers in [0, 1)."""
    parts = [float(p) for p in str(text).split(",")]
    if len(parts) != 2 or not all(0.0 <= b < 1.0 for b in parts):
        raise ValueError(text)
    return parts[0], parts[1]


def _betas_rule(v: str) -> str | None:
    try:
        parse_betas(v)
    except ValueError:
        return "must be two numbers in [0, 1) separated by a comma, e.g. --betas 0.9,0.999"
    return None


def _clip_norm_rule(v: float) -> str | None:
    return "would zero every step; give a positive norm or omit it" if v == 0 else None


@dataclass(frozen=True)
class Config:
    """The resolved settings of a run; read as cfg.batch_size. Frozen: built once by resolve()."""

    data: str | None = setting(
        None, "HDF5 dataset (default: the shipped data/mnist.h5)", metavar="PATH"
    )
    model: str | None = setting(
        None, "architecture spec (default: the reference model)", metavar="SPEC"
    )
    epochs: int = setting(12, "epochs (default 12)", min=1, max=10**6, metavar="N")
    max_steps: int | None = setting(
        None,
        "stop after N optimizer steps in total",
        min=1,
        metavar="N",
        trajectory=False,
        inherit=False,  # limits one invocation: a resumed run without it goes on to --epochs
    )
    batch_size: int = setting(
        64, "GLOBAL batch per step, split across ranks (default 64)", min=1, metavar="B"
    )
    lr: float = setting(0.05, "base learning rate (default 0.05)", above=0.0, example="0.05")
    momentum: float = setting(0.9, "SGD momentum (default 0.9)", min=0.0, below=1.0)
    optimizer: str = setting(
        "sgd",
        f"one of {', '.join(OPTIMIZERS)} (default sgd); adam/adamw as torch.optim defines them",
        choices=OPTIMIZERS,
        metavar="NAME",
    )
    betas: str = setting(
        "0.9,0.999", "Adam/AdamW betas (default 0.9,0.999)", metavar="B1,B2", check=_betas_rule
    )
    eps: float = setting(1e-8, "Adam/AdamW epsilon (default 1e-8)", above=0.0, example="1e-8")
    accum_steps: int = setting(
        1,
        "K micro-batches of --batch-size per optimizer step, one allreduce per step (default 1)",
        min=1,
        max=4096,
        metavar="K",
    )
    sync_bn: bool = setting(False, "batch norm statistics of the global batch, not the shard")
    allreduce_dtype: str = setting(
        "float32",
        f"precision of the gradient allreduce: {', '.join(ALLREDUCE_DTYPES)} (default float32)",
        choices=ALLREDUCE_DTYPES,
        metavar="DTYPE",
    )
    weight_decay: float = setting(5e-4, "L2 weight decay (default 5e-4)", min=0.0)
    lr_schedule: str = setting(
        "cosine",
        f"one of {', '.join(SCHEDULES)} (default cosine)",
        choices=SCHEDULES,
        metavar="NAME",
    )
    warmup_epochs: float = setting(
        1.0, "linear learning-rate warm-up, in epochs (default 1)", min=0.0, max=1e6
    )
    seed: int = setting(
        0, "decides initial weights and data order (default 0)", min=0, max=2**64 - 1
    )
    checkpoint_dir: str = setting(
        "checkpoints",
        "the run directory: checkpoints, metrics log, status (default checkpoints)",
        metavar="DIR",
        trajectory=False,
    )
    checkpoint_every: int = setting(
        500, "save every N steps (and at the end)", min=1, metavar="N", trajectory=False
    )
    keep: int = setting(
        3,
        "keep the newest K checkpoints (default 3)",
        min=1,
        metavar="K",
        trajectory=False,
        example="3",
    )
    resume: str | None = setting(
        None,
        "resume from a checkpoint, or the newest in the dir",
        metavar="PATH|auto",
        trajectory=False,
        inherit=False,
    )
    log: str | None = setting(
        None, "append JSON Lines metrics to PATH", metavar="PATH", trajectory=False
    )
    log_every: int = setting(
        10, "steps between step records (default 10)", min=1, metavar="N", trajectory=False
    )
    threads: int | None = setting(
        None, "BLAS threads per rank", min=1, max=4096, metavar="T", trajectory=False
    )
    deterministic: bool = setting(False, "bitwise-identical results on 1, 2, 4 ranks")
    collective_timeout: float = setting(
        300.0,
        "abort the job after S s in a collective",
        above=0.0,
        max=1e9,
        metavar="S",
        trajectory=False,
    )
    data_mode: str = setting(
        "auto",
        "how ranks hold the data: shared (one copy per node, in shared memory), stream (each "
        "rank reads its samples from the file, prefetched) or auto (shared if the splits fit "
        "--data-budget; default)",
        choices=DATA_MODES,
        metavar="MODE",
        trajectory=False,  # bitwise the same batches in every mode
    )
    data_budget: float | None = setting(
        None,
        "MB of splits that --data-mode auto holds in memory (default: half the memory "
        "available on the tightest node)",
        above=0.0,
        max=1e12,
        metavar="MB",
        trajectory=False,
    )
    prefetch: int = setting(
        4,
        "steps a streaming rank reads ahead (default 4)",
        min=1,
        max=1024,
        metavar="K",
        trajectory=False,
    )
    allow_data_change: bool = setting(
        False,
        "resume even though the dataset's fingerprint differs from the checkpoint's",
        trajectory=False,
        inherit=False,
        in_toml=False,
    )
    val_fraction: float = setting(
        0.0, "carve a validation set from train", min=0.0, below=1.0, metavar="F"
    )
    augment: str | None = setting(
        None,
        "augment each training sample from (seed, epoch, sample): shift:P (up to P pixels) "
        "and/or flip, comma-separated (default off)",
        metavar="SPEC",
        check=_augment_rule,
    )
    clip_norm: float | None = setting(
        None, "clip the global gradient norm to C", min=0.0, metavar="C", check=_clip_norm_rule
    )
    max_bad_steps: int = setting(
        3,
        "stop after N steps in a row skipped for a non-finite loss or gradient (default 3)",
        min=1,
        metavar="N",
        trajectory=False,
    )
    straggler_every: int = setting(
        100,
        "steps per straggler window: ranks share their compute time per step (default 100)",
        min=1,
        metavar="N",
        trajectory=False,
    )
    straggler_margin: float = setting(
        0.5,
        "name a rank slower than the median by this fraction, two windows in a row (0.5)",
        above=0.0,
        max=1000.0,
        metavar="F",
        trajectory=False,
    )
    eval_batch_size: int = setting(
        1000, "batch for evaluation (default 1000)", min=1, metavar="B", trajectory=False
    )
    no_progress: bool = setting(False, "no progress lines, epoch summaries only", trajectory=False)
    profile: bool = setting(
        False, "print time per phase and per layer at the end", trajectory=False
    )
    dry_run: bool = setting(
        False,
        "print the resolved config and model, then exit",
        trajectory=False,
        inherit=False,
        in_toml=False,
    )

    def as_dict(self) -> dict[str, Any]:
        """Plain {name: value}, as stored in checkpoints and run.json."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Field:
    """One row of the schema: a Config field's name, type and Setting."""

    name: str
    type: type  # int, float, str or bool
    optional: bool  # None allowed
    default: Any
    s: Setting

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def _schema() -> dict[str, Field]:
    hints = typing.get_type_hints(Config)
    rows = {}
    for f in dataclasses.fields(Config):
        t = hints[f.name]
        args = typing.get_args(t)
        optional = isinstance(t, types.UnionType) and type(None) in args
        base = next(a for a in args if a is not type(None)) if optional else t
        rows[f.name] = Field(f.name, base, optional, f.default, f.metadata["setting"])
    return rows


SCHEMA: dict[str, Field] = _schema()
DEFAULTS: dict[str, Any] = {name: f.default for name, f in SCHEMA.items()}
# Settings that do not change the sequence of parameters a run produces; everything else does,
# and overriding it when resuming earns a warning.
NON_TRAJECTORY = frozenset(n for n, f in SCHEMA.items() if not f.s.trajectory)
NOT_INHERITED = frozenset(n for n, f in SCHEMA.items() if not f.s.inherit)

_TYPE_WORDS = {int: "a whole number", float: "a number", str: "a string", bool: "true or false"}


def _num(v: float) -> str:
    return repr(v) if isinstance(v, float) else str(v)


def type_problem(f: Field, v: Any) -> str | None:
    """Why v cannot be the value of f (a TOML value or a stored one), or None."""
    if v is None and f.optional:
        return None
    ok = {
        bool: isinstance(v, bool),
        int: isinstance(v, int) and not isinstance(v, bool),
        float: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: isinstance(v, str),
    }[f.type]
    if ok:
        return None
    return f"must be {_TYPE_WORDS[f.type]}, not {type(v).__name__} {v!r}"


def value_problem(f: Field, v: Any) -> str | None:
    """Why a value of the right type is out of f's range or choices, or None."""
    s = f.s
    if v is None or f.type is bool:
        return None
    if f.type is str:
        if s.choices and v not in s.choices:
            return f"is unknown; use one of {', '.join(s.choices)}"
        if "\0" in v:
            return "holds a NUL character"
        return s.check(v) if s.check else None
    if f.type is float and not math.isfinite(v):
        lo = ">= 0" if s.min == 0 else "> 0" if s.above == 0 else ""
        return f"must be a finite number {lo}".rstrip()
    if f.type is int and s.min == 1 and v < 1:
        return f"is not a positive whole number; use e.g. {f.flag} {s.example or 10}"
    word = "a whole number" if f.type is int else "a finite number"
    if s.min is not None and v < s.min:
        return f"must be {word} >= {_num(s.min)}"
    if s.above is not None and not v > s.above:
        fix = f"; e.g. {f.flag} {s.example}" if s.example else ""
        return f"must be {word} > {_num(s.above)}{fix}"
    if s.below is not None and not v < s.below:
        return f"must be below {_num(float(s.below))}"
    if s.max is not None and v > s.max:
        return f"must be at most {_num(s.max)}"
    return s.check(v) if s.check else None


# -- flags ------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m distcnn.train",
        description="Train a CNN with data-parallel SGD; run under mpirun -n N for N ranks.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given
    )
    p.add_argument(
        "--config", metavar="FILE.toml", help="read settings from a TOML file; flags override it"
    )
    for f in SCHEMA.values():
        if f.type is bool:
            p.add_argument(f.flag, action="store_true", help=f.s.help)
        else:
            p.add_argument(f.flag, type=f.type, metavar=f.s.metavar, help=f.s.help)
    return p


def parse_flags(argv: list[str] | None) -> dict[str, Any]:
    """Only the flags given on the command line, as {setting: value}."""
    return vars(build_parser().parse_args(argv))


# -- TOML -------------------------------------------------------------------------------------


def read_text_file(path: str, what: str, limit: int = TOML_MAX_BYTES) -> str:
    """The UTF-8 text of a small regular file, or UsageError naming `what` and the fix.

    The file type is checked on the open descriptor before any read (opened non-blocking, so a
    FIFO cannot stall the open), and at most `limit` + 1 bytes are read: a directory, FIFO,
    device (/dev/zero) or huge file is refused at once instead of hanging or filling memory."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise UsageError(f"{what} {path}: no such file; give the path of a TOML file") from None
    except IsADirectoryError:
        raise UsageError(f"{what} {path} is a directory; give the path of a TOML file") from None
    except OSError as e:
        raise UsageError(
            f"{what} {path} cannot be read ({e.strerror or e}); fix its permissions or give "
            "another file"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise UsageError(f"{what} {path} is a directory; give the path of a TOML file")
        if not stat.S_ISREG(mode):
            raise UsageError(
                f"{what} {path} is not a regular file (a FIFO, socket or device); give the path "
                "of a TOML file"
            )
        chunks, got = [], 0
        while got <= limit:
            try:
                b = os.read(fd, limit + 1 - got)
            except OSError as e:
                raise UsageError(
                    f"{what} {path} cannot be read ({e.strerror or e}); give another file"
                ) from None
            if not b:
                break
            chunks.append(b)
            got += len(b)
        if got > limit:
            raise UsageError(
                f"{what} {path} is larger than {limit} bytes, too large for a config file"
            )
    finally:
        os.close(fd)
    raw = b"".join(chunks)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{what} {path} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None


def read_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like the flags (dashes or underscores),
    each type- and range-checked against the schema."""
    text = read_text_file(path, "--config")
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path} is not valid TOML ({e}); fix the file") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        f = SCHEMA.get(name)
        if f is None or not f.s.in_toml:
            raise UsageError(
                f"--config {path}: unknown setting {key!r}; use the flag names of --help"
            )
        problem = type_problem(f, value) or value_problem(f, value)
        if problem:
            raise UsageError(f"--config {path}: {key} = {_toml_repr(value)} {problem}")
        out[name] = float(value) if f.type is float else value
    return out


def _toml_repr(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, dict):
        return "{...} (a table)"
    if isinstance(v, list):
        return "[...] (an array)"
    return repr(v)


# -- resolving --------------------------------------------------------------------------------


def check_stored(
    stored: dict[str, Any], path: str, overridden: frozenset[str] | set[str] = frozenset()
) -> dict[str, Any]:
    """The inheritable settings of a checkpoint's config, each checked against the schema
    (except those the flags or the TOML file override). Settings this version does not know
    are ignored (an older or newer writer)."""
    out = {}
    for name, value in stored.items():
        f = SCHEMA.get(name)
        if f is None or not f.s.inherit:
            continue
        if name in overridden:
            out[name] = value  # compared in resolve() for the warning, never used
            continue
        problem = type_problem(f, value) or value_problem(f, value)
        if problem:
            raise UsageError(
                f"checkpoint {path}: its config has {name} {value!r}, which {problem}; give "
                f"{f.flag} to override it or resume from another checkpoint"
            )
        out[name] = float(value) if f.type is float and value is not None else value
    return out


def resolve(
    flags: dict[str, Any],
    checkpoint_config: dict[str, Any] | None = None,
    toml: dict[str, Any] | None = None,
) -> tuple[Config, list[str]]:
    """Merge defaults < checkpoint config < TOML < flags; return (config, warnings).

    checkpoint_config must already be checked (check_stored); toml, when given, is the already
    read --config file (else it is read here)."""
    values = dict(DEFAULTS)
    warnings: list[str] = []
    if checkpoint_config:
        values.update({k: v for k, v in checkpoint_config.items() if k in SCHEMA})
    given: dict[str, Any] = {}
    if toml is None and flags.get("config"):
        toml = read_toml(flags["config"])
    given.update(toml or {})
    given.update({k: v for k, v in flags.items() if k != "config"})
    for key, value in given.items():
        if (
            checkpoint_config
            and key not in NON_TRAJECTORY
            and key in checkpoint_config
            and checkpoint_config[key] != value
        ):
            warnings.append(
                f"{SCHEMA[key].flag} {value} overrides {checkpoint_config[key]} from the "
                "checkpoint; the resumed run will not match the original one"
            )
    values.update(given)
    cfg = Config(**values)
    validate(cfg)
    return cfg, warnings


def validate(cfg: Config) -> None:
    """Raise UsageError naming the first bad value and the fix."""
    for f in SCHEMA.values():
        v = getattr(cfg, f.name)
        problem = type_problem(f, v) or value_problem(f, v)
        if problem:
            shown = f"{v!r}" if f.type is str else _num(v)
            raise UsageError(f"{f.flag} {shown} {problem}")
    if cfg.data is not None and not Path(cfg.data).is_file():
        raise UsageError(
            f"--data {cfg.data}: no such file; build one with python -m distcnn.data build"
        )
