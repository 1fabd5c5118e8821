"""--allreduce-dtype: the step's gradient allreduce in 16-bit floats (bfloat16 or float16).

The reduce buffer is [gradient (P) | the trainer's float32 slots and batch-norm sums (T)]. The
gradient goes over the wire as 16-bit values and everything after it as float32, packed into
one message of 2P + 4T bytes (half of float32's 4P + 4T), summed by a user-defined MPI
operation over that whole message as one element (so MPI never cuts it where the two parts
meet). Each partial sum is rounded back to 16 bits, as NCCL does with half-precision allreduce.

Scaling: bfloat16 has float32's exponent range, so it is sent unscaled (8 bits of mantissa).
float16 tops out at 65504 and its normals start at 6.1e-5, so the gradient is multiplied by a
power of two `scale` before the cast: 2^14 / (size * the previous step's largest summed
|gradient|), which every rank knows after that step's allreduce (no extra collective), and
the sum is divided by it again. A step whose sum still overflows is a non-finite step: skipped
like any other by the trainer's guard, and the scale is halved for the next step. The scale is
saved in checkpoints, so a resumed run continues exactly.
"""

from __future__ import annotations

import math

import numpy as np

from distcnn.mpienv import MPI

DTYPES = ("float32", "bfloat16", "float16")
HEADROOM = 2.0**14  # largest summed |gradient| * scale aims here (float16 max is 65504)


def to_bfloat16(x: np.ndarray, out: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    u = x.view(np.uint32)
    r = ((u >> np.uint32(16)) & np.uint32(1)) + np.uint32(0x7FFF)
    out[...] = ((u + r) >> np.uint32(16)).astype(np.uint16)
    return out


def from_bfloat16(b: np.ndarray, out: np.ndarray) -> np.ndarray:
    """bfloat16 bits (uint16) -> float32."""
    out.view(np.uint32)[...] = b.astype(np.uint32) << np.uint32(16)
    return out


class CompressedAllreduce:
    """Sums a float32 reduce buffer over ranks with its first `n_grad` values in 16 bits."""

    def __init__(self, comm: object, size: int, n_grad: int, dtype: str) -> None:
        if dtype not in ("bfloat16", "float16"):
            raise ValueError(dtype)
        self.comm, self.n_grad, self.dtype = comm, n_grad, dtype
        self.n_tail = size - n_grad
        nbytes = 2 * n_grad + 4 * self.n_tail
        self.packed = np.zeros(nbytes, np.uint8)  # [16-bit gradient | float32 tail]
        self.grad16 = self.packed[: 2 * n_grad].view(np.uint16)
        self.tail = self.packed[2 * n_grad :].view(np.float32)
        self._a = np.empty(n_grad, np.float32)
        self._b = np.empty(n_grad, np.float32)
        self.scale = 1.0 if dtype == "bfloat16" else 2.0**10  # float16: adapted every step
        self.mpi_type = MPI.BYTE.Create_contiguous(nbytes).Commit()
        self.op = MPI.Op.Create(self._sum, commute=True)

    def _sum(self, inbuf: object, outbuf: object, datatype: object) -> None:
        """MPI user op: outbuf += inbuf, both packed messages."""
        n = self.n_grad
        a = np.frombuffer(inbuf, np.uint8)
        b = np.frombuffer(outbuf, np.uint8)
        ga, gb = a[: 2 * n].view(np.uint16), b[: 2 * n].view(np.uint16)
        if self.dtype == "float16":
            s = ga.view(np.float16).astype(np.float32) + gb.view(np.float16).astype(np.float32)
            gb.view(np.float16)[...] = s
        else:
            s = from_bfloat16(ga, self._a) + from_bfloat16(gb, self._b)
            to_bfloat16(s, gb)
        b[2 * n :].view(np.float32)[...] += a[2 * n :].view(np.float32)

    def allreduce(self, red: np.ndarray, what: str) -> np.ndarray:
        """Sum red (float32, [gradient | tail]) over ranks into red, through 16-bit values."""
        n, comm = self.n_grad, self.comm
        g = self._a
        np.multiply(red[:n], np.float32(self.scale), out=g)
        if self.dtype == "float16":
            self.grad16.view(np.float16)[...] = g
        else:
            to_bfloat16(g, self.grad16)
        self.tail[...] = red[n:]
        # MPI: one Iallreduce of the packed message, a single element of mpi_type
        comm._run(
            lambda: comm.mpi.Iallreduce(MPI.IN_PLACE, [self.packed, 1, self.mpi_type], op=self.op),
            what,
        )
        if self.dtype == "float16":
            red[:n] = self.grad16.view(np.float16)
        else:
            from_bfloat16(self.grad16, red[:n])
        red[:n] *= np.float32(1.0 / self.scale)
        red[n:] = self.tail
        self._next_scale(red[:n], comm.size)
        return red

    def _next_scale(self, summed: np.ndarray, size: int) -> None:
        """float16: aim the next step's largest |sum| at HEADROOM (the same on every rank: it
        is computed from the summed gradient); halve after an overflow."""
        if self.dtype != "float16":
            return
        top = float(np.max(np.abs(summed))) if summed.size else 0.0
        if not math.isfinite(top):
            self.scale = max(self.scale / 2.0, 2.0**-24)
        elif top > 0.0:
            self.scale = 2.0 ** min(24, max(-24, math.floor(math.log2(HEADROOM / (top * size)))))

    def free(self) -> None:
        self.op.Free()
        self.mpi_type.Free()
