"""`python -m distcnn.export CHECKPOINT -o model.npz`: the parameters as a plain .npz.

One array per tensor, named and shaped as in the checkpoint and as PyTorch names them
(`conv1.weight` (F, C, KH, KW), `fc1.weight` (out, in), ..., and batch norm's `bn1.weight`,
`bn1.bias`, `bn1.running_mean`, `bn1.running_var`, `bn1.num_batches_tracked`), nothing else:
a state_dict. In eval mode (`net.eval()`) the torch network gives our evaluation logits.
`--torch` also prints Python that builds the equivalent `torch.nn.Sequential` (modules named
conv1, relu1, pool1, ..., fc1, so `load_state_dict` matches the names) and loads the file.
Inputs must be preprocessed as in training: uint8 pixels / 255, then (x - mean) / std with the
dataset's root attributes when it has them.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from distcnn.convpool import ConvPool
from distcnn.errors import ArgumentParser, UsageError
from distcnn.layers import (
    AvgPool2d,
    BatchNorm,
    Conv2d,
    Dropout,
    Flatten,
    GlobalAvgPool,
    Linear,
    MaxPool2d,
    ReLU,
)
from distcnn.model import Model


def export_npz(params: dict[str, np.ndarray], out: str | os.PathLike) -> Path:
    """Write params to out (.npz) atomically: a temporary name, then a rename."""
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp.npz")  # np.savez appends .npz to other names
    try:
        np.savez(tmp, **{k: np.asarray(v, dtype=np.int64 if np.asarray(v).dtype.kind in "iu"
                                       else np.float32) for k, v in params.items()})  # fmt: skip
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def torch_modules(model: Model) -> list[tuple[str, str]]:
    """(name, constructor) pairs of the torch.nn.Sequential equivalent to model."""
    mods: list[tuple[str, str]] = []
    counts = {"relu": 0, "pool": 0, "flatten": 0, "drop": 0}

    def name(kind: str) -> str:
        counts[kind] += 1
        return f"{kind}{counts[kind]}"

    flat = False
    for layer in model.layers:
        if isinstance(layer, ConvPool):  # conv, relu and pool in the order the spec gives them
            mods.append((str(layer.name), f"nn.Conv2d({layer.in_shape[0]}, {layer.filters}, "
                         "(3, 3), stride=(1, 1), padding=(1, 1))"))  # fmt: skip
            for item in layer.spec_text.split(",")[1:]:
                if item.strip().lower() == "relu":
                    mods.append((name("relu"), "nn.ReLU()"))
                else:
                    mods.append((name("pool"), "nn.MaxPool2d((2, 2), stride=(2, 2))"))
        elif isinstance(layer, Conv2d):
            c = layer.in_shape[0]
            mods.append(
                (
                    str(layer.name),
                    f"nn.Conv2d({c}, {layer.filters}, {layer.kernel}, stride={layer.stride}, "
                    f"padding={layer.pad})",
                )
            )
        elif isinstance(layer, ReLU):
            mods.append((name("relu"), "nn.ReLU()"))
        elif isinstance(layer, (MaxPool2d, AvgPool2d)):
            cls = "MaxPool2d" if isinstance(layer, MaxPool2d) else "AvgPool2d"
            mods.append((name("pool"), f"nn.{cls}({layer.kernel}, stride={layer.stride})"))
        elif isinstance(layer, BatchNorm):
            dim = "2d" if len(layer.in_shape) == 3 else "1d"
            mods.append((str(layer.name), f"nn.BatchNorm{dim}({layer.channels})"))
        elif isinstance(layer, Dropout):
            mods.append((name("drop"), f"nn.Dropout({layer.prob})"))
        elif isinstance(layer, GlobalAvgPool):
            mods.append((name("pool"), "nn.AdaptiveAvgPool2d(1)"))
            mods.append((name("flatten"), "nn.Flatten()"))
            flat = True
        elif isinstance(layer, Flatten):
            mods.append((name("flatten"), "nn.Flatten()"))
            flat = True
        elif isinstance(layer, Linear):
            if not flat and len(layer.in_shape) > 1:  # distcnn's dense flattens its input
                mods.append((name("flatten"), "nn.Flatten()"))
                flat = True
            mods.append((str(layer.name), f"nn.Linear({layer.in_features}, {layer.out_features})"))
        else:  # pragma: no cover - a layer kind added without an export rule
            raise UsageError(f"export does not know layer {layer.describe()!r}")
    return mods


def torch_code(model: Model, npz: str) -> str:
    """Python that builds the equivalent torch.nn.Sequential as `net` and loads npz into it."""
    lines = [
        "import collections, numpy as np, torch",
        "from torch import nn",
        "net = nn.Sequential(collections.OrderedDict([",
    ]
    lines += [f'    ("{n}", {c}),' for n, c in torch_modules(model)]
    lines += [
        "]))",
        f"net.load_state_dict({{k: torch.from_numpy(v) for k, v in np.load({npz!r}).items()}})",
        "net.eval()  # batch norm from its running statistics, no dropout",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Export a checkpoint's parameters; 0 on success, 2 on bad input."""
    from distcnn import restore

    p = ArgumentParser(prog="python -m distcnn.export", description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a distcnn .h5 checkpoint")
    p.add_argument("-o", "--output", metavar="OUT.npz", help="default: CHECKPOINT with .npz")
    p.add_argument("--torch", action="store_true", help="print the torch.nn.Sequential code")
    try:
        args = p.parse_args(argv)
        model, ck = restore.load_model(args.checkpoint)
        out = Path(args.output or Path(args.checkpoint).with_suffix(".npz"))
        if out.suffix != ".npz":
            raise UsageError(f"-o {out}: the output name must end in .npz; e.g. -o model.npz")
        try:
            export_npz({**ck.params, **ck.buffers}, out)
        except OSError as e:
            raise UsageError(f"-o {out}: cannot write it ({e}); give a writable path") from None
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else 0
    print(
        f"wrote {out}: {len(ck.params) + len(ck.buffers)} tensors, {model.num_params:,} parameters "
        f"(step {ck.step}, model {ck.model}, input {tuple(ck.input_shape)})"
    )
    if args.torch:
        print(torch_code(model, str(out)))
    return 0


if __name__ == "__main__":
    from distcnn.errors import run_cli

    sys.exit(run_cli(main))
