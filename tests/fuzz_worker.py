"""The in-process half of tests/test_fuzz.py: corrupt files at random and call the readers.

Run as `python tests/fuzz_worker.py DIR SEED CASES`. Builds one good file of each kind in DIR
(a dataset, a checkpoint, an .npz source, gzip IDX images and labels, a gzip CSV, a PNG, a TOML
config), then for case i = 0 .. CASES-1 corrupts a copy of one of them (chosen by SEED and i) and
calls every reader of that kind on it, in this process. Prints one JSON line per case before and
after it ({"i", "start"} then {"i", "kind", "how", "outcome", "detail"}), flushed, so the parent
can bound each case's time and name a case that hangs. Outcomes:

    ok          every reader returned, and what they returned equals the good file's content
    refused     a reader raised UsageError with a one-line message naming the file
    different   every reader returned but the content differs from the good file's
    crash       anything else (an exception that is not UsageError, a multi-line message)
"""

from __future__ import annotations

import gzip
import json
import struct
import sys
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from conftest import TINY_SPEC, make_images  # noqa: E402

from distcnn import checkpoint as ckpt  # noqa: E402
from distcnn import data as datamod  # noqa: E402
from distcnn import predict, restore, safefile  # noqa: E402
from distcnn.errors import UsageError  # noqa: E402
from distcnn.model import Model  # noqa: E402


def build(d: Path) -> dict[str, Path]:
    """One good file of each kind."""
    files = {}
    files["dataset"] = d / "data.h5"
    datamod.write_dataset(
        files["dataset"],
        {"train": make_images(40, 3, 8, 1), "test": make_images(20, 3, 8, 2)},
        3,
        {"mean": np.float32(0.25), "std": np.float32(0.5), "source": "fuzz"},
    )
    split = datamod.load_split(files["dataset"], "train")
    model = Model(TINY_SPEC, split.image_shape, 3)
    model.init_params(1)
    files["checkpoint"] = d / "ckpt-00000003.h5"
    ckpt.save(
        files["checkpoint"],
        ckpt.Checkpoint(
            params={k: v.copy() for k, v in model.param_views.items()},
            velocity={k: np.zeros_like(v) for k, v in model.param_views.items()},
            step=3, epoch=0, offset=12, world_size=1, seed=1, best_val=-1.0, num_classes=3,
            input_shape=split.image_shape, model=TINY_SPEC, config={"model": TINY_SPEC},
            inference=restore.inference_info(np.uint8, [0.25], [0.5], split.image_shape, 3),
        ),
    )  # fmt: skip
    images, labels = make_images(30, 3, 8, 3)
    files["npz"] = d / "src.npz"
    np.savez_compressed(files["npz"], images=images[:, 0], labels=labels)
    files["idx"] = d / "images-idx3-ubyte.gz"
    files["idx-labels"] = d / "labels-idx1-ubyte.gz"
    files["idx"].write_bytes(
        gzip.compress(struct.pack(">BBBBIII", 0, 0, 8, 3, 30, 8, 8) + images.tobytes())
    )
    files["idx-labels"].write_bytes(
        gzip.compress(struct.pack(">BBBBI", 0, 0, 8, 1, 30) + labels.astype(np.uint8).tobytes())
    )
    files["csv"] = d / "src.csv.gz"
    rows = [
        ",".join(map(str, [*im.reshape(-1), lab])) for im, lab in zip(images, labels, strict=True)
    ]
    files["csv"].write_bytes(gzip.compress(("\n".join(rows) + "\n").encode()))
    from PIL import Image

    files["png"] = d / "im.png"
    Image.fromarray(images[0, 0]).save(files["png"])
    return files


