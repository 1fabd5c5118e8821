"""`python -m distcnn.data`: build a dataset file from source files, or summarise one.

    python -m distcnn.data build -o OUT.h5 --train SRC [--val SRC] [--test SRC] ...
    python -m distcnn.data info FILE [--split NAME]

Every bad input raises `UsageError` with a one-line message naming the value and the fix; the CLI
prints it as `error: <message>` and exits with code 2.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from distcnn.data.build import LAYOUTS as STORAGE_LAYOUTS
from distcnn.data.build import channel_stats, write_dataset
from distcnn.data.checks import SPLITS, _check_label_range, _check_num_classes, _check_shapes
from distcnn.data.dataset import dataset_summary, load_split
from distcnn.data.fingerprints import describe, fingerprint
from distcnn.data.readers import LAYOUTS, describe_source, read_source, source_files
from distcnn.data.summary import _format_checkpoint, _format_dataset, _is_checkpoint
from distcnn.errors import ArgumentParser, UsageError


def _parse_shape(text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise UsageError(
            f"--shape {text} is not C,H,W: give three positive integers, e.g. --shape 1,28,28"
        )
    return shape  # type: ignore[return-value]


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m distcnn.data",
        description="Build distcnn HDF5 dataset files and summarise dataset or checkpoint files.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{build,info}")
    build = sub.add_parser(
        "build",
        help="build an HDF5 dataset from CSV, .npz, CIFAR-10 .bin or IDX files",
        description="SRC is a .csv/.csv.gz file (pixels then the label in the last column, "
        "optional header); a .npz with `images` and `labels` (or FILE.npz:IMAGES,LABELS to name "
        "other arrays); CIFAR-10 binary batches (.bin files, comma-separated, or a quoted glob "
        "such as 'cifar-10-batches-bin/data_batch_*.bin'); or IDX files given as IMAGES,LABELS "
        "(.gz or raw). An existing OUT is replaced only if this command wrote it (or with "
        "--force), and never when it is one of the sources.",
    )
    build.add_argument("-o", "--output", required=True, help="output .h5 file")
    build.add_argument("--train", required=True, metavar="SRC", help="training split source")
    build.add_argument("--val", metavar="SRC", help="validation split source")
    build.add_argument("--test", metavar="SRC", help="test split source")
    build.add_argument("--num-classes", type=int, metavar="K", help="default: max label + 1")
    build.add_argument("--shape", metavar="C,H,W", help="image shape of CSV rows")
    build.add_argument(
        "--layout",
        choices=LAYOUTS,
        help="how 4-D .npz images are stored: nchw (N, C, H, W) or nhwc (N, H, W, C, as Keras); "
        "default: the file's `layout` array, else the shape if only one reading fits",
    )
    build.add_argument(
        "--force",
        action="store_true",
        help="replace OUT even if it is not a dataset written by distcnn.data build",
    )
    build.add_argument(
        "--normalize",
        action="store_true",
        help="store per-channel mean/std of the train split (uint8 scaled to [0,1])",
    )
    build.add_argument(
        "--storage",
        default="sample",
        choices=STORAGE_LAYOUTS,
        help="how the file stores images: sample (default): contiguous, uncompressed: fast "
        "random sample reads, for --data-mode stream; compact: gzip in ~1 MiB chunks, "
        "smaller, slow to read at random",
    )
    build.add_argument("--source", default="", help="where the data comes from (stored)")
    build.add_argument("--license", default="", help="license of the data (stored)")
    info = sub.add_parser("info", help="summarise a dataset or checkpoint file")
    info.add_argument("file", help="dataset or checkpoint .h5 file")
    info.add_argument("--split", help="check and show only this split")
    return parser


def _cmd_info(args: argparse.Namespace) -> int:
    path = Path(args.file)
    if _is_checkpoint(path):
        text = _format_checkpoint(path)
        print(text)
        return 1 if "checksum status: FAILED" in text else 0
    if args.split is not None:
        split = load_split(path, args.split)
        counts = np.bincount(split.labels, minlength=split.num_classes)
        print(
            f"{path} /{args.split}: {len(split)} x {split.image_shape} {split.images.dtype}, "
            f"{split.num_classes} classes, per class: "
            + " ".join(f"{c}:{n}" for c, n in enumerate(counts.tolist()))
        )
        return 0
    print(_format_dataset(dataset_summary(path)))
    print(f"fingerprint: {describe(fingerprint(path))}")
    return 0


def _written_by_build(path: Path) -> bool:
    """True for an HDF5 dataset whose created_by says distcnn.data build wrote it."""
    try:
        if not h5py.is_hdf5(path):
            return False
        with h5py.File(path, "r") as f:
            made = f.attrs.get("created_by", "")
    except OSError:
        return False
    if isinstance(made, bytes):
        made = made.decode("utf-8", "replace")
    return isinstance(made, str) and made.startswith("distcnn.data build ")


def _check_output(args: argparse.Namespace) -> None:
    """Refuse, before reading anything, an output that is a source or that build did not write."""
    out = Path(args.output)
    if not out.parent.is_dir():
        raise UsageError(f"output directory {out.parent} does not exist: create it first")
    if not out.exists():
        return
    if out.is_dir():
        raise UsageError(f"output {out} is a directory: give a file name such as {out}/data.h5")
    for name in SPLITS:
        spec = getattr(args, name)
        for src in source_files(spec) if spec is not None else []:
            if src.exists() and os.path.samefile(src, out):
                raise UsageError(
                    f"-o {out} is also the --{name} source: write the dataset to another file"
                )
    if not args.force and not _written_by_build(out):
        raise UsageError(
            f"-o {out} exists and is not a dataset written by python -m distcnn.data build: "
            "choose another file, or pass --force to replace it"
        )


def _created_by(args: argparse.Namespace) -> str:
    """The build command as stored in the file: options and file names, never a folder."""
    words = ["distcnn.data", "build", "-o", Path(args.output).name]
    for name in SPLITS:
        if getattr(args, name) is not None:
            words += [f"--{name}", describe_source(getattr(args, name))]
    for flag in ("num_classes", "shape", "layout", "storage", "source", "license"):
        value = getattr(args, flag)
        if value not in (None, ""):
            words += ["--" + flag.replace("_", "-"), str(value)]
    if args.normalize:
        words.append("--normalize")
    return shlex.join(words)


def _cmd_build(args: argparse.Namespace) -> int:
    shape = _parse_shape(args.shape) if args.shape is not None else None
    _check_output(args)
    replacing = Path(args.output).exists()
    splits = {}
    notes: list[str] = []
    for name in SPLITS:
        spec = getattr(args, name)
        if spec is not None:
            images, labels = read_source(spec, shape, args.layout, notes)
            _check_shapes(images.shape, labels.shape, f"--{name} {spec}", f"labels of {spec}")
            splits[name] = (images, labels)
    if args.num_classes is not None:
        num_classes = _check_num_classes(
            args.num_classes, "--num-classes", "give the number of classes"
        )
    else:
        num_classes = max(int(labels.max()) for _, labels in splits.values()) + 1
        if num_classes < 2:
            raise UsageError(
                f"the labels only use class 0 (max label + 1 = {num_classes}): pass --num-classes K"
            )
    for name, (_, labels) in splits.items():
        fix = "fix the labels"
        if args.num_classes is not None:
            fix += " or pass a larger --num-classes"
        _check_label_range(labels, num_classes, f"--{name} {getattr(args, name)}", fix)
    attrs: dict[str, Any] = {
        "source": args.source,
        "license": args.license,
        "created_by": _created_by(args),
    }
    if args.normalize:
        mean, std = channel_stats(splits["train"][0])
        if (std <= 0).any():
            raise UsageError(
                f"the train images have a constant channel (std {std.tolist()}): drop --normalize"
            )
        attrs["mean"], attrs["std"] = mean, std
    write_dataset(args.output, splits, num_classes, attrs, layout=args.storage)
    parts = [f"{n} {len(lab)} x {im.shape[1:]} {im.dtype}" for n, (im, lab) in splits.items()]
    size = Path(args.output).stat().st_size
    for note in notes:
        print(note)
    verb = "replaced" if replacing else "wrote"
    print(f"{verb} {args.output} ({size / 1e6:.2f} MB): {', '.join(parts)}; {num_classes} classes")
    if args.normalize:
        fmt = ", ".join(
            f"{m:.4f}/{d:.4f}" for m, d in zip(attrs["mean"], attrs["std"], strict=True)
        )
        print(f"  per-channel mean/std of train: {fmt}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m distcnn.data {build,info}`; returns the exit code (2 for bad input)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _build_parser().parse_args(argv)
        if args.command == "build":
            return _cmd_build(args)
        return _cmd_info(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return UsageError.exit_code
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0
