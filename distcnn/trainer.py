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
from distcnn.augment import Augment
from distcnn.comm import Comm
from distcnn.compress import CompressedAllreduce
from distcnn.config import Config, parse_betas
from distcnn.errors import UsageError
from distcnn.faults import fault_from_env, inject_fault
from distcnn.layers import Pass
from distcnn.model import REFERENCE_SPEC, Model
from distcnn.optim import learning_rate, make_optimizer
from distcnn.progress import Progress, fmt_metric, hms, profile_table
from distcnn.restore import inference_info
from distcnn.safefile import check_model_memory
from distcnn.sampler import epoch_order, shard_bounds, steps_per_epoch
from distcnn.syncbn import LaneSync, run_lanes

EXTRA = 3  # slots after the gradient in the reduce buffer: loss sum, correct, stop flag
DET_SHARDS = 8  # --deterministic: micro-shards per global batch (a multiple of 4)
# Phases of the run timed on rank 0 (every rank times its own; rank 0's go to the log and to
# --profile). "data" is building this rank's batch (and, with --deterministic, adding the
# micro-shard sums); "comm" the step's collective, waiting for slower ranks included.
PHASES = ("data", "forward", "backward", "comm", "optimizer", "checkpoint", "eval")
STEP_PHASES = PHASES[:-1]  # eval happens between steps


@dataclass
class TrainState:
    """All that resuming needs besides the parameters and the optimizer's velocity."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    offset: int = 0  # samples of this epoch's global order already used
    best_val: float = -1.0  # best validation accuracy so far (-1: none yet)
    # The metrics being averaged for the log, saved so that a resumed run logs exactly what an
    # uninterrupted one does: the step window (steps since the last multiple of --log-every,
    # sums over its finite steps) and the epoch's (loss * images, correct, images).
    window_start: int = 0  # the step the current window follows
    loss_sum: float = 0.0
    acc_sum: float = 0.0
    window: int = 0  # finite steps in the window
    epoch_sums: np.ndarray = field(default_factory=lambda: np.zeros(3))

    def log_state(self) -> dict[str, Any]:
        return {
            "window": [self.window_start, self.loss_sum, self.acc_sum, self.window],
            "epoch_sums": [float(x) for x in self.epoch_sums],
        }

    def restore_log_state(self, saved: dict[str, Any]) -> None:
        """From a checkpoint's extra["log_state"]; without one the windows start afresh."""
        if not saved:
            self.window_start = self.step
            return
        ws, ls, acs, w = saved["window"]
        self.window_start, self.loss_sum, self.acc_sum, self.window = int(ws), ls, acs, int(w)
        self.epoch_sums = np.array(saved["epoch_sums"], dtype=np.float64)


class SaveFailed(RuntimeError):
    """A checkpoint could not be written; raised on every rank (the outcome is broadcast)."""


