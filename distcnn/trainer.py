"""The training run: one loop that reads top to bottom, the same on 1 rank and on N.

Per optimizer step, on every rank:
  1. the global batch = the next `batch_size` indices of the epoch's global order (sampler.py);
  2. this rank's contiguous shard of it -> forward/backward, gradients scaled by 1/(global batch)
     so that summing over ranks gives the gradient of the global mean loss;
  3. ONE collective over [gradients | loss sum | correct | stop flag] (an allreduce, or in
     --deterministic mode an allgather of fixed micro-shard partial sums added in a fixed order);
  4. every rank applies the same SGD update to its identical replica.
Rank 0 alone prints and writes files; decisions it makes alone are broadcast.
Every place that talks to other ranks is marked `# MPI:`.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn.comm import Comm
from distcnn.errors import UsageError
from distcnn.model import REFERENCE_SPEC, Model
from distcnn.optim import SGD, learning_rate
from distcnn.sampler import epoch_order, shard_bounds, steps_per_epoch

EXTRA = 3  # slots after the gradient in the reduce buffer: loss sum, correct, stop flag
DET_SHARDS = 8  # --deterministic: micro-shards per global batch (a multiple of 4)
PHASES = ("data", "compute", "comm", "optimizer", "checkpoint", "eval")


@dataclass
class TrainState:
    """All that resuming needs besides the parameters and the optimizer's velocity."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    offset: int = 0  # samples of this epoch's global order already used
    best_val: float = -1.0  # best validation accuracy so far (-1: none yet)


@dataclass
class Phases:
    """Wall time per phase of the run, for the log and --profile."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now

    def summary(self) -> str:
        """One line: seconds per phase, and the share of step time spent in the collective."""
        step = sum(self.seconds[p] for p in ("data", "compute", "comm", "optimizer"))
        parts = ", ".join(f"{p} {s:.2f} s" for p, s in self.seconds.items())
        share = 100 * self.seconds["comm"] / max(step, 1e-9)
        return f"time per phase: {parts}; comm {share:.1f}% of step time"


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the ranks agree on it at the next step's collective."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handler)

    def _handler(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name


def fault_from_env(rank: int) -> tuple[int, str] | None:
    """DISTCNN_FAULT=<rank>:<step>:<raise|exit|hang|nan> -> (step, mode) for this rank."""
    spec = os.environ.get("DISTCNN_FAULT", "").strip()
    if not spec:
        return None
    try:
        r, s, mode = spec.split(":")
        r_i, s_i = int(r), int(s)
    except ValueError:
        raise UsageError(
            f"DISTCNN_FAULT={spec!r} is malformed; use <rank>:<step>:<raise|exit|hang|nan>"
        ) from None
    if mode not in ("raise", "exit", "hang", "nan"):
        raise UsageError(f"DISTCNN_FAULT mode {mode!r} is unknown; use raise, exit, hang or nan")
    return (s_i, mode) if r_i == rank else None


def inject_fault(mode: str, step: int, rank: int) -> None:
    if mode == "raise":
        raise RuntimeError(f"DISTCNN_FAULT: injected failure on rank {rank} at step {step}")
    if mode == "exit":
        sys.exit(3)
    if mode == "hang":
        while True:
            time.sleep(3600)


class Console:
    """Rank 0's printing and metrics log; silent on other ranks."""

    def __init__(self, comm: Comm, log_path: str | None, resumed_step: int | None) -> None:
        self.on = comm.rank == 0
        self.log_path = log_path
        if self.on and log_path and resumed_step is not None and Path(log_path).exists():
            self._truncate_log(Path(log_path), resumed_step)

    @staticmethod
    def _truncate_log(path: Path, step: int) -> None:
        """Drop records past the resumed step, so they are not repeated (atomic rewrite)."""
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(k + "\n" for k in kept))
        os.replace(tmp, path)

    def print(self, *args: Any) -> None:
        if self.on:
            print(*args, flush=True)

    def warn(self, msg: str) -> None:
        if self.on:
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    def record(self, rec: dict[str, Any]) -> None:
        if self.on and self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(rec) + "\n")


