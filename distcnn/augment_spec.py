"""The `--augment SPEC` grammar, standard library only (config checks it before NumPy loads).

SPEC is comma-separated operations: `shift:P` (P whole pixels, 1..MAX_SHIFT) and `flip`; '',
'none' or 'off' is no augmentation. distcnn.augment applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

from distcnn.errors import UsageError

MAX_SHIFT = 64  # pixels; a larger shift leaves nothing of most images
_OPS_HELP = "use shift:P (P pixels, e.g. shift:2) and/or flip, comma-separated"


@dataclass(frozen=True)
class Op:
    """One operation of a spec: kind ('shift' or 'flip') and its pixel amount (shift only)."""

    kind: str
    amount: int = 0

    def text(self) -> str:
        return f"shift:{self.amount}" if self.kind == "shift" else self.kind


def _parse(spec: str | None) -> tuple[tuple[Op, ...], str | None]:
    """(operations, None), or ((), the problem phrase)."""
    if spec is None or spec.strip().lower() in ("", "none", "off"):
        return (), None
    ops = []
    for token in spec.split(","):
        token = token.strip()
        kind, _, arg = token.partition(":")
        kind = kind.lower()
        if kind == "flip" and not arg:
            ops.append(Op("flip"))
        elif kind == "shift":
            try:
                amount = int(arg)
            except ValueError:
                amount = -1
            if not 1 <= amount <= MAX_SHIFT:
                return (), (
                    f"has {token!r}, which needs a whole number of pixels from 1 to {MAX_SHIFT}, "
                    "e.g. shift:2"
                )
            ops.append(Op("shift", amount))
        else:
            return (), f"has an unknown operation {token!r}; {_OPS_HELP}"
    return tuple(ops), None


def problem(spec: str) -> str | None:
    """Why `spec` is not a valid --augment SPEC (a phrase for the config's error), or None."""
    return _parse(spec)[1]


def parse(spec: str | None) -> tuple[Op, ...]:
    """`--augment SPEC` -> its operations (empty for None, '', 'none', 'off'); UsageError if bad."""
    ops, why = _parse(spec)
    if why:
        raise UsageError(f"--augment {spec!r} {why}")
    return ops
