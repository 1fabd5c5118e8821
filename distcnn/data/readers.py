"""Readers of source files for `build`: IDX (MNIST), CSV, .npz and CIFAR-10 binary batches.

Each returns images (N, C, H, W) uint8 or float32 and labels (N,) int64, or raises UsageError.

A 4-D .npz array is (N, C, H, W) or (N, H, W, C) (Keras's layout); the layout comes from
`--layout nchw|nhwc`, else from a `layout` array in the file, else from the shape when only one
end has room for a channel axis (at most 4 channels): (N, 32, 32, 3) is NHWC, (N, 3, 32, 32) NCHW;
a shape like (N, 3, 4, 4), readable either way, is refused with the fix.
"""

from __future__ import annotations

import io
import os
import re
import zipfile
import zlib
from pathlib import Path

import numpy as np

from distcnn import safefile
from distcnn.data import cifar
from distcnn.data.checks import _check_finite, _labels_as_int64
from distcnn.errors import UsageError

# IDX type codes (third byte of the magic number) -> big-endian dtype.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
LAYOUTS = ("nchw", "nhwc")
MAX_CHANNELS = 4  # a wider axis is not taken for channels when the layout is inferred
_GZIP_MAGIC = b"\x1f\x8b"
_ZIP_MAGIC = b"PK\x03\x04"


# What a damaged or foreign .npz can raise while it is opened and its arrays are read.
NPZ_ERRORS = (OSError, ValueError, EOFError, NotImplementedError, zipfile.BadZipFile, zlib.error)


def _read_bytes(path: str | os.PathLike, limit: int | None = None) -> bytes:
    """Whole file, gunzipped if it starts with the gzip magic number; refused past `limit`
    bytes (default a tenth of safefile.memory_limit(): parsing text takes several times its
    size), so a decompression bomb stops there."""
    cap = safefile.memory_limit() // 10 if limit is None else int(limit)
    with safefile.open_source(path, "source file") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UsageError(
            f"source file {path} holds (unpacked) more than {safefile.fmt_bytes(cap)} "
            f"({cap:,} bytes, a tenth of the memory limit): it is a decompression bomb or too "
            "big to parse here; split it into smaller files"
        )
    return data


def _gz_head(path: str | os.PathLike) -> bytes:
    """The first 4 (unpacked, if gzip) bytes of a file; nothing more is read."""
    with safefile.open_source(path, "source file") as f:
        return f.read(4)


def _looks_like_idx(head: bytes) -> bool:
    """True if the first 4 bytes are an IDX magic number (0, 0, type code, ndim)."""
    return len(head) == 4 and head[:2] == b"\0\0" and head[2] in _IDX_DTYPES and head[3] > 0


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (MNIST format), gzip-compressed or raw, detected by magic number.

    Magic: two zero bytes, a type code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64) and the number of dimensions; then one big-endian uint32 per
    dimension and the data. Returns the array in native byte order, e.g. (N, 28, 28) uint8 for
    MNIST images, (N,) uint8 for labels.
    """
    with safefile.open_source(path, "IDX file") as f:
        head = f.read(4)
        if not _looks_like_idx(head):
            raise UsageError(
                f"{path} is not an IDX file (magic {head.hex() or 'missing'}): give MNIST-style "
                "IDX files (.gz or raw), or a .csv/.npz source"
            )
        dtype, ndim = _IDX_DTYPES[head[2]], head[3]
        raw_dims = f.read(4 * ndim)
        if len(raw_dims) < 4 * ndim:
            raise UsageError(f"{path} has a bad IDX header ({ndim} dimensions): re-download it")
        dims = tuple(int(d) for d in np.frombuffer(raw_dims, dtype=">u4"))
        expected = safefile.shape_bytes(dims, dtype.itemsize)  # exact: no int64 overflow
        safefile.require_bytes(
            expected, f"IDX file {path}, whose header declares {dims} {dtype.name},",
            "check the file (a damaged header?) or split the data",
        )  # fmt: skip
        data = f.read(expected + 1)  # never more than the header declares (plus one)
    if len(data) != expected:
        raise UsageError(
            f"{path} holds {'more than ' if len(data) > expected else ''}"
            f"{min(len(data), expected)} data bytes but its header {dims} needs {expected}: "
            "the file is truncated or corrupt, re-download it"
        )
    array = np.frombuffer(data, dtype=dtype).reshape(dims)
    return array.astype(dtype.newbyteorder("="))


def _as_image_dtype(images: np.ndarray, name: str) -> np.ndarray:
    """Images of any numeric dtype -> uint8 (integers in 0..255) or float32 (finite)."""
    if images.dtype == np.uint8:
        return images
    if images.dtype.kind in "iu":
        if images.size and (images.min() < 0 or images.max() > 255):
            raise UsageError(
                f"{name} has integer pixels in [{images.min()}, {images.max()}], outside 0..255: "
                "scale them to 0..255 or store them as floats"
            )
        return images.astype(np.uint8)
    if images.dtype.kind == "f":
        _check_finite(images, name)
        with np.errstate(over="ignore"):  # overflow to inf is reported just below
            out = images.astype(np.float32)
        _check_finite(out, f"{name} (as float32)")
        return out
    raise UsageError(f"{name} has dtype {images.dtype}: pixels must be numbers")


def _with_channels(images: np.ndarray, name: str) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); (N, C, H, W) unchanged; anything else is an error."""
    if images.ndim == 3:
        return images[:, None]
    if images.ndim == 4:
        return images
    raise UsageError(f"{name} has shape {images.shape}; images must be (N, H, W) or (N, C, H, W)")