def content(kind: str, path: Path, files: dict[str, Path]) -> object:
    """Call every reader of `kind` on path; return what they read, comparable with ==."""
    if kind == "dataset":
        out = []
        for name in ("train", "test"):
            s = datamod.load_split(path, name)
            out.append((s.images.tobytes(), s.labels.tobytes(), s.num_classes,
                        None if s.mean is None else s.mean.tobytes(),
                        None if s.std is None else s.std.tobytes()))  # fmt: skip
        summary = datamod.dataset_summary(path)
        out.append(json.dumps(summary["splits"], sort_keys=True))
        out.append(json.dumps(datamod.fingerprint(path), sort_keys=True))
        return out
    if kind == "checkpoint":
        ck = ckpt.load(path)
        model, _ = restore.load_model(path)
        text = ckpt.summarize(path)
        if ckpt.SUMMARY_FAILED in text:
            raise UsageError(text.splitlines()[-1].strip())
        return [model.params.tobytes(), ck.step, ck.offset, json.dumps(ck.inference)]
    if kind == "npz":
        images, labels = datamod.read_npz(path)
        pimages, _ = predict.read_npz_images(path)
        return [images.tobytes(), labels.tobytes(), pimages.tobytes()]
    if kind == "idx":
        return datamod.read_idx(path).tobytes()
    if kind == "csv":
        images, labels = datamod.read_csv(path)
        return [images.tobytes(), labels.tobytes()]
    if kind == "png":
        return predict.read_images([str(path)], 1, (8, 8)).tobytes()
    raise AssertionError(kind)


KINDS = ["dataset", "dataset", "checkpoint", "checkpoint", "npz", "idx", "csv", "png"]
HOWS = ["flip", "flip-many", "truncate", "zero-run", "random-run", "append", "splice"]


def corrupt(raw: bytes, how: str, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    n = len(b)
    if how == "flip":
        at = int(rng.integers(n))
        b[at] ^= 1 << int(rng.integers(8))
    elif how == "flip-many":
        for at in rng.integers(0, n, int(rng.integers(2, 40))):
            b[int(at)] ^= int(rng.integers(1, 256))
    elif how == "truncate":
        del b[int(rng.integers(n)) :]
    elif how in ("zero-run", "random-run"):
        at = int(rng.integers(n))
        length = int(rng.integers(1, 256))
        fill = bytes(length) if how == "zero-run" else rng.bytes(length)
        b[at : at + length] = fill[: max(0, n - at)]
    elif how == "append":
        b += rng.bytes(int(rng.integers(1, 4096)))
    else:  # splice: a block copied over another place in the file
        src, dst = (int(x) for x in rng.integers(0, n, 2))
        length = int(rng.integers(8, 512))
        block = b[src : src + length]
        b[dst : dst + len(block)] = block
        del b[n:]
    return bytes(b)


def main() -> None:
    d, seed, cases = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    safefile.PROBE_SECONDS = 3.0  # a looping probe is given up sooner here (time budget)
    files = build(d)
    good = {k: content(k, files[k], files) for k in set(KINDS)}
    for i in range(cases):
        print(json.dumps({"i": i, "start": True}), flush=True)
        rng = np.random.default_rng([seed, i])
        kind = KINDS[int(rng.integers(len(KINDS)))]
        how = HOWS[int(rng.integers(len(HOWS)))]
        target = d / f"case{i % 4}{files[kind].name}"
        raw = corrupt(files[kind].read_bytes(), how, rng)
        if raw == files[kind].read_bytes():  # e.g. a splice onto identical bytes
            raw = raw + b"\0"
        target.write_bytes(raw)
        outcome, detail = "ok", ""
        try:
            got = content(kind, target, files)
            if got != good[kind]:
                outcome = "different"
        except UsageError as e:
            msg = str(e)
            outcome = "refused" if "\n" not in msg and target.name in msg else "crash"
            detail = msg[:300]
        except Exception:  # noqa: BLE001 - that is what the test is looking for
            outcome = "crash"
            detail = traceback.format_exc()[-1500:]
        print(json.dumps({"i": i, "kind": kind, "how": how, "outcome": outcome,
                          "detail": detail}), flush=True)  # fmt: skip
        target.unlink()
    print(json.dumps({"done": True}), flush=True)


if __name__ == "__main__":
    main()