def evaluate_split(
    model: Model, split: datamod.Split, comm: Comm, batch_size: int
) -> dict[str, Any]:
    """Loss, accuracy and confusion matrix of the model on a split, each rank a shard of it."""
    k = model.num_classes
    lo, hi = shard_bounds(len(split), comm.size, comm.rank)
    acc = np.zeros(2 + k * k, dtype=np.float64)  # loss sum, correct, confusion (k*k)
    xbuf = np.empty((min(batch_size, max(1, hi - lo)), *split.image_shape), dtype=model.dtype)
    for start in range(lo, hi, batch_size):
        idx = np.arange(start, min(hi, start + batch_size))
        x = split.batch(idx, out=xbuf)
        labels = split.labels[idx]
        loss, correct, pred = model.evaluate(x, labels)
        acc[0] += loss
        acc[1] += correct
        np.add.at(acc[2:].reshape(k, k), (labels, pred), 1)
    comm.allreduce_sum(acc, "evaluation")  # MPI: every rank joins, even with an empty shard
    n = len(split)
    return {
        "loss": acc[0] / n,
        "accuracy": acc[1] / n,
        "samples": n,
        "confusion": acc[2:].reshape(k, k).astype(np.int64),
    }


class Trainer:
    def __init__(
        self,
        cfg: dict[str, Any],
        comm: Comm,
        warnings: list[str],
        resume: ckpt.Checkpoint | None,
        resume_path: str | None,
    ) -> None:
        self.cfg = cfg
        self.comm = comm
        self.console = Console(comm, cfg["log"], resume.step if resume else None)
        for w in warnings:
            self.console.warn(w)
        data_path = cfg["data"] or str(datamod.DEFAULT_DATASET)
        self.train = datamod.load_split(data_path, "train")
        self.val = self._validation_split(data_path)
        self.test = self._optional_split(data_path, "test")
        self.model = Model(
            cfg["model"] or REFERENCE_SPEC,
            self.train.image_shape,
            self.train.num_classes,
            np.float32,
            grad_extra=EXTRA,
        )
        self.n_params = self.model.num_params
        if cfg["batch_size"] < comm.size:
            raise UsageError(
                f"--batch-size {cfg['batch_size']} is smaller than the {comm.size} ranks; "
                f"use at least {comm.size}"
            )
        if cfg["deterministic"] and DET_SHARDS % comm.size:
            raise UsageError(
                f"--deterministic needs a number of ranks that divides {DET_SHARDS}, got "
                f"{comm.size}; run on 1, 2, 4 or 8 ranks"
            )
        # The reduce buffer: [gradient (P) | loss sum | correct | stop flag]; grads are a view.
        self.red = self.model.grad_buffer
        self.opt = SGD(self.model.params, cfg["momentum"], cfg["weight_decay"])
        self.velocity_views = self.model.views_of(self.opt.velocity)
        self.state = TrainState()
        self.phases = Phases()
        self.preempt = Preemption()
        self.fault = fault_from_env(comm.rank)
        self.steps_per_epoch = steps_per_epoch(len(self.train), cfg["batch_size"])
        self.total_steps = cfg["epochs"] * self.steps_per_epoch
        if cfg["max_steps"] is not None:
            self.total_steps = min(self.total_steps, cfg["max_steps"])
        self.schedule_steps = cfg["epochs"] * self.steps_per_epoch
        shard = -(-cfg["batch_size"] // (DET_SHARDS if cfg["deterministic"] else comm.size))
        self.xbuf = np.empty((shard, *self.train.image_shape), dtype=np.float32)
        if cfg["deterministic"]:
            levels = int(math.log2(DET_SHARDS // comm.size)) + 1
            self.tree = [np.zeros_like(self.red) for _ in range(levels)]
            self.gathered = np.zeros((comm.size, self.red.size), dtype=np.float32)
        self._init_or_resume(resume, resume_path)

    # -- setup ------------------------------------------------------------------------------

    def _optional_split(self, path: str, name: str) -> datamod.Split | None:
        import h5py

        with h5py.File(path, "r") as f:
            present = name in f
        return datamod.load_split(path, name) if present else None

    def _validation_split(self, path: str) -> datamod.Split | None:
        val = self._optional_split(path, "val")
        frac = self.cfg["val_fraction"]
        if frac <= 0:
            return val
        n = len(self.train)
        n_val = int(round(n * frac))
        if n_val < 1 or n_val >= n:
            raise UsageError(
                f"--val-fraction {frac} leaves {n_val} of {n} samples for validation; "
                "use a fraction that keeps at least one sample on each side"
            )
        perm = np.random.default_rng(
            np.random.SeedSequence(self.cfg["seed"], spawn_key=(2,))
        ).permutation(n)
        v_idx, t_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        full = self.train
        self.train = datamod.Split(
            full.images[t_idx], full.labels[t_idx], full.num_classes, full.mean, full.std
        )
        return datamod.Split(
            full.images[v_idx], full.labels[v_idx], full.num_classes, full.mean, full.std
        )

    def _init_or_resume(self, resume: ckpt.Checkpoint | None, path: str | None) -> None:
        """Fill parameters and state on rank 0 (from the seed or the checkpoint); no collective
        here, so a setup error on one rank cannot strand the others: see start()."""
        if resume is not None:
            self.state = TrainState(resume.step, resume.epoch, resume.offset, resume.best_val)
        if self.comm.rank != 0:
            return
        if resume is None:
            self.model.init_params(self.cfg["seed"])
            return
        ckpt.check_fits(resume, self.model.param_shapes, self.model.num_classes, str(path))
        for name, view in self.model.param_views.items():
            view[...] = resume.params[name]
            self.velocity_views[name][...] = resume.velocity[name]

    def start(self) -> None:
        """MPI: rank 0's parameters and optimizer state become everyone's."""
        self.comm.bcast(self.model.params, 0, "initial parameters")
        self.comm.bcast(self.opt.velocity, 0, "optimizer state")

    # -- one step ---------------------------------------------------------------------------

    def step(self, batch: np.ndarray) -> tuple[float, float, bool]:
        """One optimizer step on the global batch (indices into train). Returns the global mean
        loss, accuracy, and whether any rank asked to stop."""
        cfg, comm, red, P = self.cfg, self.comm, self.red, self.n_params
        n = len(batch)
        # Flags every rank must agree on travel inside the step's one collective.
        stop_flag = 1.0 if self.preempt.requested else 0.0
        poison = self.fault is not None and self.fault == (self.state.step + 1, "nan")
        t = time.perf_counter()
        if cfg["deterministic"]:
            mine = self._deterministic_partial(batch)
            t = self.phases.add("compute", t)
            mine[P + 2] = stop_flag
            if poison:
                mine[0] = np.nan
            # MPI: every rank's subtree, combined below in the same fixed order on every rank
            comm.allgather(
                mine, self.gathered, f"deterministic allgather, step {self.state.step + 1}"
            )
            self._combine_gathered()
        else:
            lo, hi = shard_bounds(n, comm.size, comm.rank)
            x = self.train.batch(batch[lo:hi], out=self.xbuf)
            labels = self.train.labels[batch[lo:hi]]
            t = self.phases.add("data", t)
            loss, correct = self.model.loss_and_grad(x, labels, scale=1.0 / n)
            red[P], red[P + 1], red[P + 2] = loss, correct, stop_flag
            if poison:
                red[0] = np.nan
            t = self.phases.add("compute", t)
            comm.allreduce_sum(red, f"gradient allreduce, step {self.state.step + 1}")  # MPI
        t = self.phases.add("comm", t)
        grads = red[:P]
        finite = bool(np.isfinite(red[: P + 2].sum()))
        if finite:
            if cfg["clip_norm"] is not None:
                norm = float(np.sqrt(np.dot(grads, grads)))
                if norm > cfg["clip_norm"]:
                    grads *= cfg["clip_norm"] / norm
            lr = learning_rate(
                cfg["lr_schedule"],
                cfg["lr"],
                self.state.step,
                self.schedule_steps,
                int(cfg["warmup_epochs"] * self.steps_per_epoch),
            )
            self.opt.step(grads, lr)
        self.phases.add("optimizer", t)
        return float(red[P]) / n, float(red[P + 1]) / n, bool(red[P + 2] > 0) or not finite

    def _deterministic_partial(self, batch: np.ndarray) -> np.ndarray:
        """This rank's part of the fixed tree over DET_SHARDS micro-shards of the batch.

        Leaf m is the gradient sum (scaled by 1/global batch) of micro-shard m; leaves are added
        as a fixed binary tree, left + right. This rank owns a power-of-two aligned run of leaves,
        so its partial sum is a subtree of the same tree whatever the rank count, and
        _combine_gathered finishes the tree with the same pairwise additions on every rank. Same
        additions in the same order: bitwise identical for 1, 2, 4 or 8 ranks.
        Returns a buffer laid out like the reduce buffer (slot P + 2 is left to the caller).
        """
        comm, n, P = self.comm, len(batch), self.n_params
        per_rank = DET_SHARDS // comm.size
        stack: list[tuple[int, np.ndarray]] = []  # (level, buffer)
        free = list(self.tree)
        for m in range(comm.rank * per_rank, (comm.rank + 1) * per_rank):
            lo, hi = shard_bounds(n, DET_SHARDS, m)
            x = self.train.batch(batch[lo:hi], out=self.xbuf)
            loss, correct = self.model.loss_and_grad(x, self.train.labels[batch[lo:hi]], 1.0 / n)
            self.red[P], self.red[P + 1] = loss, correct
            buf = free.pop()
            buf[...] = self.red
            level = 0
            while stack and stack[-1][0] == level:
                _, left = stack.pop()
                left += buf  # left + right, always in this order
                free.append(buf)
                buf, level = left, level + 1
            stack.append((level, buf))
        ((_, mine),) = stack
        return mine

    def _combine_gathered(self) -> None:
        """The top of the tree: the ranks' subtrees (rank order) added pairwise into red."""
        P = self.n_params
        parts = list(self.gathered)
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
        self.red[...] = parts[0]
        self.red[P + 2] = self.gathered[:, P + 2].sum()  # stop flag: any rank's

    # -- the run ----------------------------------------------------------------------------

    def checkpoint_state(self) -> ckpt.Checkpoint:
        return ckpt.Checkpoint(
            params={k: v.copy() for k, v in self.model.param_views.items()},
            velocity={k: v.copy() for k, v in self.velocity_views.items()},
            step=self.state.step,
            epoch=self.state.epoch,
            offset=self.state.offset,
            world_size=self.comm.size,
            seed=self.cfg["seed"],
            best_val=self.state.best_val,
            num_classes=self.model.num_classes,
            input_shape=self.model.input_shape,
            model=self.model.spec,
            config=self.cfg,
        )

    def save(self, best: bool = False) -> None:
        """Rank 0 writes; everyone learns whether it worked (a failed save ends the job)."""
        t = time.perf_counter()
        err = ""
        if self.comm.rank == 0:
            d = Path(self.cfg["checkpoint_dir"])
            try:
                state = self.checkpoint_state()
                ckpt.save(d / ckpt.file_name(self.state.step), state)
                ckpt.prune(d, self.cfg["keep"])
                if best:
                    ckpt.save(d / "best.h5", state)
            except (OSError, ValueError) as e:
                err = f"saving checkpoint at step {self.state.step} in {d} failed: {e}"
        err = self.comm.bcast_object(err, 0, "checkpoint outcome")  # MPI: same branch everywhere
        self.phases.add("checkpoint", t)
        if err:
            raise RuntimeError(err + "; the previous checkpoint is intact")

    def run(self) -> int:
        cfg, comm, st, con = self.cfg, self.comm, self.state, self.console
        self.preempt.install()
        n_train = len(self.train)
        con.print(
            f"distcnn: {comm.size} rank(s), model {self.model.spec} ({self.n_params:,} params), "
            f"{n_train} train images {self.train.image_shape}, global batch {cfg['batch_size']}, "
            f"{self.steps_per_epoch} steps/epoch, {cfg['epochs']} epochs"
        )
        if st.step >= self.total_steps:
            con.print(f"already at step {st.step} of {self.total_steps}: nothing to do")
            return 0
        order = epoch_order(cfg["seed"], st.epoch, n_train)
        t_log, imgs_since, t_epoch, imgs_epoch = time.perf_counter(), 0, time.perf_counter(), 0
        loss_sum = acc_sum = 0.0
        n_since = 0
        stop = False
        while st.step < self.total_steps and not stop:
            batch = order[st.offset : st.offset + cfg["batch_size"]]
            if self.fault and self.fault[0] == st.step + 1 and self.fault[1] != "nan":
                inject_fault(self.fault[1], st.step + 1, comm.rank)
            loss, acc, stop = self.step(batch)
            if not math.isfinite(loss):
                raise RuntimeError(f"non-finite loss at step {st.step + 1}")
            st.step += 1
            st.offset += len(batch)
            imgs_since += len(batch)
            imgs_epoch += len(batch)
            loss_sum += loss
            acc_sum += acc
            n_since += 1
            end_of_epoch = st.offset >= n_train
            last = st.step >= self.total_steps or stop
            if st.step % cfg["log_every"] == 0 or last:
                now = time.perf_counter()
                rec = {
                    "kind": "step",
                    "time": time.time(),
                    "step": st.step,
                    "epoch": st.epoch + st.offset / n_train,
                    "loss": loss_sum / n_since,
                    "accuracy": acc_sum / n_since,
                    "lr": learning_rate(
                        cfg["lr_schedule"],
                        cfg["lr"],
                        st.step - 1,
                        self.schedule_steps,
                        int(cfg["warmup_epochs"] * self.steps_per_epoch),
                    ),
                    "images_per_sec": imgs_since / max(1e-9, now - t_log),
                }
                con.record(rec)
                if not cfg["no_progress"]:
                    con.print(
                        f"step {st.step:>6}/{self.total_steps}  epoch {rec['epoch']:.2f}  "
                        f"loss {rec['loss']:.4f}  acc {rec['accuracy']:.4f}  lr {rec['lr']:.4g}  "
                        f"{rec['images_per_sec']:.0f} img/s"
                    )
                t_log, imgs_since, loss_sum, acc_sum, n_since = now, 0, 0.0, 0.0, 0
            if end_of_epoch:
                st.epoch += 1
                st.offset = 0
                self._end_of_epoch(imgs_epoch, time.perf_counter() - t_epoch)
                t_epoch, imgs_epoch = time.perf_counter(), 0
                order = epoch_order(cfg["seed"], st.epoch, n_train)
            if st.step % cfg["checkpoint_every"] == 0 and not last:
                self._replica_check()
                self.save()
        self._replica_check()
        self.save()
        if cfg["profile"]:
            con.print(self.phases.summary())
        if stop and self.preempt.requested or stop:
            con.print(f"stopped at step {st.step} on a signal; checkpoint saved, exiting 0")
            return 0
        if self.test is not None:
            t = time.perf_counter()
            m = evaluate_split(self.model, self.test, comm, cfg["eval_batch_size"])
            self.phases.add("eval", t)
            con.print(
                f"test: loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f} ({m['samples']} images)"
            )
            con.record(
                {
                    "kind": "test",
                    "time": time.time(),
                    "step": st.step,
                    "epoch": st.epoch,
                    "loss": m["loss"],
                    "accuracy": m["accuracy"],
                }
            )
        return 0

    def _end_of_epoch(self, images: int, seconds: float) -> None:
        cfg, st = self.cfg, self.state
        line = f"epoch {st.epoch}/{cfg['epochs']}  {images / max(seconds, 1e-9):.0f} img/s"
        rec: dict[str, Any] = {
            "kind": "epoch",
            "time": time.time(),
            "step": st.step,
            "epoch": st.epoch,
            "images_per_sec": images / max(seconds, 1e-9),
        }
        if self.val is not None:
            t = time.perf_counter()
            m = evaluate_split(self.model, self.val, self.comm, cfg["eval_batch_size"])
            self.phases.add("eval", t)
            rec.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
            line += f"  val loss {m['loss']:.4f}  val acc {m['accuracy']:.4f}"
            if m["accuracy"] > st.best_val:
                st.best_val = m["accuracy"]
                self.save(best=True)
        self.console.record(rec)
        self.console.print(line)

    def _replica_check(self) -> None:
        bad = self.comm.check_replicas(self.model.params)  # MPI
        if bad:
            raise RuntimeError(
                f"replica check at step {self.state.step}: parameters on rank(s) "
                f"{', '.join(map(str, bad))} differ from rank 0's"
            )