def _csv_shape(pixels: int, shape: tuple[int, int, int] | None, path: Path) -> tuple:
    """(C, H, W) for rows of `pixels` values: the given shape, or 1 x s x s if square."""
    if shape is not None:
        if int(np.prod(shape)) != pixels:
            c, h, w = shape
            raise UsageError(
                f"--shape {c},{h},{w} has {c * h * w} pixels but the rows of {path} have "
                f"{pixels}: give C,H,W with C*H*W = {pixels}"
            )
        return tuple(shape)
    side = int(round(pixels**0.5))
    if side * side != pixels:
        raise UsageError(
            f"rows of {path} have {pixels} pixels, not a square single-channel image: "
            "pass --shape C,H,W"
        )
    return (1, side, side)


def read_csv(
    path: str | os.PathLike, shape: tuple[int, int, int] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Read a .csv or .csv.gz file: one image per row, pixels then the label in the LAST column.

    An optional header row (any non-numeric field in the first line) is skipped. `shape` is
    (C, H, W); by default a single-channel square image. Returns images (N, C, H, W), uint8 if
    every pixel is an integer in 0..255 else float32, and labels (N,) int64.
    """
    path = Path(path)
    try:
        text = _read_bytes(path).decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not a UTF-8 text file: give a CSV file") from None
    lines = [(i + 1, line) for i, line in enumerate(text.splitlines()) if line.strip()]
    if lines:
        try:
            [float(v) for v in lines[0][1].split(",")]
        except ValueError:
            lines = lines[1:]  # header row
    if not lines:
        raise UsageError(f"{path} has no data rows: give at least one image per row")
    columns = lines[0][1].count(",") + 1
    for lineno, line in lines:
        if line.count(",") + 1 != columns:
            raise UsageError(
                f"{path} line {lineno} has {line.count(',') + 1} columns but the first row has "
                f"{columns}: every row needs the same number of pixels plus the label"
            )
    if columns < 2:
        raise UsageError(f"{path} has one column: rows need pixels then the label")
    try:
        table = np.loadtxt(
            io.StringIO("\n".join(line for _, line in lines)),
            delimiter=",",
            dtype=np.float64,
            ndmin=2,
        )  # (N, pixels + 1)
    except ValueError as exc:
        raise UsageError(f"{path} has a non-numeric value ({exc}): fix the file") from None
    labels = _labels_as_int64(table[:, -1], f"the last column of {path}")
    pixels = table[:, :-1]  # (N, pixels)
    c, h, w = _csv_shape(pixels.shape[1], shape, path)
    _check_finite(pixels, f"pixels of {path}")
    if ((pixels >= 0) & (pixels <= 255) & (pixels == np.round(pixels))).all():
        images = pixels.astype(np.uint8)
    else:
        images = _as_image_dtype(pixels, f"pixels of {path}")
    return images.reshape(-1, c, h, w), labels


def to_nchw(
    images: np.ndarray, name: str, layout: str | None = None, notes: list[str] | None = None
) -> np.ndarray:
    """(N, H, W) -> (N, 1, H, W); 4-D images in `layout` ('nchw' or 'nhwc'; None: inferred
    from the shape when only one reading has at most MAX_CHANNELS channels) -> (N, C, H, W).

    How a 4-D array was read is appended to `notes` (one line).
    """
    if images.ndim == 3:
        return images[:, None]
    if images.ndim != 4:
        raise UsageError(
            f"{name} has shape {images.shape}; images must be (N, H, W), (N, C, H, W) or "
            "(N, H, W, C)"
        )
    how = "given"
    if layout is None:
        nchw, nhwc = images.shape[1] <= MAX_CHANNELS, images.shape[3] <= MAX_CHANNELS
        if nchw == nhwc:
            raise UsageError(
                f"{name} has shape {images.shape}, which reads as (N, C, H, W) or as "
                "(N, H, W, C): pass --layout nchw or --layout nhwc"
            )
        layout, how = ("nchw" if nchw else "nhwc"), "from the shape"
    if layout == "nhwc":
        images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    if notes is not None:
        notes.append(f"{name}: read as {layout.upper()} ({how}), images {images.shape[1:]}")
    return images


def _npz_layout(value: np.ndarray, path: Path) -> str:
    """The `layout` array stored in an .npz: 'nchw' or 'nhwc'."""
    text = str(value.item()).lower() if value.shape == () and value.dtype.kind == "U" else ""
    if text not in LAYOUTS:
        raise UsageError(
            f"the array layout in {path} is {value!r}; it must be the text 'nchw' or 'nhwc' "
            "(or drop it and pass --layout)"
        )
    return text


def read_npz(
    path: str | os.PathLike,
    layout: str | None = None,
    keys: tuple[str, str] = ("images", "labels"),
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a NumPy .npz with arrays `images` ((N, H, W), (N, C, H, W) or (N, H, W, C)) and
    `labels` ((N,)); `keys` names other arrays (e.g. Keras's x_train, y_train).

    `layout` ('nchw'/'nhwc') says how 4-D images are stored; without it, a `layout` array in the
    file says it, else the shape must (see to_nchw). Returns images (N, C, H, W) as uint8
    (integer pixels in 0..255) or float32, labels (N,) int64. Never unpickles.
    """
    path = Path(path)
    safefile.npz_headers(path, "source file")  # sizes from the headers, before any allocation
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UsageError(
                    f"{path} has no array {' or '.join(missing)} (it has: "
                    f"{', '.join(npz.files) or 'nothing'}): save it with "
                    "np.savez(path, images=..., labels=...) or name its arrays as "
                    f"{path.name}:IMAGES,LABELS"
                )
            images, labels = npz[keys[0]], npz[keys[1]]
            stored = _npz_layout(npz["layout"], path) if "layout" in npz.files else None
    except NPZ_ERRORS as exc:
        raise UsageError(f"cannot read {path} as .npz ({exc}): give a NumPy .npz file") from None
    if stored is not None and layout is not None and stored != layout:
        raise UsageError(
            f"--layout {layout} contradicts the layout '{stored}' stored in {path}: "
            "drop --layout or fix the file"
        )
    images_name = f"images in {path}" if keys[0] == "images" else f"{keys[0]} in {path}"
    images = to_nchw(images, images_name, layout or stored, notes)
    labels_name = f"labels in {path}" if keys[1] == "labels" else f"{keys[1]} in {path}"
    return _image_label_pair(
        images, labels, images_name, labels_name, "store one integer class index per image"
    )


def _image_label_pair(
    images: np.ndarray, labels: np.ndarray, images_name: str, labels_name: str, fix: str
) -> tuple[np.ndarray, np.ndarray]:
    """Images as (N, C, H, W) uint8/float32 and labels as (N,) int64, or a UsageError."""
    images = _with_channels(images, images_name)
    if labels.ndim != 1:
        raise UsageError(f"{labels_name} have shape {labels.shape}; they must be 1-D (N,): {fix}")
    return _as_image_dtype(images, images_name), _labels_as_int64(labels, labels_name)


def _read_idx_pair(images_path: str, labels_path: str) -> tuple[np.ndarray, np.ndarray]:
    """IDX images (N, H, W) or (N, C, H, W) and labels (N,) -> images (N, C, H, W), labels."""
    return _image_label_pair(
        read_idx(images_path),
        read_idx(labels_path),
        f"IDX images {images_path}",
        f"IDX labels {labels_path}",
        "give IMAGES,LABELS in that order",
    )


def source_files(spec: str) -> list[Path]:
    """The files a --train/--val/--test source names (patterns expanded; nothing is read)."""
    keyed = _NPZ_KEYS.match(spec)
    if keyed and not Path(spec).exists():
        return [Path(keyed["path"])]
    if cifar.is_cifar_source(spec) and not Path(spec).is_dir():
        return cifar.expand(spec)
    if "," in spec and not Path(spec).exists():
        return [Path(p) for p in spec.split(",") if p]
    return [Path(spec)]


def describe_source(spec: str) -> str:
    """The source as recorded in a dataset's created_by: file names only, never a folder."""
    keyed = _NPZ_KEYS.match(spec)
    if keyed and not Path(spec).exists():
        return f"{Path(keyed['path']).name}:{keyed['images']},{keyed['labels']}"
    if Path(spec).exists():
        return Path(spec).name
    return ",".join(Path(p).name for p in spec.split(","))


_NPZ_KEYS = re.compile(r"^(?P<path>.+\.npz):(?P<images>[^,:]+),(?P<labels>[^,:]+)$", re.I)


def read_source(
    spec: str,
    shape: tuple[int, int, int] | None = None,
    layout: str | None = None,
    notes: list[str] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Read a --train/--val/--test source: CSV, .npz (`FILE.npz` or `FILE.npz:IMAGES,LABELS`),
    CIFAR-10 batches (`.bin` files, comma-separated or a glob), or IDX as `IMAGES,LABELS`.

    Returns images (N, C, H, W) uint8 or float32 and labels (N,) int64. `shape` (C, H, W) lays out
    CSV rows; for other sources it must equal the stored image shape. `layout` says how 4-D .npz
    images are stored ('nchw' or 'nhwc'). One line per source read in a non-obvious way is
    appended to `notes`.
    """
    keyed = _NPZ_KEYS.match(spec)
    if keyed and not Path(spec).exists():
        keys = (keyed["images"], keyed["labels"])
        images, labels = read_npz(keyed["path"], layout, keys, notes)
    elif cifar.is_cifar_source(spec) and not Path(spec).is_dir():
        images, labels = cifar.read_cifar(spec)
    elif "," in spec and not Path(spec).exists():
        parts = spec.split(",")
        if len(parts) != 2 or not all(parts):
            raise UsageError(
                f"source {spec!r} is not IMAGES,LABELS: give one file, or two IDX files "
                "separated by one comma"
            )
        images, labels = _read_idx_pair(*parts)
    else:
        path = Path(spec)
        name = path.name.lower()
        safefile.check_file(path, "source file", "check the path")
        if name.endswith((".csv", ".csv.gz")):
            return read_csv(path, shape)
        if name.endswith((".tar.gz", ".tgz", ".tar")):
            raise UsageError(
                f"{path} is an archive: extract it first (tar xf {path.name}) and give the files "
                "inside, e.g. 'cifar-10-batches-bin/data_batch_*.bin'"
            )
        with open(path, "rb") as fh:
            head = fh.read(4)
        if name.endswith(".npz") or head == _ZIP_MAGIC:
            images, labels = read_npz(path, layout, notes=notes)
        elif _looks_like_idx(_gz_head(path)):
            raise UsageError(
                f"{path} is an IDX file; give its labels file too: IMAGES,LABELS, e.g. "
                f"--train {path},LABELS"
            )
        else:
            raise UsageError(
                f"cannot tell the format of {path}: use .csv, .csv.gz, .npz, CIFAR-10 .bin "
                "batches or IDX files given as IMAGES,LABELS"
            )
    if shape is not None and tuple(images.shape[1:]) != tuple(shape):
        raise UsageError(
            f"--shape {','.join(map(str, shape))} does not match the images of {spec} "
            f"{tuple(images.shape[1:])}: --shape only lays out CSV rows; drop it for this source"
        )
    return images, labels
