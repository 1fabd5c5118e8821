"""`python -m distcnn.predict CHECKPOINT INPUT...`: the top-k classes of each image, with their
probabilities (softmax of the logits).

INPUT is one of
    data.h5:test   (or data.h5 with --split, default test)   a split of a dataset file
    images.npz     array `images` (N, H, W) or (N, C, H, W), uint8 or float32; `labels` optional
    a.png b.pgm    image files, read by Pillow (optional extra: pip install 'distcnn[images]')
Images must already have the model's input shape: nothing is resized. Inputs that are not
dataset splits get the normalisation of the dataset recorded in the checkpoint (or --data).
"""

from __future__ import annotations

import argparse
import json
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distcnn import data as datamod
from distcnn import restore
from distcnn.errors import ArgumentParser, UsageError
from distcnn.model import Model


@dataclass
class Inputs:
    split: datamod.Split  # images as stored, normalised by split.batch
    names: list[str]  # one per image: index, or file name
    has_labels: bool
    source: str


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m distcnn.predict",
        description="Top-k classes with probabilities for images, a .npz or a dataset split.",
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a distcnn .h5 checkpoint")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="data.h5[:split], .npz or images")
    p.add_argument("--split", help="split of a dataset INPUT (default test)")
    p.add_argument("--data", metavar="PATH", help="dataset whose mean/std normalise the inputs")
    p.add_argument("--top-k", type=int, default=3, metavar="K", help="classes shown (default 3)")
    p.add_argument("--limit", type=int, metavar="N", help="only the first N images")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    return p


def _norm_of(path: Path) -> tuple[Any, Any]:
    """The mean/std root attributes of a dataset file, or (None, None) without them / it."""
    import h5py

    if not path.is_file():
        return None, None
    with h5py.File(path, "r") as f:
        return f.attrs.get("mean"), f.attrs.get("std")


def _check_shape(shape: tuple[int, ...], model: Model, what: str) -> None:
    if tuple(shape) != model.input_shape:
        c, h, w = model.input_shape
        raise UsageError(
            f"{what} has images of shape (C, H, W) {tuple(shape)} but the model takes "
            f"{model.input_shape}: give {w}x{h}-pixel images with {c} channel(s) (predict does "
            "not resize; e.g. PIL Image.resize)"
        )


