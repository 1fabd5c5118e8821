"""Training configuration: flags, TOML config files, defaults, and their validation.

Standard library only, so `distcnn.train` can read `--threads` and set the BLAS thread count
before NumPy is imported. Precedence, lowest first: built-in defaults, the config stored in the
checkpoint being resumed, `--config FILE.toml`, flags on the command line.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from distcnn.errors import ArgumentParser, UsageError

DEFAULTS: dict[str, Any] = {
    "data": None,  # None: the shipped data/mnist.h5
    "model": None,  # None: the reference model
    "epochs": 12,
    "max_steps": None,
    "batch_size": 64,
    "lr": 0.05,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "lr_schedule": "cosine",
    "warmup_epochs": 1.0,
    "seed": 0,
    "checkpoint_dir": "checkpoints",
    "checkpoint_every": 500,
    "keep": 3,
    "resume": None,
    "log": None,
    "log_every": 10,
    "threads": None,
    "deterministic": False,
    "collective_timeout": 300.0,
    "val_fraction": 0.0,
    "clip_norm": None,
    "max_bad_steps": 3,
    "eval_batch_size": 1000,
    "no_progress": False,
    "profile": False,
    "dry_run": False,
}

# Settings that do not change the sequence of parameters a run produces; everything else does,
# and overriding it when resuming earns a warning.
NON_TRAJECTORY = {
    "checkpoint_dir", "checkpoint_every", "keep", "resume", "log", "log_every", "threads",
    "collective_timeout", "eval_batch_size", "no_progress", "profile", "dry_run", "max_steps",
    "max_bad_steps",
}  # fmt: skip

SCHEDULES = ("constant", "cosine", "step")


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m distcnn.train",
        description="Train a CNN with data-parallel SGD; run under mpirun -n N for N ranks.",
        argument_default=argparse.SUPPRESS,  # so we know which flags were given
    )
    a = p.add_argument
    a("--config", metavar="FILE.toml", help="read settings from a TOML file; flags override it")
    a("--data", metavar="PATH", help="HDF5 dataset (default: the shipped data/mnist.h5)")
    a("--model", metavar="SPEC", help="architecture spec (default: the reference model)")
    a("--epochs", type=int, help=f"epochs (default {DEFAULTS['epochs']})")
    a("--max-steps", type=int, metavar="N", help="stop after N optimizer steps in total")
    a("--batch-size", type=int, metavar="B", help="GLOBAL batch per step, split across ranks")
    a("--lr", type=float, help=f"base learning rate (default {DEFAULTS['lr']})")
    a("--momentum", type=float, help=f"SGD momentum (default {DEFAULTS['momentum']})")
    a("--weight-decay", type=float, help=f"L2 weight decay (default {DEFAULTS['weight_decay']})")
    a("--lr-schedule", metavar="NAME", help=f"one of {', '.join(SCHEDULES)} (default cosine)")
    a("--warmup-epochs", type=float, help="linear learning-rate warm-up, in epochs (default 1)")
    a("--seed", type=int, help="decides initial weights and data order (default 0)")
    a("--checkpoint-dir", metavar="DIR", help="where checkpoints go (default checkpoints)")
    a("--checkpoint-every", type=int, metavar="N", help="save every N steps (and at the end)")
    a("--keep", type=int, metavar="K", help="keep the newest K checkpoints (default 3)")
    a("--resume", metavar="PATH|auto", help="resume from a checkpoint, or the newest in the dir")
    a("--log", metavar="PATH", help="append JSON Lines metrics to PATH")
    a("--log-every", type=int, metavar="N", help="steps between step records (default 10)")
    a("--threads", type=int, metavar="T", help="BLAS threads per rank")
    a("--deterministic", action="store_true", help="bitwise-identical results on 1, 2, 4 ranks")
    a(
        "--collective-timeout",
        type=float,
        metavar="S",
        help="abort the job after S s in a collective",
    )
    a("--val-fraction", type=float, metavar="F", help="carve a validation set from train")
    a("--clip-norm", type=float, metavar="C", help="clip the global gradient norm to C")
    a(
        "--max-bad-steps",
        type=int,
        metavar="N",
        help="stop after N steps in a row skipped for a non-finite loss or gradient (default 3)",
    )
    a("--eval-batch-size", type=int, metavar="B", help="batch for evaluation (default 1000)")
    a("--no-progress", action="store_true", help="no progress lines, epoch summaries only")
    a("--profile", action="store_true", help="print time per phase and per layer at the end")
    a("--dry-run", action="store_true", help="print the resolved config and model, then exit")
    return p


def parse_flags(argv: list[str] | None) -> dict[str, Any]:
    """Only the flags given on the command line, as {setting: value}."""
    return vars(build_parser().parse_args(argv))


def read_toml(path: str) -> dict[str, Any]:
    """Settings from a TOML file: top-level keys named like the flags (dashes or underscores)."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file; give the path of a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise UsageError(f"--config {path} is not valid TOML ({e}); fix the file") from None
    out = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in DEFAULTS or name in ("config", "dry_run"):
            raise UsageError(
                f"--config {path}: unknown setting {key!r}; use the flag names of --help"
            )
        out[name] = value
    return out


