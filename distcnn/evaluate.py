"""`python -m distcnn.evaluate CHECKPOINT`: loss, accuracy, per-class accuracy and the confusion
matrix of a checkpoint on one split of a dataset.

    python -m distcnn.evaluate checkpoints/best.h5                  # text report, test split
    python -m distcnn.evaluate ckpt.h5 --data data.h5 --split val --json
    python -m distcnn.evaluate ckpt.h5 --plot confusion.png         # needs distcnn[plot]
    mpirun -n 4 python -m distcnn.evaluate ckpt.h5                  # each rank a shard

--data defaults to the dataset recorded in the checkpoint's config, then the shipped default.
With --json, stdout holds exactly one JSON object (warnings go to stderr). Bad input: exit 2.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Any

from distcnn.errors import ArgumentParser, UsageError


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m distcnn.evaluate",
        description="Loss, accuracy, per-class accuracy and confusion matrix of a checkpoint.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a distcnn .h5 checkpoint")
    p.add_argument("--data", metavar="PATH", help="HDF5 dataset (default: the checkpoint's)")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout only")
    p.add_argument("--plot", metavar="PNG", help="also draw the confusion matrix into PNG")
    p.add_argument("--batch-size", type=int, default=1000, metavar="B", help="default 1000")
    p.add_argument(
        "--collective-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="under mpirun: abort the job, naming the ranks, after S s in a collective "
        "(default 300)",
    )
    return p


def report(metrics: dict[str, Any]) -> dict[str, Any]:
    """The JSON-ready result: metrics plus per-class accuracy from the confusion matrix."""
    conf = metrics["confusion"]  # (K, K) int64: rows true class, columns predicted
    support = conf.sum(axis=1)
    per_class = [(float(conf[c, c] / support[c]) if support[c] else None) for c in range(len(conf))]
    return {
        "loss": float(metrics["loss"]),
        "accuracy": float(metrics["accuracy"]),
        "samples": int(metrics["samples"]),
        "per_class": per_class,
        "support": support.tolist(),
        "confusion": conf.tolist(),
    }


def format_text(res: dict[str, Any]) -> str:
    """The human-readable report: header, per-class accuracy, confusion matrix."""
    conf, k = res["confusion"], len(res["confusion"])
    lines = [
        f"checkpoint {res['checkpoint']} (step {res['step']})",
        f"data {res['data']} /{res['split']}: {res['samples']} images, {k} classes",
        f"loss {res['loss']:.4f}  accuracy {res['accuracy']:.4f}",
        "",
        "per-class accuracy",
        f"  {'class':>5} {'samples':>8} {'correct':>8} {'accuracy':>9}",
    ]
    for c in range(k):
        acc = res["per_class"][c]
        shown = "-" if acc is None else f"{acc:.4f}"
        lines.append(f"  {c:>5} {res['support'][c]:>8} {conf[c][c]:>8} {shown:>9}")
    width = max(5, max(len(str(v)) for row in conf for v in row) + 1)
    lines += ["", "confusion matrix (rows: true class, columns: predicted class)"]
    lines.append(" " * 7 + "".join(f"{c:>{width}}" for c in range(k)))
    for c in range(k):
        lines.append(f"  {c:>4} " + "".join(f"{v:>{width}}" for v in conf[c]))
    return "\n".join(lines)


def strict_json(obj: Any) -> str:
    """json.dumps with every non-finite float (NaN, inf) written as null, so strict parsers
    (JSON has no NaN) read it; a diverged model's loss is reported as null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float):
            return v if math.isfinite(v) else None
        if isinstance(v, dict):
            return {k: clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(obj), allow_nan=False)


