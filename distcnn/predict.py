"""`python -m distcnn.predict CHECKPOINT INPUT...`: the top-k classes of each image, with their
probabilities (softmax of the logits).

INPUT is one of
    data.h5:test   (or data.h5 with --split, default test)   a split of a dataset file
    images.npz     array `images` (N, H, W) or (N, C, H, W), uint8 or float32; `labels` optional
    a.png b.pgm    image files, read by Pillow (optional extra: pip install 'distcnn[images]')
Images must already have the model's input shape: nothing is resized. 8-bit pixels are divided
by 255 and 16-bit ones by 65535; images with transparent pixels are refused. Every input gets the
normalisation the model was trained with, which the checkpoint records (root attribute
`inference`); a checkpoint from before that record takes it from --data or the dataset its config
names, and is refused when that file is not found (never silently unnormalised).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distcnn import data as datamod
from distcnn import restore, safefile
from distcnn.data.readers import NPZ_ERRORS
from distcnn.errors import ArgumentParser, UsageError
from distcnn.evaluate import strict_json
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


def _check_shape(shape: tuple[int, ...], model: Model, what: str) -> None:
    if tuple(shape) != model.input_shape:
        c, h, w = model.input_shape
        raise UsageError(
            f"{what} has images of shape (C, H, W) {tuple(shape)} but the model takes "
            f"{model.input_shape}: give {w}x{h}-pixel images with {c} channel(s) (predict does "
            "not resize; e.g. PIL Image.resize)"
        )


_ALPHA_MODES = ("RGBA", "LA", "La", "RGBa", "PA")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")


def _pixels(im: Any, f: str, channels: int) -> tuple[np.ndarray, int]:
    """(C, H, W) pixels of an opened image and their bit depth (8 or 16), converted without
    loss of meaning: 16-bit grey stays 16-bit (not clipped to 8 bits), alpha must be opaque."""
    mode = im.mode
    transparent = mode in _ALPHA_MODES or "transparency" in im.info
    if transparent:
        rgba = np.asarray(im.convert("RGBA"))
        clear = int(np.count_nonzero(rgba[..., 3] != 255))
        if clear:
            raise UsageError(
                f"image {f} has {clear} of {rgba[..., 3].size} pixels not fully opaque (an alpha "
                "channel); predict does not guess the background: flatten it onto your training "
                "images' background (e.g. PIL Image.alpha_composite) and save it without alpha"
            )
        im = im.convert("RGB")  # opaque everywhere: the colour channels are the image
        mode = "RGB"
    if mode in _SIXTEEN_BIT or (mode == "I" and im.format == "PNG"):
        a = np.asarray(im).astype(np.uint16)  # (H, W), 0..65535
        return np.repeat(a[None], channels, axis=0), 16
    if mode in ("I", "F"):
        raise UsageError(
            f"image {f} has 32-bit pixels (mode {mode}) whose range predict cannot know: save it "
            "as an 8- or 16-bit PNG"
        )
    a = np.asarray(im.convert("L" if channels == 1 else "RGB"), dtype=np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), 8


def read_images(files: list[str], channels: int, size: tuple[int, int] | None = None) -> np.ndarray:
    """Image files -> (N, C, H, W): uint8 when every file has 8-bit pixels, else float32 in
    [0, 1] (16-bit pixels / 65535, 8-bit / 255). Grey for 1 channel, RGB for 3. With `size`
    (H, W), a file of another size is refused from its header, before it is decoded."""
    try:
        from PIL import Image
    except ImportError:
        raise UsageError(
            "reading image files needs Pillow, which is not installed: "
            "pip install 'distcnn[images]' (or give a .npz or data.h5:split)"
        ) from None
    if channels not in (1, 3):
        raise UsageError(f"the model takes {channels} channels; image files give 1 or 3")
    out: list[tuple[np.ndarray, int]] = []
    shape0 = None
    bomb = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # the size check below comes first: nothing big is decoded
    try:
        for f in files:
            safefile.check_file(f, "image", "give a PNG, PGM or JPEG file")
            try:
                with Image.open(f) as im:
                    w, h = im.size
                    if size is not None and (h, w) != tuple(size):
                        raise UsageError(
                            f"image {f} is {w}x{h} pixels but the model takes {size[1]}x{size[0]}:"
                            " resize it first (predict does not resize; e.g. PIL Image.resize)"
                        )
                    out.append(_pixels(im, f, channels))
            except UsageError:
                raise
            except Exception as e:  # Pillow reports bad files as OSError, ValueError, ...
                raise UsageError(
                    f"cannot read image {f} ({e}); give a PNG, PGM or JPEG file"
                ) from None
            a = out[-1][0]
            if shape0 is not None and a.shape != shape0:
                raise UsageError(f"image {f} is {a.shape[2]}x{a.shape[1]}, unlike {files[0]}")
            shape0 = a.shape
    finally:
        Image.MAX_IMAGE_PIXELS = bomb
    if all(depth == 8 for _, depth in out):
        return np.stack([a for a, _ in out])
    return np.stack([a.astype(np.float32) / (255.0 if d == 8 else 65535.0) for a, d in out])


def read_npz_images(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """`images` (and `labels`, if there) of an .npz, sized from the headers before reading."""
    safefile.npz_headers(path, "input")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "images" not in z.files:
                raise UsageError(
                    f"{path} has no array 'images' (it has: {', '.join(z.files) or 'nothing'}); "
                    "save it with np.savez(path, images=...)"
                )
            images = z["images"]
            labels = z["labels"] if "labels" in z.files else None
    except NPZ_ERRORS as e:
        raise UsageError(f"cannot read {path} as .npz ({e}); give a NumPy .npz file") from None
    images = datamod._with_channels(images, f"images in {path}")
    images = datamod._as_image_dtype(images, f"images in {path}")
    if labels is not None:
        labels = datamod._labels_as_int64(labels, f"labels in {path}")
        if labels.shape != images.shape[:1]:
            raise UsageError(f"{path}: {len(labels)} labels for {len(images)} images")
    return images, labels


def _refuse_unknown_scale(norm: restore.Normalisation, eight_bit: bool, what: str) -> None:
    """A model trained on float32 pixels (used as stored) cannot take 8/16-bit pixels: their
    scale relative to its training data is unknown."""
    if norm.pixels == "float32" and eight_bit:
        raise UsageError(
            f"the model was trained on float32 pixels used as stored, so {what} with 8/16-bit "
            "pixels have no known scale for it: give a .npz of float32 images scaled like its "
            "training data"
        )


def load_inputs(args: argparse.Namespace, model: Model, ck: Any) -> tuple[Inputs, str | None]:
    """Resolve INPUT... into images (as stored), names and, when known, labels; and a warning
    (or None) when a dataset split's own mean/std differ from the training's."""
    first = args.inputs[0]
    head, _, tail = first.rpartition(":")
    if len(args.inputs) == 1 and head and Path(head).is_file() and not Path(first).exists():
        path, split_name = Path(head), tail  # data.h5:test
    else:
        path, split_name = Path(first), args.split or "test"
    if len(args.inputs) == 1 and path.suffix in (".h5", ".hdf5"):
        split = restore.load_matching_split(path, split_name, model)
        split, warning = restore.apply_recorded_norm(split, ck, f"{path} /{split_name}")
        names = [str(i) for i in range(len(split))]
        return Inputs(split, names, True, f"{path} /{split_name}"), warning
    if len(args.inputs) == 1 and path.suffix == ".npz":
        safefile.check_file(path, "input", "give an .npz with an array 'images'")
    else:
        for f in args.inputs:
            safefile.check_file(f, "input", "give data.h5:SPLIT, an .npz or image files")
    norm = restore.normalisation(ck, args.data, model.input_shape[0])
    k = model.num_classes
    if len(args.inputs) == 1 and path.suffix == ".npz":
        images, labels = read_npz_images(path)
        _check_shape(images.shape[1:], model, str(path))
        _refuse_unknown_scale(norm, images.dtype == np.uint8, str(path))
        has = labels is not None and bool(np.all((labels >= 0) & (labels < k)))
        lab = labels if has else np.zeros(len(images), dtype=np.int64)
        split = datamod.Split(images, lab, k, norm.mean, norm.std)
        return Inputs(split, [str(i) for i in range(len(images))], has, str(path)), None
    _refuse_unknown_scale(norm, True, "image files")
    images = read_images(args.inputs, model.input_shape[0], model.input_shape[1:])
    _check_shape(images.shape[1:], model, args.inputs[0])
    split = datamod.Split(images, np.zeros(len(images), dtype=np.int64), k, norm.mean, norm.std)
    return Inputs(split, list(args.inputs), False, " ".join(args.inputs)), None


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
    from distcnn.launcher import launched_rank

    if launched_rank() > 0:  # one process does it all; under mpirun the others would repeat it
        return 0
    try:
        args = build_parser().parse_args(argv)
        model, ck = restore.load_model(args.checkpoint)
        if args.top_k < 1:
            raise UsageError(f"--top-k {args.top_k} must be at least 1; e.g. --top-k 3")
        if args.limit is not None and args.limit < 1:
            raise UsageError(f"--limit {args.limit} must be at least 1")
        inp, warning = load_inputs(args, model, ck)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
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
        print(strict_json(res))
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
