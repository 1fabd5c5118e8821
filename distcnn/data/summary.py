"""The text `python -m distcnn.data info` prints: a dataset summary, or a checkpoint's."""

from __future__ import annotations

import re
from pathlib import Path

import h5py

from distcnn.data.dataset import _attr_value


def _format_dataset(summary: dict) -> str:
    k = summary["num_classes"]
    size = Path(summary["path"]).stat().st_size
    lines = [f"{summary['path']}: distcnn dataset, {k} classes, {size / 1e6:.2f} MB"]
    lines.append(f"  {'split':<8}{'N':>8}  {'image (C, H, W)':<16}dtype")
    for name, s in summary["splits"].items():
        lines.append(f"  {name:<8}{s['n']:>8}  {str(s['image_shape']):<16}{s['dtype']}")
    lines.append("layout (images):")
    for name, s in summary["splits"].items():
        lines.append(f"  {name}: {s['layout']}")
    lines.append("per-class counts:")
    for name, s in summary["splits"].items():
        counts = " ".join(f"{c}:{n}" for c, n in enumerate(s["class_counts"]))
        lines.append(f"  {name}: {counts}")
    if summary["attrs"]:
        lines.append("attrs:")
        for key, value in summary["attrs"].items():
            lines.append(f"  {key}: {value}")
    return "\n".join(lines)


def _is_checkpoint(path: Path) -> bool:
    if not path.is_file() or not h5py.is_hdf5(path):
        return False
    try:
        with h5py.File(path, "r") as f:
            return "format_version" in f.attrs and isinstance(f.get("model"), h5py.Group)
    except (OSError, RuntimeError, KeyError):
        # damaged (e.g. truncated): a checkpoint by its name gets the checkpoint report
        return re.fullmatch(r"ckpt-\d{8,}\.h5|best\.h5", path.name) is not None


def _format_checkpoint(path: Path) -> str:
    """Checkpoint summary from distcnn.checkpoint, or root attrs and /model tensors without it."""
    try:
        from distcnn import checkpoint

        summarize = checkpoint.summarize
    except (ImportError, AttributeError):
        summarize = None
    if summarize is not None:
        return summarize(path)
    lines = [f"{path}: distcnn checkpoint (distcnn.checkpoint unavailable; raw view)", "attrs:"]
    with h5py.File(path, "r") as f:
        for key, value in f.attrs.items():
            lines.append(f"  {key}: {_attr_value(value)}")
        lines.append("/model:")
        for name, ds in f["model"].items():
            if isinstance(ds, h5py.Dataset):
                lines.append(f"  {name}: {ds.shape} {ds.dtype}")
    return "\n".join(lines)