def _check_plot_target(png: str) -> None:
    """--plot's folder must exist and be writable before any evaluation."""
    import os
    from pathlib import Path

    target = Path(png)
    folder = target.parent if str(target.parent) else Path(".")
    if target.is_dir():
        raise UsageError(f"--plot {png} is a directory: give a file name such as {png}/cm.png")
    if not folder.is_dir():
        raise UsageError(f"--plot {png}: the folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"--plot {png}: the folder {folder} is not writable; choose another")


def _setup(args: argparse.Namespace) -> tuple[Any, Any, Any, str, str | None]:
    from distcnn import restore, safefile

    if args.batch_size < 1:
        raise UsageError(f"--batch-size {args.batch_size} must be at least 1; e.g. 1000")
    if not args.collective_timeout > 0:
        raise UsageError(
            f"--collective-timeout {args.collective_timeout} must be a number of seconds > 0"
        )
    if args.plot:
        _check_plot_target(args.plot)
        from distcnn.plot import require_matplotlib

        require_matplotlib()
    model, ck = restore.load_model(args.checkpoint)
    k = model.num_classes
    safefile.require_bytes(
        16 * (k * k + 2), f"the {k:,} x {k:,} confusion matrix", "this is not a real checkpoint"
    )
    path = restore.dataset_path(args.data, ck)
    split = restore.load_matching_split(path, args.split, model)
    safefile.check_model_memory(
        ck.model, model.input_shape, k, min(args.batch_size, max(1, len(split)))
    )
    split, warning = restore.apply_recorded_norm(split, ck, f"{path} /{args.split}")
    return model, ck, split, str(path), warning


def main(argv: list[str] | None = None) -> int:
    """Evaluate a checkpoint; 0 on success, 2 on bad input."""
    try:  # mpi4py's MPI, or a one-process stand-in when no MPI library is installed
        from distcnn.mpienv import MPI
    except UsageError as e:  # several ranks launched, no MPI library: what to install
        if getattr(e, "rank", 0) == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0

    from distcnn import threads

    node = world.Split_type(MPI.COMM_TYPE_SHARED)
    threads.apply(threads.choose(None, node.Get_size())[0])
    node.Free()

    from distcnn.comm import Comm, run_or_abort

    # MPI: the watchdog: a rank that stops (or hangs reading a file) ends the job, named, after
    # --collective-timeout seconds instead of leaving the others waiting forever
    timeout = args.collective_timeout if args.collective_timeout > 0 else 300.0
    comm = Comm(world, timeout=timeout)
    return run_or_abort(lambda: _run(args, comm), comm)


def _fault(comm: Any) -> tuple[int, str] | None:
    """This rank's DISTCNN_FAULT=<rank>:<step>:<mode> (UsageError if malformed). evaluate has
    no steps: raise, exit, kill and hang happen just before its one collective, whatever the
    step; nan does not apply."""
    from distcnn.faults import fault_from_env

    fault = fault_from_env(comm.rank)
    return fault if fault is not None and fault[1] != "nan" else None


def _run(args: argparse.Namespace, comm: Any) -> int:
    from distcnn.trainer import evaluate_split

    err, model, ck, split, path, warning, fault = None, None, None, None, "", None, None
    try:
        model, ck, split, path, warning = _setup(args)
        fault = _fault(comm)
    except UsageError as e:
        err = str(e)
    errors = comm.gather_objects(err, "evaluate setup")  # MPI: every rank takes the same branch
    first = next((e for e in errors if e), None)
    if first:
        if comm.rank == 0:
            print(f"error: {first}", file=sys.stderr, flush=True)
        return 2
    if warning and comm.rank == 0:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    if fault is not None:
        from distcnn.faults import inject_fault

        inject_fault(fault[1], fault[0], comm.rank)
    metrics = evaluate_split(model, split, comm, args.batch_size)  # MPI: sharded, summed
    if comm.rank != 0:
        return 0
    step = ck.step
    res = {
        "checkpoint": str(args.checkpoint),
        "step": step,
        "data": path,
        "split": args.split,
        **report(metrics),
    }
    if args.plot:
        from distcnn.plot import confusion_png

        confusion_png(metrics["confusion"], args.plot, title=f"{path} /{args.split}, step {step}")
    if args.json:
        print(strict_json(res), flush=True)
    else:
        print(format_text(res), flush=True)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr if args.json else sys.stdout, flush=True)
    return 0


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