def read_images(files: list[str], channels: int) -> np.ndarray:
    """Image files -> uint8 (N, C, H, W); grey for 1 channel, RGB for 3."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(
            "reading image files needs Pillow, which is not installed: "
            "pip install 'distcnn[images]' (or give a .npz or data.h5:split)"
        ) from None
    if channels not in (1, 3):
        raise UsageError(f"the model takes {channels} channels; image files give 1 or 3")
    out, shape0 = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot read image {f} ({e}); give a PNG, PGM or JPEG file") from None
        a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)  # (C, H, W)
        if shape0 is not None and a.shape != shape0:
            raise UsageError(f"image {f} is {a.shape[2]}x{a.shape[1]}, unlike {files[0]}")
        shape0 = a.shape
        out.append(a)
    return np.stack(out)


def read_npz_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise UsageError(
                    f"{path} has no array 'images' (it has: {', '.join(z.files) or 'nothing'}); "
                    "save it with np.savez(path, images=...)"
                )
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise UsageError(f"cannot read {path} as .npz ({e}); give a NumPy .npz file") from None
    images = datamod._with_channels(images, f"images in {path}")
    images = datamod._as_image_dtype(images, f"images in {path}")
    if labels is not None:
        labels = datamod._labels_as_int64(labels, f"labels in {path}")
        if labels.shape != images.shape[:1]:
            raise UsageError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def load_inputs(args: argparse.Namespace, model: Model, norm_from: Path) -> Inputs:
    """Resolve INPUT... into images (as stored), names and, when known, labels."""
    first = args.inputs[0]
    head, _, tail = first.rpartition(":")
    if len(args.inputs) == 1 and head and Path(head).is_file() and not Path(first).exists():
        path, split_name = Path(head), tail  # data.h5:test
    else:
        path, split_name = Path(first), args.split or "test"
    if len(args.inputs) == 1 and path.suffix in (".h5", ".hdf5"):
        split = restore.load_matching_split(path, split_name, model)
        names = [str(i) for i in range(len(split))]
        return Inputs(split, names, True, f"{path} /{split_name}")
    mean, std = _norm_of(norm_from)
    k = model.num_classes
    if len(args.inputs) == 1 and path.suffix == ".npz":
        if not path.is_file():
            raise UsageError(f"{path}: no such file; give an .npz with an array 'images'")
        images, labels = read_npz_images(path)
        _check_shape(images.shape[1:], model, str(path))
        has = labels is not None and bool(np.all((labels >= 0) & (labels < k)))
        lab = labels if has else np.zeros(len(images), dtype=np.int64)
        split = datamod.Split(images, lab, k, mean, std)
        return Inputs(split, [str(i) for i in range(len(images))], has, str(path))
    missing = [f for f in args.inputs if not Path(f).is_file()]
    if missing:
        raise UsageError(f"{missing[0]}: no such file; give data.h5:SPLIT, an .npz or images")
    images = read_images(args.inputs, model.input_shape[0])
    _check_shape(images.shape[1:], model, args.inputs[0])
    split = datamod.Split(images, np.zeros(len(images), dtype=np.int64), k, mean, std)
    return Inputs(split, list(args.inputs), False, " ".join(args.inputs))


def probabilities(model: Model, split: datamod.Split, count: int, batch: int = 1000) -> np.ndarray:
    """Softmax of the logits for the first `count` images, float64 (count, num_classes)."""
    out = np.empty((count, model.num_classes))
    for start in range(0, count, batch):
        idx = np.arange(start, min(count, start + batch))
        z = model.forward(split.batch(idx)).astype(np.float64)  # (B, K)
        z -= z.max(axis=1, keepdims=True)
        e = np.exp(z)
        out[idx] = e / e.sum(axis=1, keepdims=True)
    return out


def main(argv: list[str] | None = None) -> int:
    """Print the top-k predictions; 0 on success, 2 on bad input."""
    try:
        args = build_parser().parse_args(argv)
        model, ck = restore.load_model(args.checkpoint)
        if args.top_k < 1:
            raise UsageError(f"--top-k {args.top_k} must be at least 1; e.g. --top-k 3")
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit {args.limit} must be at least 1")
        inp = load_inputs(args, model, restore.dataset_path(args.data, ck))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    n = len(inp.split) if args.limit is None else min(args.limit, len(inp.split))
    k = min(args.top_k, model.num_classes)
    probs = probabilities(model, inp.split, n)  # (n, K)
    top = np.argsort(-probs, axis=1, kind="stable")[:, :k]  # (n, k), ties: lower class first
    labels = inp.split.labels[:n] if inp.has_labels else None
    if args.json:
        preds = []
        for i in range(n):
            item: dict[str, Any] = {"input": inp.names[i]}
            if labels is not None:
                item["label"] = int(labels[i])
            item["top"] = [[int(c), float(probs[i, c])] for c in top[i]]
            preds.append(item)
        res: dict[str, Any] = {"checkpoint": args.checkpoint, "source": inp.source, "samples": n}
        if labels is not None:
            res["accuracy"] = float(np.mean(top[:, 0] == labels))
        res["predictions"] = preds
        print(json.dumps(res))
        return 0
    print(f"checkpoint {args.checkpoint} (step {ck.step}) on {inp.source}: {n} image(s)")
    width = max(5, max(len(s) for s in inp.names[:n]))
    head = f"{'input':>{width}} " + ("label " if labels is not None else "")
    print(head + f"top-{k} class: probability")
    for i in range(n):
        row = f"{inp.names[i]:>{width}} " + (f"{labels[i]:>5} " if labels is not None else "")
        print(row + "  ".join(f"{c}: {probs[i, c]:.4f}" for c in top[i]))
    if labels is not None:
        print(f"top-1 accuracy {np.mean(top[:, 0] == labels):.4f}")
    return 0


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
