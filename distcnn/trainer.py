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

import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from distcnn import checkpoint as ckpt
from distcnn import data as datamod
from distcnn import signals
from distcnn.augment import Augment
from distcnn.comm import Comm
from distcnn.compress import CompressedAllreduce
from distcnn.config import Config, parse_betas
from distcnn.errors import UsageError
from distcnn.faults import fault_from_env, inject_fault, slow_from_env
from distcnn.layers import Pass
from distcnn.metrics import Console, LogWindow, Metrics, Phases
from distcnn.model import REFERENCE_SPEC, Model
from distcnn.optim import learning_rate, make_optimizer
from distcnn.progress import Progress, fmt_metric, hms, profile_table
from distcnn.restore import inference_info
from distcnn.rundir import RunDir, new_run_id
from distcnn.safefile import check_model_memory
from distcnn.sampler import epoch_order, shard_bounds, steps_per_epoch
from distcnn.saver import SaveFailed, Saver
from distcnn.status import StatusFile
from distcnn.stragglers import PERSIST, StragglerWatch
from distcnn.stragglers import describe as describe_straggler
from distcnn.syncbn import LaneSync, run_lanes

__all__ = ["Console", "SaveFailed", "TrainState", "Trainer", "evaluate_split"]

# Slots after the gradient in the reduce buffer: loss sum, correct, stop flag (a signal reached
# a rank), interrupt flag (that signal was SIGINT), then one per rank: its compute seconds per
# step at the end of a straggler window (stragglers.py), 0 otherwise.
EXTRA = 4  # plus the world size
DET_SHARDS = 8  # --deterministic: micro-shards per global batch (a multiple of 4)