@dataclass
class Phases:
    """Wall time per phase of the run, for the log and --profile."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def add(self, phase: str, t0: float) -> float:
        now = time.perf_counter()
        self.seconds[phase] += now - t0
        return now


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


class Console:
    """Rank 0's printing and metrics log; silent on other ranks."""

    def __init__(self, comm: Comm, log_path: str | None, resumed_step: int | None) -> None:
        self.on = comm.rank == 0
        self.log_path = log_path
        self.resumed_step = resumed_step

    def continue_log(self) -> None:
        """Once setup has succeeded (a refused resume leaves the log alone): drop the records
        past the step resumed from."""
        path, step = self.log_path, self.resumed_step
        if self.on and path and step is not None and Path(path).exists():
            self._truncate_log(Path(path), step)

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
        cfg: Config,
        comm: Comm,
        warnings: list[str],
        resume: ckpt.Checkpoint | None,
        resume_path: str | None,
    ) -> None:
        self.cfg = cfg
        self.comm = comm
        self.console = Console(comm, cfg.log, resume.step if resume else None)
        for w in warnings:
            self.console.warn(w)
        data_path = cfg.data or str(datamod.DEFAULT_DATASET)
        if cfg.batch_size < comm.size:
            raise UsageError(
                f"--batch-size {cfg.batch_size} is smaller than the {comm.size} ranks; "
                f"use at least {comm.size}"
            )
        if cfg.deterministic and cfg.allreduce_dtype != "float32":
            raise UsageError(
                f"--allreduce-dtype {cfg.allreduce_dtype} rounds partial sums whose grouping "
                "depends on the rank count, so it cannot be --deterministic; drop one of them"
            )
        if cfg.deterministic and DET_SHARDS % comm.size:
            raise UsageError(
                f"--deterministic needs a number of ranks that divides {DET_SHARDS}, got "
                f"{comm.size}; run on 1, 2, 4 or 8 ranks"
            )
        # MPI: collective; --data-mode decides how the ranks hold the splits (same batches)
        self.data = datamod.open_data(
            data_path,
            comm,
            cfg.data_mode,
            cfg.data_budget,
            max_rows=-(-cfg.batch_size // comm.size),
            depth=cfg.prefetch,
        )
        self.train, self.test = self.data.train, self.data.test
        self.val = self._validation_split(self.data.val)
        # what the checkpoints record and a resume is checked against (rank 0 owns files)
        self.fingerprint = datamod.fingerprint(data_path) if comm.rank == 0 else None
        self.data_path = data_path
        # what predict/evaluate need without the dataset (distcnn.restore.inference_info)
        self.inference = inference_info(
            self.train.dtype,
            self.train.mean,
            self.train.std,
            self.train.image_shape,
            self.train.num_classes,
        )
        # --augment: the training split's batches only, keyed by (seed, epoch, sample row)
        augment = Augment(cfg.augment, cfg.seed, self.train.image_shape)
        self.train.augment = augment if augment else None
        # the bytes the model and this rank's batch imply, before any of it is allocated
        check_model_memory(
            cfg.model or REFERENCE_SPEC,
            self.train.image_shape,
            self.train.num_classes,
            -(-cfg.batch_size // (DET_SHARDS if cfg.deterministic else comm.size)),
        )
        self.model = Model(
            cfg.model or REFERENCE_SPEC,
            self.train.image_shape,
            self.train.num_classes,
            np.float32,
            grad_extra=EXTRA,
            grad_alloc=comm.reduce_buffer,  # MPI: in shared memory when ranks share a node
        )
        self.n_params = self.model.num_params
        # The reduce buffer: [gradient (P) | loss sum | correct | stop flag]; grads are a view.
        self.red = self.model.grad_buffer
        self.opt = make_optimizer(
            cfg.optimizer,
            self.model.params,
            cfg.momentum,
            cfg.weight_decay,
            parse_betas(cfg.betas),
            cfg.eps,
        )
        # named views of each optimizer state buffer (velocity; or exp_avg, exp_avg_sq)
        self.opt_views = {k: self.model.views_of(v) for k, v in self.opt.state.items()}
        self.state = TrainState()
        self.phases = Phases()
        self.preempt = Preemption()
        self.preempt.install()  # early, so a signal during setup is not fatal either
        self.saved_step = -1  # step of the last ckpt-<step>.h5 written by this run
        self.fault = fault_from_env(comm.rank)
        # one optimizer step takes accum_steps micro-batches of batch_size (the last step of an
        # epoch takes what is left: fewer micro-batches, the last one short)
        self.step_batch = cfg.batch_size * cfg.accum_steps
        self.steps_per_epoch = steps_per_epoch(len(self.train), self.step_batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule_steps = cfg.epochs * self.steps_per_epoch
        shard = -(-cfg.batch_size // (DET_SHARDS if cfg.deterministic else comm.size))
        self.xbuf = np.empty((shard, *self.train.image_shape), dtype=np.float32)
        if cfg.deterministic:
            # one buffer per micro-shard this rank owns (its gradient summed over micro-batches)
            self.leaves = [np.zeros_like(self.red) for _ in range(DET_SHARDS // comm.size)]
            self.gathered = np.zeros((comm.size, self.red.size), dtype=np.float32)
        if cfg.accum_steps > 1:
            self.acc = np.zeros_like(self.red)  # the micro-batches' sums, before the allreduce
        self.lanes: list[Model] = []
        if cfg.sync_bn and cfg.deterministic:
            # one lane per micro-shard of this rank (distcnn.syncbn); lane 0 is the model
            per_rank = DET_SHARDS // comm.size
            self.lane_sync = LaneSync(comm, per_rank)
            self.lanes = [self.model] + [
                Model(
                    self.model.spec,
                    self.model.input_shape,
                    self.model.num_classes,
                    np.float32,
                    grad_extra=EXTRA,
                    params=self.model.params,
                )  # fmt: skip
                for _ in range(per_rank - 1)
            ]
            for j, lane in enumerate(self.lanes):
                lane.share_buffers(self.model)
                lane.set_norm_sync(self.lane_sync.for_lane(j))
            self.lane_x = [np.empty_like(self.xbuf) for _ in self.lanes]
        elif cfg.sync_bn:
            self.model.set_norm_sync(self._sync_norm_sums)
        self.compressed = None
        if cfg.allreduce_dtype != "float32" and comm.size > 1:
            self.compressed = CompressedAllreduce(comm, self.red.size, self.n_params,
                                                  cfg.allreduce_dtype)  # fmt: skip
        self._init_or_resume(resume, resume_path)

    # -- setup ------------------------------------------------------------------------------

    def _validation_split(self, val: datamod.Split | None) -> datamod.Split | None:
        """The file's val split, or --val-fraction of train carved out of it (then self.train
        becomes the rest): subsets by row, whatever the data mode."""
        frac = self.cfg.val_fraction
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
            np.random.SeedSequence(self.cfg.seed, spawn_key=(2,))
        ).permutation(n)
        v_idx, t_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        full = self.train
        self.train = full.subset(t_idx)
        return full.subset(v_idx)

    def _init_or_resume(self, resume: ckpt.Checkpoint | None, path: str | None) -> None:
        """Fill parameters and state on rank 0 (from the seed or the checkpoint); no collective
        here, so a setup error on one rank cannot strand the others: see start()."""
        if resume is not None:
            self.state = TrainState(resume.step, resume.epoch, resume.offset, resume.best_val)
            self.state.restore_log_state(resume.extra.get("log_state"))
            if self.state.offset >= len(self.train):  # a smaller train split (allowed below)
                self.state.epoch, self.state.offset = self.state.epoch + 1, 0
        if self.comm.rank != 0:
            return
        if resume is None:
            self.model.init_params(self.cfg.seed)
            return
        trained = (resume.config or {}).get("optimizer", "sgd")
        if trained != self.cfg.optimizer:
            raise UsageError(
                f"checkpoint {path} was trained with --optimizer {trained}, not "
                f"{self.cfg.optimizer}: its optimizer state does not carry over; resume with "
                f"--optimizer {trained}"
            )
        ckpt.check_fits(
            resume,
            self.model.param_shapes,
            self.model.num_classes,
            str(path),
            self.model.input_shape,
            buffers=self.model.buffers,
            optimizer_state=tuple(self.opt.state),
        )
        self._check_resume_data(resume, str(path))
        saved = {"velocity": resume.velocity, **resume.optimizer_state}
        for name, view in self.model.param_views.items():
            view[...] = resume.params[name]
            for state, views in self.opt_views.items():
                views[name][...] = saved[state][name]
        for name, a in self.model.buffers.items():
            a[...] = resume.buffers[name]
        self.opt.steps = int(resume.extra.get("optimizer_steps", resume.step))
        if self.compressed is not None and "allreduce_scale" in resume.extra:
            self.compressed.scale = float(resume.extra["allreduce_scale"])

    def _check_resume_data(self, resume: ckpt.Checkpoint, path: str) -> None:
        """Rank 0: the dataset must be the one the checkpoint was trained on (its fingerprint),
        unless --allow-data-change; UsageError (exit 2) naming both fingerprints otherwise."""
        recorded, current = resume.dataset_fingerprint, self.fingerprint
        assert current is not None
        if recorded is None:
            self.console.warn(f"{path} records no dataset fingerprint: the data is not checked")
            return
        problem = datamod.resume_problem(recorded, current, path, self.data_path)
        if problem and not self.cfg.allow_data_change:
            raise UsageError(problem)
        if problem:
            now, then = (datamod.describe_fingerprint(fp) for fp in (current, recorded))
            self.console.warn(f"--allow-data-change: resuming on {now} (trained on {then})")

    def start(self) -> None:
        """MPI: rank 0's parameters and optimizer state become everyone's."""
        self.console.continue_log()
        self.comm.bcast(self.model.params, 0, "initial parameters")
        for name, buf in self.opt.state.items():
            self.comm.bcast(buf, 0, f"optimizer state {name}")
        small = {"optimizer_steps": self.opt.steps, "buffers": self.model.buffers,
                 "scale": self.compressed.scale if self.compressed else 1.0}  # fmt: skip
        small = self.comm.bcast_object(small, 0, "optimizer steps and batch norm statistics")
        self.opt.steps = small["optimizer_steps"]
        if self.compressed is not None:
            self.compressed.scale = small["scale"]
        for name, a in self.model.buffers.items():
            a[...] = small["buffers"][name]

    # -- one step ---------------------------------------------------------------------------

    def step(self, batch: np.ndarray) -> tuple[float, float, bool, bool]:
        """One optimizer step on the global batch (indices into train): accum_steps
        micro-batches of batch_size consecutive indices, gradients summed before the one
        allreduce, each scaled by 1/len(batch): the update of one batch of len(batch).

        Returns (global mean loss, accuracy, stop: a rank got a preemption signal, finite).
        finite is False when the summed loss or gradient holds a NaN or Inf: a non-finite value
        on any rank poisons the sum every rank receives, so every rank sees it, skips the update
        (parameters and velocity unchanged) and returns False — the same decision everywhere
        without an extra collective.
        """
        cfg, comm, red, P, model = self.cfg, self.comm, self.red, self.n_params, self.model
        n = len(batch)
        t = time.perf_counter()
        fwd0, bwd0, comm0 = model.seconds["forward"], model.seconds["backward"], comm.comm_seconds
        micro = [batch[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if cfg.deterministic:
            red[P + 2] = 1.0 if self.preempt.requested else 0.0
            self._deterministic_grads(micro, n)
        else:
            for k, mb in enumerate(micro):
                lo, hi = shard_bounds(len(mb), comm.size, comm.rank)
                x = self.train.batch(mb[lo:hi], out=self.xbuf, epoch=self.state.epoch)
                labels = self.train.labels[mb[lo:hi]]
                loss, correct = model.loss_and_grad(x, labels, 1.0 / n, self._pass(mb[lo:hi]))
                red[P], red[P + 1] = loss, correct
                if len(micro) > 1:  # accumulate: one allreduce per optimizer step
                    if k == 0:
                        self.acc[...] = red
                    else:
                        self.acc += red
            if len(micro) > 1:
                red[...] = self.acc
            red[P + 2] = 1.0 if self.preempt.requested else 0.0
            self._maybe_inject_nan(red)
            what = f"gradient allreduce, step {self.state.step + 1}"
            if self.compressed is not None:
                red = self.compressed.allreduce(red, what)  # MPI: 16-bit gradient
            else:
                # MPI: the sum may land in a shared read-only array (allreduce_sum_view); it
                # is read below, before the next collective
                red = comm.allreduce_sum_view(red, what)
        now = time.perf_counter()
        sec = self.phases.seconds
        fwd, bwd = model.seconds["forward"] - fwd0, model.seconds["backward"] - bwd0
        sec["forward"] += fwd
        sec["backward"] += bwd
        sec["comm"] += comm.comm_seconds - comm0
        sec["data"] += (now - t) - fwd - bwd - (comm.comm_seconds - comm0)
        t = now
        grads = red[:P]
        stats = red[model.stat_offset :]  # batch norm sums of the whole global batch
        finite = bool(np.isfinite(red[: P + 2].sum()) and np.isfinite(stats.sum()))
        if finite:
            model.update_running_stats(stats)
            scale = 1.0
            if cfg.clip_norm is not None:
                norm = float(np.sqrt(np.dot(grads, grads)))
                if norm > cfg.clip_norm:
                    scale = cfg.clip_norm / norm
            lr = learning_rate(
                cfg.lr_schedule,
                cfg.lr,
                self.state.step,
                self.schedule_steps,
                int(cfg.warmup_epochs * self.steps_per_epoch),
            )
            self.opt.step(grads, lr, scale)
        self.phases.add("optimizer", t)
        return float(red[P]) / n, float(red[P + 1]) / n, bool(red[P + 2] > 0), finite

    def _lane_grads(self, mb: np.ndarray, n: int, k: int) -> None:
        """--sync-bn --deterministic: this rank's micro-shards of micro-batch mb, each in its
        lane, their batch norms meeting at the lanes' barrier; summed into the leaves."""
        per_rank = len(self.lanes)
        self.lane_sync.what = f"sync-bn sums, step {self.state.step + 1}"

        def work(j: int) -> Any:
            lo, hi = shard_bounds(len(mb), DET_SHARDS, self.comm.rank * per_rank + j)
            # here, not in the lane
            x = self.train.batch(mb[lo:hi], out=self.lane_x[j], epoch=self.state.epoch)
            labels, ctx = self.train.labels[mb[lo:hi]], self._pass(mb[lo:hi])

            def run() -> None:
                lane = self.lanes[j]
                loss, correct = lane.loss_and_grad(x, labels, 1.0 / n, ctx)
                buf = lane.grad_buffer
                buf[self.n_params], buf[self.n_params + 1] = loss, correct
                if k == 0:
                    self.leaves[j][...] = buf
                else:
                    self.leaves[j] += buf

            return run

        run_lanes([work(j) for j in range(per_rank)], self.lane_sync)

    def _sync_norm_sums(self, v: np.ndarray) -> np.ndarray:
        """--sync-bn: a batch norm's float64 sums over all ranks. A blocking allreduce per
        batch norm layer in forward (its batch statistics) and in backward (the sums its input
        gradient needs): the forward cannot go on without the statistics, so these cannot join
        the step's gradient allreduce. Every rank makes them, an empty shard too."""
        out = np.array(v, dtype=np.float64)
        self.comm.allreduce_sum(out, f"sync-bn sums, step {self.state.step + 1}")  # MPI
        return out

    def _pass(self, ids: np.ndarray) -> Pass:
        """A training pass over the samples `ids` (global dataset indices) at this step: what
        the dropout masks depend on, so they do not depend on the rank count."""
        return Pass(True, self.cfg.seed, self.state.step, ids)

    def _maybe_inject_nan(self, buf: np.ndarray) -> None:
        """DISTCNN_FAULT=<rank>:<step>:nan: this rank's gradient turns NaN before the collective."""
        if self.fault == (self.state.step + 1, "nan"):
            buf[0] = np.nan

    def _deterministic_grads(self, micro: list[np.ndarray], n: int) -> None:
        """Gradient sums of DET_SHARDS fixed micro-shards, added as a fixed binary tree.

        Micro-shard m of each micro-batch is the m-th of DET_SHARDS even parts of it; leaf m
        sums micro-shard m over the micro-batches in order. This rank owns a power-of-two
        aligned run of leaves, so its partial sum is a subtree of the same tree whatever the
        rank count; the ranks' subtrees are then allgathered and combined by the same pairwise
        additions on every rank. Same additions, same order: bitwise identical for 1, 2, 4 or
        8 ranks.
        """
        comm, P = self.comm, self.n_params
        per_rank = DET_SHARDS // comm.size
        for k, mb in enumerate(micro):
            if self.lanes:
                self._lane_grads(mb, n, k)
                continue
            for j, m in enumerate(range(comm.rank * per_rank, (comm.rank + 1) * per_rank)):
                lo, hi = shard_bounds(len(mb), DET_SHARDS, m)
                x = self.train.batch(mb[lo:hi], out=self.xbuf, epoch=self.state.epoch)
                loss, correct = self.model.loss_and_grad(
                    x, self.train.labels[mb[lo:hi]], 1.0 / n, self._pass(mb[lo:hi])
                )
                self.red[P], self.red[P + 1] = loss, correct
                if k == 0:
                    self.leaves[j][...] = self.red
                else:
                    self.leaves[j] += self.red
        stack: list[tuple[int, np.ndarray]] = []  # (level, buffer)
        for buf in self.leaves:
            level = 0
            while stack and stack[-1][0] == level:
                _, left = stack.pop()
                left += buf  # left + right, always in this order
                buf, level = left, level + 1
            stack.append((level, buf))
        ((_, mine),) = stack
        mine[P + 2] = self.red[P + 2]  # this rank's stop flag
        self._maybe_inject_nan(mine)
        comm.allgather(mine, self.gathered, f"deterministic allgather, step {self.state.step + 1}")
        parts = list(self.gathered)
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
        self.red[...] = parts[0]
        self.red[P + 2] = self.gathered[:, P + 2].sum()

    # -- the run ----------------------------------------------------------------------------

    def checkpoint_state(self) -> ckpt.Checkpoint:
        return ckpt.Checkpoint(
            params={k: v.copy() for k, v in self.model.param_views.items()},
            velocity={k: v.copy() for k, v in self.opt_views.get("velocity", {}).items()},
            step=self.state.step,
            epoch=self.state.epoch,
            offset=self.state.offset,
            world_size=self.comm.size,
            seed=self.cfg.seed,
            best_val=self.state.best_val,
            num_classes=self.model.num_classes,
            input_shape=self.model.input_shape,
            model=self.model.spec,
            config=self.cfg.as_dict(),
            extra={
                "log_state": self.state.log_state(),
                "optimizer_steps": self.opt.steps,
                "allreduce_scale": self.compressed.scale if self.compressed else 1.0,
            },
            optimizer_state={
                state: {k: v.copy() for k, v in views.items()}
                for state, views in self.opt_views.items()
                if state != "velocity"
            },
            buffers={k: v.copy() for k, v in self.model.buffers.items()},
            inference=self.inference,
            dataset_fingerprint=self.fingerprint,
        )

    def save(self, best: bool = False) -> None:
        """Rank 0 writes ckpt-<step>.h5 (once per step) and, if best, best.h5; everyone learns
        whether it worked, and a failed save raises SaveFailed on every rank."""
        t = time.perf_counter()
        err = ""
        if self.comm.rank == 0:
            d = Path(self.cfg.checkpoint_dir)
            try:
                state = self.checkpoint_state()
                if self.saved_step != self.state.step:
                    ckpt.save(d / ckpt.file_name(self.state.step), state)
                    self.saved_step = self.state.step
                    ckpt.prune(d, self.cfg.keep)
                if best:
                    ckpt.save(d / "best.h5", state)
            except Exception as e:  # disk full, directory gone, h5py errors: all end the job
                err = f"saving the checkpoint of step {self.state.step} in {d} failed: {e}"
        err = self.comm.bcast_object(err, 0, "checkpoint outcome")  # MPI: same branch everywhere
        self.phases.add("checkpoint", t)
        if err:
            raise SaveFailed(err + "; the previous checkpoint is intact")

    def run(self) -> int:
        """Train to the step limit; the exit code (0 done or preempted, 1 too many bad steps)."""
        if self.cfg.profile:
            self.model.profile_layers()
        first_step = self.state.step
        try:
            code = self._train()
        finally:
            self.data.close()  # prefetch threads and file handles (shared memory: at exit)
        if self.cfg.profile:
            self.console.print(self.profile_report(self.state.step - first_step))
        return code

    def _train(self) -> int:
        cfg, comm, st, con = self.cfg, self.comm, self.state, self.console
        n_train = len(self.train)
        con.print(
            f"distcnn: {comm.size} rank(s), model {self.model.spec} ({self.n_params:,} params), "
            f"{n_train} train images {self.train.image_shape}, global batch {self.step_batch}"
            + (f" ({cfg.accum_steps} x {cfg.batch_size})" if cfg.accum_steps > 1 else "")
            + ", "
            f"{self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs"
        )
        if comm.size > 1:
            con.print(f"gradient allreduce: {comm.allreduce_path}")
        con.print(self.data.line)
        if st.step >= self.total_steps:
            con.print(f"already at step {st.step} of {self.total_steps}: nothing to do")
            return 0
        order = epoch_order(cfg.seed, st.epoch, n_train)
        # the rows this rank will ask for, so a streaming split reads them ahead
        self.train.prefetch(
            datamod.rank_plan(cfg.seed, n_train, cfg.batch_size, comm.size, comm.rank,
                              st.epoch, st.offset)
        )  # fmt: skip
        prog = self.progress = Progress(con.on, self.total_steps, st.step, not cfg.no_progress)
        t_log, imgs_since, t_epoch, imgs_epoch = time.perf_counter(), 0, time.perf_counter(), 0
        epoch_sums = st.epoch_sums  # this epoch's loss * images, correct, images (finite steps)
        mark_step, mark_phases = st.step, dict(self.phases.seconds)
        bad_in_row = 0
        stop = False
        while st.step < self.total_steps and not stop:
            batch = order[st.offset : st.offset + self.step_batch]
            if self.fault and self.fault[0] == st.step + 1 and self.fault[1] != "nan":
                inject_fault(self.fault[1], st.step + 1, comm.rank)
            loss, acc, stop, finite = self.step(batch)
            # A skipped step still counts (the step counter, the data position and the schedule
            # move on), so a bad batch is not retried forever and resuming stays exact.
            st.step += 1
            st.offset += len(batch)
            imgs_since += len(batch)
            imgs_epoch += len(batch)
            if finite:
                bad_in_row = 0
                st.loss_sum += loss
                st.acc_sum += acc
                st.window += 1
                epoch_sums += (loss * len(batch), acc * len(batch), len(batch))
            else:
                bad_in_row += 1
                if self._non_finite_step(bad_in_row):
                    prog.close()
                    return 1
            end_of_epoch = st.offset >= n_train
            last = st.step >= self.total_steps or stop
            rec = None
            if st.step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                steps = st.step - mark_step
                rec = {
                    "kind": "step",
                    "time": time.time(),
                    "step": st.step,
                    "epoch": st.epoch + st.offset / n_train,
                    "loss": st.loss_sum / st.window if st.window else None,
                    "accuracy": st.acc_sum / st.window if st.window else None,
                    "lr": learning_rate(
                        cfg.lr_schedule,
                        cfg.lr,
                        st.step - 1,
                        self.schedule_steps,
                        int(cfg.warmup_epochs * self.steps_per_epoch),
                    ),
                    "images_per_sec": imgs_since / max(1e-9, now - t_log),
                    # mean seconds per step in each phase since the previous record (rank 0)
                    "phase_seconds": {
                        k: (self.phases.seconds[k] - mark_phases[k]) / steps for k in STEP_PHASES
                    },
                }
                if st.window < st.step - st.window_start:
                    rec["skipped_steps"] = st.step - st.window_start - st.window
                con.record(rec)
                t_log, imgs_since = now, 0
                mark_step, mark_phases = st.step, dict(self.phases.seconds)
                if st.step % cfg.log_every == 0:  # windows end at multiples of --log-every
                    st.window_start, st.loss_sum, st.acc_sum, st.window = st.step, 0.0, 0.0, 0
            prog.update(st.step, rec)
            if end_of_epoch:
                st.epoch += 1
                st.offset = 0
                sums = epoch_sums.copy()
                epoch_sums[:] = 0  # before _end_of_epoch, which may save (best.h5)
                self._end_of_epoch(imgs_epoch, time.perf_counter() - t_epoch, sums)
                t_epoch, imgs_epoch = time.perf_counter(), 0
                order = epoch_order(cfg.seed, st.epoch, n_train)
            if st.step % cfg.checkpoint_every == 0 and not last:
                self._replica_check()
                self.save()
        prog.close()
        self._replica_check()
        self.save()
        if stop:
            where = (
                f"{self.preempt.signal_name} on rank 0"
                if self.preempt.requested
                else "a signal on another rank"
            )
            con.print(
                f"preempted ({where}): stopped at step {st.step}, checkpoint "
                f"{ckpt.file_name(st.step)} saved; exiting 0"
            )
            return 0
        if self.test is not None:
            m = self._evaluate(self.test)
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

    def _non_finite_step(self, in_row: int) -> bool:
        """Report a skipped step (rank 0); True when --max-bad-steps in a row ends the run.

        Every rank reaches the same verdict from the same reduced values, so all return the
        same exit code with no collective; the newest checkpoint is left as it is (checkpoints
        never hold non-finite values: checkpoint.save refuses them)."""
        step, limit = self.state.step, self.cfg.max_bad_steps
        if in_row < limit:
            self.progress.warn(
                f"warning: step {step}: non-finite loss or gradient on some rank; update skipped "
                f"(parameters and momentum unchanged), {in_row} in a row of --max-bad-steps {limit}"
            )
            return False
        first = step - in_row + 1
        steps = f"steps {first} to {step}" if in_row > 1 else f"step {step}"
        self.progress.warn(
            f"error: non-finite loss or gradient at {steps} ({in_row} in a row, --max-bad-steps "
            f"{limit}); stopped at step {step} without saving. Lower --lr, set --clip-norm or "
            "check the data; checkpoints (if any) hold only finite values"
        )
        return True

    def _evaluate(self, split: datamod.Split) -> dict[str, Any]:
        """evaluate_split, timed as "eval" and kept out of the per-layer profile."""
        t = time.perf_counter()
        timers, self.model.layer_seconds = self.model.layer_seconds, None
        m = evaluate_split(self.model, split, self.comm, self.cfg.eval_batch_size)
        self.model.layer_seconds = timers
        self.phases.add("eval", t)
        return m

    def _end_of_epoch(self, images: int, seconds: float, sums: np.ndarray) -> None:
        """The epoch's one summary line and epoch record; validation and best.h5 if there is a
        validation split. sums: (loss * images, correct, images) over the epoch's finite steps
        (restored from the checkpoint when the run resumed mid-epoch)."""
        cfg, st, prog = self.cfg, self.state, self.progress
        n = sums[2]
        rec: dict[str, Any] = {
            "kind": "epoch",
            "time": time.time(),
            "step": st.step,
            "epoch": st.epoch,
            "loss": sums[0] / n if n else None,
            "accuracy": sums[1] / n if n else None,
            "images_per_sec": images / max(seconds, 1e-9),
        }
        line = f"epoch {st.epoch}/{cfg.epochs}  step {st.step}/{self.total_steps}  "
        line += f"train loss {fmt_metric(rec['loss'])} acc {fmt_metric(rec['accuracy'])}  "
        if self.val is not None:
            m = self._evaluate(self.val)
            rec.update(val_loss=m["loss"], val_accuracy=m["accuracy"])
            line += f"val loss {m['loss']:.4f} acc {m['accuracy']:.4f}  "
            if m["accuracy"] > st.best_val:
                st.best_val = m["accuracy"]
                self.save(best=True)
                line += "(best) "
        rec.update(elapsed=prog.elapsed(), eta=prog.eta(st.step))
        self.console.record(rec)
        prog.line(
            line + f"{rec['images_per_sec']:.0f} img/s  elapsed {hms(rec['elapsed'])}  "
            f"eta {hms(rec['eta'])}"
        )

    def profile_report(self, steps: int) -> str:
        """The --profile table of this rank's phases and per-layer times over `steps` steps."""
        layers = []
        if self.model.layer_seconds is not None:
            for i, (layer, (f, b)) in enumerate(
                zip(self.model.layers, self.model.layer_seconds, strict=True)
            ):
                layers.append((f"{i + 1:>2} {layer.name or layer.describe()}", float(f), float(b)))
        return profile_table(self.phases.seconds, steps, layers)

    def _replica_check(self) -> None:
        bad = self.comm.check_replicas(self.model.params)  # MPI
        if bad:
            raise RuntimeError(
                f"replica check at step {self.state.step}: parameters on rank(s) "
                f"{', '.join(map(str, bad))} differ from rank 0's"
            )
