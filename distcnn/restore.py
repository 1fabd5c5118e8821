"""A trained model back from a checkpoint, for the commands that use one (evaluate, predict,
export). No MPI and no training state here: parameters and batch norm statistics only."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn.errors import UsageError
from distcnn.model import Model


def load_model(path: str | os.PathLike) -> tuple[Model, ckpt.Checkpoint]:
    """The model a checkpoint describes, with its parameters loaded (UsageError if unusable)."""
    ck = ckpt.load(path)  # CheckpointError (a UsageError) names the file and the problem
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