@dataclass
class TrainState:
    """All that resuming needs besides the parameters and the optimizer's velocity."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    offset: int = 0  # samples of this epoch's global order already used
    best_val: float = -1.0  # best validation accuracy so far (-1: none yet)
    log: LogWindow = field(default_factory=LogWindow)  # what the next records average


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
        run_id: str | None = None,
        run: RunDir | None = None,
    ) -> None:
        """run_id: this run's id (a new one when None); run: rank 0's RunDir (lock held), or
        None (other ranks, and tests that build a Trainer directly)."""
        self.cfg = cfg
        self.comm = comm
        self.run_id = run_id if run_id is not None else new_run_id()
        self.rundir = run
        log_path = run.log_path if run else cfg.log  # without a RunDir: --log only
        self.console = Console(comm, log_path, resume.step if resume else None)
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
        for name, split in (("val", self.val), ("test", self.test)):
            if split is not None and split.image_shape != self.train.image_shape:
                raise UsageError(
                    f"--data {data_path}: the {name} split's images are {split.image_shape} but "
                    f"train's are {self.train.image_shape}; rebuild the file with one image shape"
                )
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
            grad_extra=EXTRA + comm.size,
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
        self.status: StatusFile | None = None  # rank 0's status.json, from start()
        self._status_warned = False
        self.stop_request = signals.STOP  # train.main installs its handlers first thing
        self.interrupted = False  # the agreed stop came from SIGINT on some rank
        self.fault = fault_from_env(comm.rank)
        self.slow = slow_from_env(comm.rank)  # DISTCNN_SLOW: seconds of delay per step
        self.stragglers = StragglerWatch(
            comm.rank, comm.size, cfg.straggler_every, cfg.straggler_margin
        )
        self.straggler_records: list[dict[str, Any]] = []  # of the last step
        self._slots_dirty = True  # the reduce buffer's straggler slots need clearing
        self.bad_in_row = 0  # non-finite steps in a row
        # one optimizer step takes accum_steps micro-batches of batch_size (the last step of an
        # epoch takes what is left: fewer micro-batches, the last one short)
        self.step_batch = cfg.batch_size * cfg.accum_steps
        self.steps_per_epoch = steps_per_epoch(len(self.train), self.step_batch)
        self.total_steps = cfg.epochs * self.steps_per_epoch
        if cfg.max_steps is not None:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.schedule_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = int(cfg.warmup_epochs * self.steps_per_epoch)
        self.saver = Saver(
            comm,
            self.run_id,
            cfg.checkpoint_dir,
            cfg.checkpoint_every,
            cfg.keep,
            self.phases,
            self.checkpoint_state,
            self._replica_check,
            lambda path: self._set_status(force=True, last_checkpoint=str(path)),
        )
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
                    grad_extra=EXTRA + comm.size,
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
        self.metrics = Metrics(
            self.state.log, self.phases, cfg.log_every, len(self.train), self.lr_at
        )

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
            log = LogWindow.from_saved(resume.extra.get("log_state"), resume.step)
            self.state = TrainState(resume.step, resume.epoch, resume.offset, resume.best_val, log)
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
        if not self.cfg.allow_data_change:
            self._check_same_train_split(resume, str(path))
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

    def _check_same_train_split(self, resume: ckpt.Checkpoint, path: str) -> None:
        """The data order and the position in it only mean the same thing on the same training
        split: refuse another size (another dataset or --val-fraction) before any work."""
        n, saved = len(self.train), resume.extra.get("train_size")
        fix = (
            "resume with the dataset and --val-fraction it was trained with, or start a new run "
            "in another --checkpoint-dir"
        )
        if isinstance(saved, int) and saved != n:
            raise UsageError(
                f"checkpoint {path} was trained on {saved} training samples, this run has {n} "
                f"(--val-fraction {self.cfg.val_fraction}); {fix}"
            )
        if resume.offset > n:
            raise UsageError(
                f"checkpoint {path} stopped at sample {resume.offset} of its epoch, past the {n} "
                f"training samples of this run (--val-fraction {self.cfg.val_fraction}); {fix}"
            )

    def start(self) -> None:
        """Rank 0 continues the metrics log and writes run.json; MPI: rank 0's parameters and
        optimizer state become everyone's."""
        st = self.state
        if st.step < self.total_steps:  # a run with nothing to do changes no file
            self._open_run_files()
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
        if self.comm.size > 1:  # MPI: for naming stragglers
            self.stragglers.hosts = self.comm.gather_objects(socket.gethostname(), "host names")

    def _open_run_files(self) -> None:
        st = self.state
        self.console.continue_log()
        self.console.record(
            {"kind": "run", "time": time.time(), "step": st.step, "epoch": st.epoch,
             "run_id": self.run_id, "world_size": self.comm.size}
        )  # fmt: skip
        if self.rundir is not None:
            self.rundir.write_run_json(self.cfg.as_dict(), self.comm.size, st.step)
            self.status = StatusFile(
                self.cfg.checkpoint_dir, self.run_id, self.total_steps, self.comm.size
            )
            self.status.update(True, state="starting", step=st.step, epoch=st.epoch)
            self.comm.on_stall = lambda msg: self._set_status("failed", message=msg)

    def _set_status(
        self,
        state: str | None = None,
        message: str | None = None,
        force: bool = False,
        **kw: Any,
    ) -> None:
        """Rank 0: status.json (see distcnn.status), written at each step record, checkpoint,
        change of state and failure (unforced updates at most once a second)."""
        if self.status is None:
            return
        if message is not None:
            kw["last_failure"] = {
                "rank": self.comm.rank,
                "host": socket.gethostname(),
                "step": self.state.step,
                "message": message,
            }
        if state is not None:
            kw["state"] = state
        self.status.update(force or state is not None or message is not None, **kw)
        if self.status.error and not self._status_warned:
            self._status_warned = True
            self.console.warn(self.status.error + "; training goes on without a live status")

    # -- one step ---------------------------------------------------------------------------

    def step(self, batch: np.ndarray) -> tuple[float, float, bool, bool]:
        """One optimizer step on the global batch (indices into train).

        Returns (global mean loss, accuracy, stop: a rank got a signal, finite); when stop,
        self.interrupted says whether a rank's signal was SIGINT.
        finite is False when the summed loss or gradient holds a NaN or Inf: a non-finite value
        on any rank poisons the sum every rank receives, so every rank sees it, skips the update
        (parameters and velocity unchanged) and returns False — the same decision everywhere
        without an extra collective.
        """
        cfg, comm, red, P, model = self.cfg, self.comm, self.red, self.n_params, self.model
        n = len(batch)
        t = time.perf_counter()
        fwd0, bwd0, comm0 = model.seconds["forward"], model.seconds["backward"], comm.comm_seconds
        if self.slow:
            time.sleep(self.slow)
        micro = [batch[i : i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        if cfg.deterministic:
            self._deterministic_grads(micro, n, t)
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
                self._slots_dirty = True  # the copy brought back summed slots
            self._control_slots(red, t)
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
            self.opt.step(grads, self.lr_at(self.state.step), scale)
        self.phases.add("optimizer", t)
        self.interrupted = bool(red[P + 3] > 0)
        self.straggler_records = self.stragglers.window(
            self.state.step + 1, red[P + EXTRA : P + EXTRA + comm.size]
        )
        return float(red[P]) / n, float(red[P + 1]) / n, bool(red[P + 2] > 0), finite

    def _control_slots(self, buf: np.ndarray, t0: float) -> None:
        """This rank's slots after loss and correct, just before the step's collective: stop
        and interrupt flags, and its compute time at the end of a straggler window."""
        P, w = self.n_params, self.stragglers
        buf[P + 2] = 1.0 if self.stop_request.requested else 0.0
        buf[P + 3] = 1.0 if self.stop_request.interrupted else 0.0
        w.add(time.perf_counter() - t0)
        value = w.slot_value(self.state.step + 1)
        # only this rank's slot is ever non-zero going in; an in-place allreduce leaves every
        # rank's time in the buffer after a window step, so the next step clears the slots
        if buf is not self.red or self._slots_dirty:
            buf[P + EXTRA : P + EXTRA + self.comm.size] = 0.0
            self._slots_dirty = False
        if value:
            buf[P + EXTRA + self.comm.rank] = value
            self._slots_dirty = True

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

    def lr_at(self, step: int) -> float:
        """The learning rate of the step after `step` steps done."""
        cfg = self.cfg
        return learning_rate(cfg.lr_schedule, cfg.lr, step, self.schedule_steps, self.warmup_steps)

    def _maybe_inject_nan(self, buf: np.ndarray) -> None:
        """DISTCNN_FAULT=<rank>:<step>:nan: this rank's gradient turns NaN before the collective."""
        if self.fault == (self.state.step + 1, "nan"):
            buf[0] = np.nan

    def _deterministic_grads(self, micro: list[np.ndarray], n: int, t0: float) -> None:
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
        self._control_slots(mine, t0)  # this rank's flags and straggler slot, not summed above
        self._maybe_inject_nan(mine)
        comm.allgather(mine, self.gathered, f"deterministic allgather, step {self.state.step + 1}")
        parts = list(self.gathered)
        while len(parts) > 1:
            parts = [parts[i] + parts[i + 1] for i in range(0, len(parts), 2)]
        self.red[...] = parts[0]
        # flags and straggler slots: each set by one rank only, so a plain sum
        end = P + EXTRA + comm.size
        self.red[P + 2 : end] = self.gathered[:, P + 2 : end].sum(axis=0)

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
                "log_state": self.state.log.as_saved(),
                "optimizer_steps": self.opt.steps,
                "allreduce_scale": self.compressed.scale if self.compressed else 1.0,
                "train_size": len(self.train),
            },
            optimizer_state={
                state: {k: v.copy() for k, v in views.items()}
                for state, views in self.opt_views.items()
                if state != "velocity"
            },
            buffers={k: v.copy() for k, v in self.model.buffers.items()},
            run_id=self.run_id,
            inference=self.inference,
            dataset_fingerprint=self.fingerprint,
        )

    def save(self, best: bool = False) -> None:
        """MPI: save now (ckpt-<step>.h5 once per step, best.h5 if best); see Saver.save."""
        self.saver.save(self.state.step, best)

    def run(self) -> int:
        """Train to the step limit; the exit code (0 done or preempted, 130 interrupted by
        SIGINT, 1 too many bad steps)."""
        if self.cfg.profile:
            self.model.profile_layers()
        first_step = self.state.step
        try:
            code = self._train()
        except BaseException as e:  # rank 0's own failure (any rank's SaveFailed included)
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            self._set_status("failed", message=f"{type(e).__name__}: {msg}")
            raise
        finally:
            self.data.close()  # prefetch threads and file handles (shared memory: at exit)
        if self.cfg.profile:
            self.console.print(self.profile_report(self.state.step - first_step))
        return code

    def _train(self) -> int:
        st, n_train = self.state, len(self.train)
        self._announce()
        if st.step >= self.total_steps:
            self.console.print(f"already at step {st.step} of {self.total_steps}: nothing to do")
            return 0
        self.progress = Progress(
            self.console.on, self.total_steps, st.step, not self.cfg.no_progress
        )
        self.metrics.restart_clocks(st.step)
        self._set_status("running", step=st.step, epoch=st.epoch)
        order = epoch_order(self.cfg.seed, st.epoch, n_train)
        # the rows this rank will ask for, so a streaming split reads them ahead
        cfg, comm = self.cfg, self.comm
        self.train.prefetch(
            datamod.rank_plan(cfg.seed, n_train, cfg.batch_size, comm.size, comm.rank,
                              st.epoch, st.offset)
        )  # fmt: skip
        stop = False
        while st.step < self.total_steps and not stop:
            batch = order[st.offset : st.offset + self.step_batch]
            self._fault_before_step()
            loss, acc, stop, finite = self.step(batch)
            # A skipped step still counts (the step counter, the data position and the schedule
            # move on), so a bad batch is not retried forever and resuming stays exact.
            st.step, st.offset = st.step + 1, st.offset + len(batch)
            self.metrics.add(loss, acc, len(batch), finite)
            if self._too_many_bad_steps(finite):
                self.progress.close()
                self._set_status("failed", message=f"{self.bad_in_row} non-finite steps in a row")
                return 1
            last = st.step >= self.total_steps or stop
            self._report_stragglers()
            self._log_step(last)
            if st.offset >= n_train:
                self._end_of_epoch()
                order = epoch_order(self.cfg.seed, st.epoch, n_train)
            if self.saver.due(st.step, last):
                self.saver.checkpoint(st.step)  # MPI
        self.progress.close()
        self.saver.checkpoint(st.step)  # MPI: the final save
        return self._report_stop() if stop else self._final_test()

    # -- the loop's named steps -------------------------------------------------------------

    def _announce(self) -> None:
        cfg, comm, con = self.cfg, self.comm, self.console
        con.print(
            f"distcnn: {comm.size} rank(s), model {self.model.spec} ({self.n_params:,} params), "
            f"{len(self.train)} train images {self.train.image_shape}, global batch "
            f"{self.step_batch}"
            + (f" ({cfg.accum_steps} x {cfg.batch_size})" if cfg.accum_steps > 1 else "")
            + f", {self.steps_per_epoch} steps/epoch, {cfg.epochs} epochs"
        )
        if comm.size > 1:
            con.print(f"gradient allreduce: {comm.allreduce_path}")
        con.print(self.data.line)

    def _fault_before_step(self) -> None:
        """DISTCNN_FAULT (faults.py): raise, exit or hang on this rank before the step."""
        if self.fault and self.fault[0] == self.state.step + 1 and self.fault[1] != "nan":
            inject_fault(self.fault[1], self.state.step + 1, self.comm.rank)

    def _too_many_bad_steps(self, finite: bool) -> bool:
        if finite:
            self.bad_in_row = 0
            return False
        self.bad_in_row += 1
        return self._non_finite_step(self.bad_in_row)

    def _report_stragglers(self) -> None:
        """Rank 0: a warning and a metrics record per straggler (every rank has the same)."""
        for rec in self.straggler_records:
            rec = {"time": time.time(), "epoch": self.state.epoch, **rec}
            self.console.record(rec)
            if rec["windows"] == PERSIST:  # once per episode on the console
                self.progress.warn(f"warning: {describe_straggler(rec)}")

    def _log_step(self, last: bool) -> None:
        """The step record (every --log-every steps and at the last) and the progress line."""
        st = self.state
        rec = self.metrics.step_record(st.step, st.epoch, st.offset, last)
        if rec is not None:
            self.console.record(rec)
            self._set_status(  # at every record: the supervisor reads the step reached here
                force=True,
                step=st.step,
                epoch=rec["epoch"],
                loss=rec["loss"],
                accuracy=rec["accuracy"],
                images_per_sec=rec["images_per_sec"],
                eta_seconds=self.progress.eta(st.step),
            )
        self.progress.update(st.step, rec)

    def _report_stop(self) -> int:
        """The one line after a signal stopped the run: 0 preempted, 130 interrupted."""
        where = signals.describe(self.stop_request, self.interrupted)
        what, code = ("interrupted", 130) if self.interrupted else ("preempted", 0)
        path = self.saver.dir / ckpt.file_name(self.state.step)
        self.console.print(
            f"{what} ({where}): stopped at step {self.state.step}, checkpoint {path} saved; "
            f"exiting {code}"
        )
        self._set_status(what, step=self.state.step, eta_seconds=None)
        return code

    def _final_test(self) -> int:
        if self.test is None:
            self._set_status("done", step=self.state.step, eta_seconds=0.0)
            return 0
        st, m = self.state, self._evaluate(self.test)
        self.console.print(
            f"test: loss {m['loss']:.4f}  accuracy {m['accuracy']:.4f} ({m['samples']} images)"
        )
        self.console.record(
            {
                "kind": "test",
                "time": time.time(),
                "step": st.step,
                "epoch": st.epoch,
                "loss": m["loss"],
                "accuracy": m["accuracy"],
            }
        )
        self._set_status("done", step=st.step, eta_seconds=0.0, test_accuracy=m["accuracy"])
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

    def _end_of_epoch(self) -> None:
        """The epoch's one summary line and epoch record; validation and best.h5 if there is a
        validation split. The epoch's sums are restored from the checkpoint when the run
        resumed mid-epoch, so the record is the one an uninterrupted run writes."""
        cfg, st, prog = self.cfg, self.state, self.progress
        st.epoch, st.offset = st.epoch + 1, 0
        rec = self.metrics.epoch_record(st.step, st.epoch)
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
        self.metrics.new_epoch()

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