def resolve(
    flags: dict[str, Any], checkpoint_config: dict[str, Any] | None = None
) -> tuple[dict[str, Any], list[str]]:
    """Merge defaults < checkpoint config < TOML < flags; return (config, warnings)."""
    cfg = dict(DEFAULTS)
    warnings: list[str] = []
    if checkpoint_config:
        cfg.update({k: v for k, v in checkpoint_config.items() if k in DEFAULTS})
    given = {}
    if flags.get("config"):
        given.update(read_toml(flags["config"]))
    given.update(flags)
    for key, value in given.items():
        if (
            checkpoint_config
            and key not in NON_TRAJECTORY
            and key in checkpoint_config
            and checkpoint_config[key] != value
        ):
            flag = "--" + key.replace("_", "-")
            warnings.append(
                f"{flag} {value} overrides {checkpoint_config[key]} from the checkpoint; "
                "the resumed run will not match the original one"
            )
    cfg.update(given)
    validate(cfg)
    return cfg, warnings


def validate(cfg: dict[str, Any]) -> None:
    """Raise UsageError naming the first bad value and the fix."""

    def positive(key: str, allow_none: bool = False) -> None:
        v = cfg[key]
        if v is None and allow_none:
            return
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            flag = "--" + key.replace("_", "-")
            raise UsageError(f"{flag} {v} is not a positive whole number; use e.g. {flag} 10")

    def nonneg_float(key: str, upper: float | None = None) -> None:
        v = cfg[key]
        flag = "--" + key.replace("_", "-")
        if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise UsageError(f"{flag} {v} must be a finite number >= 0")
        if upper is not None and v >= upper:
            raise UsageError(f"{flag} {v} must be below {upper}")

    for key in ("epochs", "batch_size", "checkpoint_every", "log_every", "eval_batch_size"):
        positive(key)
    positive("max_bad_steps")
    positive("max_steps", allow_none=True)
    positive("threads", allow_none=True)
    if not isinstance(cfg["keep"], int) or cfg["keep"] < 1:
        raise UsageError(f"--keep {cfg['keep']} must be at least 1; use --keep 2 or more")
    if not isinstance(cfg["lr"], (int, float)) or not math.isfinite(cfg["lr"]) or cfg["lr"] <= 0:
        raise UsageError(f"--lr {cfg['lr']} must be a finite number > 0; e.g. --lr 0.05")
    nonneg_float("momentum", upper=1.0)
    nonneg_float("weight_decay")
    nonneg_float("warmup_epochs")
    nonneg_float("val_fraction", upper=1.0)
    if cfg["clip_norm"] is not None:
        nonneg_float("clip_norm")
        if cfg["clip_norm"] == 0:
            raise UsageError("--clip-norm 0 would zero every step; give a positive norm or omit it")
    ct = cfg["collective_timeout"]
    if not isinstance(ct, (int, float)) or not ct > 0:
        raise UsageError(f"--collective-timeout {ct} must be a number of seconds > 0")
    if cfg["lr_schedule"] not in SCHEDULES:
        raise UsageError(
            f"--lr-schedule {cfg['lr_schedule']!r} is unknown; use one of {', '.join(SCHEDULES)}"
        )
    if not isinstance(cfg["seed"], int) or cfg["seed"] < 0:
        raise UsageError(f"--seed {cfg['seed']} must be a whole number >= 0")
    if cfg["data"] is not None and not Path(cfg["data"]).is_file():
        raise UsageError(
            f"--data {cfg['data']}: no such file; build one with python -m distcnn.data build"
        )
