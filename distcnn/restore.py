"""A trained model back from a checkpoint, for the commands that use one (evaluate, predict,
export). No MPI and no training state here: parameters, batch norm statistics, and what
inference needs.

A checkpoint written by the trainer records under root attribute `inference` how the model's
inputs were made from stored pixels (`inference_info`): the pixel dtype of the training images
(uint8 ones are divided by 255, float32 ones used as stored) and the per-channel mean/std that
then normalised them. Evaluate and predict use that record, so a checkpoint is usable without
its dataset and no input is normalised differently from training without a word.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn import safefile
from distcnn.data.checks import _norm_stats
from distcnn.errors import UsageError
from distcnn.model import Model


def inference_info(
    pixel_dtype: Any, mean: Any, std: Any, input_shape: tuple[int, ...], num_classes: int
) -> dict[str, Any]:
    """The checkpoint's `inference` record: {"pixels": "uint8" | "float32", "mean", "std"
    (lists of C floats, or null), "input_shape" [C, H, W], "num_classes"}."""
    return {
        "pixels": str(np.dtype(pixel_dtype)),
        "mean": None if mean is None else [float(v) for v in np.asarray(mean).reshape(-1)],
        "std": None if std is None else [float(v) for v in np.asarray(std).reshape(-1)],
        "input_shape": [int(d) for d in input_shape],
        "num_classes": int(num_classes),
    }


def load_model(path: str | os.PathLike) -> tuple[Model, ckpt.Checkpoint]:
    """The model a checkpoint describes, with its parameters loaded (UsageError if unusable)."""
    ck = ckpt.load(path)  # CheckpointError (a UsageError) names the file and the problem
    safefile.check_model_memory(ck.model, tuple(ck.input_shape), ck.num_classes)
    model = Model(ck.model, tuple(ck.input_shape), ck.num_classes, np.float32)
    ckpt.check_fits(ck, model.param_shapes, ck.num_classes, str(path), buffers=model.buffers,
                    optimizer_state=())  # fmt: skip
    for name, view in model.param_views.items():
        view[...] = ck.params[name]
    for name, a in model.buffers.items():
        a[...] = ck.buffers[name]
    return model, ck


def dataset_path(data: str | None, ck: ckpt.Checkpoint) -> Path:
    """--data, else the dataset recorded in the checkpoint's config, else the shipped default."""
    if data:
        return Path(data)
    recorded = (ck.config or {}).get("data")
    return Path(recorded) if recorded else datamod.DEFAULT_DATASET


class Normalisation:
    """How inputs that are not a dataset split are turned into model inputs: pixel dtype of
    training (None: unknown) and mean/std (float32 (C,) or None)."""

    def __init__(self, pixels: str | None, mean: Any, std: Any, source: str) -> None:
        self.pixels, self.mean, self.std, self.source = pixels, mean, std, source


def normalisation(ck: ckpt.Checkpoint, data: str | None, channels: int) -> Normalisation:
    """The checkpoint's inference record; for an older checkpoint without one, the root mean/std
    of --data or the dataset its config names — refused (not silently skipped) when that file is
    not there."""
    rec = ck.inference or {}
    if "pixels" in rec:
        mean, std = _norm_stats(rec.get("mean"), rec.get("std"), channels, "checkpoint")
        return Normalisation(str(rec["pixels"]), mean, std, "the checkpoint")
    path = dataset_path(data, ck)
    if not path.is_file():
        raise UsageError(
            f"checkpoint records no input normalisation (written before distcnn stored it) and "
            f"its dataset {path} is not found: give --data the dataset it was trained on, so its "
            "mean/std normalise the inputs as in training"
        )
    fix = "give --data the dataset the checkpoint was trained on"
    with safefile.open_h5(path, "dataset file", fix) as f:
        mean = safefile.read_attr(f, "mean", path, "dataset file", fix)
        std = safefile.read_attr(f, "std", path, "dataset file", fix)
    mean, std = _norm_stats(mean, std, channels, str(path))
    return Normalisation(None, mean, std, str(path))


def apply_recorded_norm(split: datamod.Split, ck: ckpt.Checkpoint, where: str) -> tuple:
    """(split, warning or None): a dataset split normalised as the checkpoint's training was;
    when the file's own mean/std differ from the recorded ones the recorded ones win, said in
    the warning."""
    rec = ck.inference or {}
    if "pixels" not in rec:
        return split, None
    c = split.image_shape[0]
    mean, std = _norm_stats(rec.get("mean"), rec.get("std"), c, "checkpoint")

    def same(a: Any, b: Any) -> bool:
        if a is None or b is None:
            return a is None and b is None
        return bool(np.allclose(a, b, rtol=1e-6, atol=0))

    if same(mean, split.mean) and same(std, split.std):
        return split, None
    fixed = datamod.Split(split.images, split.labels, split.num_classes, mean, std)
    shown = "none" if split.mean is None else f"{split.mean.tolist()}/{split.std.tolist()}"
    used = "none" if mean is None else f"{mean.tolist()}/{std.tolist()}"
    return fixed, (
        f"{where} has mean/std {shown} but the model was trained with {used}; "
        "using the checkpoint's"
    )


def load_matching_split(path: Path, split: str, model: Model) -> datamod.Split:
    """A split whose images and classes fit the model, or UsageError naming the mismatch."""
    s = datamod.load_split(path, split)
    if s.image_shape != model.input_shape:
        raise UsageError(
            f"{path} /{split} has images {s.image_shape} but the checkpoint's model takes "
            f"{model.input_shape}; give the dataset it was trained on with --data"
        )
    if s.num_classes != model.num_classes:
        raise UsageError(
            f"{path} has {s.num_classes} classes but the checkpoint's model has "
            f"{model.num_classes}; give the dataset it was trained on with --data"
        )
    return s
