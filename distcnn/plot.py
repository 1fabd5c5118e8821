"""`python -m distcnn.plot run.jsonl -o curves.png`: training curves from a `--log` file.

Three panels against the optimizer step: loss (train, validation, test), accuracy (same), and
throughput (global images/s). matplotlib is an optional extra: `pip install 'distcnn[plot]'`.
Also the confusion-matrix picture of `python -m distcnn.evaluate --plot`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from distcnn.errors import ArgumentParser, UsageError

INSTALL_HINT = "pip install 'distcnn[plot]'"


def require_matplotlib() -> Any:
    """matplotlib.pyplot on the non-interactive Agg backend, or UsageError saying how to get it."""
    try:
        import matplotlib
    except ImportError:
        raise UsageError(
            f"plotting needs matplotlib, which is not installed: {INSTALL_HINT}"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON Lines metrics log; skips lines that are not JSON objects."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: no such file; give the --log file of a training run")
    records = []
    for line in p.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and "step" in rec and "kind" in rec:
            records.append(rec)
    return records


def last_run(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last run when a log holds several fresh runs (the step went back)."""
    start = 0
    for i in range(1, len(records)):
        if records[i]["kind"] == "step" and records[i]["step"] < _last_step(records[:i]):
            start = i
    return records[start:]


def _last_step(records: list[dict[str, Any]]) -> int:
    steps = [r["step"] for r in records if r["kind"] == "step"]
    return steps[-1] if steps else -1


def _series(records: list[dict[str, Any]], kind: str, key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in records if r["kind"] == kind and r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def curves_png(records: list[dict[str, Any]], out: str | Path, size: tuple[int, int]) -> None:
    """Draw loss, accuracy and throughput against step into a PNG of size (width, height) px."""
    plt = require_matplotlib()
    dpi = 100
    fig, axes = plt.subplots(3, 1, figsize=(size[0] / dpi, size[1] / dpi), dpi=dpi, sharex=True)
    ax_loss, ax_acc, ax_ips = axes
    for ax, key, label in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "accuracy")):
        x, y = _series(records, "step", key)
        ax.plot(x, y, color="tab:blue", lw=1.2, label=f"train {label} (mean since last record)")
        x, y = _series(records, "epoch", f"val_{key}")
        if x:
            ax.plot(x, y, "o-", color="tab:orange", lw=1.5, ms=4, label=f"validation {label}")
        x, y = _series(records, "test", key)
        if x:
            ax.plot(x, y, "*", color="tab:green", ms=12, label=f"test {label}")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=9)
    if any(r["kind"] == "step" for r in records):
        losses = [v for v in _series(records, "step", "loss")[1] if v > 0]
        if losses and max(losses) / min(losses) > 20:
            ax_loss.set_yscale("log")
    x, y = _series(records, "step", "images_per_sec")
    ax_ips.plot(x, y, color="tab:purple", lw=1.2, label="train throughput (all ranks)")
    ax_ips.set_ylabel("images / s")
    ax_ips.set_ylim(bottom=0)
    ax_ips.set_xlabel("optimizer step")
    ax_ips.grid(alpha=0.3)
    ax_ips.legend(loc="best", fontsize=9)
    ax_loss.set_title("training curves")
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    plt.close(fig)


def confusion_png(confusion: Any, out: str | Path, title: str = "") -> None:
    """The confusion matrix (K, K) as a heat map with counts, rows true and columns predicted."""
    import numpy as np

    plt = require_matplotlib()
    conf = np.asarray(confusion)
    k = conf.shape[0]
    side = min(12.0, 3.0 + 0.6 * k)
    fig, ax = plt.subplots(figsize=(side, side), dpi=100)
    rows = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
    im = ax.imshow(rows, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                color = "white" if rows[i, j] > 0.5 else "black"
                ax.text(j, i, str(conf[i, j]), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or "confusion matrix", fontsize=10)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def _size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UsageError(
            f"--size {text!r} is not WIDTHxHEIGHT in pixels; e.g. --size 1200x900"
        ) from None
    if not (100 <= w <= 10000 and 100 <= h <= 10000):
        raise UsageError(f"--size {text} is out of range; use 100..10000 pixels per side")
    return w, h


def main(argv: list[str] | None = None) -> int:
    """Plot a metrics log; 0 on success, 2 on bad input or missing matplotlib."""
    p = ArgumentParser(
        prog="python -m distcnn.plot", description="Training curves from a --log file."
    )
    p.add_argument("log", metavar="RUN.jsonl", help="the JSON Lines file written by --log")
    p.add_argument("-o", "--output", default="curves.png", metavar="PNG", help="output PNG")
    p.add_argument("--size", default="1200x900", help="WIDTHxHEIGHT in pixels (1200x900)")
    try:
        args = p.parse_args(argv)
        size = _size(args.size)
        records = read_log(args.log)
        if not any(r["kind"] == "step" for r in records):
            raise UsageError(f"{args.log} holds no step records; train with --log {args.log}")
        run = last_run(records)
        if len(run) < len(records):
            print(f"note: {args.log} holds several runs; plotting the last one", file=sys.stderr)
        curves_png(run, args.output, size)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    print(f"wrote {args.output} ({size[0]}x{size[1]})")
    return 0


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
